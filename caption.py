"""Caption images with a trained checkpoint and show where the model looked for each word.

    python caption.py --img photo.jpg --checkpoint runs/shapes/best.pt
    python caption.py --img photos/ "more/*.png" --checkpoint best.pt --beam-size 5 --out-dir captions --show

PATH may be an image file (anything PIL opens, any size or mode), a folder (its image files, sorted, not
recursive) or a glob pattern. For each image this prints `path: caption` and writes into --out-dir:

    NAME_attention.png  a grid: the image, then one panel per word with alpha_t upsampled and smoothed
                        over the image (hard attention also outlines the argmax cell s_t)
    NAME_attention.gif  the same panels animated: frame 0 is the plain image, then one frame per word,
                        so frames = words + 1; 800 ms per frame, looping forever

NAME is the file's stem (`_1`, `_2`, ... appended when two inputs share a stem). Bad inputs are reported
as `error: PATH: reason` and skipped; the exit code is 0 when at least one image was captioned.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from datasets import load_image_tensor
from decoding import decode_args_parser, decode_images, decode_options_from_args
from models import Hypothesis, load_model
from utils import UserError, atomic_write, decode_ids, one_line, resolve_device, run_cli

MAX_IMAGE_SIZE = 2048  # a larger S would only exhaust memory: the packed datasets use 96-256

__all__ = [
    "IMAGE_EXTENSIONS",
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
PANEL_INCHES, PANEL_DPI = 2.6, 100  # every panel has the same pixel size, so grid and GIF frames agree


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


def render_panels(maps: AttentionMaps) -> list[Image.Image]:
    """Panel 0 is the plain image; panel t (1..T) overlays alpha_t on it with word t as the title.

    Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
    headless and leaves an interactive session's backend alone. All panels have the same pixel size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    image = np.asarray(maps.image)  # (H, W, 3)
    height, width = image.shape[:2]
    alphas = maps.alphas.detach().float().cpu().numpy()  # (T, g, g)
    panels = []
    for t in range(len(maps.words) + 1):
        fig = Figure(figsize=(PANEL_INCHES, PANEL_INCHES + 0.3), dpi=PANEL_DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 * PANEL_INCHES / (PANEL_INCHES + 0.3)))
        ax.imshow(image)
        ax.set_axis_off()
        if t == 0:
            title = "image"
        else:
            alpha = alphas[t - 1]  # (g, g)
            heat = smooth_attention(alpha, (height, width))
            ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=max(float(heat.max()), 1e-12))
            # The step number keeps consecutive frames distinct: PIL merges identical GIF frames.
            title = f"{t}: {maps.words[t - 1]}"
            if maps.betas is not None:
                title += f" (β={float(maps.betas[t - 1]):.2f})"
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
    grid = panel_grid(panels)
    atomic_write(path, lambda f: grid.save(f, format="PNG"))


def save_attention_gif(path: str | Path, panels: Sequence[Image.Image], frame_ms: int = GIF_FRAME_MS) -> None:
    """The panels as an animated GIF (one frame each, `frame_ms` per frame, looping forever), atomically."""
    first, rest = panels[0], list(panels[1:])
    atomic_write(
        path, lambda f: first.save(f, format="GIF", save_all=True, append_images=rest, duration=frame_ms, loop=0)
    )


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_cli(lambda: caption(args), args.debug)


def caption(args: argparse.Namespace) -> int:
    """The CLI's work: bad images are reported one line each and skipped; exit 1 only when none worked."""
    opts = decode_options_from_args(args)
    if args.image_size is not None and not 1 <= args.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size={args.image_size} must be in 1..{MAX_IMAGE_SIZE} (the model sees S x S pixels)")
    paths, bad = collect_images(args.img)
    for source, reason in bad:
        print(f"error: {source}: {reason}", file=sys.stderr)
    if not paths:
        raise UserError("no images to caption")
    model, model_cfg, ckpt = load_model(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    image_size = args.image_size or int(ckpt.get("image_size", DEFAULT_IMAGE_SIZE))
    word_map = ckpt["word_map"]
    rev_word_map = {v: k for k, v in word_map.items()}
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the output folder ({one_line(e)})") from None
    show = args.show and _display_available()
    if args.show and not show:
        print("warning: --show: no display available; the figures are only saved", file=sys.stderr)

    captioned: list[tuple[str, Path]] = []
    named = list(zip(paths, output_names(paths)))
    for first in range(0, len(named), opts.batch_size):
        chunk = named[first : first + opts.batch_size]
        loaded = []
        for path, name in chunk:  # load one batch at a time: a folder of photos need not fit in memory
            try:
                tensor, display = load_image_tensor(path, image_size)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                bad.append((str(path), str(e)))
                continue
            loaded.append((path, name, tensor, display))
        if not loaded:
            continue
        images = torch.stack([tensor for _, _, tensor, _ in loaded])  # (b, 3, S, S)
        hypotheses = decode_images(model, images, word_map, opts, device=device)
        for (path, name, _, display), hyp in zip(loaded, hypotheses):
            words, alphas, betas = caption_words(hyp, rev_word_map)
            maps = AttentionMaps(display, words, alphas, betas if model_cfg.gate != "none" else None,
                                 model_cfg.attention == "hard")
            panels = render_panels(maps)
            png, gif = out_dir / f"{name}_attention.png", out_dir / f"{name}_attention.gif"
            # Both figures are staged before either is renamed: a failure (a full disk) leaves the previous
            # run's pair as it was, and never a new PNG without its GIF.
            staged = [(out_dir / f".{final.name}.{os.getpid()}.staged", final) for final in (png, gif)]
            try:
                save_attention_png(staged[0][0], panels)
                save_attention_gif(staged[1][0], panels)
                for tmp, final in staged:
                    os.replace(tmp, final)
            except OSError as e:
                for tmp, _ in staged:
                    tmp.unlink(missing_ok=True)
                print(f"error: {path}: cannot write its figures to {out_dir} ({one_line(e)})", file=sys.stderr)
                bad.append((str(path), "cannot write figures"))
                continue
            caption_text = decode_ids(hyp.tokens, rev_word_map)
            print(f"{path}: {caption_text}", flush=True)
            captioned.append((f"{path}: {caption_text}", png))

    if bad:
        print(f"skipped {len(bad)} bad image(s)", file=sys.stderr)
    if captioned:
        print(f"figures: {out_dir}/")
    if show and captioned:
        show_grids(captioned)
    return 0 if captioned else 1


if __name__ == "__main__":
    sys.exit(main())
