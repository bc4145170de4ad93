"""eval.py: coco-caption scores, NLTK BLEU, attention fidelity, and eval.main end to end and on bad files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint

import eval as eval_cli
from satkit.evaluation import fidelity, scoring
from satkit.config import ModelConfig
from satkit.model import build_model
from satkit.data.text import tokenize

pytestmark = pytest.mark.java  # coco-caption's Java parts (PTB tokenizer, METEOR) are what this file checks
NEEDS_JAVA = pytest.mark.skipif(not scoring.java_available(), reason="coco-caption's PTB tokenizer/METEOR need Java")

# Fixed results/references (raw text, punctuation and case included: the PTB tokenizer must see them).
CAPTIONS = {
    1: "A red circle and a blue square.",
    2: "two shapes: a green triangle and a red circle",
    7: "a purple diamond on a grey background",
}
REFERENCES = {
    1: ["a red circle and a blue square", "two shapes a red circle and a blue square", "A blue square, a red circle."],
    2: ["a green triangle and a yellow circle", "there are two shapes a green triangle and a yellow circle"],
    7: ["a purple diamond", "a single purple diamond", "a purple diamond on a grey background"],
}


@pytest.fixture(scope="module")
def meteor_jvm():
    """One METEOR JVM for the whole file: loading its paraphrase tables takes seconds each time."""
    if not scoring.java_available():
        pytest.skip("METEOR needs Java")
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    yield meteor
    del meteor  # its __del__ stops the JVM


@pytest.fixture
def shared_meteor(meteor_jvm, monkeypatch):
    """Make score_captions' `Meteor()` return the shared instance (METEOR scoring is stateless per call)."""
    import pycocoevalcap.meteor.meteor as meteor_module

    monkeypatch.setattr(meteor_module, "Meteor", lambda: meteor_jvm)
    return meteor_jvm


# --------------------------------------------------------------------------------------------
# Caption metrics
# --------------------------------------------------------------------------------------------
@NEEDS_JAVA
def test_score_captions_matches_pycocoevalcap(shared_meteor):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = scoring.score_captions(CAPTIONS, REFERENCES)

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in CAPTIONS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    # Brevity penalty by hand: corpus hypothesis length vs the closest reference length per image.
    hyp_len = sum(len(res[i][0].split()) for i in res)
    ref_len = sum(min((len(r.split()) for r in gts[i]), key=lambda n: (abs(n - len(res[i][0].split())), n))
                  for i in res)
    expected["BLEU-brevity-penalty"] = min(1.0, math.exp(1 - ref_len / hyp_len))
    expected["METEOR"] = shared_meteor.compute_score(gts, res)[0]
    expected["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]

    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1  # a non-trivial case: neither all wrong nor perfect


def test_bleu_brevity_penalty_can_be_divided_out():
    captions = {1: "a cat on grass", 2: "two red cars"}
    references = {1: ["a dog runs on the green grass", "a brown dog"], 2: ["two red cars parked on a street"]}
    scores = scoring.score_captions(captions, references, metrics=("BLEU",), words="ascii")
    # closest reference lengths: 3 ("a brown dog" is nearer 4 words than 7) and 7; hypotheses 4 + 3
    assert scores["BLEU-brevity-penalty"] == pytest.approx(math.exp(1 - 10 / 7))
    # Without the penalty, BLEU-1 is the clipped unigram precision: 3 of 4 + 3 of 3 words match.
    assert scores["BLEU-1"] / scores["BLEU-brevity-penalty"] == pytest.approx(6 / 7, rel=1e-6)


def test_score_captions_ascii_words_and_subset():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ours = scoring.score_captions(CAPTIONS, REFERENCES, metrics=["BLEU", "CIDEr"], words="ascii")
    def tok(text: str) -> str:
        return " ".join(tokenize(text))

    gts = {i: [tok(r) for r in refs] for i, refs in REFERENCES.items()}
    res = {i: [tok(c)] for i, c in CAPTIONS.items()}
    assert tok("Two shapes: a RED circle.") == "two shapes a red circle"
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert set(ours) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "BLEU-brevity-penalty", "CIDEr"}
    assert [ours[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)


@NEEDS_JAVA
def test_score_captions_empty_caption_scores_zero(shared_meteor):
    """An untrained model can emit <end> first: an empty caption must score, not crash."""
    scores = scoring.score_captions({1: "", 2: "a red circle"}, {1: ["a blue square"], 2: ["a red circle"]})
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "BLEU-brevity-penalty", "METEOR", "ROUGE-L", "CIDEr"}
    assert 0 < scores["BLEU-1"] < 1 and 0 <= scores["METEOR"] < 1


def test_score_captions_without_java_skips_meteor(monkeypatch, capsys):
    from pycocoevalcap.bleu.bleu import Bleu

    monkeypatch.setattr(scoring, "java_available", lambda: False)
    scores = scoring.score_captions(CAPTIONS, REFERENCES)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "BLEU-brevity-penalty", "ROUGE-L", "CIDEr"}
    assert "java not found" in capsys.readouterr().err
    def tok(text: str) -> str:  # the Python tokenizer stands in for PTB
        return " ".join(tokenize(text))

    bleu, _ = Bleu(4).compute_score({i: [tok(r) for r in refs] for i, refs in REFERENCES.items()},
                                    {i: [tok(c)] for i, c in CAPTIONS.items()}, verbose=0)
    assert [scores[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)


def test_score_captions_rejects_bad_input():
    with pytest.raises(ValueError, match="same image ids"):
        scoring.score_captions({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="unknown metric"):
        scoring.score_captions({1: "a"}, {1: ["a"]}, metrics=["BLEU", "WER"], words="ascii")
    with pytest.raises(ValueError, match="nothing to score"):
        scoring.score_captions({}, {})


def test_nltk_bleu():
    from nltk.translate.bleu_score import corpus_bleu

    perfect = scoring.score_captions({1: "A red circle, left."}, {1: ["a red circle left", "a circle"]},
                                     metrics=["NLTK-BLEU"], words="ascii")
    assert perfect == {f"NLTK-BLEU-{n}": pytest.approx(1.0) for n in range(1, 5)}
    scores = scoring.score_captions(CAPTIONS, REFERENCES, metrics=["NLTK-BLEU"], words="ascii")
    ids = sorted(CAPTIONS)
    refs = [[tokenize(r) for r in REFERENCES[i]] for i in ids]
    hyps = [tokenize(CAPTIONS[i]) for i in ids]
    assert scores["NLTK-BLEU-1"] == pytest.approx(corpus_bleu(refs, hyps, weights=(1.0,)), abs=1e-12)
    assert scores["NLTK-BLEU-4"] == pytest.approx(corpus_bleu(refs, hyps), abs=1e-12)
    assert 0 < scores["NLTK-BLEU-4"] < scores["NLTK-BLEU-1"] < 1


# --------------------------------------------------------------------------------------------
# The metric registry
# --------------------------------------------------------------------------------------------
def test_registry_declares_what_each_metric_gives():
    assert scoring.default_metrics() == ("BLEU", "METEOR", "ROUGE-L", "CIDEr")
    assert {n for n, m in scoring.METRICS.items() if not m.default} >= {"SPICE", "NLTK-BLEU"}
    assert scoring.METRICS["BLEU"].keys == ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
    assert scoring.METRICS["BLEU"].extra_keys == ("BLEU-brevity-penalty",)
    assert "BLEU-brevity-penalty" not in scoring.SCORE_KEYS  # reported, but it cannot select a model
    assert scoring.SCORE_KEYS["ROUGE-L"] == "ROUGE-L" and "ROUGE_L" not in scoring.SCORE_KEYS
    assert [n for n, m in scoring.METRICS.items() if m.needs_java] == ["METEOR", "SPICE"]
    assert [n for n, m in scoring.METRICS.items() if m.english_only] == ["METEOR", "SPICE"]
    assert scoring.per_image_keys() == ("BLEU-4", "CIDEr")
    # Every metric requested is returned under the keys it declares: ROUGE-L as ROUGE-L.
    scores = scoring.score_captions(CAPTIONS, REFERENCES, metrics=["ROUGE-L"], words="ascii")
    assert set(scores) == {"ROUGE-L"}
    with pytest.raises(ValueError, match="unknown metric"):
        scoring.score_captions(CAPTIONS, REFERENCES, metrics=["ROUGE_L"], words="ascii")
    with pytest.raises(ValueError, match="already registered"):
        scoring.register_metric("BLEU2", keys=["BLEU-4"])(lambda gts, res: {})


def test_validation_metrics_follow_val_metric():
    assert scoring.validation_metrics("BLEU-4") == ("BLEU", "CIDEr")
    assert scoring.validation_keys("CIDEr") == ("BLEU-4", "CIDEr")
    assert scoring.validation_metrics("ROUGE-L") == ("BLEU", "CIDEr", "ROUGE-L")
    assert scoring.validation_keys("ROUGE-L") == ("BLEU-4", "CIDEr", "ROUGE-L")
    assert scoring.validation_metrics("NLTK-BLEU-2") == ("BLEU", "CIDEr", "NLTK-BLEU")


def test_scoring_words_maps_the_packs_tokenizer(monkeypatch):
    monkeypatch.setattr(scoring, "java_available", lambda: True)
    assert scoring.scoring_words("ascii") == "ptb"  # eval: coco-caption's tokenizer, as published numbers
    assert scoring.scoring_words("ascii", ptb=False) == "ascii"  # train's validation: no JVM every epoch
    assert scoring.scoring_words("unicode") == scoring.scoring_words("unicode", ptb=False) == "unicode"
    monkeypatch.setattr(scoring, "java_available", lambda: False)
    assert scoring.scoring_words("ascii") == "ascii"
    with pytest.raises(ValueError, match="words='simple'"):
        scoring.score_captions(CAPTIONS, REFERENCES, words="simple")


def test_a_metric_must_return_its_declared_keys():
    @scoring.register_metric("BAD-KEYS", keys=["BAD-1"], default=False)
    def bad(gts, res):
        return {"BAD-2": 0.0}

    try:
        with pytest.raises(ValueError, match="'BAD-KEYS' returned \\['BAD-2'\\]"):
            scoring.score_captions(CAPTIONS, REFERENCES, metrics=["BAD-KEYS"], words="ascii")
    finally:
        unregister("BAD-KEYS")


def unregister(name: str) -> None:
    """Undo a test's register_metric (the registry is module state shared by every test)."""
    metric = scoring.METRICS.pop(name)
    for key in metric.keys:
        del scoring.SCORE_KEYS[key]


# --------------------------------------------------------------------------------------------
# Attention fidelity on hand-made decoded items
# --------------------------------------------------------------------------------------------
GRID = 4  # cell centres at 0.125, 0.375, 0.625, 0.875 of the side


def peaked(cells: list[tuple[int, int]]) -> torch.Tensor:
    """(T, g, g) attention maps, step t peaked at cells[t] = (row, col) (row = y, col = x)."""
    alphas = torch.full((len(cells), GRID, GRID), 0.2 / (GRID * GRID - 1))
    for t, (row, col) in enumerate(cells):
        alphas[t, row, col] = 0.8
    return alphas


TOP_LEFT = [0.0, 0.0, 0.5, 0.5]  # x0, y0, x1, y1: holds 2 x 2 of the 16 cell centres
RIGHT_HALF = [0.5, 0.0, 1.0, 1.0]  # holds 2 x 4 centres


def test_attention_fidelity_hits_and_chance():
    objects = {
        0: [{"color": "red", "shape": "circle", "box": TOP_LEFT}],
        1: [{"color": "red", "shape": "circle", "box": TOP_LEFT},
            {"color": "blue", "shape": "square", "box": RIGHT_HALF}],
    }
    decoded = [
        # noun step peaks inside the box: a hit for both measures
        {"index": 0, "words": ["a", "red", "circle"], "alphas": peaked([(3, 3), (3, 3), (1, 0)])},
        # image 1: "red circle" noun peak outside, colour peak inside -> noun miss, noun_or_colour hit;
        # "blue square" noun peak inside the right half -> hit; "green circle" is not in the image: ignored;
        # "red square" names a colour/shape pair that is not there either: ignored.
        {"index": 1, "words": ["a", "red", "circle", "a", "blue", "square", "green", "circle", "red", "square"],
         "alphas": peaked([(0, 0), (0, 1), (3, 3), (0, 0), (0, 0), (2, 3), (0, 0), (0, 0), (0, 0), (0, 0)])},
    ]
    result = fidelity.attention_fidelity(decoded, objects)
    assert set(result) == {"all", "1_objects", "2_objects"}
    assert result["1_objects"] == {"mentions": 1, "hit_noun": 1.0, "hit_noun_or_colour": 1.0, "chance": 0.25}
    assert result["2_objects"] == {"mentions": 2, "hit_noun": 0.5, "hit_noun_or_colour": 1.0,
                                   "chance": pytest.approx((0.25 + 0.5) / 2)}
    assert result["all"]["mentions"] == 3
    assert result["all"]["hit_noun"] == pytest.approx(2 / 3)
    assert result["all"]["hit_noun_or_colour"] == 1.0
    assert result["all"]["chance"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)


def test_attention_fidelity_miss_and_no_mentions():
    objects = {0: [{"color": "red", "shape": "circle", "box": TOP_LEFT}]}
    miss = [{"index": 0, "words": ["red", "circle"], "alphas": peaked([(2, 2), (3, 1)])}]
    result = fidelity.attention_fidelity(miss, objects)
    assert result["all"] == {"mentions": 1, "hit_noun": 0.0, "hit_noun_or_colour": 0.0, "chance": 0.25}
    nothing = [{"index": 0, "words": ["a", "circle", "red"], "alphas": peaked([(0, 0)] * 3)}]
    assert fidelity.attention_fidelity(nothing, objects) == {}


@pytest.mark.parametrize("box,chance", [([0.0, 0.0, 1.0, 1.0], 1.0), ([0.0, 0.0, 0.3, 0.3], 1 / 16),
                                        ([0.125, 0.0, 0.625, 1.0], 3 / 4), ([0.2, 0.2, 0.3, 0.3], 0.0)])
def test_attention_fidelity_chance_is_the_fraction_of_cell_centres_in_the_box(box, chance):
    objects = {0: [{"color": "red", "shape": "circle", "box": box}]}
    decoded = [{"index": 0, "words": ["red", "circle"], "alphas": peaked([(0, 0), (0, 0)])}]
    assert fidelity.attention_fidelity(decoded, objects)["all"]["chance"] == pytest.approx(chance)


# --------------------------------------------------------------------------------------------
# eval.main end to end on a tiny packed shapes dataset
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    import create_input_files

    folder = tmp_path_factory.mktemp("eval") / "shapes"
    code = create_input_files.main(["--dataset", "shapes", "--output-folder", str(folder), "--num-images", "60",
                                    "--image-size", "64", "--num-workers", "1"])
    assert code in (0, None)
    return folder


def chain_checkpoint(path: Path, folder: Path) -> tuple[Path, str]:
    """A tiny model wired to say one fixed caption, "a <colour> <shape>", for every image.

    The colour and shape are those of the first test image's first object, so at least that image has a
    mention for attention fidelity. Wiring: a one-hot embedding E, the h/z paths of the deep output cut,
    and L_o mapping the previous word to the next one: p(y_t | y_{t-1}) follows the chain.
    """
    from satkit.data.dataset import CaptionDataset

    dataset = CaptionDataset(str(folder), "test")
    first = dataset.objects(0)[0]
    dataset.close()
    word_map = json.loads((folder / "word_map.json").read_text())
    chain = ["<start>", "a", first["color"], first["shape"], "<end>"]
    assert all(w in word_map for w in chain)
    vocab = len(word_map)
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=GRID, attention_dim=16, embed_dim=vocab,
                      decoder_dim=32, dropout=0.0, vocab_size=vocab)
    torch.manual_seed(0)
    model = build_model(cfg)
    decoder = model.decoder
    with torch.no_grad():
        decoder.embedding.weight.copy_(torch.eye(vocab))
        for layer in (decoder.L_h, decoder.L_z):
            layer.weight.zero_()
            layer.bias.zero_()
        decoder.L_o.weight.zero_()
        decoder.L_o.bias.zero_()
        for prev, nxt in zip(chain, chain[1:]):
            decoder.L_o.weight[word_map[nxt], word_map[prev]] = 30.0
    write_checkpoint(path, model, cfg, word_map, image_size=64)
    return path, " ".join(chain[1:-1])


@NEEDS_JAVA
@pytest.mark.filterwarnings("ignore::UserWarning:nltk.translate.bleu_score")  # 3-word captions: no 4-grams
def test_eval_main_end_to_end(packed, tmp_path, capsys, shared_meteor):
    ckpt, sentence = chain_checkpoint(tmp_path / "chain.pt", packed)
    out = tmp_path / "results" / "test.json"
    code = eval_cli.main(["--checkpoint", str(ckpt), "--data-folder", str(packed), "--split", "test",
                            "--beam-size", "2", "--batch-size", "2", "--max-len", "8", "--device", "cpu",
                            "--num-workers", "0", "--bleu", "nltk", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads(out.read_text())
    assert isinstance(results, list) and len(results) == 5  # 60 images: 50 train, 5 val, 5 test
    assert all(set(r) == {"image_id", "caption", "index"} for r in results)
    assert [r["index"] for r in results] == list(range(5))
    assert [r["image_id"] for r in results] == [f"shapes_{i:06d}.png" for i in range(55, 60)]  # file names
    assert all(r["caption"] == sentence for r in results)

    metrics = json.loads(out.with_name("test.metrics.json").read_text())
    keys = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "BLEU-brevity-penalty", "METEOR", "ROUGE-L", "CIDEr", "attention_hit_noun",
            "attention_hit_noun_or_colour", "attention_chance", "NLTK-BLEU-1", "NLTK-BLEU-2", "NLTK-BLEU-3",
            "NLTK-BLEU-4"}
    assert keys <= set(metrics)
    assert metrics["images"] == 5 and metrics["unfinished"] == 0 and metrics["beam_size"] == 2
    for key in keys:
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= (10.0 if key == "CIDEr" else 1.0), key
    assert metrics["BLEU-1"] > 0  # "a" is in every reference
    assert metrics["attention_fidelity"]["all"]["mentions"] >= 1
    assert 0 < metrics["attention_chance"] < 1
    assert f"captions: {out}" in captured.out
    # One caption for every image: 1 of 5 distinct, and the shuffled control scores exactly the same,
    # since a caption that ignores the image fits any image's references equally well.
    assert metrics["distinct_captions"] == pytest.approx(0.2) and metrics["vocab_used"] == 3
    assert metrics["mean_length"] == 3.0 and metrics["control"] == "shuffled"
    assert metrics["bad_endings"] == float(sentence.split()[-1] in scoring.FUNCTION_WORDS)  # one caption for all
    assert metrics["shuffled_CIDEr"] == pytest.approx(metrics["CIDEr"])
    assert metrics["shuffled_BLEU-4"] == pytest.approx(metrics["BLEU-4"])
    assert metrics["CIDEr_over_shuffled"] == pytest.approx(1.0)


@NEEDS_JAVA
def test_eval_main_default_output_and_coco_only(packed, tmp_path, capsys, shared_meteor):
    ckpt, _ = chain_checkpoint(tmp_path / "run" / "best.pt", packed)
    code = eval_cli.main(["--checkpoint", str(ckpt), "--data-folder", str(packed), "--split", "val",
                            "--beam-size", "1", "--max-len", "8", "--device", "cpu", "--num-workers", "1"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "val_beam1.json").read_text())
    assert len(results) == 5
    metrics = json.loads((tmp_path / "run" / "val_beam1.metrics.json").read_text())
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(metrics)
    assert not any(key.startswith("NLTK") for key in metrics)
    assert metrics["split"] == "val"


def test_eval_main_sample_writes_its_own_file_beside_the_beam_search_results(packed, tmp_path, capsys, monkeypatch):
    """docs/evaluation.md: `--sample` writes SPLIT_sampleN.json (and its metrics), never SPLIT_beamN.json."""
    monkeypatch.setattr(scoring, "java_available", lambda: False)  # not about Java: ascii words, BLEU and CIDEr
    ckpt, _ = chain_checkpoint(tmp_path / "run" / "best.pt", packed)
    common = ["--checkpoint", str(ckpt), "--data-folder", str(packed), "--split", "test", "--beam-size", "2",
              "--max-len", "8", "--device", "cpu", "--num-workers", "0", "--control", "none", "--metrics-only",
              "--metric", "BLEU", "--metric", "CIDEr"]
    assert eval_cli.main(common) == 0, capsys.readouterr().err
    beam = {name: (tmp_path / "run" / name).read_bytes() for name in ("test_beam2.json", "test_beam2.metrics.json")}
    assert eval_cli.main([*common, "--sample", "--top-k", "3"]) == 0, capsys.readouterr().err
    assert {name: (tmp_path / "run" / name).read_bytes() for name in beam} == beam  # untouched
    assert "sample" not in json.loads(beam["test_beam2.metrics.json"])["decode"]
    assert len(json.loads((tmp_path / "run" / "test_sample2.json").read_text())) == 5
    decode = json.loads((tmp_path / "run" / "test_sample2.metrics.json").read_text())["decode"]
    assert decode["sample"] is True and decode["top_k"] == 3 and decode["beam_size"] == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("test_*.json")) == [
        "test_beam2.json", "test_beam2.metrics.json", "test_sample2.json", "test_sample2.metrics.json"]


def test_eval_main_on_the_train_split(packed, tmp_path, capsys):
    """Train items carry no references for training; eval asks for them, so any split can be scored."""
    ckpt, _ = chain_checkpoint(tmp_path / "run" / "best.pt", packed)
    out = tmp_path / "train.json"
    code = eval_cli.main(["--checkpoint", str(ckpt), "--data-folder", str(packed), "--split", "train",
                            "--beam-size", "1", "--max-len", "8", "--num-workers", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert len(json.loads(out.read_text())) == 50
    assert json.loads((tmp_path / "train.metrics.json").read_text())["split"] == "train"


# --------------------------------------------------------------------------------------------
# eval.main on bad checkpoints: one `error:` line naming the file, exit code 1
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random bytes", "zero bytes", "text", "missing", "not ours"])
def test_eval_main_bad_checkpoint(kind, packed, tmp_path, capsys):
    ckpt = tmp_path / "bad.pt"
    if kind == "random bytes":
        ckpt.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "zero bytes":
        ckpt.write_bytes(b"")
    elif kind == "text":
        ckpt.write_text("checkpoint: best\nepoch: 3\n")
    elif kind == "not ours":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    code = eval_cli.main(["--checkpoint", str(ckpt), "--data-folder", str(packed), "--device", "cpu",
                            "--num-workers", "0"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and str(ckpt) in lines[0]
    assert "Traceback" not in captured.err


def test_eval_main_word_map_mismatch(packed, tmp_path, capsys):
    word_map = {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3, "a": 4}
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=GRID, attention_dim=16, embed_dim=16,
                      decoder_dim=32, vocab_size=len(word_map))
    ckpt = write_checkpoint(tmp_path / "other.pt", build_model(cfg), cfg, word_map)
    code = eval_cli.main(["--checkpoint", str(ckpt), "--data-folder", str(packed), "--device", "cpu",
                            "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and "word map" in err and len(err.strip().splitlines()) == 1


def test_shuffled_references_are_a_fixed_derangement():
    references = {i: [f"caption of image {i}"] for i in range(10, 30)}
    shuffled = scoring.shuffled_references(references)
    assert set(shuffled) == set(references)
    assert all(shuffled[i] != references[i] for i in references)  # no image keeps its own references
    assert sorted(map(tuple, shuffled.values())) == sorted(map(tuple, references.values()))  # a permutation
    assert shuffled == scoring.shuffled_references(references)  # fixed: the same every run
    with pytest.raises(ValueError, match="at least 2"):
        scoring.shuffled_references({1: ["a"]})


def test_caption_diversity_and_collapse_warning(capsys):
    diversity = scoring.caption_diversity(["a dog runs", "a dog runs", "a cat sits on a mat", "a dog runs"])
    assert diversity == {"distinct_captions": 0.5, "vocab_used": 7, "mean_length": 3.75, "bad_endings": 0.0}
    scoring.warn_if_collapsed(diversity)
    assert capsys.readouterr().err == ""
    scoring.warn_if_collapsed(scoring.caption_diversity(["a man"] * 8 + ["a dog", "a cat"]))
    assert capsys.readouterr().err == ""  # 30% distinct: no warning
    scoring.warn_if_collapsed(scoring.caption_diversity(["a man"] * 19 + ["a dog"]))
    assert "warning: only 10% of the captions are distinct" in capsys.readouterr().err


def test_bad_endings_counts_captions_cut_mid_phrase():
    """The SCST failure mode: captions that stop on a function word ("a man riding a")."""
    captions = ["a man riding a", "a dog on the", "a dog runs", "two dogs play in the snow", "", "the"]
    assert scoring.caption_diversity(captions)["bad_endings"] == pytest.approx(3 / 6)  # the empty one is not
    assert scoring.caption_diversity([])["bad_endings"] == 0.0
    assert scoring.caption_diversity(["a man with his", "a cat is"])["bad_endings"] == 1.0
    assert "bad_endings" in scoring.DIVERSITY_KEYS and {"a", "the", "of", "their"} <= scoring.FUNCTION_WORDS
