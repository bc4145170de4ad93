"""The Python API: `Captioner.from_checkpoint(path)(images)` -> one CaptionResult per image.

    from captioner import Captioner
    cap = Captioner.from_checkpoint("runs/shapes/best.pt")
    result = cap("photo.jpg", beam_size=3)[0]
    print(result.best.text)"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image

from attention import is_stochastic
from config import ModelConfig, check_fields
from datasets import load_image_tensor
from decoding import DecodeOptions, Hypothesis, decode_images
from figures import AttentionMaps, gif_writer, png_writer, render_panels
from filesafety import atomic_write_all
from models import ShowAttendTell, load_model
from runtime import UserError, resolve_device
from text import decode_ids

MAX_IMAGE_SIZE = 2048  # a larger S would only exhaust memory: the packed datasets use 96-256


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


DEFAULT_IMAGE_SIZE = 256  # when the checkpoint does not record the packed image size S


ImageInput = Union[str, os.PathLike, Image.Image]


_DEFAULTS = DecodeOptions()


# --------------------------------------------------------------------------------------------
# The Python API: Captioner.from_checkpoint(path)(images) -> one CaptionResult per image
# --------------------------------------------------------------------------------------------
@dataclass
class Caption:
    """One caption of an image (one hypothesis of the final beam)."""

    text: str  # the words joined by spaces
    words: list[str]  # the caption's words, one per attention map
    tokens: list[int]  # word ids as decoded, without <start> and <end>
    score: float  # log p(caption | image): summed word log-probabilities, <end> included when finished
    normalized_score: float  # score / length**length_penalty: what ranked the beam
    finished: bool  # False when max_len was reached before <end>
    alphas: torch.Tensor  # (T, g, g) alpha_t when emitting each word of `words`
    betas: torch.Tensor | None  # (T,) gate beta_t (mean over D for a vector gate); None without a gate


@dataclass
class CaptionResult:
    """What one image got: its n-best captions, best first, and the S x S image the model saw."""

    source: str  # the path given, or `<image N>` for a PIL image without a file name
    image: Image.Image = field(repr=False)  # RGB, S x S: what the overlays are drawn on
    captions: list[Caption]
    hard: bool = False  # hard attention: figures outline the argmax cell

    @property
    def best(self) -> Caption:
        return self.captions[0]


class Captioner:
    """A trained model ready to caption images: load once, call as often as needed.

    Every call decodes through `decoding.decode_images` (models.beam_search) with a
    `decoding.DecodeOptions`, the same path and options as eval.py and validation.
    """

    def __init__(self, model: ShowAttendTell, model_cfg: ModelConfig, word_map: dict[str, int], *,
                 image_size: int = DEFAULT_IMAGE_SIZE, device: str | torch.device = "cpu") -> None:
        if not 1 <= image_size <= MAX_IMAGE_SIZE:
            raise UserError(f"image_size={image_size} must be in 1..{MAX_IMAGE_SIZE} (the model sees S x S pixels)")
        self.device = resolve_device(str(device))
        self.model = model.to(self.device).eval()
        self.model_cfg = model_cfg
        self.word_map = word_map
        self.rev_word_map = {v: k for k, v in word_map.items()}
        self.image_size = image_size

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        image_size: int | None = None) -> "Captioner":
        """Load a best.pt / last.pt written by train.py. image_size: S (default: the checkpoint's own)."""
        model, model_cfg, ckpt = load_model(path)
        size = image_size if image_size is not None else int(ckpt.get("image_size", DEFAULT_IMAGE_SIZE))
        return cls(model, model_cfg, ckpt["word_map"], image_size=size, device=device)

    def load(self, image: ImageInput) -> tuple[torch.Tensor, Image.Image]:
        """An image file or PIL image -> (normalised (3, S, S) tensor, S x S RGB image); UserError if unreadable."""
        return load_image_tensor(image, self.image_size)

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        beam_size: int = _DEFAULTS.beam_size,
        n_best: int = 1,
        max_len: int = _DEFAULTS.max_len,
        length_penalty: float = _DEFAULTS.length_penalty,
        hard_decode: str = _DEFAULTS.hard_decode,
        batch_size: int = _DEFAULTS.batch_size,
    ) -> list[CaptionResult]:
        """Caption image files and/or PIL images (one, or a list mixing both): one CaptionResult each,
        in order, with its n_best (1..beam_size) captions best first.

        Images are read one batch at a time, so a long list need not fit in memory. An unreadable
        file raises UserError naming it.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        opts = DecodeOptions(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                             hard_decode=hard_decode, batch_size=batch_size)
        check_fields(opts)
        results = []
        for first in range(0, len(images), batch_size):
            chunk = images[first : first + batch_size]
            loaded = [(_source_name(image, first + i), *self.load(image)) for i, image in enumerate(chunk)]
            results += self.caption_loaded(loaded, opts, n_best)
        return results

    def caption_loaded(self, loaded: Sequence[tuple[str, torch.Tensor, Image.Image]], opts: DecodeOptions,
                       n_best: int = 1) -> list[CaptionResult]:
        """Caption images already read by `load`: (source, tensor, image) each. The CLI uses this to
        skip bad files one by one; `__call__` is the convenient form."""
        check_n_best(n_best, opts.beam_size)
        if not loaded:
            return []
        tensors = torch.stack([tensor for _, tensor, _ in loaded])  # (b, 3, S, S)
        hypotheses = decode_images(self.model, tensors, self.word_map, opts, device=self.device, n_best=n_best)
        hard = is_stochastic(self.model_cfg.attention)
        return [CaptionResult(source, display, [self._caption(h) for h in hyps], hard)
                for (source, _, display), hyps in zip(loaded, hypotheses)]

    def _caption(self, hyp: Hypothesis) -> Caption:
        words, alphas, betas = caption_words(hyp, self.rev_word_map)
        return Caption(text=decode_ids(hyp.tokens, self.rev_word_map), words=words, tokens=hyp.tokens,
                       score=hyp.score, normalized_score=hyp.normalized_score, finished=hyp.finished,
                       alphas=alphas, betas=betas if self.model_cfg.gate != "none" else None)

    @staticmethod
    def panels(result: CaptionResult, rank: int = 0, overlay: str = "highlight") -> list[Image.Image]:
        """The figure panels of one caption (rank 0 = the best): the image, then one per word."""
        chosen = result.captions[rank]
        return render_panels(AttentionMaps(result.image, chosen.words, chosen.alphas, chosen.betas, result.hard),
                             overlay=overlay)

    @classmethod
    def save_figures(cls, result: CaptionResult, prefix: str | os.PathLike, rank: int = 0,
                     overlay: str = "highlight") -> tuple[Path, Path]:
        """Write PREFIX_attention.png and PREFIX_attention.gif for one caption; returns their paths."""
        panels = cls.panels(result, rank, overlay)
        png, gif = Path(f"{prefix}_attention.png"), Path(f"{prefix}_attention.gif")
        # Both or neither: a failure (a full disk) leaves the previous pair, never a new PNG without its GIF.
        atomic_write_all([(png, png_writer(panels)), (gif, gif_writer(panels))])
        return png, gif


def check_n_best(n_best: int, beam_size: int) -> None:
    if not 1 <= n_best <= beam_size:
        raise UserError(f"n_best={n_best} must be in 1..beam_size ({beam_size}): the beam holds beam_size captions")


def _source_name(image: ImageInput, position: int) -> str:
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"<image {position}>"
    return os.fspath(image)


# --------------------------------------------------------------------------------------------
# Inputs: paths, patterns and folders -> image files (datasets.load_image_tensor reads each one)
# --------------------------------------------------------------------------------------------
def collect_images(patterns: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders and glob patterns into image paths, in the order given.

    Returns (paths, bad): `bad` holds (input, reason) for inputs that name nothing usable, so the caller
    can report each one and still caption the rest. A path listed twice is captioned once.
    """
    paths: list[Path] = []
    bad: list[tuple[str, str]] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                bad.append((pattern, f"folder has no image files ({', '.join(IMAGE_EXTENSIONS)})"))
        elif path.is_file():
            found = [path]
        elif glob.has_magic(pattern):
            found = [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_file()]
            if not found:
                bad.append((pattern, "pattern matches no files"))
        else:
            found = []
            bad.append((pattern, "no such file or folder"))
        paths.extend(found)
    seen: set[Path] = set()
    unique = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, bad


def caption_words(hyp: Hypothesis, rev_word_map: dict[int, str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The caption's words with their alpha_t (T, g, g) and beta_t (T,): the words `decode_ids` prints.

    <start>/<pad> tokens (which an untrained model may emit) are dropped together with their maps, so the
    panels are exactly the printed caption's words.
    """
    keep = [t for t, token in enumerate(hyp.tokens) if rev_word_map.get(token, "<unk>") not in ("<start>", "<pad>")]
    words = [rev_word_map.get(hyp.tokens[t], "<unk>") for t in keep]
    return words, hyp.alphas[keep], hyp.betas[keep]


def output_names(paths: Sequence[Path]) -> list[str]:
    """File stems, with `_1`, `_2`, ... appended to repeats (e.g. a/cat.jpg and b/cat.png)."""
    used: set[str] = set()
    names = []
    for path in paths:
        name, n = path.stem, 0
        while name.casefold() in used:  # casefold: case-insensitive file systems
            n += 1
            name = f"{path.stem}_{n}"
        used.add(name.casefold())
        names.append(name)
    return names
