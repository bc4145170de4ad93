"""Evaluate a checkpoint on a packed split: decode each image once, score it with the registered metrics
(scoring.py) against all its raw references, run the shuffled-references control, the collapse
diagnostics and, on the shapes dataset, attention fidelity; write results and metrics together, and
optionally the HTML report. eval.py is its command line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from satkit.attention import is_stochastic
from satkit.config import ModelConfig
from satkit.data.dataset import CaptionDataset, collate_captions
from satkit.decoding import DecodeOptions, decode_split
from satkit.data.feature_cache import ensure_cache
from satkit.infra.filesafety import atomic_write_all, check_writable
from satkit.model import ShowAttendTell, load_model
from satkit.evaluation.report import write_report
from satkit.infra.runtime import UserError, dead_workers_explained, resolve_device
from satkit.evaluation.attention_measures import deletion_test, summarise_attention
from satkit.evaluation.fidelity import attention_fidelity
from satkit.evaluation.scoring import (
    METRICS,
    caption_diversity,
    default_metrics,
    runnable_metrics,
    score_captions,
    scoring_words,
    shuffled_references,
    warn_if_collapsed,
)
from satkit.validation import check_fields, option

__all__ = ["EvalOptions", "evaluate", "print_table"]

SPLITS = ("train", "val", "test")
CONTROLS = ("none", "shuffled")
FEATURE_CACHE_MODES = ("auto", "on", "off")


@dataclass
class EvalOptions:
    """What to score and how, besides decoding (decoding.DecodeOptions); fields are eval.py's flags."""

    split: str = option("test", choices=SPLITS)
    metrics: tuple[str, ...] = ()  # names in scoring.METRICS; () = scoring.default_metrics()
    control: str = option("shuffled", choices=CONTROLS)  # shuffled: also score against other images' references
    report_limit: int = option(50, min=0)  # attention GIFs for this many (the worst) images in the report
    num_workers: int = option(2, min=0)  # DataLoader workers
    feature_cache: str = option("auto", choices=FEATURE_CACHE_MODES)  # see feature_cache.py
    # The deletion test of attention (attention_measures.py) on the first N decoded images: each costs the
    # encoder 1 + 2 x (its content words) passes. The per-word measures cover every image whatever N.
    attention_images: int = option(100, min=0)

    def check(self) -> None:
        """Raise UserError naming the first bad flag."""
        check_fields(self, as_flags=True)
        for name in self.metrics:
            if name not in METRICS:
                raise UserError(f"--metric={name!r} is not one of {', '.join(METRICS)}")


def output_paths(checkpoint: str | Path, split: str, decode: DecodeOptions, out: str | Path | None
                 ) -> tuple[Path, Path]:
    """(results JSON, metrics JSON): `out` or CHECKPOINT_DIR/SPLIT_beamN.json (SPLIT_sampleN.json when
    sampling: never over a beam search's results), and the same with .metrics.json."""
    how = "sample" if decode.sample else "beam"
    results = Path(out) if out else Path(checkpoint).with_name(f"{split}_{how}{decode.beam_size}.json")
    return results, results.with_name(results.name.removesuffix(".json") + ".metrics.json")


def prepare_output_folders(results: Path, report: str | Path | None) -> None:
    """Refuse unwritable or blocked output locations before any decoding, then create the folders."""
    check_writable(results.parent, "the results")
    results.parent.mkdir(parents=True, exist_ok=True)
    if report:
        if Path(report).exists() and not Path(report).is_dir():
            raise UserError(f"--report {report}: exists and is not a folder")
        check_writable(report, "the report")
        Path(report).mkdir(parents=True, exist_ok=True)


def load_split(checkpoint: str | Path, data_folder: str | Path, split: str, ckpt: dict[str, Any]) -> CaptionDataset:
    """The split, with its references, checked against the checkpoint's word map."""
    dataset = CaptionDataset(str(data_folder), split, with_references=True)
    # A model fine-tuned with init_from keeps its own word map and records the pack's (train.py).
    if dataset.word_map not in (ckpt["word_map"], ckpt.get("pack_word_map")):
        raise UserError(f"{checkpoint}: word map differs from {data_folder}/word_map.json")
    if len(dataset) == 0:
        raise UserError(f"{dataset.path}: the {split} split has no images")
    return dataset


def eval_feature_cache(model: ShowAttendTell, model_cfg: ModelConfig, data_folder: str | Path, split: str,
                       mode: str, device: torch.device, num_workers: int) -> Path | None:
    """The split's feature cache when it was made by this checkpoint's encoder (auto), or built (on)."""
    try:
        return ensure_cache(model.encoder, model_cfg, str(data_folder), split, build=mode == "on", device=device,
                            num_workers=num_workers)
    except UserError:
        if mode == "on":
            raise
        return None  # auto: another encoder's cache (say, before fine-tuning): decode from the images


def score_decoded(decoded: list[dict[str, Any]], names: Sequence[str], words: str, control: str
                  ) -> tuple[dict[str, Any], dict[int, dict[str, float]]]:
    """Corpus metrics (with the shuffled control and diversity) and per-image scores of decoded captions.

    `names` must already be runnable (scoring.runnable_metrics), so nothing is noted twice.
    """
    captions = {d["index"]: d["caption"] for d in decoded}
    references = {d["index"]: d["references"] for d in decoded}
    per_image: dict[int, dict[str, float]] = {}
    metrics: dict[str, Any] = score_captions(captions, references, metrics=names, words=words, per_image=per_image)
    if control == "shuffled" and len(decoded) > 1:
        control_names = [n for n in names if METRICS[n].default]  # opt-in metrics are slow: not twice
        shuffled = score_captions(captions, shuffled_references(references), metrics=control_names, words=words)
        score_keys = {key for n in control_names for key in METRICS[n].keys}
        metrics.update({f"shuffled_{key}": value for key, value in shuffled.items() if key in score_keys})
        if shuffled.get("CIDEr"):
            metrics["CIDEr_over_shuffled"] = metrics["CIDEr"] / shuffled["CIDEr"]
    metrics.update(caption_diversity(list(captions.values())))
    return metrics, per_image


def fidelity_metrics(decoded: list[dict[str, Any]], dataset: CaptionDataset) -> dict[str, Any]:
    """Attention fidelity when the split knows its objects' boxes (the shapes dataset), else nothing."""
    objects = {d["index"]: dataset.objects(d["index"]) for d in decoded}
    if not all(o is not None for o in objects.values()):
        return {}
    fidelity = attention_fidelity(decoded, objects)
    metrics: dict[str, Any] = {}
    if "all" in fidelity:
        metrics["attention_hit_noun"] = fidelity["all"]["hit_noun"]
        metrics["attention_hit_noun_or_colour"] = fidelity["all"]["hit_noun_or_colour"]
        metrics["attention_chance"] = fidelity["all"]["chance"]
    metrics["attention_fidelity"] = fidelity
    return metrics


def attention_metrics(model: ShowAttendTell, decoded: list[dict[str, Any]], data_folder: str | Path,
                      opts: EvalOptions, word_map: dict[str, int]) -> dict[str, Any]:
    """How concentrated the attention of every generated word is, and the deletion test on the first
    `opts.attention_images` images (read as pixels: a feature cache holds no image to grey out)."""
    metrics = summarise_attention(decoded)
    if opts.attention_images > 0:
        pixels = CaptionDataset(str(data_folder), opts.split, with_references=False)
        metrics.update(deletion_test(model, decoded[: opts.attention_images], lambda i: pixels[i]["image"],
                                     word_map, progress=True))
    return metrics


def write_results(results_path: Path, metrics_path: Path, decoded: list[dict[str, Any]], dataset: CaptionDataset,
                  metrics: dict[str, Any]) -> None:
    """Results in COCO format (image_id: the image's cocoid, else its file name; index: its row in the
    split) and the metrics: both files or neither, so a full disk never leaves new results beside old metrics."""
    results = [{"image_id": dataset.image_id(d["index"]), "caption": d["caption"], "index": d["index"]}
               for d in decoded]
    atomic_write_all([(metrics_path, lambda f: f.write(json.dumps(metrics, indent=2).encode("utf-8"))),
                      (results_path, lambda f: f.write(json.dumps(results, indent=1).encode("utf-8")))])


def decode_dataset(model: ShowAttendTell, model_cfg: ModelConfig, dataset: CaptionDataset, data_folder: str | Path,
                   word_map: dict[str, int], opts: EvalOptions, decode: DecodeOptions, device: torch.device
                   ) -> list[dict[str, Any]]:
    """Decode every image of `dataset` (from its feature cache when there is one). A DataLoader worker that
    dies meanwhile (the OOM killer) is one line naming the flags to lower, as in training."""
    with dead_workers_explained("--num-workers or --batch-size"):
        if opts.feature_cache != "off":
            dataset.features_path = eval_feature_cache(model, model_cfg, data_folder, opts.split, opts.feature_cache,
                                                       device, opts.num_workers)
        loader = DataLoader(dataset, batch_size=decode.batch_size, shuffle=False, num_workers=opts.num_workers,
                            collate_fn=collate_captions)
        return decode_split(model, loader, word_map, decode, device=device)


def evaluate(checkpoint: str | Path, data_folder: str | Path, opts: EvalOptions, decode: DecodeOptions, *,
             out: str | Path | None = None, report: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Decode `opts.split` of the pack in `data_folder` with `checkpoint`, score it, write the results and
    metrics JSON (and the report to the folder `report`); return the metrics."""
    opts.check()
    results_path, metrics_path = output_paths(checkpoint, opts.split, decode, out)
    prepare_output_folders(results_path, report)
    model, model_cfg, ckpt = load_model(checkpoint)
    torch_device = resolve_device(device)
    model.to(torch_device)
    dataset = load_split(checkpoint, data_folder, opts.split, ckpt)
    words = scoring_words(dataset.tokenizer)
    names = runnable_metrics(opts.metrics or default_metrics(), words)  # said before decoding
    decoded = decode_dataset(model, model_cfg, dataset, data_folder, ckpt["word_map"], opts, decode, torch_device)
    metrics, per_image = score_decoded(decoded, names, words, opts.control)
    metrics.update({"images": len(decoded), "unfinished": sum(not d["finished"] for d in decoded),
                    "beam_size": decode.beam_size, "decode": decode.record(), "split": opts.split,
                    "attention": model_cfg.attention,
                    "control": opts.control, "tokenizer": dataset.tokenizer, "scoring_words": words})
    metrics.update(fidelity_metrics(decoded, dataset))
    metrics.update(attention_metrics(model, decoded, data_folder, opts, ckpt["word_map"]))
    write_results(results_path, metrics_path, decoded, dataset, metrics)
    if report:
        index_html = write_report(report, decoded, dataset, metrics, per_image,
                                  stochastic=is_stochastic(model_cfg.attention), gif_limit=opts.report_limit,
                                  source=f"{checkpoint} on {data_folder}")
    print_table(metrics)
    warn_if_collapsed(metrics)
    print(f"captions: {results_path}")
    if report:
        print(f"report: {index_html}")
    return metrics


def print_table(metrics: dict[str, Any]) -> None:
    """The numeric metrics as a two-column table on stdout, then attention fidelity's rows."""
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
