"""Scoring captions: coco-caption metrics (pycocoevalcap), the shuffled-references control, collapse
diagnostics and, on the shapes dataset, attention fidelity."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from runtime import UserError
from text import tokenize

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
