"""Captions as words and ids: the tokenizers that pack and score a dataset, word maps, ids back to text."""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from satkit.infra.runtime import UserError, one_line

SPECIAL_TOKENS = ("<pad>", "<unk>", "<start>", "<end>")


TOKENIZERS = ("ascii", "unicode")  # how packing and scoring split captions into words (see `tokenize`)


def tokenize(text: str, tokenizer: str = "ascii") -> list[str]:
    """Caption text -> lower-cased words, by one of TOKENIZERS; the same rule packs and scores a dataset.

    ascii: runs of a-z0-9, the rule behind the Karpathy JSON `tokens` (English).
    unicode: runs of letters, digits and combining marks of any script (NFC), lower-cased by Unicode
        rules, so Greek, Cyrillic or Devanagari words survive. Scripts written without spaces
        (Japanese, Chinese) must be segmented beforehand: a run between spaces is one word.
    """
    if tokenizer == "ascii":
        return re.findall(r"[a-z0-9]+", text.lower())
    if tokenizer != "unicode":
        raise ValueError(f"tokenizer {tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    words, word = [], []
    for char in unicodedata.normalize("NFC", text).lower():
        if unicodedata.category(char)[0] in "LNM":  # letter, number, mark (a vowel sign is part of its word)
            word.append(char)
        elif word:
            words.append("".join(word))
            word = []
    return words + ["".join(word)] if word else words


def load_word_map(path: str | Path) -> dict[str, int]:
    """Read word_map.json and check it has the special tokens every script relies on."""
    try:
        with open(path, encoding="utf-8") as f:
            word_map = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: word map not found (run create_input_files.py first)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the word map ({one_line(e)})") from None
    check_word_map(word_map, str(path))
    return word_map


def check_word_map(word_map: Any, source: str) -> None:
    if not isinstance(word_map, dict) or not all(isinstance(v, int) for v in word_map.values()):
        raise UserError(f"{source}: word map must map words to integer ids")
    missing = [t for t in SPECIAL_TOKENS if t not in word_map]
    if missing:
        raise UserError(f"{source}: word map lacks {', '.join(missing)}")
    if word_map["<pad>"] != 0:
        raise UserError(f"{source}: <pad> must have id 0")


def decode_ids(ids: Sequence[int], rev_word_map: dict[int, str]) -> str:
    """Token ids -> caption text without <start>/<end>/<pad>; stops at the first <end>."""
    words = []
    for i in ids:
        word = rev_word_map.get(int(i), "<unk>")
        if word == "<end>":
            break
        if word not in ("<start>", "<pad>"):
            words.append(word)
    return " ".join(words)
