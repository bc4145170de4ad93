"""Score a checkpoint on a packed split: BLEU-1..4, METEOR, ROUGE-L, CIDEr (coco-caption), and on the
built-in shapes dataset, attention fidelity.

    python eval.py --checkpoint runs/shapes/best.pt --data-folder data/shapes --split test --beam-size 5

Each image is decoded once and scored against all its original reference captions (the stored raw
texts, PTB-tokenised as coco-caption does), never against references re-decoded through the word map.
"""
from __future__ import annotations

import omp_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from config import ModelConfig
from attention import is_stochastic
from datasets import CaptionDataset, collate_captions
from decoding import decode_args_parser, decode_options_from_args, decode_split
from feature_cache import ensure_cache
from filesafety import atomic_write_all, check_writable
from models import ShowAttendTell, load_model
from runtime import UserError, resolve_device, run_cli
from scoring import (
    _ENGLISH_METRICS,
    ALL_METRICS,
    attention_fidelity,
    caption_diversity,
    nltk_corpus_bleu,
    score_captions,
    shuffled_references,
    spice_missing,
    warn_if_collapsed,
)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[decode_args_parser()])
    parser.add_argument("--checkpoint", required=True, help="a best.pt / last.pt written by train.py")
    parser.add_argument("--data-folder", required=True, help="folder written by create_input_files.py")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    parser.add_argument("--bleu", choices=("coco", "nltk"), default="coco",
                        help="coco: coco-caption metrics only; nltk: also NLTK corpus BLEU as the tutorial")
    parser.add_argument("--control", choices=("none", "shuffled"), default="shuffled",
                        help="shuffled (default): also score the same captions against the references of a fixed "
                             "random permutation of the images, to show the model uses the image")
    parser.add_argument("--out", help="results JSON (COCO format); metrics go to OUT with .metrics.json")
    parser.add_argument("--spice", action="store_true",
                        help="also SPICE (needs java and Stanford CoreNLP's jars; says what is missing otherwise)")
    parser.add_argument("--report", metavar="DIR",
                        help="write a static HTML page DIR/index.html: per image its caption, references, CIDEr, "
                             "BLEU-4 and attention, worst first")
    parser.add_argument("--report-limit", type=int, default=50,
                        help="attention GIFs for this many (the worst) images in the report, each ~0.5 s and "
                             "~0.3 MB (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (default: 2)")
    parser.add_argument("--feature-cache", choices=("auto", "on", "off"), default="auto",
                        help="decode from the split's cached encoder features (feature_cache.py): auto (default) "
                             "when a cache made by this checkpoint's encoder exists, on: build it if missing")
    return parser


def eval_feature_cache(model: ShowAttendTell, model_cfg: ModelConfig, args: argparse.Namespace,
                       device: torch.device) -> Path | None:
    """The split's feature cache when it was made by this checkpoint's encoder (auto), or built (on)."""
    build = args.feature_cache == "on"
    try:
        return ensure_cache(model.encoder, model_cfg, args.data_folder, args.split, build=build, device=device,
                            num_workers=args.num_workers)
    except UserError:
        if build:
            raise
        return None  # auto: another encoder's cache (say, before fine-tuning): decode from the images


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    opts = decode_options_from_args(args)
    if args.num_workers < 0:
        raise UserError(f"--num-workers={args.num_workers} must be >= 0")
    if args.report_limit < 0:
        raise UserError(f"--report-limit={args.report_limit} must be >= 0")
    spice = bool(args.spice)
    if spice and spice_missing():  # said before decoding; the other metrics are computed as usual
        print(f"warning: {spice_missing()}", file=sys.stderr)
        spice = False
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"{args.split}_beam{opts.beam_size}.json")
    metrics_path = out.with_name(out.name.removesuffix(".json") + ".metrics.json")
    check_writable(out.parent, "the results")  # fail before decoding, not after
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        if Path(args.report).exists() and not Path(args.report).is_dir():
            raise UserError(f"--report {args.report}: exists and is not a folder")
        check_writable(args.report, "the report")
        Path(args.report).mkdir(parents=True, exist_ok=True)
    model, model_cfg, ckpt = load_model(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    dataset = CaptionDataset(args.data_folder, args.split, with_references=True)
    # A model fine-tuned with init_from keeps its own word map and records the pack's (train.py).
    if dataset.word_map not in (ckpt["word_map"], ckpt.get("pack_word_map")):
        raise UserError(f"{args.checkpoint}: word map differs from {args.data_folder}/word_map.json")
    if len(dataset) == 0:
        raise UserError(f"{dataset.path}: the {args.split} split has no images")
    if args.feature_cache != "off":
        dataset.features_path = eval_feature_cache(model, model_cfg, args, device)
    loader = DataLoader(dataset, batch_size=opts.batch_size, shuffle=False, num_workers=args.num_workers,
                        collate_fn=collate_captions)
    decoded = decode_split(model, loader, ckpt["word_map"], opts, device=device)
    captions = {d["index"]: d["caption"] for d in decoded}
    references = {d["index"]: d["references"] for d in decoded}
    tokenizer = "unicode" if dataset.tokenizer == "unicode" else "ptb"
    per_image: dict[int, dict[str, float]] = {}
    metrics: dict[str, Any] = score_captions(captions, references, tokenizer=tokenizer, per_image=per_image,
                                             metrics=ALL_METRICS + (("SPICE",) if spice else ()))
    if args.bleu == "nltk":
        metrics.update(nltk_corpus_bleu(captions, references))
    if args.control == "shuffled" and len(decoded) > 1:
        control_metrics = [m for m in ALL_METRICS if tokenizer != "unicode" or m not in _ENGLISH_METRICS]  # noted once
        control = score_captions(captions, shuffled_references(references), metrics=control_metrics,
                                 tokenizer=tokenizer)
        metrics.update({f"shuffled_{key}": value for key, value in control.items() if key != "BLEU-brevity-penalty"})
        if control.get("CIDEr"):
            metrics["CIDEr_over_shuffled"] = metrics["CIDEr"] / control["CIDEr"]
    diversity = caption_diversity(list(captions.values()))
    metrics.update(diversity)
    unfinished = sum(not d["finished"] for d in decoded)
    metrics.update({"images": len(decoded), "unfinished": unfinished, "beam_size": opts.beam_size,
                    "split": args.split, "attention": model_cfg.attention, "control": args.control,
                    "tokenizer": dataset.tokenizer})
    objects = {d["index"]: dataset.objects(d["index"]) for d in decoded}
    if all(o is not None for o in objects.values()):
        fidelity = attention_fidelity(decoded, objects)
        if "all" in fidelity:
            metrics["attention_hit_noun"] = fidelity["all"]["hit_noun"]
            metrics["attention_hit_noun_or_colour"] = fidelity["all"]["hit_noun_or_colour"]
            metrics["attention_chance"] = fidelity["all"]["chance"]
        metrics["attention_fidelity"] = fidelity

    # COCO results format: image_id is the image's own id (cocoid, else its file name); index is its row in the split.
    results = [{"image_id": dataset.image_id(d["index"]), "caption": d["caption"], "index": d["index"]}
               for d in decoded]
    # Both files or neither: a full disk must not leave new results beside old metrics.
    atomic_write_all([(metrics_path, lambda f: f.write(json.dumps(metrics, indent=2).encode("utf-8"))),
                      (out, lambda f: f.write(json.dumps(results, indent=1).encode("utf-8")))])
    if args.report:
        from report import write_report

        index_html = write_report(args.report, decoded, dataset, metrics, per_image, hard=is_stochastic(model_cfg.attention),
                                  gif_limit=args.report_limit, source=f"{args.checkpoint} on {args.data_folder}")
    print_table(metrics)
    warn_if_collapsed(diversity)
    print(f"captions: {out}")
    if args.report:
        print(f"report: {index_html}")
    return metrics


def print_table(metrics: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("images", "unfinished", "beam_size")]
    width = max(len(k) for k, _ in rows) if rows else 0
    print(f"{'metric'.ljust(width)}  value")
    for key, value in rows:
        print(f"{key.ljust(width)}  {value:.4f}" if isinstance(value, float) else f"{key.ljust(width)}  {value}")
    fidelity = metrics.get("attention_fidelity", {})
    if fidelity:
        print("attention fidelity       mentions  hit(noun)  hit(noun|colour)  chance")
        for key, row in fidelity.items():
            print(f"  {key:<22} {row['mentions']:>8}  {row['hit_noun']:>9.3f}  {row['hit_noun_or_colour']:>16.3f}"
                  f"  {row['chance']:>6.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        evaluate(args)
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
