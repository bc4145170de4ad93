"""The seams: an attention variant and a metric defined here, outside the library, are one class and one
function plus their registrations; training, validation, eval.py (with its report) and caption.py then use
them without a library file being edited."""
from __future__ import annotations

import csv
import json

import pytest
import torch

import caption
import eval as eval_cli
import train
from satkit.attention import ATTENTIONS, HardAttention, register_attention
from satkit.checkpoints import load_checkpoint
from satkit.evaluation.scoring import METRICS, SCORE_KEYS, register_metric
from satkit.data.shapes import generate_image

TINY = ["encoder_stages=2", "enc_size=4", "attention_dim=16", "embed_dim=16", "decoder_dim=32", "batch_size=8",
        "num_workers=0", "max_len=8", "early_stop_patience=0"]


class SharpenedHardAttention(HardAttention):
    """A stochastic variant: hard attention that samples s_t from alpha_t squared (renormalised)."""

    stochastic = True

    def weights(self, features_proj: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        alpha = super().weights(features_proj, h)  # (N, L)
        sharpened = alpha * alpha
        return sharpened / sharpened.sum(dim=1, keepdim=True)


def word_precision(references: dict, results: dict) -> dict[str, float]:
    """Share of the generated words that appear in one of the image's references."""
    hits = total = 0
    for image, (result,) in results.items():
        known = {word for reference in references[image] for word in reference.split()}
        words = result.split()
        hits += sum(word in known for word in words)
        total += len(words)
    return {"word_precision": hits / max(total, 1)}


@pytest.fixture
def registered():
    """Register both as a user's own file would, and take them back out afterwards."""
    register_attention("sharpened_hard")(SharpenedHardAttention)
    register_metric("word_precision")(word_precision)
    yield
    del ATTENTIONS["sharpened_hard"], METRICS["word_precision"], SCORE_KEYS["word_precision"]


def test_a_new_attention_variant_and_metric_train_validate_evaluate_and_caption(registered, shapes_folder,
                                                                                tmp_path, capsys):
    out = tmp_path / "run"
    # hard_expected_prob=0: every step samples s_t, so the variant's stochastic flag drives REINFORCE
    assert train.main(["--config", "configs/shapes.yaml", f"data_folder={shapes_folder}", f"out_dir={out}", *TINY,
                       "epochs=2", "attention=sharpened_hard", "val_metric=word_precision",
                       "hard_expected_prob=0"]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["model_config"]["attention"] == "sharpened_hard"
    assert ckpt["train_state"]["hard_baseline"] < 0.0  # the REINFORCE baseline moved
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    precision = [float(row["val_word_precision"]) for row in rows]
    assert len(precision) == 2 and all(0.0 <= p <= 1.0 for p in precision)
    assert ckpt["train_state"]["best_score"] == pytest.approx(max(precision), abs=1e-3)  # it selected best.pt

    results, report = tmp_path / "test.json", tmp_path / "report"
    assert eval_cli.main(["--checkpoint", str(out / "best.pt"), "--data-folder", str(shapes_folder), "--beam-size",
                          "2", "--num-workers", "0", "--out", str(results), "--report", str(report)]) == 0
    metrics = json.loads(results.with_name("test.metrics.json").read_text())
    assert 0.0 <= metrics["word_precision"] <= 1.0 and "shuffled_word_precision" in metrics
    assert "word_precision" in (report / "index.html").read_text()

    generate_image(7, 0, 48)[0].save(tmp_path / "fresh.png")
    capsys.readouterr()
    assert caption.main(["--img", str(tmp_path / "fresh.png"), "--checkpoint", str(out / "best.pt"),
                         "--beam-size", "2", "--out-dir", str(tmp_path / "figures")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'fresh.png'}: ")
    assert (tmp_path / "figures" / "fresh_attention.png").is_file()


def test_an_unregistered_attention_name_is_one_line(shapes_folder, tmp_path, capsys):
    assert train.main(["--config", "configs/shapes.yaml", f"data_folder={shapes_folder}",
                       f"out_dir={tmp_path / 'run'}", "attention=sharpened_hard"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: config attention='sharpened_hard' is not one of soft, hard"
