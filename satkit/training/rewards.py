"""Rewards for self-critical sequence training (SCST): CIDEr-D and sentence BLEU-4 of sampled captions,
computed on token ids with numpy (no pycocoevalcap, no java, no strings at training time).

`cider_d` is exactly what pycocoevalcap's `Cider` (coco-caption's cider_scorer.py) gives each image: n-grams
n = 1..4, tf-idf vectors with idf = log(reference sets) - log(max(1, df)), the candidate's counts clipped by
each reference's, a Gaussian length penalty (sigma 6) on the difference in length (counted as
cider_scorer does: in bigrams), the mean over n and over references, times 10. Only the document
frequencies differ from eval's CIDEr: they come from the train split (`load_document_frequencies`),
not from the images being scored, as in Rennie et al. 2017. `bleu4` reimplements pycocoevalcap BleuScorer's
per-image BLEU-4 (same smoothing, closest reference length), vectorised on ids too. A call scores a batch of
samples at once: an image's references are worked on once however many of its samples are scored.

Convention, END COUNTED: the <end> token is a word, in candidates and in references. A candidate is the
sampled ids up to and including the first <end> (an unfinished sample has none); a reference is a
packed caption without <start>, with <end>, without <pad>. So "a man riding a <end>" earns nothing for
its last bigram, and a sample cut off before <end> loses the n-grams that end there: the known fix for
SCST's captions that stop mid-phrase ("a man riding a"); scoring.caption_diversity's bad_endings watches it.

N-grams are uint64 keys: the ids + 1 as 16-bit digits, first word highest, so ids must be below 65535.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from satkit.data.dataset import check_packed
from satkit.infra.filesafety import atomic_write_text
from satkit.infra.progress import progress_bar
from satkit.infra.runtime import UserError, one_line
from satkit.data.text import load_word_map

__all__ = ["DocumentFrequencies", "cider_d", "bleu4", "scst_rewards", "reference_ids",
           "load_document_frequencies", "build_document_frequencies", "read_document_frequencies",
           "write_document_frequencies", "df_path", "df_identity", "END_CONVENTION"]

MAX_N = 4  # n-grams 1..4, as CIDEr-D and BLEU-4
SIGMA = 6.0  # CIDEr-D's Gaussian length penalty
MAX_ID = 65534  # ids + 1 must fit a 16-bit digit of an n-gram key
DF_FILE = "cider_df.json"
DF_FORMAT = 1
END_CONVENTION = "end-counted"  # <end> is a word of candidates and references; no <start>, no <pad>
_ROWS = 65536  # caption rows read at a time when building from the pack
_TINY, _SMALL = 1e-15, 1e-9  # BleuScorer's smoothing: 0 matches give ~0, never a division by zero

Ids = Sequence[int]


# --------------------------------------------------------------------------------------------
# N-grams as integer keys
# --------------------------------------------------------------------------------------------
def _ngrams(texts: Sequence[Ids]) -> tuple[np.ndarray, np.ndarray]:
    """Every n-gram (n = 1..MAX_N) of every text: (text index, key), both (E,), in no particular order."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    flat = np.fromiter(itertools.chain.from_iterable(texts), dtype=np.int64, count=int(lengths.sum()))
    width = int(lengths.max(initial=0))
    ids = np.zeros((len(texts), width), dtype=np.int64)  # (T, W)
    ids[np.arange(width) < lengths[:, None]] = flat
    return _ngrams_of_rows(ids, lengths)


def _ngrams_of_rows(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_ngrams of texts stored as rows: ids (T, W), each row's first lengths[t] ids its text."""
    width = ids.shape[1]
    inside = np.arange(width) < lengths[:, None]  # (T, W)
    used = ids[inside]
    if used.size and (used.min() < 0 or used.max() > MAX_ID):
        raise ValueError(f"token ids must lie in 0..{MAX_ID}, got {used.min()}..{used.max()}")
    digits = np.zeros((len(ids), width + MAX_N - 1), dtype=np.uint64)  # (T, W + 3), 0 past each text's end
    digits[:, :width][inside] = used.astype(np.uint64) + np.uint64(1)
    rows, keys = [], []
    key = np.zeros((len(ids), width), dtype=np.uint64)
    for n in range(1, MAX_N + 1):
        key = (key << np.uint64(16)) | digits[:, n - 1 : n - 1 + width]  # the n-gram starting at each position
        valid = np.arange(width) + n <= lengths[:, None]  # (T, W)
        rows.append(np.nonzero(valid)[0])
        keys.append(key[valid])
    return np.concatenate(rows), np.concatenate(keys)


def _order(keys: np.ndarray) -> np.ndarray:
    """n - 1 of each key: how many 16-bit digits it has, less one."""
    return sum(((keys >> np.uint64(bits)) > 0).astype(np.int64) for bits in (16, 32, 48))


def _key(ngram: Ids) -> int:
    key = 0
    for i in ngram:
        key = (key << 16) | (int(i) + 1)
    return key


def _unique_pairs(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The keys of the distinct (group, key) pairs: each key once per group it occurs in."""
    order = np.lexsort((keys, groups))
    g, k = groups[order], keys[order]
    first = np.ones(len(k), dtype=bool)
    first[1:] = (g[1:] != g[:-1]) | (k[1:] != k[:-1])
    return k[first]


@dataclass(frozen=True, eq=False)
class DocumentFrequencies:
    """CIDEr-D's document frequencies: for each n-gram, in how many reference sets (images) it occurs,
    and the number of reference sets, whose log is the idf of an n-gram no reference has."""

    keys: np.ndarray  # (K,) uint64 n-gram keys, sorted
    counts: np.ndarray  # (K,) reference sets holding each n-gram
    num_sets: int

    @property
    def log_num_sets(self) -> float:
        return math.log(float(self.num_sets))

    def log_df(self, keys: np.ndarray) -> np.ndarray:
        """log(max(1, df)) of each key: 0 for n-grams no reference has (cider_scorer's rule)."""
        if not len(self.keys):
            return np.zeros(len(keys))
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, np.log(np.maximum(self.counts[pos], 1).astype(np.float64)), 0.0)

    def count(self, ngram: Ids) -> int:
        """In how many reference sets `ngram` (ids) occurs."""
        key = np.uint64(_key(ngram))
        pos = int(np.searchsorted(self.keys, key))
        return int(self.counts[pos]) if pos < len(self.keys) and self.keys[pos] == key else 0

    def mapped(self, id_map: Any) -> DocumentFrequencies:
        """The same counts in another word map's ids: id_map[pack id] = model id (CaptionDataset's
        caption_id_map, when a run's model keeps the word map of its init_from checkpoint). N-grams that
        map to one (several words to <unk>) keep the highest count, so df never exceeds num_sets."""
        id_map = np.asarray(id_map, dtype=np.int64)
        if id_map.size and (id_map.min() < 0 or id_map.max() > MAX_ID):
            raise ValueError(f"mapped ids must lie in 0..{MAX_ID}")
        keys = np.zeros_like(self.keys)
        for bits in (48, 32, 16, 0):  # each 16-bit digit, first word first; 0: no word there
            digit = ((self.keys >> np.uint64(bits)) & np.uint64(0xFFFF)).astype(np.int64)
            new = np.where(digit > 0, id_map[np.maximum(digit - 1, 0)] + 1, 0).astype(np.uint64)
            keys = np.where(digit > 0, (keys << np.uint64(16)) | new, keys)
        order = np.argsort(keys, kind="stable")
        unique, first = np.unique(keys[order], return_index=True)
        counts = np.maximum.reduceat(self.counts[order], first) if len(first) else self.counts[:0]
        return DocumentFrequencies(unique, counts, self.num_sets)

    @classmethod
    def from_references(cls, refs: Sequence[Sequence[Ids]]) -> DocumentFrequencies:
        """Document frequencies of these reference sets (refs[i]: image i's references, as ids)."""
        return cls.from_counts(*_set_counts(refs), num_sets=len(refs))

    @classmethod
    def from_counts(cls, keys: np.ndarray, counts: np.ndarray, num_sets: int) -> DocumentFrequencies:
        if num_sets < 1:
            raise ValueError("document frequencies need at least one reference set")
        return cls(np.asarray(keys, dtype=np.uint64), np.asarray(counts, dtype=np.int64), int(num_sets))


def _set_counts(refs: Sequence[Sequence[Ids]]) -> tuple[np.ndarray, np.ndarray]:
    """(keys, in how many of `refs`' sets each occurs), keys sorted."""
    texts = [ref for refs_of_image in refs for ref in refs_of_image]
    owner = np.repeat(np.arange(len(refs)), [len(r) for r in refs])
    rows, keys = _ngrams(texts)
    return np.unique(_unique_pairs(owner[rows], keys), return_counts=True)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
class _Batch:
    """Candidates and their reference sets as term-frequency entries, the work shared by CIDEr-D and BLEU.

    Texts are the candidates (0..C-1), then each distinct reference set's references once: an image's
    references are shared by all of its samples. Entries are the distinct (text, n-gram) pairs, sorted.
    """

    def __init__(self, candidates: Sequence[Ids], references: Sequence[Sequence[Ids]]) -> None:
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
        sets: dict[tuple[tuple[int, ...], ...], int] = {}
        self.set_of = np.array([sets.setdefault(tuple(map(tuple, refs)), len(sets))
                                for refs in references], dtype=np.int64)  # (C,) each candidate's set
        if any(len(refs) == 0 for refs in sets):
            raise ValueError("every candidate needs at least one reference")
        ref_texts = [ref for refs in sets for ref in refs]
        self.set_size = np.array([len(refs) for refs in sets], dtype=np.int64)  # (S,)
        self.set_start = len(candidates) + np.concatenate([[0], np.cumsum(self.set_size)[:-1]]).astype(np.int64)
        texts = [*candidates, *ref_texts]
        self.num_candidates, self.num_texts = len(candidates), len(texts)
        self.lengths = np.array([len(t) for t in texts], dtype=np.int64)  # (T,)
        rows, keys = _ngrams(texts)
        self.keys, dense = np.unique(keys, return_inverse=True)  # (U,) distinct n-grams of the batch
        entries, self.tf = np.unique(rows * len(self.keys) + dense.reshape(-1), return_counts=True)
        self.entries = entries  # (E,) text * U + n-gram, sorted
        self.text, self.ngram = np.divmod(entries, max(len(self.keys), 1))
        self.n = _order(self.keys)[self.ngram]  # (E,) n - 1

    def candidate_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each candidate entry against each reference of its set: (entry, pair, reference text), (P_e,);
        pairs number (candidate, reference) in candidate order."""
        cand = np.nonzero(self.text < self.num_candidates)[0]
        sizes = self.set_size[self.set_of]  # (C,) references per candidate
        pair_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        reps = sizes[self.text[cand]]
        entry = np.repeat(cand, reps)
        j = np.arange(len(entry)) - np.repeat(np.cumsum(reps) - reps, reps)  # which reference of the set
        owner = self.text[entry]
        return entry, pair_start[owner] + j, self.set_start[self.set_of[owner]] + j

    def pair_references(self) -> tuple[np.ndarray, np.ndarray]:
        """(candidate, reference text) of every pair, (P,), in pair order."""
        sizes = self.set_size[self.set_of]
        cand = np.repeat(np.arange(self.num_candidates), sizes)
        j = np.arange(len(cand)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return cand, self.set_start[self.set_of[cand]] + j

    def lookup(self, texts: np.ndarray, ngrams: np.ndarray, values: np.ndarray) -> np.ndarray:
        """values[entry] of each (text, n-gram), 0 where the text lacks the n-gram."""
        return _lookup(self.entries, values, texts * len(self.keys) + ngrams)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[i] where sorted_keys[i] == query, else 0."""
    if not len(sorted_keys):
        return np.zeros(len(query))
    pos = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == query, values[pos], 0.0)


def cider_d(candidates: Sequence[Ids], references: Sequence[Sequence[Ids]], df: DocumentFrequencies) -> np.ndarray:
    """CIDEr-D of each candidate against its references (candidate i against references[i]), (C,) float64;
    pycocoevalcap's per-image CIDEr when `df` comes from the same references."""
    if not len(candidates):
        return np.zeros(0)
    b = _Batch(candidates, references)
    vec = b.tf * (df.log_num_sets - df.log_df(b.keys))[b.ngram]  # (E,) tf-idf
    norm = np.sqrt(np.bincount(b.text * MAX_N + b.n, weights=vec**2, minlength=b.num_texts * MAX_N))
    norm = norm.reshape(b.num_texts, MAX_N)
    entry, pair, ref = b.candidate_pairs()
    vec_ref = b.lookup(ref, b.ngram[entry], vec)
    cand, ref_of_pair = b.pair_references()
    overlap = np.bincount(pair * MAX_N + b.n[entry], weights=np.minimum(vec[entry], vec_ref) * vec_ref,
                          minlength=len(cand) * MAX_N).reshape(len(cand), MAX_N)  # (P, N) clipped dot products
    denominator = norm[cand] * norm[ref_of_pair]
    overlap = np.where(denominator != 0, overlap / np.where(denominator != 0, denominator, 1.0), overlap)
    bigrams = np.maximum(b.lengths - 1, 0)  # cider_scorer's length: the number of bigrams
    delta = (bigrams[cand] - bigrams[ref_of_pair]).astype(np.float64)
    per_pair = overlap.mean(axis=1) * np.exp(-(delta**2) / (2 * SIGMA**2))
    sizes = b.set_size[b.set_of]
    return np.bincount(cand, weights=per_pair, minlength=b.num_candidates) / sizes * 10.0


def bleu4(candidates: Sequence[Ids], references: Sequence[Sequence[Ids]]) -> np.ndarray:
    """Sentence BLEU-4 of each candidate, (C,) float64: pycocoevalcap BleuScorer's per-image BLEU-4 (its
    smoothing constants, the closest reference length for the brevity penalty), reimplemented on ids."""
    if not len(candidates):
        return np.zeros(0)
    b = _Batch(candidates, references)
    refs = b.text >= b.num_candidates
    ref_set = np.searchsorted(b.set_start, b.text[refs], side="right") - 1  # (E_r,) the set of each ref entry
    set_ngram = ref_set * len(b.keys) + b.ngram[refs]
    order = np.argsort(set_ngram, kind="stable")
    set_ngrams, first = np.unique(set_ngram[order], return_index=True)
    most = np.maximum.reduceat(b.tf[refs][order], first) if len(first) else np.zeros(0)  # max count in any ref
    cand = ~refs
    owner = b.text[cand]
    clipped = np.minimum(b.tf[cand], _lookup(set_ngrams, most, b.set_of[owner] * len(b.keys) + b.ngram[cand]))
    correct = np.bincount(owner * MAX_N + b.n[cand], weights=clipped, minlength=b.num_candidates * MAX_N)
    length = b.lengths[: b.num_candidates].astype(np.float64)
    guess = np.maximum(length[:, None] - np.arange(MAX_N), 0)  # (C, N) n-grams of the candidate
    precision = (correct.reshape(-1, MAX_N) + _TINY) / (guess + _SMALL)
    score = np.prod(precision, axis=1) ** (1.0 / MAX_N)
    pair_cand, pair_ref = b.pair_references()
    distance = np.abs(b.lengths[pair_ref] - length[pair_cand]) * 1e6 + b.lengths[pair_ref]  # ties: the shorter
    best = np.full(b.num_candidates, np.inf)
    np.minimum.at(best, pair_cand, distance)
    ref_length = np.round(best % 1e6)
    ratio = (length + _TINY) / (ref_length + _SMALL)
    return np.where(ratio < 1, score * np.exp(1 - 1 / np.minimum(ratio, 1)), score)


def scst_rewards(candidates: Sequence[Ids], references: Sequence[Sequence[Ids]], df: DocumentFrequencies,
                 bleu_weight: float = 0.0) -> np.ndarray:
    """The SCST reward of each candidate: CIDEr-D + bleu_weight * BLEU-4 (both end counted), (C,)."""
    reward = cider_d(candidates, references, df)
    return reward + bleu_weight * bleu4(candidates, references) if bleu_weight else reward


def reference_ids(captions: Any, caplens: Any) -> list[list[list[int]]]:
    """Packed captions (B, cpi, T) and caplens (B, cpi), as CaptionDataset gives them -> per image its
    references without <start>, with <end>, without <pad> (caplens count <start> and <end>)."""
    caps, lens = np.asarray(captions).tolist(), np.asarray(caplens).tolist()
    return [[cap[1:length] for cap, length in zip(image, image_lens)] for image, image_lens in zip(caps, lens)]


# --------------------------------------------------------------------------------------------
# The document-frequency file beside the pack
# --------------------------------------------------------------------------------------------
def df_path(data_folder: str | os.PathLike[str]) -> Path:
    """Where the train split's document frequencies live: beside the pack."""
    return Path(data_folder) / DF_FILE


def df_identity(data_folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What the file depends on, stored in it and compared when it is read: its format and convention, the
    pack (feature_cache's recipe: dataset.json, written last by packing, and train.h5's size), the word map."""
    folder = Path(data_folder)
    marker = folder / "dataset.json"
    pack = hashlib.sha1(marker.read_bytes() if marker.is_file() else b"")
    pack.update(str(os.path.getsize(folder / "train.h5")).encode())
    word_map = load_word_map(folder / "word_map.json")
    return {"format": DF_FORMAT, "convention": END_CONVENTION, "max_n": MAX_N, "pack_sha1": pack.hexdigest()[:16],
            "word_map_sha1": hashlib.sha1((folder / "word_map.json").read_bytes()).hexdigest()[:16],
            "end_id": word_map["<end>"]}


def build_document_frequencies(data_folder: str | os.PathLike[str]) -> DocumentFrequencies:
    """Count, for every n-gram, the train images whose references (the packed captions, END COUNTED) hold it.

    Reads the caption ids in chunks of whole images (memory flat in the pack's size), vectorised.
    """
    path = Path(data_folder) / "train.h5"
    info = check_packed(str(data_folder), "train")
    per_image = info["captions_per_image"]
    rows = max(_ROWS // per_image, 1) * per_image
    counted: list[tuple[np.ndarray, np.ndarray]] = []
    starts = range(0, info["num_captions"], rows)
    try:
        with h5py.File(path, "r") as h5:
            for first in progress_bar(starts, desc="CIDEr-D document frequencies", unit="chunk",
                                      disable=len(starts) < 4):
                captions = h5["captions"][first : first + rows].astype(np.int64)  # (R, T): <start> w.. <end> <pad>..
                lengths = h5["caplens"][first : first + rows].astype(np.int64) - 1  # words and <end>
                text, keys = _ngrams_of_rows(captions[:, 1:], lengths)
                counted.append(np.unique(_unique_pairs((first + text) // per_image, keys), return_counts=True))
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({one_line(e)})") from None
    if not counted:
        raise UserError(f"{path}: the train split is empty: no references to count document frequencies from")
    keys, inverse = np.unique(np.concatenate([k for k, _ in counted]), return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), weights=np.concatenate([c for _, c in counted]))
    return DocumentFrequencies.from_counts(keys, counts.astype(np.int64), info["num_images"])


def _encode(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _decode(stored: dict[str, Any], name: str, dtype: str, count: int) -> np.ndarray:
    data = base64.b64decode(stored[name], validate=True)
    if len(data) != count * np.dtype(dtype).itemsize:
        raise ValueError(f"{name}: {len(data)} bytes for {count} n-grams")
    return np.frombuffer(data, dtype=dtype)


def write_document_frequencies(path: str | os.PathLike[str], df: DocumentFrequencies, identity: dict[str, Any]) -> None:
    """The file: JSON (no pickle), the identity fields, then the sorted n-gram keys (little-endian uint64)
    and their document counts (little-endian uint32), base64: COCO's millions of n-grams load in a blink."""
    body = {"what": "CIDEr-D document frequencies of the train split's references (rewards.py)", **identity,
            "num_reference_sets": df.num_sets, "num_ngrams": len(df.keys),
            "ngram_keys": _encode(df.keys, "<u8"), "document_counts": _encode(df.counts, "<u4")}
    atomic_write_text(path, json.dumps(body, indent=0) + "\n")


def read_document_frequencies(path: str | os.PathLike[str], identity: dict[str, Any]) -> DocumentFrequencies:
    """The file at `path`, checked against `identity`; UserError (one line, naming the file) otherwise."""
    rebuild = "delete it to rebuild"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the CIDEr-D document frequencies ({one_line(e)}); {rebuild}") from None
    if not text.strip():
        raise UserError(f"{path}: empty file (a write that never finished?); {rebuild}")
    try:
        stored = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON, truncated or damaged ({e}); {rebuild}") from None
    if not isinstance(stored, dict) or "ngram_keys" not in stored or stored.get("format") != DF_FORMAT:
        found = stored.get("format") if isinstance(stored, dict) else type(stored).__name__
        raise UserError(f"{path}: not a CIDEr-D document-frequency file of format {DF_FORMAT} "
                        f"(found format {found!r}); {rebuild}")
    differs = [f"{key} {stored.get(key)!r} != {value!r}" for key, value in identity.items() if stored.get(key) != value]
    if differs:
        raise UserError(f"{path}: made from another pack or word map ({'; '.join(differs)}); {rebuild}")
    try:
        num_sets, count = int(stored["num_reference_sets"]), int(stored["num_ngrams"])
        keys = _decode(stored, "ngram_keys", "<u8", count).astype(np.uint64)
        counts = _decode(stored, "document_counts", "<u4", count).astype(np.int64)
        if num_sets < 1 or (count and (not np.all(keys[1:] > keys[:-1]) or counts.min() < 1
                                       or counts.max() > num_sets)):
            raise ValueError("n-gram keys unsorted or counts out of range")
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise UserError(f"{path}: damaged ({one_line(e)}); {rebuild}") from None
    return DocumentFrequencies(keys, counts, num_sets)


def load_document_frequencies(data_folder: str | os.PathLike[str], build: bool = True) -> DocumentFrequencies:
    """The train split's document frequencies, from DATA/cider_df.json: built (and written atomically) when
    missing and `build`; a file from another pack or word map, or a damaged one, is refused (UserError).
    Its ids are the pack's: for a model with another word map, use `.mapped(dataset.caption_id_map)`."""
    check_packed(str(data_folder), "train")
    identity = df_identity(data_folder)
    if len(load_word_map(Path(data_folder) / "word_map.json")) > MAX_ID + 1:
        raise UserError(f"{Path(data_folder) / 'word_map.json'}: over {MAX_ID + 1} words; CIDEr-D rewards "
                        "need ids below 65535")
    path = df_path(data_folder)
    if path.exists() or path.is_symlink():
        return read_document_frequencies(path, identity)
    if not build:
        raise UserError(f"{path} not found: load_document_frequencies(build=True) builds it from the train split")
    df = build_document_frequencies(data_folder)
    try:
        write_document_frequencies(path, df, identity)
    except OSError as e:  # a read-only data folder: rebuilding costs seconds, so go on without the file
        print(f"warning: {path}: cannot write ({one_line(e)}); the document frequencies are rebuilt each run",
              file=sys.stderr)
    return df
