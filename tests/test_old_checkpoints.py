"""Checkpoints written by earlier code still load, caption and evaluate to the figures that code gave.

tests/fixtures holds last.pt files trained (12 epochs on the conftest shapes pack) by commit e44d9fe
(checkpoint format 1: one flat config) and by ebabf9b (format 2, soft and hard attention), the last code
whose attention score had a bias (dropped since: the softmax cancels it). Beside each, what that code
printed: eval.py's test captions and metrics (beam 2) and the teacher-forced logits of two fixed inputs.
The e44d9fe and hard files were re-saved without their optimizer state to keep them small.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import caption
import eval as eval_cli
from satkit.evaluation import scoring
import train
from satkit.model import load_model
from satkit.data.shapes import generate_image

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINTS = ["e44d9fe_soft.pt", "ebabf9b_soft.pt", "ebabf9b_hard.pt"]


def expected(name: str) -> dict:
    return json.loads((FIXTURES / name.replace(".pt", ".expected.json")).read_text())


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_old_checkpoint_gives_the_same_logits(name):
    model, _, ckpt = load_model(FIXTURES / name)
    assert "decoder.attention.score.bias" in torch.load(FIXTURES / name, weights_only=True)["model"]
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    captions = torch.tensor([[[2, 4, 5, 6, 3]], [[2, 4, 6, 3, 0]]])
    with torch.no_grad():
        logits = model(images, captions, torch.tensor([[5], [4]]))["logits"]
    torch.testing.assert_close(logits.flatten(), torch.tensor(expected(name)["logits"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_old_checkpoint_evaluates_and_captions_as_before(name, shapes_folder, tmp_path, capsys, monkeypatch):
    """Captions and all recorded metrics for the oldest format; the captions (what the metrics are computed
    from) for the others, scored without the JVM to keep the suite fast."""
    full = name == CHECKPOINTS[0]
    if full:  # as eval.py scored it when the fixture was written: the PTB tokenizer and METEOR
        monkeypatch.setattr(scoring, "java_available", lambda: shutil.which("java") is not None)
    out = tmp_path / "test.json"
    assert eval_cli.main(["--checkpoint", str(FIXTURES / name), "--data-folder", str(shapes_folder),
                          "--beam-size", "2", "--num-workers", "0", "--out", str(out),
                          "--no-block-trigrams",  # the search the fixtures were written with (before #32)
                          *([] if full else ["--control", "none"])]) == 0
    was = expected(name)
    assert [r["caption"] for r in json.loads(out.read_text())] == was["captions"]
    metrics = json.loads(out.with_name("test.metrics.json").read_text())
    for key, value in was["metrics"].items() if full else ():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    generate_image(7, 0, 48)[0].save(tmp_path / "fresh.png")
    capsys.readouterr()
    assert caption.main(["--img", str(tmp_path / "fresh.png"), "--checkpoint", str(FIXTURES / name),
                         "--beam-size", "2", "--out-dir", str(tmp_path / "figures")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'fresh.png'}: a ")
    assert (tmp_path / "figures" / "fresh_attention.gif").is_file()


def test_a_last_pt_from_before_the_bias_was_dropped_cannot_resume_but_can_start_a_run(shapes_folder, tmp_path,
                                                                                      capsys):
    """Its optimizer state has one parameter more than the model: resume is refused in one line that
    names the way on, init_from, which then trains."""
    old = tmp_path / "old" / "last.pt"
    old.parent.mkdir()
    old.write_bytes((FIXTURES / "ebabf9b_soft.pt").read_bytes())
    assert train.main([f"resume={old}", "epochs=13", f"data_folder={shapes_folder}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and f"init_from={old}" in err
    assert train.main(["--config", "configs/shapes.yaml", f"data_folder={shapes_folder}", f"init_from={old}",
                       f"out_dir={tmp_path / 'new'}", "epochs=1", "batch_size=8", "num_workers=0"]) == 0
    assert "decoder.attention.score.bias" not in torch.load(tmp_path / "new" / "last.pt", weights_only=True)["model"]
