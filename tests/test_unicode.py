"""--tokenizer unicode: captions in any script, packed and scored with the same tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from conftest import pack_main
from PIL import Image

import create_input_files
import eval as eval_cli
from satkit.evaluation import scoring
from satkit.training import trainer
from satkit.data.dataset import CaptionDataset
from satkit.data.text import tokenize

# Greek captions, with capitals, accents and punctuation; the colour word names the image's colour.
COLOURS = {"κόκκινο": (200, 30, 30), "πράσινο": (30, 200, 30), "μπλε": (30, 30, 200)}
TEMPLATES = ["Ένα {c} ΤΕΤΡΑΓΩΝΟ.", "ένα {c} τετράγωνο σε λευκό φόντο", "Το τετράγωνο είναι {c}!"]


def test_unicode_tokenizer():
    assert tokenize("Ένα ΚΟΚΚΙΝΟ τετράγωνο, 2 φορές!", "unicode") == ["ένα", "κοκκινο", "τετράγωνο", "2", "φορές"]
    assert tokenize("Ο ΣΚΥΛΟΣ", "unicode") == ["ο", "σκυλος"]  # final sigma by Unicode's lower-casing rules
    assert tokenize("कुत्ता घास पर", "unicode") == ["कुत्ता", "घास", "पर"]  # vowel signs stay in their word
    assert tokenize("犬 が 走る", "unicode") == ["犬", "が", "走る"]  # pre-segmented Japanese
    assert tokenize("a dog_runs", "unicode") == tokenize("a dog_runs") == ["a", "dog", "runs"]
    assert tokenize("Ένα σκυλί") == []  # the ascii rule drops every Greek letter
    with pytest.raises(ValueError, match="tokenizer 'latin'"):
        tokenize("a", "latin")


@pytest.fixture
def greek(tmp_path: Path, write_image: Callable[..., Path]) -> tuple[Path, Path]:
    """12 images (4 per colour) and a Flickr token.txt of Greek captions: (captions file, image folder)."""
    images, lines = tmp_path / "images", []
    for n in range(12):
        word, rgb = list(COLOURS.items())[n % 3]
        name = f"img{n:02d}.png"
        write_image(images / name, Image.new("RGB", (24, 24), rgb))
        lines += [f"{name}#{k}\t{t.format(c=word)}" for k, t in enumerate(TEMPLATES)]
    captions = tmp_path / "token.txt"
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return captions, images


def test_pack_and_score_greek(greek, tmp_path, capsys):
    import torch
    from conftest import write_checkpoint

    from satkit.config import ModelConfig
    from satkit.model import build_model

    captions, images = greek
    folder = tmp_path / "packed"
    args = ["--dataset", "custom", "--captions-file", str(captions), "--image-folder", str(images),
            "--image-size", "32", "--min-word-freq", "1", "--val-fraction", "0.25", "--test-fraction", "0.25",
            "--workers", "1", "--output-folder", str(folder)]
    # The default (English) tokenizer finds no word in these captions.
    assert create_input_files.main(args) == 1
    assert "image has no captions" in capsys.readouterr().err
    pack_main(args + ["--tokenizer", "unicode"])
    word_map = json.loads((folder / "word_map.json").read_text(encoding="utf-8"))
    assert {"ένα", "τετράγωνο", "κόκκινο", "πράσινο", "μπλε"} <= set(word_map)
    assert all(w == w.lower() for w in word_map if not w.startswith("<"))
    assert json.loads((folder / "dataset.json").read_text())["tokenizer"] == "unicode"
    assert CaptionDataset(str(folder), "test").tokenizer == "unicode"

    # Scoring: our tokens straight into the coco-caption scorers, no PTB tokenizer, no METEOR.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    hyps = {1: "Ένα ΚΟΚΚΙΝΟ τετράγωνο.", 2: "ένα μπλε τετράγωνο", 3: "Το τετράγωνο είναι πράσινο"}
    refs = {i: [t.format(c=c) for t in TEMPLATES] for i, c in zip(hyps, ["κόκκινο", "πράσινο", "πράσινο"])}
    scores = scoring.score_captions(hyps, refs, words="unicode")
    assert "METEOR" not in scores
    assert "skipping METEOR" in capsys.readouterr().err
    gts = {i: [" ".join(tokenize(r, "unicode")) for r in refs[i]] for i in hyps}
    res = {i: [" ".join(tokenize(hyps[i], "unicode"))] for i in hyps}
    assert scores["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert scores["BLEU-4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-12)
    assert scores["BLEU-1"] > 0.5  # accents and capitals removed nothing: most words match

    # eval.py end to end on the Greek pack scores with the pack's tokenizer.
    cfg = ModelConfig(encoder="resnet18", encoder_stages=1, enc_size=2, attention_dim=8, embed_dim=8,
                      decoder_dim=16, vocab_size=len(word_map))
    torch.manual_seed(0)
    ckpt = write_checkpoint(tmp_path / "tiny.pt", build_model(cfg), cfg, word_map)
    out = tmp_path / "test.json"
    code = eval_cli.main(["--checkpoint", str(ckpt), "--data-folder", str(folder), "--beam-size", "1",
                            "--max-len", "5", "--num-workers", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads(out.with_name("test.metrics.json").read_text())
    assert metrics["tokenizer"] == "unicode" and "METEOR" not in metrics and "CIDEr" in metrics
    assert all(r["image_id"].startswith("img") for r in json.loads(out.read_text()))


def test_train_validates_with_the_packs_tokenizer(greek, tmp_path, monkeypatch):
    import train

    captions, images = greek
    folder = tmp_path / "packed"
    pack_main(["--dataset", "custom", "--captions-file", str(captions), "--image-folder", str(images),
               "--image-size", "32", "--min-word-freq", "1", "--workers", "1", "--tokenizer", "unicode",
               "--val-fraction", "0.25", "--test-fraction", "0.25", "--output-folder", str(folder)])
    used = []
    score = scoring.score_captions
    monkeypatch.setattr(trainer, "score_captions", lambda *a, **k: used.append(k["words"]) or score(*a, **k))
    assert train.main(["--config", "configs/shapes.yaml", f"data_folder={folder}", f"out_dir={tmp_path / 'run'}",
                       "epochs=1", "batch_size=2", "num_workers=0", "encoder_stages=1", "enc_size=2",
                       "attention_dim=8", "embed_dim=8", "decoder_dim=16", "max_len=6"]) == 0
    assert used == ["unicode"]
