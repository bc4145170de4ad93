"""SCST rewards (rewards.py): CIDEr-D and BLEU-4 on token ids equal pycocoevalcap's on the same captions
written as tokens; the <end> convention; the document-frequency file beside the pack.

The file's fault rows (truncated, foreign, empty, unreadable, missing) are in test_faults.py.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider_scorer import CiderScorer

from satkit.training import rewards
from satkit.training.rewards import DocumentFrequencies, bleu4, cider_d, scst_rewards

END = 3  # the <end> id of the hand-made captions below


def as_tokens(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def coco_cider(candidates: list[list[int]], references: list[list[list[int]]]) -> np.ndarray:
    """pycocoevalcap's per-image CIDEr-D (df from these references), the ids written as tokens."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for candidate, refs in zip(candidates, references):
        scorer += (as_tokens(candidate), [as_tokens(r) for r in refs])
    return np.asarray(scorer.compute_score()[1])


def coco_bleu4(candidates: list[list[int]], references: list[list[list[int]]]) -> np.ndarray:
    """BleuScorer's per-image BLEU-4, closest reference length (what it uses for more than one image)."""
    scorer = BleuScorer(n=4)
    for candidate, refs in zip(candidates, references):
        scorer += (as_tokens(candidate), [as_tokens(r) for r in refs])
    return np.asarray(scorer.compute_score(option="closest")[1][3])


def random_batch(seed: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Few words (many repeated n-grams), candidates from empty to longer than every reference."""
    rng = random.Random(seed)

    def caption(lo: int, hi: int) -> list[int]:
        return [rng.randrange(12) for _ in range(rng.randint(lo, hi))]

    references = [[caption(1, 14) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(2, 9))]
    candidates = [caption(0, 20) for _ in references]
    candidates[0] = []
    return candidates, references


WORDS = {w: i for i, w in enumerate("<pad> <unk> <start> <end> a man riding horse dog and on the grass two dogs play "
                                    "in snow black white runs beach of is".split())}


def ids(caption: str, end: bool = True) -> list[int]:
    return [WORDS[w] for w in caption.split()] + ([END] if end else [])


REAL_REFS = [
    [ids("a man riding a horse"), ids("a man on a horse"), ids("a man riding a black horse on the beach"),
     ids("man riding horse")],
    [ids("a dog and a dog and a dog"), ids("two dogs play in the snow"), ids("a black dog and a white dog play"),
     ids("two dogs in the snow"), ids("dogs play")],
    [ids("a black and white dog runs on the grass"), ids("a dog runs on the grass"), ids("a dog on the grass")],
]
REAL_CANDIDATES = [
    ids("a man riding a horse"),  # a reference itself
    ids("a dog and a dog and a dog and a dog and a dog in the snow"),  # repeats, longer than every reference
    [],  # empty: not even <end>
]


@pytest.mark.parametrize("seed", range(6))
def test_cider_d_equals_pycocoevalcap_on_random_captions(seed):
    candidates, references = random_batch(seed)
    df = DocumentFrequencies.from_references(references)
    ours = cider_d(candidates, references, df)
    np.testing.assert_allclose(ours, coco_cider(candidates, references), rtol=0, atol=1e-6)
    assert ours[0] == 0.0  # the empty candidate


def test_cider_d_equals_pycocoevalcap_on_real_captions():
    candidates = REAL_CANDIDATES + [ids("a man riding a", end=False), ids("dogs"), ids("a dog on the grass")]
    references = REAL_REFS + [REAL_REFS[0], REAL_REFS[1], REAL_REFS[2]]
    ours = cider_d(candidates, references, DocumentFrequencies.from_references(references))
    np.testing.assert_allclose(ours, coco_cider(candidates, references), rtol=0, atol=1e-6)
    assert ours[0] > 1.0 and ours[2] == 0.0


def test_samples_of_one_image_score_as_if_alone():
    """Several samples per image share its references (scored once per set): same as one by one."""
    df = DocumentFrequencies.from_references(REAL_REFS)
    candidates = [ids("a man riding a horse"), ids("a dog"), ids("a horse"), ids("dogs play in the snow")]
    references = [REAL_REFS[0], REAL_REFS[0], [list(r) for r in REAL_REFS[0]], REAL_REFS[1]]  # equal, not the same
    together = cider_d(candidates, references, df)
    alone = [cider_d([c], [r], df)[0] for c, r in zip(candidates, references)]
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-12)


def test_document_frequencies_count_reference_sets():
    df = DocumentFrequencies.from_references(REAL_REFS)
    assert df.num_sets == 3 and df.count([WORDS["a"]]) == 3 and df.count([WORDS["dog"], WORDS["and"]]) == 1
    assert df.count([WORDS["grass"], END]) == 1 and df.count([WORDS["beach"], WORDS["man"]]) == 0
    assert df.count([END]) == 3  # <end> is a word of every reference
    with pytest.raises(ValueError, match="token ids"):
        DocumentFrequencies.from_references([[[70000]]])


def test_document_frequencies_in_another_word_map():
    """A model keeping its init_from word map scores in its own ids: the counts follow the words."""
    id_map = np.concatenate([[0, 1, 2, 3], np.arange(4, len(WORDS))[::-1]])  # pack id -> model id: words reversed
    df = DocumentFrequencies.from_references(REAL_REFS)
    in_model_ids = [[[int(id_map[i]) for i in ref] for ref in refs] for refs in REAL_REFS]
    expected = DocumentFrequencies.from_references(in_model_ids)
    mapped = df.mapped(id_map)
    np.testing.assert_array_equal(mapped.keys, expected.keys)
    np.testing.assert_array_equal(mapped.counts, expected.counts)
    merged = df.mapped(np.where(np.arange(len(WORDS)) > 3, 1, np.arange(len(WORDS))))  # every word -> <unk>
    assert merged.count([1]) == 3 and merged.counts.max() <= 3


def test_end_token_counts_as_a_word():
    """The fix for captions cut mid-phrase: without <end> a sample loses the n-grams ending the references."""
    df = DocumentFrequencies.from_references(REAL_REFS)
    finished, unfinished = ids("a man riding a horse"), ids("a man riding a horse", end=False)
    cut = ids("a man riding a")
    scores = cider_d([finished, unfinished, cut], [REAL_REFS[0]] * 3, df)
    assert scores[0] > scores[1] and scores[0] > scores[2]  # "a <end>" ends no reference


def test_reference_ids_from_packed_captions():
    captions = np.array([[[2, 4, 5, END, 0], [2, 6, END, 0, 0]]])  # (B=1, cpi=2, T): <start> w.. <end> <pad>
    assert rewards.reference_ids(captions, np.array([[4, 3]])) == [[[4, 5, END], [6, END]]]


@pytest.mark.parametrize("seed", range(4))
def test_bleu4_equals_pycocoevalcap_bleu_scorer(seed):
    candidates, references = random_batch(seed)
    candidates += REAL_CANDIDATES
    references += REAL_REFS
    np.testing.assert_allclose(bleu4(candidates, references), coco_bleu4(candidates, references), rtol=0, atol=1e-9)


def test_scst_rewards_adds_weighted_bleu():
    df = DocumentFrequencies.from_references(REAL_REFS)
    cider, bleu = cider_d(REAL_CANDIDATES, REAL_REFS, df), bleu4(REAL_CANDIDATES, REAL_REFS)
    np.testing.assert_allclose(scst_rewards(REAL_CANDIDATES, REAL_REFS, df), cider)
    np.testing.assert_allclose(scst_rewards(REAL_CANDIDATES, REAL_REFS, df, bleu_weight=0.5), cider + 0.5 * bleu)
    assert len(cider_d([], [], df)) == 0
    with pytest.raises(ValueError, match="2 candidates but 1"):
        cider_d(REAL_CANDIDATES[:2], REAL_REFS[:1], df)


# --------------------------------------------------------------------------------------------
# The document-frequency file
# --------------------------------------------------------------------------------------------
@pytest.fixture
def packed(shapes_folder: Path, tmp_path: Path) -> Path:
    """A copy of the shapes pack: the file is written beside it."""
    return Path(shutil.copytree(shapes_folder, tmp_path / "packed"))


def train_references(folder: Path) -> list[list[list[int]]]:
    with h5py.File(folder / "train.h5", "r") as h5:
        per_image = int(h5.attrs["captions_per_image"])
        captions, caplens = h5["captions"][:], h5["caplens"][:]
    return rewards.reference_ids(captions.reshape(-1, per_image, captions.shape[1]), caplens.reshape(-1, per_image))


def test_df_file_round_trip(packed, monkeypatch):
    df = rewards.load_document_frequencies(packed)
    expected = DocumentFrequencies.from_references(train_references(packed))
    assert df.num_sets == expected.num_sets == 30
    np.testing.assert_array_equal(df.keys, expected.keys)
    np.testing.assert_array_equal(df.counts, expected.counts)
    stored = json.loads((packed / "cider_df.json").read_text())
    word_map = json.loads((packed / "word_map.json").read_text())
    assert stored["format"] == 1 and stored["convention"] == "end-counted" and stored["end_id"] == word_map["<end>"]
    assert stored["num_reference_sets"] == 30 and stored["num_ngrams"] == len(df.keys)
    monkeypatch.setattr(rewards, "build_document_frequencies", None)  # a second load reads, never builds
    again = rewards.load_document_frequencies(packed, build=False)
    np.testing.assert_array_equal(again.keys, df.keys)
    np.testing.assert_array_equal(again.counts, df.counts)


def test_df_file_missing_without_build(packed):
    with pytest.raises(rewards.UserError, match="cider_df.json not found"):
        rewards.load_document_frequencies(packed, build=False)


def test_df_file_from_another_pack_is_refused(packed, tmp_path):
    rewards.load_document_frequencies(packed)
    other = Path(shutil.copytree(packed, tmp_path / "other"))
    marker = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**marker, "seed": 4}))  # another pack of the same shapes
    with pytest.raises(rewards.UserError) as error:
        rewards.load_document_frequencies(other)
    line = str(error.value)
    assert "\n" not in line and str(other / "cider_df.json") in line
    assert "made from another pack" in line and "pack_sha1" in line and "delete it to rebuild" in line
