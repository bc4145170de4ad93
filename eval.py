"""Score a checkpoint on a packed split: BLEU-1..4, METEOR, ROUGE-L, CIDEr (coco-caption) and any other
registered metric (scoring.py), and on the built-in shapes dataset, attention fidelity.

    python eval.py --checkpoint runs/shapes/best.pt --data-folder data/shapes --split test --beam-size 5

Each image is decoded once and scored against all its original reference captions (the stored raw
texts, PTB-tokenised as coco-caption does), never against references re-decoded through the word map.
The work is evaluation.evaluate; this file only reads the flags.
"""
from __future__ import annotations

import omp_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)

import argparse
import sys
from typing import Sequence

from satkit.decoding import decode_args_parser, decode_options_from_args
from satkit.evaluation.evaluation import CONTROLS, FEATURE_CACHE_MODES, SPLITS, EvalOptions, evaluate
from satkit.plugins import import_args_parser, import_plugins
from satkit.infra.runtime import UserError, run_cli
from satkit.evaluation.scoring import METRICS, default_metrics


def get_args_parser() -> argparse.ArgumentParser:
    defaults = EvalOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[decode_args_parser(), import_args_parser()])
    parser.add_argument("--checkpoint", required=True, help="a best.pt / last.pt written by train.py")
    parser.add_argument("--data-folder", required=True, help="folder written by create_input_files.py")
    parser.add_argument("--split", default=defaults.split, choices=SPLITS, help="default: %(default)s")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME",
                        help=f"also score with metric NAME (repeatable; one of {', '.join(METRICS)}); "
                             f"always scored: {', '.join(default_metrics())}")
    parser.add_argument("--metrics-only", action="store_true",
                        help="score only the metrics named with --metric, not the defaults (where METEOR's java or "
                             "ROUGE-L's module is missing, e.g. --metrics-only --metric BLEU --metric CIDEr)")
    parser.add_argument("--bleu", choices=("coco", "nltk"), default="coco",
                        help="coco: coco-caption metrics only; nltk: also NLTK corpus BLEU as the tutorial "
                             "(= --metric NLTK-BLEU)")
    parser.add_argument("--spice", action="store_true",
                        help="also SPICE (= --metric SPICE; needs java and Stanford CoreNLP's jars, says what is "
                             "missing otherwise)")
    control_help = ("shuffled (default): also score the same captions against the references of a fixed random "
                    "permutation of the images, to show the model uses the image")
    parser.add_argument("--control", choices=CONTROLS, default=defaults.control, help=control_help)
    parser.add_argument("--out", help="results JSON (COCO format); metrics go to OUT with .metrics.json")
    parser.add_argument("--report", metavar="DIR",
                        help="write a static HTML page DIR/index.html: per image its caption, references, CIDEr, "
                             "BLEU-4 and attention, worst first")
    parser.add_argument("--report-limit", type=int, default=defaults.report_limit,
                        help="attention GIFs for this many (the worst) images in the report, each ~0.5 s and "
                             "~0.3 MB (default: %(default)s)")
    parser.add_argument("--attention-images", type=int, default=defaults.attention_images,
                        help="the deletion test of attention on this many images (0 = off; default: %(default)s); "
                             "the per-word attention measures cover every image")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers,
                        help="DataLoader workers (default: %(default)s)")
    parser.add_argument("--feature-cache", choices=FEATURE_CACHE_MODES, default=defaults.feature_cache,
                        help="decode from the split's cached encoder features (feature_cache.py): auto (default) "
                             "when a cache made by this checkpoint's encoder from this pack exists, on: build it if "
                             "missing or made from an earlier pack")
    return parser


def eval_options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The flags as EvalOptions: the default metrics (unless --metrics-only) plus those asked for, each once."""
    asked = [*args.metric, *(["NLTK-BLEU"] if args.bleu == "nltk" else []), *(["SPICE"] if args.spice else [])]
    if args.metrics_only and not asked:
        raise UserError("--metrics-only needs at least one --metric NAME")
    metrics = tuple(dict.fromkeys([*(() if args.metrics_only else default_metrics()), *asked]))
    return EvalOptions(split=args.split, metrics=metrics, control=args.control, report_limit=args.report_limit,
                       attention_images=args.attention_images, num_workers=args.num_workers,
                       feature_cache=args.feature_cache)  # evaluate checks them


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        import_plugins(args.imports)  # before the metric names are read
        decode = decode_options_from_args(args)
        evaluate(args.checkpoint, args.data_folder, eval_options_from_args(args), decode, out=args.out,
                 report=args.report, device=args.device)
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
