"""Self-critical sequence training (objective=scst): baselines, the direction of one update, the sampled
batch, and a run that trains, resumes exactly and reports its reward."""
from __future__ import annotations

import csv

import pytest
import torch

import train
from config import ModelConfig, load_config
from decoding import Hypothesis
from losses import sample_batch, scst_baseline, self_critical_loss
from losses import target_log_probs
from models import build_model
from runtime import UserError

WORD_MAP = {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3, "a": 4, "red": 5, "blue": 6, "circle": 7}
TINY = ["encoder_stages=2", "enc_size=4", "attention_dim=16", "embed_dim=16", "decoder_dim=32", "batch_size=8",
        "num_workers=0", "max_len=8", "early_stop_patience=0", "fine_tune_encoder=false", "objective=scst",
        "scst_samples=3"]


def test_mean_of_others_baseline_gives_advantages_that_sum_to_zero_per_image():
    rewards = torch.rand(4, 5)
    advantages = rewards - scst_baseline(rewards, "mean")
    torch.testing.assert_close(advantages.sum(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    # each sample's baseline leaves its own reward out
    torch.testing.assert_close(scst_baseline(rewards, "mean")[0, 0], rewards[0, 1:].mean())
    greedy = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.equal(scst_baseline(rewards, "greedy", greedy), greedy[:, None].expand(4, 5))


def sequence_log_probs(model, images, captions, caplens) -> torch.Tensor:
    with torch.no_grad():
        out = model(images, captions, caplens)
    return (target_log_probs(out["logits"], out["targets"]) * out["mask"]).sum(dim=1)


def test_one_step_raises_the_better_sample_and_lowers_the_worse():
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="resnet18", encoder_stages=1, enc_size=2, attention_dim=8, embed_dim=8, decoder_dim=16,
                      dropout=0.0, vocab_size=len(WORD_MAP))
    model = build_model(cfg).eval()
    images = torch.randn(1, 3, 32, 32)
    samples = [[Hypothesis([4, 5, 7], -3.0, -3.0, True, torch.zeros(3, 2, 2), torch.zeros(3)),
                Hypothesis([4, 6, 7], -3.0, -3.0, True, torch.zeros(3, 2, 2), torch.zeros(3))]]
    captions, caplens = sample_batch(samples, WORD_MAP)
    assert captions.tolist() == [[[2, 4, 5, 7, 3], [2, 4, 6, 7, 3]]] and caplens.tolist() == [[5, 5]]
    before = sequence_log_probs(model, images, captions, caplens)
    rewards = torch.tensor([1.0, 0.0])  # the red circle is right
    train_cfg = load_config(None, ["alpha_c=0"])
    out = model(images, captions, caplens)
    loss, parts = self_critical_loss(out, rewards, scst_baseline(rewards.view(1, 2), "mean").flatten(), train_cfg)
    assert parts["reward"] == pytest.approx(0.5) and parts["advantage_std"] > 0
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = sequence_log_probs(model, images, captions, caplens)
    assert after[0] > before[0] and after[1] < before[1], (before, after)


def test_an_unfinished_sample_is_read_without_end():
    samples = [[Hypothesis([4, 4], -1.0, -1.0, False, torch.zeros(2, 1, 1), torch.zeros(2))]]
    captions, caplens = sample_batch(samples, WORD_MAP)
    assert captions.tolist() == [[[2, 4, 4]]] and caplens.tolist() == [[3]]


def run_scst(folder, out, *extra):
    return train.main(["--config", "configs/shapes.yaml", f"data_folder={folder}", f"out_dir={out}", *TINY, *extra])


def test_scst_run_logs_its_reward(shapes_folder, tmp_path):
    """metrics.csv carries the reward, baseline, advantage spread and entropy (exact resume in the SCST
    phase: tests/test_train.py::test_resume_is_exact[scst])."""
    assert run_scst(shapes_folder, tmp_path / "run", "epochs=1") == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert {"train_reward", "train_baseline", "train_advantage_std", "train_entropy", "val_bad_endings"} <= set(rows[0])
    assert float(rows[0]["train_reward"]) >= 0.0 and float(rows[0]["train_entropy"]) > 0.0
    assert (tmp_path / "run" / "curves.png").is_file()


@pytest.mark.parametrize("override,message", [
    (["scst_baseline=mean", "scst_samples=1"], "scst_baseline=mean needs scst_samples >= 2"),
    (["concept_loss_weight=1"], "objective=scst trains on the captions' reward alone"),
])
def test_scst_settings_that_cannot_work_are_one_line(override, message, shapes_folder, tmp_path, capsys):
    assert run_scst(shapes_folder, tmp_path / "run", *override) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_baseline_kinds_are_checked():
    with pytest.raises(ValueError, match="scst_baseline"):
        scst_baseline(torch.zeros(1, 2), "median")
    with pytest.raises(UserError, match="not one of greedy, mean"):
        load_config(None, ["scst_baseline=median"])
