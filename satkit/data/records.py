"""What packing and shard streaming share: an image's caption record, the vocabulary, and caption encoding.

Apart from packing.py so that shards.py (which streams shards), shard_writer.py (which writes them) and
packing.py (which packs them, among other sources) all import it, and packing.py is imported by none of them.
"""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from satkit.data.text import SPECIAL_TOKENS

__all__ = ["Record", "build_word_map", "choose_captions", "encode_caption"]


@dataclass
class Record:
    """One image to pack. `filename` is relative to the image folder and is stored in the HDF5 file; it
    names the image in error messages when the image comes as `data` rather than from a file."""

    filename: str
    path: str = ""  # file to decode; empty for generated (shapes) images and for images given as `data`
    tokens: list[list[str]] = field(default_factory=list)  # every caption, tokenised
    references: list[str] = field(default_factory=list)  # every caption as text, aligned with `tokens`
    index: int = -1  # shapes: image index
    image_id: int | None = None  # the dataset's own image id (COCO's `cocoid`), stored as image_ids when all have one
    objects: list[dict[str, Any]] | None = None  # shapes only
    # The encoded image (JPEG, PNG, ...) to decode instead of reading `path`, e.g. from a WebDataset shard;
    # decoded exactly as a file is (dataset.load_image_bytes).
    data: bytes | None = field(default=None, repr=False)

    def add_caption(self, text: str, tokens: list[str]) -> None:
        """Keep a caption only if it has a word: an empty or punctuation-only one is dropped."""
        if tokens:
            self.tokens.append(tokens)
            self.references.append(text)


def build_word_map(captions: Iterable[list[str]], min_word_freq: int) -> dict[str, int]:
    """<pad>=0, then words with count >= min_word_freq by descending count (ties alphabetical),
    then <unk>, <start>, <end>."""
    counts = Counter(w for c in captions for w in c)
    words = sorted((w for w, n in counts.items() if n >= min_word_freq and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    word_map = {"<pad>": 0}
    for w in words + ["<unk>", "<start>", "<end>"]:
        word_map[w] = len(word_map)
    return word_map


def choose_captions(num_captions: int, captions_per_image: int, seed: int, key: str) -> list[int]:
    """Indices of the captions stored for one image: all of them if exactly enough, a seeded sample
    without replacement if more, and all plus seeded repeats if fewer. Seeded by (seed, key), so one
    image's choice does not depend on which other images were packed or skipped."""
    if num_captions == captions_per_image:
        return list(range(num_captions))
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    if num_captions > captions_per_image:
        return sorted(int(i) for i in rng.choice(num_captions, captions_per_image, replace=False))
    repeats = rng.choice(num_captions, captions_per_image - num_captions, replace=True)
    return list(range(num_captions)) + [int(i) for i in repeats]


def encode_caption(tokens: Sequence[str], word_map: dict[str, int], max_words: int) -> tuple[list[int], int]:
    """<start> w1..wn <end> <pad>... (length max_words + 2) and n + 2; callers truncate to max_words first."""
    ids = [word_map["<start>"]] + [word_map.get(w, word_map["<unk>"]) for w in tokens] + [word_map["<end>"]]
    return ids + [word_map["<pad>"]] * (max_words + 2 - len(ids)), len(ids)
