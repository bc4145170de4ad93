"""Caption images with a trained checkpoint and show where the model looked for each word.

From Python (this script is a thin layer over captioner.py):

    from satkit.captioner import Captioner
    captioner = Captioner.from_checkpoint("runs/shapes/best.pt", device="cpu")
    results = captioner(["photo.jpg", pil_image], beam_size=5, n_best=3)
    results[0].best.text, results[0].best.score       # the caption and its log-probability
    results[0].captions[1].alphas                     # (T, g, g) attention of the second best caption
    captioner.save_figures(results[0], "out/photo")   # out/photo_attention.png and .gif

From the shell:

    python caption.py --img photo.jpg --checkpoint runs/shapes/best.pt
    python caption.py --img photos/ "more/*.png" --checkpoint best.pt --beam-size 5 --out-dir captions --show
    python caption.py --img photos/ --checkpoint best.pt --n-best 3 --json captions.json --csv captions.csv
    python caption.py --img photo.jpg --checkpoint best.pt --sample --beam-size 5 --n-best 5 --top-p 0.9

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
toward black; --overlay paper draws the paper's figures (alpha smoothed by a wider Gaussian, a white veil
where attention is high, black elsewhere); --overlay colormap tints the image with a jet colormap.
--json FILE / --csv FILE also write, per image, the file, its caption and score, the n-best list with
scores and the figure paths (CSV: one row per image and rank).

NAME is the file's stem (`_1`, `_2`, ... appended when two inputs share a stem). Bad inputs are reported
as `error: PATH: reason` and skipped; the exit code is 0 when at least one image was captioned.
"""
from __future__ import annotations

import omp_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)

import argparse
import sys
from typing import Sequence

from satkit.captioner import DEFAULT_IMAGE_SIZE, CaptionOptions, caption_to_folder
from satkit.decoding import decode_args_parser, decode_options_from_args
from satkit.figures import OVERLAY_STYLES, display_available, show_grids
from satkit.plugins import import_args_parser
from satkit.infra.runtime import run_cli


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help,
        parents=[decode_args_parser(), import_args_parser()],
    )
    parser.add_argument("--img", nargs="+", required=True, metavar="PATH",
                        help="image files, folders (non-recursive) or glob patterns (quote them)")
    parser.add_argument("--checkpoint", required=True, help="a best.pt / last.pt written by train.py")
    parser.add_argument("--out-dir", default="captions", help="where the PNG/GIF go (default: captions/)")
    parser.add_argument("--show", action="store_true", help="also open the grids in a window (needs a display)")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"resize to S x S (default: the checkpoint's image_size, else {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--n-best", type=int, default=1, metavar="K",
                        help="keep the K best captions of the beam (or samples) per image, 1..--beam-size "
                             "(default: 1)")
    parser.add_argument("--overlay", choices=OVERLAY_STYLES, default="highlight",
                        help="highlight: the image's colours where attention is high, the rest dimmed; paper: "
                             "the paper's figures (a white veil where attention is high); colormap: a jet tint "
                             "(default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results (n-best, scores, figures) as JSON")
    parser.add_argument("--csv", metavar="FILE", help="also write them as CSV, one row per image and rank")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_cli(lambda: caption(args), args.debug)


def caption(args: argparse.Namespace) -> int:
    """Exit code 0 when at least one image was captioned, 1 when none was."""
    decode = decode_options_from_args(args)
    options = CaptionOptions(image_size=args.image_size, n_best=args.n_best, overlay=args.overlay)
    options.check(decode.beam_size, as_flags=True)
    show = args.show and display_available()
    if args.show and not show:
        print("warning: --show: no display available; the figures are only saved", file=sys.stderr)
    run = caption_to_folder(args.img, args.checkpoint, args.out_dir, decode, options, device=args.device,
                            json_path=args.json, csv_path=args.csv, imports=args.imports)
    if show and run.captioned:
        show_grids([(f"{c.result.source}: {c.result.best.text}", c.png) for c in run.captioned])
    return 0 if run.captioned else 1


if __name__ == "__main__":
    sys.exit(main())
