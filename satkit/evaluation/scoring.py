"""Scoring captions: a registry of caption metrics (coco-caption's through pycocoevalcap, NLTK BLEU), the
shuffled-references control and collapse diagnostics (attention fidelity on the shapes dataset: fidelity.py).

A new metric is one function plus `@register_metric(...)`: the function takes the tokenised references
and captions and returns its scores; eval.py scores it (default metrics) or on request (`--metric
NAME`), the shuffled control and the report list it, and each score it reports is a valid `val_metric`.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch

from satkit.infra.runtime import UserError
from satkit.data.text import tokenize

# image id -> captions as words joined by single spaces (references: all of them; results: one)
Tokenized = dict[Any, list[str]]


class Scored(NamedTuple):
    """What a metric that gives per-image scores returns: corpus scores and image id -> its own scores."""

    corpus: dict[str, float]
    per_image: dict[Any, dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """A registered metric: its scoring function and what callers need to know without running it."""

    name: str
    score: Callable[[Tokenized, Tokenized], "dict[str, float] | Scored"]  # (references, results)
    keys: tuple[str, ...]  # the scores it reports, higher is better: each a valid val_metric
    extra_keys: tuple[str, ...]  # reported beside the scores, never selects a model (BLEU's brevity penalty)
    per_image: tuple[str, ...]  # keys it also gives per image (score returns Scored): the report's columns
    needs_java: bool  # skipped, with a warning, where java is not on PATH
    english_only: bool  # skipped, with a note, for captions split by the unicode rule
    default: bool  # scored unless the caller lists metrics; False: only when asked for by name (slow)
    missing: Callable[[], str | None] | None  # one line on what it lacks here (java included), or None

    def result_keys(self) -> tuple[str, ...]:
        return self.keys + self.extra_keys


METRICS: dict[str, Metric] = {}  # name -> metric, in registration order (the order of every listing)
SCORE_KEYS: dict[str, str] = {}  # score key -> the metric giving it: train's val_metric choices (kept live)


def register_metric(
    name: str,
    *,
    keys: Sequence[str] | None = None,
    extra_keys: Sequence[str] = (),
    per_image: Sequence[str] = (),
    needs_java: bool = False,
    english_only: bool = False,
    default: bool = True,
    missing: Callable[[], str | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Function decorator: make `fn(references, results)` the metric `name`, reporting `keys` (default:
    the name itself). The function returns {key: corpus score}, or Scored when `per_image` is given."""
    keys = tuple(keys) if keys is not None else (name,)

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        taken = [k for k in keys + tuple(extra_keys) if any(k in m.result_keys() for m in METRICS.values())]
        if name in METRICS or taken:
            raise ValueError(f"metric {name!r}: name or keys {taken} already registered")
        if not set(per_image) <= set(keys):
            raise ValueError(f"metric {name!r}: per_image keys must be among its keys {keys}")
        METRICS[name] = Metric(name, fn, keys, tuple(extra_keys), tuple(per_image), needs_java, english_only,
                               default, missing)
        SCORE_KEYS.update({key: name for key in keys})
        return fn

    return register


def default_metrics() -> tuple[str, ...]:
    """Names of the metrics scored when none are asked for (eval.py's, and the shuffled control's)."""
    return tuple(name for name, metric in METRICS.items() if metric.default)


def result_keys() -> tuple[str, ...]:
    """Every key a registered metric can put in the results, in registration order (the report's rows)."""
    return tuple(key for metric in METRICS.values() for key in metric.result_keys())


def per_image_keys() -> tuple[str, ...]:
    """Every key some metric scores per image (the report's columns)."""
    return tuple(key for metric in METRICS.values() for key in metric.per_image)


# Validation in train.py scores these every epoch (recorded as val_BLEU-4 and val_CIDEr in metrics.csv).
VAL_METRICS = ("BLEU", "CIDEr")
VAL_KEYS = ("BLEU-4", "CIDEr")


def validation_metrics(val_metric: str) -> tuple[str, ...]:
    """Metric names validation scores each epoch: VAL_METRICS plus the one that gives `val_metric`."""
    owner = SCORE_KEYS[val_metric]
    return VAL_METRICS + ((owner,) if owner not in VAL_METRICS else ())


def validation_keys(val_metric: str) -> tuple[str, ...]:
    """Score keys validation records each epoch (metrics.csv's val_* columns): VAL_KEYS plus val_metric."""
    return VAL_KEYS + ((val_metric,) if val_metric not in VAL_KEYS else ())


# --------------------------------------------------------------------------------------------
# How captions become words for the scorers. Packs split captions by text.TOKENIZERS (ascii|unicode);
# scoring splits them by one of WORDS, and `scoring_words` is the one map from the first to the second.
# --------------------------------------------------------------------------------------------
WORDS = ("ptb", "ascii", "unicode")  # ptb: coco-caption's PTB tokenizer (Java); else text.tokenize's rule


def java_available() -> bool:
    return shutil.which("java") is not None


def scoring_words(pack_tokenizer: str, *, ptb: bool = True) -> str:
    """How to split a pack's captions into words for scoring, given the pack's tokenizer (text.TOKENIZERS).

    ascii packs: coco-caption's PTB tokenizer (the published numbers' rule) when `ptb` and java is there,
    else the ascii rule (train.py's validation: no JVM every epoch). unicode packs: the unicode rule,
    since the PTB tokenizer is English-only.
    """
    if pack_tokenizer == "unicode":
        return "unicode"
    return "ptb" if ptb and java_available() else "ascii"


def split_words(captions: dict[Any, str], references: dict[Any, list[str]], words: str
                ) -> tuple[Tokenized, Tokenized]:
    """(references, results) as the scorers take them: each caption's words joined by single spaces."""
    if words == "ptb" and java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        gts = ptb.tokenize({i: [{"caption": r} for r in references[i]] for i in captions})
        return gts, ptb.tokenize({i: [{"caption": captions[i]}] for i in captions})
    rule = "ascii" if words == "ptb" else words  # no java: the nearest Python rule
    gts = {i: [" ".join(tokenize(r, rule)) for r in references[i]] for i in captions}
    return gts, {i: [" ".join(tokenize(captions[i], rule))] for i in captions}


# --------------------------------------------------------------------------------------------
# Scoring with the registered metrics
# --------------------------------------------------------------------------------------------
def runnable_metrics(names: Iterable[str], words: str) -> list[str]:
    """`names` less those that cannot run here or on these words, each left out with one stderr line."""
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid: {', '.join(METRICS)}")
    english = [n for n in names if words == "unicode" and METRICS[n].english_only]
    if english:
        print(f"note: skipping {', '.join(english)}: English-only (the captions use the unicode tokenizer)",
              file=sys.stderr)
    runnable = []
    for name in (n for n in names if n not in english):
        reason = metric_missing(name)
        if reason:
            print(f"warning: {reason}", file=sys.stderr)
        else:
            runnable.append(name)
    return runnable


def metric_missing(name: str) -> str | None:
    """What metric `name` lacks here, in one line, or None when it can run."""
    metric = METRICS[name]
    if metric.missing is not None:
        return metric.missing()
    if metric.needs_java and not java_available():
        return f"java not found; skipping {name} (needs a JRE 8+ on PATH)"
    return None


def score_captions(
    captions: dict[Any, str],
    references: dict[Any, list[str]],
    *,
    metrics: Iterable[str] | None = None,
    words: str = "ptb",
    per_image: dict[Any, dict[str, float]] | None = None,
) -> dict[str, float]:
    """Corpus scores of one caption per image against its references, by registered metrics.

    Args:
        captions: image id -> generated caption.
        references: image id -> raw reference captions.
        metrics: names in METRICS (default: default_metrics()); those that cannot run here (no java,
            SPICE's jars) or on these words (English-only ones on unicode words) are left out, with a line.
        words: one of WORDS, how captions are split into words (see scoring_words); "ptb" without
            java falls back to the ascii rule.
        per_image: when given, filled with image id -> the per-image scores of the metrics run.
    """
    if set(captions) != set(references):
        raise ValueError("captions and references must cover the same image ids")
    if not captions:
        raise UserError("nothing to score: no captions")
    if words not in WORDS:
        raise ValueError(f"words={words!r} is not one of {', '.join(WORDS)}")
    names = runnable_metrics(default_metrics() if metrics is None else metrics, words)
    gts, res = split_words(captions, references, words)
    scores: dict[str, float] = {}
    for name in names:
        scores.update(_run_metric(METRICS[name], gts, res, per_image))
    return scores


def _run_metric(metric: Metric, gts: Tokenized, res: Tokenized,
                per_image: dict[Any, dict[str, float]] | None) -> dict[str, float]:
    """One metric's corpus scores (its per-image ones added to `per_image`), checked against its keys."""
    out = metric.score(gts, res)
    corpus, images = (out.corpus, out.per_image) if isinstance(out, Scored) else (out, {})
    stray = set(corpus) - set(metric.result_keys())
    if stray:
        raise ValueError(f"metric {metric.name!r} returned {sorted(stray)}, not among its keys {metric.result_keys()}")
    if per_image is not None:
        for i, image_scores in images.items():
            per_image.setdefault(i, {}).update(image_scores)
    return {key: float(value) for key, value in corpus.items()}


# --------------------------------------------------------------------------------------------
# The metrics: coco-caption's (pycocoevalcap), then NLTK's corpus BLEU as the PyTorch tutorial reports it
# --------------------------------------------------------------------------------------------
@register_metric("BLEU", keys=[f"BLEU-{n}" for n in range(1, 5)], extra_keys=["BLEU-brevity-penalty"],
                 per_image=["BLEU-4"])
def coco_bleu(gts: Tokenized, res: Tokenized) -> Scored:
    """coco-caption BLEU-1..4 (what pycocoevalcap's Bleu(4) computes), the corpus brevity penalty, and
    each image's own BLEU-4.

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
    return Scored(scores, {i: {"BLEU-4": float(b)} for i, b in zip(gts, per_image[3])})


@register_metric("METEOR", needs_java=True, english_only=True)
def meteor(gts: Tokenized, res: Tokenized) -> dict[str, float]:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return {"METEOR": float(scorer.compute_score(gts, res)[0])}  # then its __del__ stops the JVM
    except BaseException:
        _stop_meteor(scorer)
        raise


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


@register_metric("ROUGE-L")
def rouge_l(gts: Tokenized, res: Tokenized) -> dict[str, float]:
    from pycocoevalcap.rouge.rouge import Rouge

    return {"ROUGE-L": float(Rouge().compute_score(gts, res)[0])}


@register_metric("CIDEr", per_image=["CIDEr"])
def cider(gts: Tokenized, res: Tokenized) -> Scored:
    from pycocoevalcap.cider.cider import Cider

    corpus, images = Cider().compute_score(gts, res)  # images in the order of gts' keys
    return Scored({"CIDEr": float(corpus)}, {i: {"CIDEr": float(v)} for i, v in zip(gts, images)})


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


# Opt-in: slow (a JVM parses every caption) and it needs CoreNLP's jars; looked up at call time so that
# tests can stand in for the jars.
@register_metric("SPICE", needs_java=True, english_only=True, default=False, missing=lambda: spice_missing())
def spice(gts: Tokenized, res: Tokenized) -> dict[str, float]:
    from pycocoevalcap.spice.spice import Spice

    try:
        return {"SPICE": float(Spice().compute_score(gts, res)[0])}
    except subprocess.CalledProcessError as e:  # its JVM died: say so, keep the other metrics
        print(f"warning: SPICE failed (java exited with {e.returncode}); other metrics unaffected", file=sys.stderr)
        return {}


@register_metric("NLTK-BLEU", keys=[f"NLTK-BLEU-{n}" for n in range(1, 5)], default=False)
def nltk_bleu(gts: Tokenized, res: Tokenized) -> dict[str, float]:
    """NLTK corpus BLEU-1..4, as the popular PyTorch tutorial reports it (not coco-caption's BLEU).

    NLTK clips and aggregates the n-gram counts its own way; the tutorial scores against word-map-encoded
    references, we against the raw references split into the same words as every other metric.
    """
    from nltk.translate.bleu_score import corpus_bleu

    ids = sorted(gts)
    refs = [[r.split() for r in gts[i]] for i in ids]
    hyps = [res[i][0].split() for i in ids]
    weights = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
    return {f"NLTK-BLEU-{n + 1}": float(corpus_bleu(refs, hyps, weights=w)) for n, w in enumerate(weights)}


# --------------------------------------------------------------------------------------------
# Does the model use the image? Collapse diagnostics and the shuffled-references control
# --------------------------------------------------------------------------------------------
COLLAPSE_DISTINCT = 0.2  # below this share of distinct captions, warn: "the same caption for every image"
DIVERSITY_KEYS = ("distinct_captions", "vocab_used", "mean_length", "bad_endings")  # what caption_diversity returns
# Words no finished English caption ends on. A caption ending on one was cut mid-phrase ("a man riding a"):
# the failure mode of self-critical training when a missing <end> costs no reward.
FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "with", "and", "in", "on", "at", "to", "for", "from", "by", "is",
                            "are", "its", "his", "her", "their"})


def caption_diversity(captions: list[str]) -> dict[str, float]:
    """Share of distinct captions among images, vocabulary words used, mean caption length in words, and
    the share of captions whose last word is one of FUNCTION_WORDS (bad_endings: cut mid-phrase)."""
    words = [caption.split() for caption in captions]
    return {
        "distinct_captions": len(set(captions)) / max(len(captions), 1),
        "vocab_used": len({w for caption in words for w in caption}),
        "mean_length": sum(map(len, words)) / max(len(words), 1),
        "bad_endings": sum(1 for caption in words if caption and caption[-1] in FUNCTION_WORDS) / max(len(words), 1),
    }


def warn_if_collapsed(diversity: dict[str, float]) -> None:
    """One stderr warning when so few captions are distinct that the model cannot be using the image."""
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
