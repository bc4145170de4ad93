"""Figures: attention overlays (one list of panels feeds the PNG grid and the GIF, so they cannot
disagree) and the training curves."""
from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from satkit.evaluation.attention_measures import word_measures
from satkit.infra.filesafety import atomic_write
from satkit.infra.runtime import UserError

GIF_FRAME_MS = 800  # slow enough to read each word
GRID_COLUMNS = 5
PANEL_INCHES, TITLE_INCHES, PANEL_DPI = 2.6, 0.45, 100  # equal panels, so grid and GIF frames agree
OVERLAY_STYLES = ("highlight", "colormap", "paper")
HIGHLIGHT_FLOOR = 0.15  # brightness left where attention is zero: dark, yet the scene stays readable
SMOOTH_CELLS = 0.5  # Gaussian sigma of highlight and colormap, in grid cells
# The paper's figures (Xu et al.'s released code): alpha upsampled 16x from 14x14 with
# skimage's pyramid_expand(upscale=16, sigma=20), i.e. a Gaussian of 20/16 = 1.25 cells, drawn as a grey
# map (white = high) at opacity 0.8 over the image.
PAPER_SMOOTH_CELLS = 1.25
PAPER_VEIL = 0.8


# --------------------------------------------------------------------------------------------
# Attention figures
# --------------------------------------------------------------------------------------------
@dataclass
class AttentionMaps:
    """What the figures show for one image."""

    image: Image.Image  # RGB, S x S (what the model saw)
    words: list[str]  # T words of the caption
    alphas: torch.Tensor  # (T, g, g) alpha_t when emitting each word
    betas: torch.Tensor | None = None  # (T,) gate beta_t, shown in the titles; None without a gate
    stochastic: bool = False  # the variant samples one location s_t: outline the argmax cell


def smooth_attention(alpha: np.ndarray, size: tuple[int, int], sigma_cells: float = SMOOTH_CELLS) -> np.ndarray:
    """alpha_t (g, g) -> (H, W): bilinear upsampling, then a Gaussian `sigma_cells` grid cells wide."""
    from skimage.filters import gaussian
    from skimage.transform import resize

    up = resize(alpha.astype(np.float64), size, order=1, mode="edge", anti_aliasing=False)  # (H, W)
    sigma = sigma_cells * max(size) / max(alpha.shape)
    return gaussian(up, sigma=sigma, mode="nearest")


def attention_weights(alphas: np.ndarray, size: tuple[int, int], sigma_cells: float = SMOOTH_CELLS) -> np.ndarray:
    """alpha_t (T, g, g) -> (T, H, W) smoothed maps on ONE scale for the whole caption, in [0, 1].

    Dividing by the caption's largest value (not each step's own max) keeps a flat map flat: a step
    whose alpha is nearly uniform draws as a nearly even dimming, never as a strong hot-to-cold gradient.
    """
    heat = (np.stack([smooth_attention(alpha, size, sigma_cells) for alpha in alphas]) if len(alphas)
            else np.zeros((0, *size)))
    return heat / max(float(heat.max(initial=0.0)), 1e-12)


def overlay_weights(alphas: np.ndarray, size: tuple[int, int], overlay: str) -> np.ndarray:
    """alpha_t (T, g, g) -> (T, H, W) in [0, 1] on one scale, smoothed as `overlay` draws them: the paper's
    style with its own wider Gaussian. What render_panels and the browser page (satkit.serve) both draw."""
    return attention_weights(alphas, size, PAPER_SMOOTH_CELLS if overlay == "paper" else SMOOTH_CELLS)


def paper_overlay(image: np.ndarray, weight: np.ndarray, veil: float = PAPER_VEIL) -> np.ndarray:
    """The paper's figures: a grey map (white where weight is 1, black at 0) at opacity `veil` over the image.

    image: (H, W, 3) uint8; weight: (H, W) in [0, 1]. Returns (H, W, 3) uint8.
    """
    grey = 255.0 * np.clip(weight, 0.0, 1.0)[..., None]  # (H, W, 1)
    return np.rint((1.0 - veil) * image.astype(np.float64) + veil * grey).astype(np.uint8)


def attention_measures(alpha: np.ndarray) -> dict[str, float]:
    """How peaked alpha_t (g, g) is, in numbers a figure cannot exaggerate: `peak` (its largest weight),
    `x_uniform` (peak / (1/L): 1.0 is a flat map), `entropy` (H(alpha) / log L: 1 flat, 0 one cell) and
    `half_mass_area` (the share of cells holding half its mass), as eval.py measures them."""
    measures = word_measures(torch.as_tensor(np.asarray(alpha, dtype=np.float64))[None])
    return {"peak": float(np.max(alpha)), "x_uniform": float(measures["peak_x_uniform"][0]),
            "entropy": float(measures["entropy"][0]), "half_mass_area": float(measures["half_mass_area"][0])}


def highlight(image: np.ndarray, weight: np.ndarray, floor: float = HIGHLIGHT_FLOOR) -> np.ndarray:
    """The paper's style: keep the image's colours where weight is 1, dim toward `floor` brightness at 0.

    image: (H, W, 3) uint8; weight: (H, W) in [0, 1]. Returns (H, W, 3) uint8.
    """
    factor = floor + (1.0 - floor) * np.clip(weight, 0.0, 1.0)  # (H, W)
    return np.rint(image.astype(np.float64) * factor[..., None]).astype(np.uint8)


def step_title(t: int, word: str, alpha: np.ndarray, beta: float | None) -> str:
    """`3: dog (β=0.52)` over `peak 0.038 = 2.4x uniform`: a flat map says so in numbers."""
    measures = attention_measures(alpha)
    title = f"{t}: {word}" + (f" (β={beta:.2f})" if beta is not None else "")
    # The step number keeps consecutive frames distinct: PIL merges identical GIF frames.
    return f"{title}\npeak {measures['peak']:.2g} = {measures['x_uniform']:.1f}x uniform"


def render_panels(maps: AttentionMaps, overlay: str = "highlight") -> list[Image.Image]:
    """Panel 0 is the plain image; panel t (1..T) overlays alpha_t on it with word t as the title.

    overlay: "highlight" (the image's colours where alpha is high, dimmed elsewhere), "colormap"
    (jet over the image) or "paper" (the paper's figures: a wider Gaussian, a white veil where alpha is
    high). All panels of a caption share one scale (see `attention_weights`), the paper's style too,
    where the paper stretched each panel to its own range; the titles give each step's peak.
    Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
    headless and leaves an interactive session's backend alone. All panels have the same pixel size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if overlay not in OVERLAY_STYLES:
        raise UserError(f"overlay={overlay!r} is not one of {', '.join(OVERLAY_STYLES)}")
    image = np.asarray(maps.image)  # (H, W, 3)
    height, width = image.shape[:2]
    alphas = maps.alphas.detach().float().cpu().numpy()  # (T, g, g)
    weights = overlay_weights(alphas, (height, width), overlay)  # (T, H, W), one scale
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
            elif overlay == "paper":
                ax.imshow(paper_overlay(image, weights[t - 1]))
            else:
                ax.imshow(image)
                ax.imshow(weights[t - 1], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            beta = float(maps.betas[t - 1]) if maps.betas is not None else None
            title = step_title(t, maps.words[t - 1], alpha, beta)
            if maps.stochastic:
                ax.add_patch(argmax_cell(alpha, height, width))
        ax.set_title(title, fontsize=9)
        fig.canvas.draw()
        panels.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB"))
    return panels


def argmax_cell(alpha: np.ndarray, height: int, width: int) -> Any:
    """A white outline of alpha_t's (g, g) largest cell on an H x W image (a matplotlib Rectangle)."""
    from matplotlib.patches import Rectangle

    grid = alpha.shape[0]
    row, col = divmod(int(alpha.argmax()), grid)
    cell_h, cell_w = height / grid, width / grid
    return Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h, fill=False, edgecolor="white",
                     linewidth=2)


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
    """The grid as a writer for filesafety's atomic writers (the grid is drawn now, written later)."""
    grid = panel_grid(panels)
    return lambda f: grid.save(f, format="PNG")


def gif_writer(panels: Sequence[Image.Image], frame_ms: int = GIF_FRAME_MS) -> Callable[[BinaryIO], None]:
    """Each frame is reduced to 256 colours with PIL's fast octree first: PIL's default for GIFs (median
    cut) took ~3 s a GIF against ~0.03 s, measured on the report's shapes GIFs."""
    frames = [panel.quantize(colors=256, method=Image.Quantize.FASTOCTREE) for panel in panels]
    return lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms,
                                    loop=0)


# --------------------------------------------------------------------------------------------
# Display
# --------------------------------------------------------------------------------------------
_NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def display_available() -> bool:
    """Whether a window can open: a display on Linux and an interactive matplotlib backend."""
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


def logged_columns(rows: list[dict[str, str]], names: list[str]) -> list[str]:
    """The columns of `names` with a value in some row: a term the run does not use (the concept loss at
    weight 0) gets no empty legend entry."""
    return [name for name in names if any(row.get(name) for row in rows)]


def write_curves(metrics_csv: Path, out_png: Path) -> None:
    """Loss (or SCST's reward), val BLEU-4 and CIDEr, distinct captions and learning rate against epoch,
    redrawn after every epoch; matplotlib's Agg canvas directly, so no global backend is switched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]

    def column(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) else float("nan") for r in rows]

    train = [("SCST reward", ["train_reward", "train_baseline"])] if rows and "train_reward" in rows[0] else \
        [("train loss", ["train_loss", "train_ce", "train_ds", "train_concept"])]
    panels = [*train, ("val BLEU-4", ["val_BLEU-4"]), ("val CIDEr", ["val_CIDEr"]),
              ("val distinct captions", ["val_distinct_captions"]), ("learning rate", ["lr"])]
    fig = Figure(figsize=(4 * len(panels), 3.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for ax, (title, names) in zip(axes, panels):
        names = logged_columns(rows, names)
        for name in names:
            ax.plot(epochs, column(name), marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend()
    axes[-1].set_yscale("log")
    atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=90))
