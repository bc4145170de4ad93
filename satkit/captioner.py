"""Captioning with a trained model: the Python API and the work behind caption.py.

    from satkit.captioner import Captioner
    cap = Captioner.from_checkpoint("runs/shapes/best.pt")
    result = cap("photo.jpg", beam_size=3)[0]
    print(result.best.text)

    Captioner          a loaded model: images (paths or PIL) -> one CaptionResult per image
    CaptionOptions     image size, n-best and overlay: the bounds the API and caption.py's flags share
    collect_images     files, folders and glob patterns -> image paths, and the inputs that named nothing
    caption_files      image files -> figures in a folder, one outcome per file (bad files are skipped)
    caption_to_folder  caption.py's whole run: collect, caption, print, write --json/--csv
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch
from PIL import Image

from satkit.attention import is_stochastic
from satkit.config import ModelConfig
from satkit.data.dataset import load_image_bytes, load_image_tensor, normalize_image
from satkit.decoding import DecodeOptions, Hypothesis, decode_images
from satkit.figures import OVERLAY_STYLES, AttentionMaps, gif_writer, png_writer, render_panels
from satkit.infra.filesafety import atomic_write_all, atomic_write_text
from satkit.model import ShowAttendTell, load_model
from satkit.plugins import import_plugins
from satkit.infra.runtime import UserError, one_line, resolve_device
from satkit.data.text import decode_ids
from satkit.validation import check_fields, option

MAX_IMAGE_SIZE = 2048  # a larger S would only exhaust memory: the packed datasets use 96-256
DEFAULT_IMAGE_SIZE = 256  # when the checkpoint does not record the packed image size S
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CSV_COLUMNS = ("file", "rank", "caption", "score", "normalized_score", "finished", "attention_png", "attention_gif")

ImageInput = Union[str, os.PathLike, Image.Image]

_DEFAULTS = DecodeOptions()


@dataclass
class CaptionOptions:
    """Captioning choices beside decoding's (decoding.DecodeOptions), each bound declared once for
    Captioner's arguments and caption.py's flags of the same names."""

    image_size: int | None = option(None, min=1, max=MAX_IMAGE_SIZE)  # S x S the model sees; None: the checkpoint's
    n_best: int = option(1, min=1)  # captions kept per image, best first; at most the beam size
    overlay: str = option("highlight", choices=OVERLAY_STYLES)  # the figures' style (figures.render_panels)

    def check(self, beam_size: int | None = None, as_flags: bool = False) -> None:
        """Raise UserError naming the first bad value, as `config key` or, with as_flags, as `--key`.
        n_best is held to beam_size when that is given."""
        # image_size None leaves the size to the checkpoint: Captioner checks it once it is read.
        check_fields(self if self.image_size is not None else replace(self, image_size=1), as_flags)
        if beam_size is not None and self.n_best > beam_size:
            beam = "--beam-size" if as_flags else "beam_size"
            label = "--n-best" if as_flags else "config n_best"
            raise UserError(f"{label}={self.n_best} must be in 1..{beam} ({beam_size})")


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
    stochastic: bool = False  # the attention samples one location: the figures outline the argmax cell

    @property
    def best(self) -> Caption:
        return self.captions[0]


class Captioner:
    """A trained model ready to caption images: load once, call as often as needed.

    Every call decodes through `decoding.decode_images` with a `decoding.DecodeOptions`: the same
    path and options as eval.py and validation, so the captions cannot differ from theirs.
    """

    def __init__(self, model: ShowAttendTell, model_cfg: ModelConfig, word_map: dict[str, int], *,
                 image_size: int = DEFAULT_IMAGE_SIZE, device: str | torch.device = "cpu") -> None:
        CaptionOptions(image_size=image_size).check()
        self.device = resolve_device(str(device))
        self.model = model.to(self.device).eval()
        self.model_cfg = model_cfg
        self.word_map = word_map
        self.rev_word_map = {v: k for k, v in word_map.items()}
        self.image_size = image_size

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        image_size: int | None = None, imports: Sequence[str] = ()) -> Captioner:
        """Load a best.pt / last.pt written by train.py. image_size: S (default: the checkpoint's own);
        imports: modules to import first (a checkpoint trained with `imports:` needs them)."""
        import_plugins(imports)
        model, model_cfg, ckpt = load_model(path)
        size = image_size if image_size is not None else int(ckpt.get("image_size", DEFAULT_IMAGE_SIZE))
        return cls(model, model_cfg, ckpt["word_map"], image_size=size, device=device)

    def load(self, image: ImageInput) -> tuple[torch.Tensor, Image.Image]:
        """An image file or PIL image -> (normalised (3, S, S) tensor, S x S RGB image); UserError if unreadable."""
        return load_image_tensor(image, self.image_size)

    def load_bytes(self, data: bytes, name: str) -> tuple[torch.Tensor, Image.Image]:
        """`load` for an encoded image held in memory (an upload to satkit.serve): the same pixels and the
        same one-line UserErrors (`NAME: empty file`, truncated, not an image, PIL's decompression-bomb
        limit) as the same bytes read from a file, without writing them anywhere."""
        pixels = load_image_bytes(data, self.image_size, name)  # (3, S, S) uint8
        return normalize_image(torch.from_numpy(pixels)), Image.fromarray(pixels.transpose(1, 2, 0))

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        beam_size: int = _DEFAULTS.beam_size,
        n_best: int = 1,
        max_len: int = _DEFAULTS.max_len,
        length_penalty: float = _DEFAULTS.length_penalty,
        hard_decode: str = _DEFAULTS.hard_decode,
        batch_size: int = _DEFAULTS.batch_size,
        sample: bool = _DEFAULTS.sample,
        temperature: float = _DEFAULTS.temperature,
        top_k: int = _DEFAULTS.top_k,
        top_p: float = _DEFAULTS.top_p,
        block_trigrams: bool = _DEFAULTS.block_trigrams,
    ) -> list[CaptionResult]:
        """Caption image files and/or PIL images (one, or a list mixing both): one CaptionResult each,
        in order, with its n_best (1..beam_size) captions best first. With sample=True the captions are
        beam_size draws from the model (temperature, top_k, top_p shape the draws; see decoding.beam_search).

        Images are read one batch at a time, so a long list need not fit in memory. An unreadable
        file raises UserError naming it.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        opts = DecodeOptions(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                             hard_decode=hard_decode, batch_size=batch_size, sample=sample, temperature=temperature,
                             top_k=top_k, top_p=top_p, block_trigrams=block_trigrams)
        check_fields(opts)
        results = []
        for first in range(0, len(images), batch_size):
            chunk = images[first : first + batch_size]
            loaded = [(_source_name(image, first + i), *self.load(image)) for i, image in enumerate(chunk)]
            results += self.caption_loaded(loaded, opts, n_best)
        return results

    def caption_loaded(self, loaded: Sequence[tuple[str, torch.Tensor, Image.Image]], opts: DecodeOptions,
                       n_best: int = 1) -> list[CaptionResult]:
        """Caption images already read by `load`: (source, tensor, image) each. Lets a caller read files
        itself and skip the bad ones (see `caption_files`); `__call__` is the convenient form."""
        CaptionOptions(n_best=n_best).check(opts.beam_size)
        if not loaded:
            return []
        tensors = torch.stack([tensor for _, tensor, _ in loaded])  # (b, 3, S, S)
        hypotheses = decode_images(self.model, tensors, self.word_map, opts, device=self.device, n_best=n_best)
        stochastic = is_stochastic(self.model_cfg.attention)
        return [CaptionResult(source, display, [self._caption(h) for h in hyps], stochastic)
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
        maps = AttentionMaps(result.image, chosen.words, chosen.alphas, chosen.betas, result.stochastic)
        return render_panels(maps, overlay=overlay)

    @classmethod
    def save_figures(cls, result: CaptionResult, prefix: str | os.PathLike, rank: int = 0,
                     overlay: str = "highlight") -> tuple[Path, Path]:
        """Write PREFIX_attention.png and PREFIX_attention.gif for one caption; returns their paths."""
        panels = cls.panels(result, rank, overlay)
        png, gif = Path(f"{prefix}_attention.png"), Path(f"{prefix}_attention.gif")
        # Both or neither: a failure (a full disk) leaves the previous pair, never a new PNG without its GIF.
        atomic_write_all([(png, png_writer(panels)), (gif, gif_writer(panels))])
        return png, gif


def _source_name(image: ImageInput, position: int) -> str:
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"<image {position}>"
    return os.fspath(image)


def caption_words(hyp: Hypothesis, rev_word_map: dict[int, str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The caption's words with their alpha_t (T, g, g) and beta_t (T,): the words `decode_ids` prints.

    <start>/<pad> tokens (which an untrained model may emit) are dropped together with their maps, so the
    panels are exactly the printed caption's words.
    """
    keep = [t for t, token in enumerate(hyp.tokens) if rev_word_map.get(token, "<unk>") not in ("<start>", "<pad>")]
    words = [rev_word_map.get(hyp.tokens[t], "<unk>") for t in keep]
    return words, hyp.alphas[keep], hyp.betas[keep]


# --------------------------------------------------------------------------------------------
# Inputs: paths, patterns and folders -> image files (dataset.load_image_tensor reads each one)
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


# --------------------------------------------------------------------------------------------
# Files -> figures in a folder, skipping bad files (caption.py's work)
# --------------------------------------------------------------------------------------------
@dataclass
class Captioned:
    """An image file captioned by `caption_files`, with the figures of its best caption."""

    result: CaptionResult
    png: Path
    gif: Path


@dataclass
class Skipped:
    """An image file `caption_files` could not caption."""

    source: str
    message: str  # one line naming the file and the reason, e.g. `a.jpg: file not found`


def caption_files(captioner: Captioner, paths: Sequence[Path], out_dir: Path, decode: DecodeOptions,
                  n_best: int = 1, overlay: str = "highlight") -> Iterator[Captioned | Skipped]:
    """Caption image files into the existing folder out_dir, as NAME_attention.{png,gif} (NAME from
    `output_names`), yielding one outcome per file as soon as it is known, so a caller can report as it goes.

    Files are read and decoded one batch at a time (a folder of photos need not fit in memory): a file
    that cannot be read is Skipped when its batch is read, before that batch's captions. One whose
    figures cannot be written is Skipped too; neither ends the run.
    """
    named = list(zip(paths, output_names(paths)))
    for first in range(0, len(named), decode.batch_size):
        loaded, names = [], []
        for path, name in named[first : first + decode.batch_size]:
            try:
                loaded.append((str(path), *captioner.load(path)))
            except UserError as e:
                yield Skipped(str(path), str(e))
                continue
            names.append(name)
        for result, name in zip(captioner.caption_loaded(loaded, decode, n_best), names):
            try:
                png, gif = captioner.save_figures(result, out_dir / name, overlay=overlay)
            except OSError as e:
                yield Skipped(result.source, f"{result.source}: cannot write its figures to {out_dir} ({one_line(e)})")
                continue
            yield Captioned(result, png, gif)


@dataclass
class CaptionRun:
    """What `caption_to_folder` did: the images captioned and every input skipped, in order."""

    captioned: list[Captioned]
    skipped: list[Skipped]


def caption_to_folder(inputs: Sequence[str], checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                      decode: DecodeOptions, options: CaptionOptions, *, device: str = "auto",
                      json_path: str | os.PathLike | None = None,
                      csv_path: str | os.PathLike | None = None, imports: Sequence[str] = ()) -> CaptionRun:
    """caption.py's run: caption the images that `inputs` (files, folders, patterns) name into out_dir.

    Prints `path: caption` per image (then, with n_best > 1, the others indented with their
    log-probabilities) as it goes, and `error: ...` on stderr for each bad input, which is skipped.
    Writes the --json / --csv records when any image was captioned. UserError when nothing can be tried.
    """
    options.check(decode.beam_size)
    paths, bad = collect_images(inputs)
    skipped = [Skipped(source, f"{source}: {reason}") for source, reason in bad]
    for skip in skipped:
        print(f"error: {skip.message}", file=sys.stderr)
    if not paths:
        raise UserError("no images to caption")
    captioner = Captioner.from_checkpoint(checkpoint, device=device, image_size=options.image_size, imports=imports)
    out_dir = _make_folder(Path(out_dir))
    captioned = []
    for outcome in caption_files(captioner, paths, out_dir, decode, options.n_best, options.overlay):
        if isinstance(outcome, Skipped):
            print(f"error: {outcome.message}", file=sys.stderr)
            skipped.append(outcome)
        else:
            print_captions(outcome.result)
            captioned.append(outcome)
    if captioned:
        records = [result_record(c.result, c.png, c.gif) for c in captioned]
        if json_path:
            atomic_write_text(json_path, records_json(records, checkpoint, decode, options))
        if csv_path:
            atomic_write_text(csv_path, records_csv(records))
    if skipped:
        print(f"skipped {len(skipped)} bad image(s)", file=sys.stderr)
    if captioned:
        print(f"figures: {out_dir}/")
    return CaptionRun(captioned, skipped)


def _make_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the output folder ({one_line(e)})") from None
    return folder


def print_captions(result: CaptionResult) -> None:
    """`path: caption`, then each other kept caption indented with its log-probability (flushed: a pipe
    such as `| head -1` sees each image as it is done)."""
    print(f"{result.source}: {result.best.text}", flush=True)
    for rank, other in enumerate(result.captions[1:], start=2):
        print(f"    {rank}. {other.text}  (log p = {other.score:.2f})", flush=True)


# --------------------------------------------------------------------------------------------
# Records: --json and --csv
# --------------------------------------------------------------------------------------------
def result_record(result: CaptionResult, png: Path, gif: Path) -> dict[str, Any]:
    """One image's entry in --json: the best caption up front, every kept caption under n_best."""
    best = result.best
    return {
        "file": result.source,
        "caption": best.text,
        "score": best.score,
        "normalized_score": best.normalized_score,
        "finished": best.finished,
        "n_best": [{"rank": rank, "caption": c.text, "score": c.score, "normalized_score": c.normalized_score,
                    "finished": c.finished} for rank, c in enumerate(result.captions, start=1)],
        "attention_png": str(png),
        "attention_gif": str(gif),
    }


def records_json(records: Sequence[dict[str, Any]], checkpoint: str | os.PathLike, decode: DecodeOptions,
                 options: CaptionOptions) -> str:
    """--json: the run's settings (so the captions can be reproduced), then one record per image."""
    payload = {"checkpoint": str(checkpoint), "decode": {**decode.record(), "n_best": options.n_best},
               "overlay": options.overlay, "images": list(records)}
    return json.dumps(payload, indent=2) + "\n"


def records_csv(records: Sequence[dict[str, Any]]) -> str:
    """--csv: one row per image and rank (the figures show rank 1)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        for entry in record["n_best"]:
            writer.writerow({"file": record["file"], "attention_png": record["attention_png"],
                             "attention_gif": record["attention_gif"], **entry})
    return buffer.getvalue()
