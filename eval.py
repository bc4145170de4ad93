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
import math
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader

from datasets import CaptionDataset, collate_captions
from decoding import decode_args_parser, decode_options_from_args, decode_split
from feature_cache import ensure_cache
from models import ShowAttendTell, load_model
from utils import ModelConfig, UserError, atomic_write_all, check_writable, resolve_device, run_cli, tokenize

ALL_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
OPTIONAL_METRICS = ("SPICE",)  # asked for by name (eval.py --spice): slow, and it needs CoreNLP's jars
_JAVA_METRICS = ("METEOR",)  # the PTB tokenizer needs Java too; without it we tokenise in Python (SPICE: spice_missing)
_ENGLISH_METRICS = ("METEOR", "SPICE")  # English stemmer/synonyms or parser: skipped for the unicode tokenizer


# --------------------------------------------------------------------------------------------
# Caption metrics (coco-caption through pycocoevalcap; NLTK corpus BLEU as an optional comparison)
# --------------------------------------------------------------------------------------------
def java_available() -> bool:
    return shutil.which("java") is not None


def spice_missing() -> str | None:
    """What SPICE lacks here, in one line, or None when it can run.

    pycocoevalcap's Spice downloads Stanford CoreNLP 3.6.0 on first use (into its own spice/lib);
    without the network that fails, so we look for the jars first instead of letting it try.
    """
    import pycocoevalcap.spice.get_stanford_models as stanford

    lib = Path(stanford.SPICEDIR) / stanford.SPICELIB
    jars = [lib / f"{stanford.JAR}.jar", lib / f"{stanford.JAR}-models.jar"]
    missing = ([] if java_available() else ["java (a JRE 8+ on PATH)"]) + [j.name for j in jars if not j.is_file()]
    if not missing:
        return None
    return (f"SPICE skipped: missing {', '.join(missing)} (pycocoevalcap downloads the jars on first use, from "
            f"nlp.stanford.edu/software/{stanford.CORENLP}.zip, which needs the network; put them in {lib})")


def score_captions(
    captions: dict[int, str],
    references: dict[int, list[str]],
    *,
    metrics: Iterable[str] = ALL_METRICS,
    tokenizer: str = "ptb",
    per_image: dict[Any, dict[str, float]] | None = None,
) -> dict[str, float]:
    """coco-caption scores of one caption per image against its references.

    Args:
        captions: image id -> generated caption.
        references: image id -> raw reference captions.
        metrics: any of BLEU (gives BLEU-1..4), METEOR, ROUGE_L, CIDEr, and SPICE (needs its jars,
            see spice_missing).
        tokenizer: "ptb" (coco-caption's Stanford PTB tokenizer, needs Java), "simple" (Python, a-z0-9
            words) or "unicode" (utils.tokenize's unicode rule, for packs made with --tokenizer unicode;
            the PTB tokenizer is English-only, so it is skipped, and so are METEOR and SPICE).
        per_image: when given, filled with image id -> {"BLEU-4", "CIDEr"} (those asked for): each
            image's own score from the same scorers, for the report.
    """
    if set(captions) != set(references):
        raise ValueError("captions and references must cover the same image ids")
    if not captions:
        raise UserError("nothing to score: no captions")
    metrics = list(metrics)
    unknown = set(metrics) - set(ALL_METRICS + OPTIONAL_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; valid: {', '.join(ALL_METRICS + OPTIONAL_METRICS)}")
    if tokenizer == "unicode":
        gts = {i: [" ".join(tokenize(r, "unicode")) for r in references[i]] for i in captions}
        res = {i: [" ".join(tokenize(captions[i], "unicode"))] for i in captions}
        english = [m for m in metrics if m in _ENGLISH_METRICS]
        if english:
            print(f"note: skipping {', '.join(english)}: English-only (the captions use the unicode tokenizer)",
                  file=sys.stderr)
            metrics = [m for m in metrics if m not in _ENGLISH_METRICS]
    elif tokenizer == "ptb" and java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        gts = ptb.tokenize({i: [{"caption": r} for r in references[i]] for i in captions})
        res = ptb.tokenize({i: [{"caption": captions[i]}] for i in captions})
    else:
        gts = {i: [" ".join(tokenize(r)) for r in references[i]] for i in captions}
        res = {i: [" ".join(tokenize(captions[i]))] for i in captions}
    if not java_available() and any(m in _JAVA_METRICS for m in metrics):
        print("warning: java not found; skipping METEOR (and using a Python tokenizer)", file=sys.stderr)
        metrics = [m for m in metrics if m not in _JAVA_METRICS]
    if "SPICE" in metrics and spice_missing():
        raise UserError(spice_missing())

    scores: dict[str, float] = {}
    for name in metrics:
        if name == "BLEU":
            corpus, bleu4 = _coco_bleu(gts, res)
            scores.update(corpus)
            if per_image is not None:
                for i, value in zip(gts, bleu4):
                    per_image.setdefault(i, {})["BLEU-4"] = float(value)
        elif name == "METEOR":
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            try:
                scores["METEOR"] = float(meteor.compute_score(gts, res)[0])  # then its __del__ stops the JVM
            except BaseException:
                _stop_meteor(meteor)
                raise
        elif name == "ROUGE_L":
            from pycocoevalcap.rouge.rouge import Rouge

            scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        elif name == "CIDEr":
            from pycocoevalcap.cider.cider import Cider

            corpus_cider, cider = Cider().compute_score(gts, res)
            scores["CIDEr"] = float(corpus_cider)
            if per_image is not None:
                for i, value in zip(gts, cider):  # Cider scores images in the order of gts' keys
                    per_image.setdefault(i, {})["CIDEr"] = float(value)
        elif name == "SPICE":
            from pycocoevalcap.spice.spice import Spice

            try:
                scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except subprocess.CalledProcessError as e:  # its JVM died: say so, keep the other metrics
                print(f"warning: SPICE failed (java exited with {e.returncode}); other metrics unaffected",
                      file=sys.stderr)
    return scores


def _stop_meteor(meteor: Any) -> None:
    """End METEOR's JVM after a failure or Ctrl-C inside compute_score: that leaves its lock held, and the
    object's own __del__ (which takes the lock) would then hang the interpreter at exit."""
    if meteor.lock.locked():
        meteor.lock.release()
    try:
        meteor.meteor_p.stdin.close()
    except BrokenPipeError:  # the JVM had already gone
        pass
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()


def _coco_bleu(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[dict[str, float], list[float]]:
    """coco-caption BLEU-1..4 (what pycocoevalcap's Bleu(4) computes), plus the corpus brevity penalty;
    and each image's own BLEU-4, in the order of gts' keys.

    The scorer is driven directly, rather than through Bleu.compute_score, only to read the length
    ratio: BLEU-n / BLEU-brevity-penalty is BLEU without the penalty, for papers that report it so.
    """
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for i in gts:
        scorer += (res[i][0], gts[i])
    bleu, per_image = scorer.compute_score(option="closest", verbose=0)
    # Hypothesis length / closest reference length, corpus-wide (its ratio() method is broken in 1.2).
    ratio = scorer.testlen(option="closest") / max(scorer.reflen(option="closest"), 1e-9)
    scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["BLEU-brevity-penalty"] = 1.0 if ratio >= 1 else float(math.exp(1 - 1 / ratio)) if ratio > 0 else 0.0
    return scores, [float(b) for b in per_image[3]]


def nltk_corpus_bleu(captions: dict[int, str], references: dict[int, list[str]]) -> dict[str, float]:
    """NLTK corpus BLEU-1..4, as the popular PyTorch tutorial reports it (not coco-caption's BLEU).

    Differences from coco-caption: NLTK's brevity penalty uses the closest reference length per corpus
    (the same) but counts are clipped and aggregated by NLTK's implementation, and the tutorial scores
    against word-map-encoded references; we use the raw references with Python tokenisation.
    """
    from nltk.translate.bleu_score import corpus_bleu

    ids = sorted(captions)
    refs = [[tokenize(r) for r in references[i]] for i in ids]
    hyps = [tokenize(captions[i]) for i in ids]
    weights = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
    return {f"NLTK-BLEU-{n + 1}": float(corpus_bleu(refs, hyps, weights=w)) for n, w in enumerate(weights)}


# --------------------------------------------------------------------------------------------
# Does the model use the image? Collapse diagnostics and the shuffled-references control
# --------------------------------------------------------------------------------------------
COLLAPSE_DISTINCT = 0.2  # below this share of distinct captions, warn: "the same caption for every image"


def caption_diversity(captions: list[str]) -> dict[str, float]:
    """Share of distinct captions among images, vocabulary words used, mean caption length in words."""
    words = [caption.split() for caption in captions]
    return {
        "distinct_captions": len(set(captions)) / max(len(captions), 1),
        "vocab_used": len({w for caption in words for w in caption}),
        "mean_length": sum(map(len, words)) / max(len(words), 1),
    }


def warn_if_collapsed(diversity: dict[str, float]) -> None:
    if diversity["distinct_captions"] < COLLAPSE_DISTINCT:
        print(f"warning: only {diversity['distinct_captions']:.0%} of the captions are distinct: the model gives "
              "(nearly) the same caption to every image; it is not using the image", file=sys.stderr)


def shuffled_references(references: dict[int, list[str]], seed: int = 0) -> dict[int, list[str]]:
    """Each image's references replaced by those of another image (a fixed random derangement).

    Scoring the same captions against these is the control: a model that uses the image scores far
    higher against its own references than against shuffled ones; a caption prior alone scores the same.
    """
    ids = sorted(references)
    if len(ids) < 2:
        raise UserError("the shuffled control needs at least 2 images")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    # A cyclic shift of a random order is a derangement: no image keeps its own references.
    return {ids[order[i]]: references[ids[order[(i + 1) % len(ids)]]] for i in range(len(ids))}


# --------------------------------------------------------------------------------------------
# Attention fidelity on the shapes dataset
# --------------------------------------------------------------------------------------------
def attention_fidelity(decoded: list[dict[str, Any]], objects: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Does the model look at the object it names? (shapes dataset only)

    For each generated mention "<colour> <shape>" of an object present in the image, a hit when the
    centre of the argmax attention cell lies inside the object's box at the step emitting the shape noun
    (`noun`), or at the noun or the colour step (`noun_or_colour`). `chance` is the fraction of grid
    cell centres inside the box: what uniformly random peaks would score.
    """
    from shapes import COLORS, SHAPES

    tallies: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])  # mentions, noun, either, chance
    for item in decoded:
        words, alphas = item["words"], item["alphas"]  # T words, (T, g, g)
        image_objects = objects[item["index"]]
        for t in range(1, len(words)):
            colour, shape = words[t - 1], words[t]
            if colour not in COLORS or shape not in SHAPES:
                continue
            match = [o for o in image_objects if o["color"] == colour and o["shape"] == shape]
            if not match:
                continue  # a mention of an object that is not there: a caption error, not attention
            box = match[0]["box"]
            noun_hit = _peak_in_box(alphas[t], box)
            either_hit = noun_hit or _peak_in_box(alphas[t - 1], box)
            chance = _fraction_of_cells_in_box(alphas.shape[-1], box)
            for key in ("all", f"{len(image_objects)}_objects"):
                tally = tallies[key]
                tally[0] += 1
                tally[1] += noun_hit
                tally[2] += either_hit
                tally[3] += chance
    result: dict[str, Any] = {}
    for key, (mentions, noun, either, chance) in sorted(tallies.items()):
        result[key] = {
            "mentions": int(mentions),
            "hit_noun": noun / mentions,
            "hit_noun_or_colour": either / mentions,
            "chance": chance / mentions,
        }
    return result


def _cell_centres(grid: int) -> torch.Tensor:
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (g*g, 2) as (x, y) fractions


def _in_box(points: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
    x0, y0, x1, y1 = box
    return (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)


def _peak_in_box(alpha: torch.Tensor, box: Sequence[float]) -> bool:
    grid = alpha.shape[-1]
    peak = int(alpha.flatten().argmax())
    return bool(_in_box(_cell_centres(grid)[peak : peak + 1], box)[0])


def _fraction_of_cells_in_box(grid: int, box: Sequence[float]) -> float:
    return float(_in_box(_cell_centres(grid), box).float().mean())


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

        index_html = write_report(args.report, decoded, dataset, metrics, per_image, hard=model_cfg.attention == "hard",
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
