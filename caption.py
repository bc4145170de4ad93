"""Caption images with a trained checkpoint and show where the model looked for each word.

From Python (the CLI below is a thin layer over this):

    from caption import Captioner
    captioner = Captioner.from_checkpoint("runs/shapes/best.pt", device="cpu")
    results = captioner(["photo.jpg", pil_image], beam_size=5, n_best=3)
    results[0].best.text, results[0].best.score       # the caption and its log-probability
    results[0].captions[1].alphas                     # (T, g, g) attention of the second best caption
    captioner.save_figures(results[0], "out/photo")   # out/photo_attention.png and .gif

From the shell:

    python caption.py --img photo.jpg --checkpoint runs/shapes/best.pt
    python caption.py --img photos/ "more/*.png" --checkpoint best.pt --beam-size 5 --out-dir captions --show
    python caption.py --img photos/ --checkpoint best.pt --n-best 3 --json captions.json --csv captions.csv

PATH may be an image file (anything PIL opens, any size or mode), a folder (its image files, sorted, not
recursive) or a glob pattern. For each image this prints `path: caption` (with --n-best K, the other
K-1 captions follow, indented, with their log-probabilities) and writes into --out-dir:

    NAME_attention.png  a grid: the image, then one panel per word of the best caption with alpha_t
                        upsampled and smoothed over the image (hard attention also outlines the argmax
                        cell s_t); every panel of a caption is drawn on one scale, and its title gives
                        the step's peak alpha as a multiple of the uniform 1/L
    NAME_attention.gif  the same panels animated: frame 0 is the plain image, then one frame per word,
                        so frames = words + 1; 800 ms per frame, looping forever

--overlay highlight (default) keeps the image's own colours where attention is high and dims the rest
toward black, as the paper's figures do; --overlay colormap tints the image with a jet colormap.
--json FILE / --csv FILE also write, per image, the file, its caption and score, the n-best list with
scores and the figure paths (CSV: one row per image and rank).

NAME is the file's stem (`_1`, `_2`, ... appended when two inputs share a stem). Bad inputs are reported
as `error: PATH: reason` and skipped; the exit code is 0 when at least one image was captioned.
"""
from __future__ import annotations

import omp_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)

import argparse
import csv
import glob
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from datasets import load_image_tensor
from decoding import DecodeOptions, decode_args_parser, decode_images, decode_options_from_args
from models import Hypothesis, ShowAttendTell, load_model
from utils import ModelConfig, UserError, atomic_write, atomic_write_all, atomic_write_text, check_fields, \
    decode_ids, one_line, resolve_device, run_cli

MAX_IMAGE_SIZE = 2048  # a larger S would only exhaust memory: the packed datasets use 96-256

__all__ = [
    "Caption",
    "CaptionResult",
    "Captioner",
    "IMAGE_EXTENSIONS",
    "OVERLAY_STYLES",
    "collect_images",
    "caption_words",
    "render_panels",
    "save_attention_png",
    "save_attention_gif",
    "get_args_parser",
    "main",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_IMAGE_SIZE = 256  # when the checkpoint does not record the packed image size S
GIF_FRAME_MS = 800  # slow enough to read each word
GRID_COLUMNS = 5
PANEL_INCHES, TITLE_INCHES, PANEL_DPI = 2.6, 0.45, 100  # equal panels, so grid and GIF frames agree
OVERLAY_STYLES = ("highlight", "colormap")
HIGHLIGHT_FLOOR = 0.15  # brightness left where attention is zero: dark, yet the scene stays readable

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
        hard = self.model_cfg.attention == "hard"
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


# --------------------------------------------------------------------------------------------
# Attention figures: one list of panels feeds both the PNG grid and the GIF, so they cannot disagree
# --------------------------------------------------------------------------------------------
@dataclass
class AttentionMaps:
    """What the figures show for one image."""

    image: Image.Image  # RGB, S x S (what the model saw)
    words: list[str]  # T words of the caption
    alphas: torch.Tensor  # (T, g, g) alpha_t when emitting each word
    betas: torch.Tensor | None = None  # (T,) gate beta_t, shown in the titles; None without a gate
    hard: bool = False  # hard attention: outline the argmax cell (the location s_t argmax decoding uses)


def smooth_attention(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """alpha_t (g, g) -> (H, W): bilinear upsampling, then a Gaussian about half a cell wide."""
    from skimage.filters import gaussian
    from skimage.transform import resize

    up = resize(alpha.astype(np.float64), size, order=1, mode="edge", anti_aliasing=False)  # (H, W)
    sigma = 0.5 * max(size) / max(alpha.shape)
    return gaussian(up, sigma=sigma, mode="nearest")


def attention_weights(alphas: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """alpha_t (T, g, g) -> (T, H, W) smoothed maps on ONE scale for the whole caption, in [0, 1].

    Dividing by the caption's largest value (not each step's own max) keeps a flat map flat: a step
    whose alpha is nearly uniform draws as a nearly even dimming, never as a strong hot-to-cold gradient.
    """
    heat = np.stack([smooth_attention(alpha, size) for alpha in alphas]) if len(alphas) else np.zeros((0, *size))
    return heat / max(float(heat.max(initial=0.0)), 1e-12)


def highlight(image: np.ndarray, weight: np.ndarray, floor: float = HIGHLIGHT_FLOOR) -> np.ndarray:
    """The paper's style: keep the image's colours where weight is 1, dim toward `floor` brightness at 0.

    image: (H, W, 3) uint8; weight: (H, W) in [0, 1]. Returns (H, W, 3) uint8.
    """
    factor = floor + (1.0 - floor) * np.clip(weight, 0.0, 1.0)  # (H, W)
    return np.rint(image.astype(np.float64) * factor[..., None]).astype(np.uint8)


def step_title(t: int, word: str, alpha: np.ndarray, beta: float | None) -> str:
    """`3: dog (β=0.52)` over `peak 0.038 = 2.4x uniform`: a flat map says so in numbers."""
    peak = float(alpha.max())
    title = f"{t}: {word}" + (f" (β={beta:.2f})" if beta is not None else "")
    # The step number keeps consecutive frames distinct: PIL merges identical GIF frames.
    return f"{title}\npeak {peak:.2g} = {peak * alpha.size:.1f}x uniform"


def render_panels(maps: AttentionMaps, overlay: str = "highlight") -> list[Image.Image]:
    """Panel 0 is the plain image; panel t (1..T) overlays alpha_t on it with word t as the title.

    overlay: "highlight" (the image's colours where alpha is high, dimmed elsewhere) or "colormap"
    (jet over the image). All panels of a caption share one scale (see `attention_weights`).
    Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
    headless and leaves an interactive session's backend alone. All panels have the same pixel size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if overlay not in OVERLAY_STYLES:
        raise UserError(f"overlay={overlay!r} is not one of {', '.join(OVERLAY_STYLES)}")
    image = np.asarray(maps.image)  # (H, W, 3)
    height, width = image.shape[:2]
    alphas = maps.alphas.detach().float().cpu().numpy()  # (T, g, g)
    weights = attention_weights(alphas, (height, width))  # (T, H, W), one scale
    panels = []
    for t in range(len(maps.words) + 1):
        fig = Figure(figsize=(PANEL_INCHES, PANEL_INCHES + TITLE_INCHES), dpi=PANEL_DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 * PANEL_INCHES / (PANEL_INCHES + TITLE_INCHES)))
        ax.set_axis_off()
        if t == 0:
            ax.imshow(image)
            title = "image"
        else:
            alpha = alphas[t - 1]  # (g, g)
            if overlay == "highlight":
                ax.imshow(highlight(image, weights[t - 1]))
            else:
                ax.imshow(image)
                ax.imshow(weights[t - 1], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            beta = float(maps.betas[t - 1]) if maps.betas is not None else None
            title = step_title(t, maps.words[t - 1], alpha, beta)
            if maps.hard:
                grid = alpha.shape[0]
                row, col = divmod(int(alpha.argmax()), grid)
                cell_h, cell_w = height / grid, width / grid
                ax.add_patch(Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h,
                                       fill=False, edgecolor="white", linewidth=2))
        ax.set_title(title, fontsize=9)
        fig.canvas.draw()
        panels.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB"))
    return panels


def panel_grid(panels: Sequence[Image.Image], columns: int = GRID_COLUMNS) -> Image.Image:
    """Tile equal-sized panels row by row on a white canvas."""
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    width, height = panels[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, panel in enumerate(panels):
        grid.paste(panel, ((i % columns) * width, (i // columns) * height))
    return grid


def save_attention_png(path: str | Path, panels: Sequence[Image.Image]) -> None:
    """The grid of all panels as one PNG, written atomically."""
    atomic_write(path, png_writer(panels))


def save_attention_gif(path: str | Path, panels: Sequence[Image.Image], frame_ms: int = GIF_FRAME_MS) -> None:
    """The panels as an animated GIF (one frame each, `frame_ms` per frame, looping forever), atomically."""
    atomic_write(path, gif_writer(panels, frame_ms))


def png_writer(panels: Sequence[Image.Image]) -> Callable[[BinaryIO], None]:
    grid = panel_grid(panels)
    return lambda f: grid.save(f, format="PNG")


def gif_writer(panels: Sequence[Image.Image], frame_ms: int = GIF_FRAME_MS) -> Callable[[BinaryIO], None]:
    """Each frame is reduced to 256 colours with PIL's fast octree first: PIL's default for GIFs (median
    cut) took ~3 s a GIF against ~0.03 s, measured on the report's shapes GIFs."""
    frames = [panel.quantize(colors=256, method=Image.Quantize.FASTOCTREE) for panel in panels]
    return lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms,
                                    loop=0)


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
# Display
# --------------------------------------------------------------------------------------------
_NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def _display_available() -> bool:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    import matplotlib

    return matplotlib.get_backend().lower() not in _NON_INTERACTIVE


def show_grids(grids: Sequence[tuple[str, Path]]) -> None:
    """Open one window per captioned image (blocks until they are closed)."""
    import matplotlib.pyplot as plt

    for caption, png in grids:
        with Image.open(png) as grid:
            pixels = np.asarray(grid.convert("RGB"))
        fig = plt.figure(figsize=(pixels.shape[1] / PANEL_DPI, pixels.shape[0] / PANEL_DPI + 0.4), dpi=PANEL_DPI)
        fig.suptitle(caption)
        ax = fig.add_axes((0, 0, 1, pixels.shape[0] / (pixels.shape[0] + 0.4 * PANEL_DPI)))
        ax.imshow(pixels)
        ax.set_axis_off()
    plt.show()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help,
        parents=[decode_args_parser()],
    )
    parser.add_argument("--img", nargs="+", required=True, metavar="PATH",
                        help="image files, folders (non-recursive) or glob patterns (quote them)")
    parser.add_argument("--checkpoint", required=True, help="a best.pt / last.pt written by train.py")
    parser.add_argument("--out-dir", default="captions", help="where the PNG/GIF go (default: captions/)")
    parser.add_argument("--show", action="store_true", help="also open the grids in a window (needs a display)")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"resize to S x S (default: the checkpoint's image_size, else {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--n-best", type=int, default=1, metavar="K",
                        help="keep the K best captions of the beam per image, 1..--beam-size (default: 1)")
    parser.add_argument("--overlay", choices=OVERLAY_STYLES, default="highlight",
                        help="highlight: the image's colours where attention is high, the rest dimmed (the "
                             "paper's style); colormap: a jet tint (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results (n-best, scores, figures) as JSON")
    parser.add_argument("--csv", metavar="FILE", help="also write them as CSV, one row per image and rank")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_cli(lambda: caption(args), args.debug)


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


CSV_COLUMNS = ("file", "rank", "caption", "score", "normalized_score", "finished", "attention_png", "attention_gif")


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


def caption(args: argparse.Namespace) -> int:
    """The CLI's work: bad images are reported one line each and skipped; exit 1 only when none worked."""
    opts = decode_options_from_args(args)
    if args.image_size is not None and not 1 <= args.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size={args.image_size} must be in 1..{MAX_IMAGE_SIZE} (the model sees S x S pixels)")
    if not 1 <= args.n_best <= opts.beam_size:
        raise UserError(f"--n-best={args.n_best} must be in 1..--beam-size ({opts.beam_size})")
    paths, bad = collect_images(args.img)
    for source, reason in bad:
        print(f"error: {source}: {reason}", file=sys.stderr)
    if not paths:
        raise UserError("no images to caption")
    captioner = Captioner.from_checkpoint(args.checkpoint, device=args.device, image_size=args.image_size)
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the output folder ({one_line(e)})") from None
    show = args.show and _display_available()
    if args.show and not show:
        print("warning: --show: no display available; the figures are only saved", file=sys.stderr)

    captioned: list[tuple[str, Path]] = []
    records: list[dict[str, Any]] = []
    named = list(zip(paths, output_names(paths)))
    for first in range(0, len(named), opts.batch_size):
        chunk = named[first : first + opts.batch_size]
        loaded, names = [], []
        for path, name in chunk:  # load one batch at a time: a folder of photos need not fit in memory
            try:
                loaded.append((str(path), *captioner.load(path)))
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                bad.append((str(path), str(e)))
                continue
            names.append(name)
        for result, name in zip(captioner.caption_loaded(loaded, opts, args.n_best), names):
            try:
                png, gif = captioner.save_figures(result, out_dir / name, overlay=args.overlay)
            except OSError as e:
                print(f"error: {result.source}: cannot write its figures to {out_dir} ({one_line(e)})",
                      file=sys.stderr)
                bad.append((result.source, "cannot write figures"))
                continue
            print(f"{result.source}: {result.best.text}", flush=True)
            for rank, other in enumerate(result.captions[1:], start=2):
                print(f"    {rank}. {other.text}  (log p = {other.score:.2f})", flush=True)
            captioned.append((f"{result.source}: {result.best.text}", png))
            records.append(result_record(result, png, gif))

    if records and args.json:
        payload = {"checkpoint": str(args.checkpoint), "decode": {**asdict(opts), "n_best": args.n_best},
                   "overlay": args.overlay, "images": records}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    if records and args.csv:
        atomic_write_text(args.csv, records_csv(records))
    if bad:
        print(f"skipped {len(bad)} bad image(s)", file=sys.stderr)
    if captioned:
        print(f"figures: {out_dir}/")
    if show and captioned:
        show_grids(captioned)
    return 0 if captioned else 1


if __name__ == "__main__":
    sys.exit(main())
