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
import io
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from captioner import (
    DEFAULT_IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    Captioner,
    CaptionResult,
    collect_images,
    output_names,
)
from decoding import decode_args_parser, decode_options_from_args
from figures import OVERLAY_STYLES, display_available, show_grids
from filesafety import atomic_write_text
from runtime import UserError, one_line, run_cli

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
    show = args.show and display_available()
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
