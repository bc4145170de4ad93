"""A gallery of where a model looks: one row per photo (its caption's panels, in one overlay style), each row
titled with the caption and its attention measures (attention_measures.py), so that a figure cannot make a
flat gaze look sharp. The README's Flickr8k gallery is drawn with it:

    python -m tools.attention_gallery --checkpoint runs/flickr8k_lite/best.pt --out docs/gallery_flickr8k.png \
        --img ../shared/data/flickr8k/images/A.jpg ../shared/data/flickr8k/images/B.jpg --overlay paper
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from satkit.captioner import Caption, Captioner
from satkit.evaluation.attention_measures import word_measures
from satkit.figures import OVERLAY_STYLES, panel_grid
from satkit.infra.filesafety import atomic_write
from satkit.infra.runtime import run_cli

TITLE_HEIGHT = 22  # px: one line of PIL's built-in font (no font file needed)


def measures_line(result_caption: Caption) -> str:
    """`half-mass 14% of the image, peak 6.1x uniform, entropy 0.71 (medians over 9 words)`."""
    m = word_measures(result_caption.alphas)
    return (f"half-mass {np.median(m['half_mass_area']):.0%} of the image, peak {np.median(m['peak_x_uniform']):.1f}x "
            f"uniform, entropy {np.median(m['entropy']):.2f} (medians over {len(result_caption.words)} words)")


def gallery(captioner: Captioner, images: Sequence[str], overlay: str, beam_size: int, max_words: int
            ) -> Image.Image:
    """The rows stacked: per photo a title line, then the photo and its first `max_words` word panels."""
    rows = []
    for result in captioner(list(images), beam_size=beam_size):
        panels = Captioner.panels(result, overlay=overlay)[: max_words + 1]
        strip = panel_grid(panels, columns=len(panels))
        title = Image.new("RGB", (strip.width, TITLE_HEIGHT), "white")
        draw = ImageDraw.Draw(title)
        draw.text((6, 5), f"\"{result.best.text}\": {measures_line(result.best)}", fill="black")
        rows += [title, strip]
    width = max(row.width for row in rows)
    canvas = Image.new("RGB", (width, sum(row.height for row in rows)), "white")
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height
    return canvas


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--img", nargs="+", required=True, help="photos, one row each")
    parser.add_argument("--out", required=True, help="the gallery PNG")
    parser.add_argument("--overlay", choices=OVERLAY_STYLES, default="paper")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=8, help="word panels per row (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1600, help="the PNG's width in px (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show a traceback for every error")
    args = parser.parse_args(argv)

    def body() -> int:
        captioner = Captioner.from_checkpoint(args.checkpoint)
        figure = gallery(captioner, args.img, args.overlay, args.beam_size, args.max_words)
        if figure.width > args.width:
            figure = figure.resize((args.width, round(figure.height * args.width / figure.width)), Image.LANCZOS)
        atomic_write(args.out, lambda f: figure.save(f, format="PNG", optimize=True))
        print(f"wrote {args.out}")
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
