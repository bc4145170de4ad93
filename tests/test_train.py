"""train.py end to end on the tiny packed shapes dataset of conftest.py: run folder, checkpoints, exact resume, DDP."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from satkit.training import logger, trainer
from satkit.checkpoints import load_checkpoint
from satkit.figures import logged_columns

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "encoder_stages=2", "enc_size=4", "attention_dim=32", "embed_dim=16", "decoder_dim=32", "batch_size=8",
    "num_workers=0", "max_len=12", "log_every=1", "early_stop_patience=0",
]


def run_train(folder: Path, out_dir: Path, *extra: str) -> int:
    argv = ["--config", "configs/shapes.yaml", f"data_folder={folder}", f"out_dir={out_dir}", *TINY, *extra]
    return train.main(argv)


def test_run_folder_contents_and_checkpoint(shapes_folder, tmp_path):
    out = tmp_path / "run"
    assert run_train(shapes_folder, out, "epochs=2") == 0
    for name in ("config.yaml", "metrics.csv", "curves.png", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert 0.0 <= float(rows[-1]["val_BLEU-4"]) <= 1.0
    assert 0.0 < float(rows[-1]["val_distinct_captions"]) <= 1.0  # collapse diagnostics, every epoch
    assert int(rows[-1]["val_vocab_used"]) >= 1 and float(rows[-1]["val_mean_length"]) > 0
    assert 0.0 <= float(rows[-1]["val_bad_endings"]) <= 1.0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["format_version"] == 2
    assert ckpt["train_state"]["epoch"] == 2 and ckpt["train_config"]["batch_size"] == 8
    assert ckpt["model_config"]["enc_size"] == 4 and ckpt["model_config"]["vocab_size"] == len(ckpt["word_map"])
    assert "enc_size" not in ckpt["train_config"]  # the model config is kept apart
    assert ckpt["image_size"] == 48
    load_checkpoint(out / "best.pt")
    assert "batch_size: 8" in (out / "config.yaml").read_text()
    # the curves' legend names the terms this run logged, not the concept loss it left at weight 0
    assert rows[-1]["train_concept"] == "" and rows[-1]["train_ds"] != ""
    assert logged_columns(rows, ["train_loss", "train_ds", "train_concept"]) == ["train_loss", "train_ds"]


@pytest.mark.parametrize("extra", [("dropout=0.3",), ("concept_loss_weight=0.5",),
                                   ("objective=scst", "scst_samples=3", "fine_tune_encoder=false")],
                         ids=["xe", "concept", "scst"])
def test_resume_is_exact(extra, shapes_folder, tmp_path):
    """Also in the SCST phase (sampling draws from the restored RNG) and from a feature cache."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(shapes_folder, straight, "epochs=2", *extra) == 0
    assert run_train(shapes_folder, split, "epochs=1", *extra) == 0
    # The resumed run takes its config from the checkpoint; only epochs is extended here.
    assert train.main([f"resume={split / 'last.pt'}", "epochs=2"]) == 0
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert a["train_state"] == b["train_state"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    if "concept_loss_weight=0.5" in extra:  # the auxiliary head resumes too, and stays out of the model's weights
        torch.testing.assert_close(b["concept_head"]["weight"], a["concept_head"]["weight"], rtol=1e-5, atol=1e-6)
        assert not any(key.startswith("head") for key in a["model"])
    assert len(list(csv.DictReader(open(split / "metrics.csv")))) == 2


def test_hard_attention_train_eval_caption_round_trip(shapes_folder, tmp_path, capsys):
    """A hard checkpoint goes through eval.py and caption.py with no flag saying it is hard."""
    import caption
    import eval as evaluate
    from satkit.data.shapes import generate_image

    out = tmp_path / "hard"
    # hard_expected_prob=0: every step samples locations, so the REINFORCE baseline moves
    assert run_train(shapes_folder, out, "epochs=1", "attention=hard", "hard_decode=argmax", "hard_expected_prob=0") == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["model_config"]["attention"] == "hard"
    assert ckpt["train_state"]["hard_baseline"] < 0.0  # moving average of log p(y|s,a)
    results = tmp_path / "test.json"
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--data-folder", str(shapes_folder),
                          "--beam-size", "2", "--num-workers", "0", "--out", str(results)]) == 0
    metrics = json.loads(results.with_name("test.metrics.json").read_text())
    assert metrics["attention"] == "hard" and 0.0 <= metrics["BLEU-4"] <= 1.0
    generate_image(7, 0, 48)[0].save(tmp_path / "fresh.png")
    assert caption.main(["--img", str(tmp_path / "fresh.png"), "--checkpoint", str(out / "best.pt"),
                         "--out-dir", str(tmp_path / "figures"), "--beam-size", "2"]) == 0
    assert (tmp_path / "figures" / "fresh_attention.png").is_file()
    assert (tmp_path / "figures" / "fresh_attention.gif").is_file()


def test_existing_run_folder_is_not_overwritten(shapes_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(shapes_folder, out, "epochs=1") == 0
    before = (out / "last.pt").read_bytes()
    assert run_train(shapes_folder, out, "epochs=1") == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before


def test_bad_overrides_fail_cleanly(capsys, tmp_path):
    assert train.main(["--config", "configs/shapes.yaml", "learning_rate=0.1"]) == 1
    assert "unknown key 'learning_rate'" in capsys.readouterr().err
    assert train.main(["--config", "configs/shapes.yaml", f"data_folder={tmp_path / 'nothing'}",
                       f"out_dir={tmp_path / 'run'}"]) == 1
    assert "nothing" in capsys.readouterr().err
    assert train.main(["--config", "configs/missing.yaml"]) == 1
    assert "config file not found" in capsys.readouterr().err


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_gloo_run_crosses_epochs_and_resumes(shapes_folder, tmp_path):
    """Several steps per rank, an epoch boundary with validation between, then a resume: what a user's
    multi-process run does (one step per rank hid a parameter without gradient, which fails at step 2).
    Hard attention and the concept head together: the two parts DDP had never run. The resumed run ends
    with the weights of an uninterrupted one, as test_resume_is_exact checks in one process."""
    out, straight = tmp_path / "ddp", tmp_path / "straight"
    args = ("--config", "configs/shapes.yaml", f"data_folder={shapes_folder}", *TINY, "batch_size=4", "device=cpu",
            "attention=hard", "concept_loss_weight=1.0")
    result = torchrun(*args, f"out_dir={out}", "epochs=2")
    assert result.stdout.count("epoch 1:") == 1 and result.stdout.count("epoch 2:") == 1  # rank 0 prints
    ckpt = torch.load(out / "last.pt", weights_only=True)
    # 30 train images -> 15 per rank, 4 per step with drop_last -> 3 steps per rank and epoch
    assert ckpt["train_state"]["step"] == 6 and ckpt["train_state"]["epoch"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped
    assert "concept_head" in ckpt and ckpt["model_config"]["attention"] == "hard"
    torchrun(f"resume={out / 'last.pt'}", "epochs=3")
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["train_state"]["step"] == 9 and resumed["train_state"]["epoch"] == 3
    assert [row["epoch"] for row in csv.DictReader(open(out / "metrics.csv"))] == ["1", "2", "3"]
    torchrun(*args, f"out_dir={straight}", "epochs=3")
    uninterrupted = torch.load(straight / "last.pt", weights_only=True)
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in uninterrupted["concept_head"].items():
        torch.testing.assert_close(resumed["concept_head"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert resumed["train_state"] == uninterrupted["train_state"]


def test_resume_refuses_an_architecture_change(shapes_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(shapes_folder, out, "epochs=1") == 0
    capsys.readouterr()
    assert train.main([f"resume={out / 'last.pt'}", "epochs=2", "decoder_dim=64"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "decoder_dim" in err and len(err.strip().splitlines()) == 1, err


def test_a_bug_keeps_its_traceback_while_a_user_error_is_one_line(shapes_folder, tmp_path, capsys, monkeypatch):
    """A ValueError raised by our code inside the training step is a bug: it must not be dressed up as
    a one-line user error. A bad config value still is one line."""
    assert run_train(shapes_folder, tmp_path / "bad", "epochs=0") == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: config epochs=0 must be >= 1"

    def broken_loss(*args, **kwargs):
        raise ValueError("injected bug in the training step")

    monkeypatch.setattr(trainer, "compute_loss", broken_loss)
    with pytest.raises(ValueError, match="injected bug"):
        run_train(shapes_folder, tmp_path / "run", "epochs=1")
    # --debug shows the traceback of a user error too
    with pytest.raises(ValueError, match="epochs=0"):
        train.main(["--debug", "--config", "configs/shapes.yaml", "epochs=0"])


def test_val_metric_cider_selects_the_model(shapes_folder, tmp_path):
    out = tmp_path / "run"
    assert run_train(shapes_folder, out, "epochs=2", "val_metric=CIDEr") == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    cider = [float(r["val_CIDEr"]) for r in rows]
    assert all(0 <= c <= 10 for c in cider) and all(0 <= float(r["val_BLEU-4"]) <= 1 for r in rows)
    best = torch.load(out / "last.pt", weights_only=True)["train_state"]["best_score"]
    assert best == pytest.approx(max(cider), abs=1e-3)  # best.pt follows CIDEr, not BLEU-4


def test_metrics_csv_keeps_its_columns_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_loss\n1,10,2.5\n")  # written by older code with fewer columns
    logger.append_metrics_row(path, {key: "7" for key in ("epoch", "step", "train_loss", "val_CIDEr")})
    assert path.read_text().splitlines() == ["epoch,step,train_loss", "1,10,2.5", "7,7,7"]


def test_training_with_persistent_workers_exits(shapes_folder, tmp_path):
    """DataLoader workers ignore SIGTERM (the main process handles it), so train.py must end them itself:
    left to multiprocessing's exit handler, the finished run hung forever (the demo did)."""
    argv = [sys.executable, "train.py", "--config", "configs/shapes.yaml", f"data_folder={shapes_folder}",
            f"out_dir={tmp_path / 'run'}", *TINY, "num_workers=1", "epochs=2", "feature_cache=off"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: best val" in result.stdout


def test_each_epoch_logs_the_lr_it_trained_at(shapes_folder, tmp_path, capsys, monkeypatch):
    """The schedule halves the LR after epoch 2's worse val score: metrics.csv's lr says what epochs 1 and 2
    trained at (2e-3 both), not the LR after the schedule's step; the checkpoint holds the halved one.
    enc_size=4 on the 6x6 grid pools down: no warning."""
    scores = iter([0.5, 0.4])
    real = train.val_scores
    monkeypatch.setattr(train, "val_scores", lambda *args, **kwargs: {**real(*args, **kwargs), "BLEU-4": next(scores)})
    out = tmp_path / "run"
    assert run_train(shapes_folder, out, "epochs=2", "decoder_lr=2e-3", "lr_patience=0", "lr_decay_factor=0.5") == 0
    assert [row["lr"] for row in csv.DictReader(open(out / "metrics.csv"))] == ["0.002", "0.002"]
    assert torch.load(out / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert "enc_size" not in capsys.readouterr().err


def test_enc_size_above_the_encoders_grid_is_named_in_one_line(shapes_folder, tmp_path, capsys):
    """48 px through ResNet-18's layer2 (stride 8) is a 6x6 grid: enc_size=8 pools it up, copying cells."""
    assert run_train(shapes_folder, tmp_path / "run", "epochs=1", "enc_size=8") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "enc_size=8" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: enc_size=8 pools resnet18's 6x6 grid"), lines
    assert "1.8x the attention" in lines[0] and "enc_size=6" in lines[0]


RANK_DRAWS = """
    import json, sys
    import torch
    import train
    from satkit.config import load_config
    from satkit.infra.runtime import cleanup_distributed, init_distributed

    folder, out = sys.argv[1], sys.argv[2]
    overrides = [f"data_folder={folder}", f"out_dir={out}/run", "encoder_stages=2", "enc_size=4", "attention_dim=16",
                 "embed_dim=16", "decoder_dim=16", "batch_size=4", "num_workers=0", "fine_tune_encoder=false",
                 "device=cpu"]
    cfg = load_config("configs/shapes.yaml", overrides)
    info, device = init_distributed(cfg.device)
    run = train.setup_run(cfg, None, None, info, device, None, ())
    result = {"draws": torch.rand(4).tolist(), "cache": str(run.train_loader.dataset.features_path),
              "weights": [float(p.double().sum()) for p in run.model.parameters()]}
    with open(f"{out}/rank{info.rank}.json", "w") as f:
        json.dump(result, f)
    cleanup_distributed(info)
"""


def test_each_rank_draws_its_own_numbers_from_the_same_initial_weights(shapes_folder, tmp_path):
    """seed + rank: the two ranks' dropout masks and hard-attention draws differ (before, both drew the same
    numbers). The model is built before that, from the seed alone: every rank holds the same weights, so
    rank 1 finds the feature cache rank 0 built for the frozen encoder (its name holds the weights' hash)."""
    import shutil
    import textwrap

    pack = shutil.copytree(shapes_folder, tmp_path / "pack", ignore=shutil.ignore_patterns("features"))
    script = tmp_path / "rank_draws.py"
    script.write_text(textwrap.dedent(RANK_DRAWS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(pack), str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["draws"] != ranks[1]["draws"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["cache"] == ranks[1]["cache"] != "None"
