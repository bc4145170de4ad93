"""Stop signals in 2-process gloo runs, as schedulers send them, and the lagged non-finite loss check.

The promises (docs/reliability.md): a SIGTERM to the whole torchrun job, or to one rank, stops every rank
at the same step; rank 0 saves last.pt once; every worker exits 143; resume=last.pt goes on to the step
count of an unbroken run. A second signal stops at once and leaves no half-written file. With the lagged
non-finite check (every 10 steps, as on a GPU), a NaN loss stops the run within 10 steps and the weights
that saw it are never saved.

Signals are sent from inside the run (a driver around train.main) at a given step, so nothing races.
Runs are tiny: 30 train images, batch_size 2, so 7 steps per rank and epoch in the 2-process runs.
"""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from satkit.infra import filesafety
import train
from satkit.training import trainer
from satkit.checkpoints import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.faults]

TINY = ["encoder_stages=1", "enc_size=2", "attention_dim=16", "embed_dim=16", "decoder_dim=16", "batch_size=2",
        "num_workers=0", "encoder_weights=none", "encoder=resnet18", "max_len=12", "early_stop_patience=0",
        "feature_cache=off", "device=cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}

# Each rank runs train.main under this driver (torchrun needs a file). SIG_AT=STEP:RANK:WHO sends SIGTERM
# after that step of that rank: WHO=job to the agent's process group and every worker (a scheduler's
# preemption), WHO=self to that rank alone. SIG_SLOW_SAVE=S holds the stop's save S seconds before it
# writes; SIG_CHECK_EVERY=N sets trainer.CHECK_EVERY["cpu"] (N=10: the lagged reads of a GPU run);
# SIG_PROBE_NAN=1 has every rank, once stopped, read losses in which rank 1 alone has a NaN.
# Each rank reports its stop step, its saves, the probe's outcome and its exit code on stdout.
DRIVER = r"""
import os, signal, sys, time
import torch
import train
from satkit.training import trainer
from satkit.infra.runtime import UserError
rank = int(os.environ["RANK"])
at_step, on_rank, who = (os.environ.get("SIG_AT") or "0:0:self").split(":")
trainer.CHECK_EVERY["cpu"] = int(os.environ.get("SIG_CHECK_EVERY", "1"))

def report(text):  # one write: the ranks share stdout, and print's two writes interleave
    os.write(1, f"rank {rank} {text}\n".encode())

def workers(agent):
    with open(f"/proc/{agent}/task/{agent}/children") as f:
        return [int(pid) for pid in f.read().split()]

original_step, original_epoch, original_save = trainer.train_step, train.train_one_epoch, train.save_checkpoint
def train_step(*args, **kwargs):
    parts = original_step(*args, **kwargs)
    if args[5].step == int(at_step) and rank == int(on_rank):
        agent = os.getppid()
        if who == "job":
            os.killpg(os.getpgid(agent), signal.SIGTERM)
        for pid in workers(agent) if who == "job" else [os.getpid()]:
            os.kill(pid, signal.SIGTERM)
    return parts
def train_one_epoch(run, log):
    losses = original_epoch(run, log)
    if not losses:
        report(f"stopped at step {run.state.step}")
        if os.environ.get("SIG_PROBE_NAN"):  # all ranks here at once: a NaN loss that rank 1 alone saw
            probe = trainer.TrainState(epoch=1)
            probe.unchecked.append((2, 9, torch.tensor(float("nan") if rank == 1 else 2.0)))
            try:
                trainer.check_losses(probe)
                report("probe went on")
            except UserError as e:
                report(f"probe {e}")
    return losses
def save_checkpoint(path, payload):
    if payload["train_state"]["epoch_step"]:
        time.sleep(float(os.environ.get("SIG_SLOW_SAVE", "0")))
    original_save(path, payload)
    report(f"saved {path.name} at step {payload['train_state']['step']}")
trainer.train_step, train.train_one_epoch, train.save_checkpoint = train_step, train_one_epoch, save_checkpoint
code = train.main(sys.argv[1:])
report(f"exit {code}")
sys.exit(code)
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


def torchrun(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A 2-process gloo job in a session of its own, as a scheduler starts one; SIGKILLed if it hangs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        for pid in children(proc.pid):  # the workers: torchrun starts each in a session of its own
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job hung:\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except FileNotFoundError:
        return []


def reports(result: subprocess.CompletedProcess, what: str) -> dict[int, list[str]]:
    """The driver's `rank R <what> X` lines, by rank: {R: [X, ...]}."""
    found: dict[int, list[str]] = {0: [], 1: []}
    for rank, value in re.findall(rf"^rank (\d) {what} (.+)$", result.stdout, re.MULTILINE):
        found[int(rank)].append(value)
    return found


def train_state(path: Path) -> dict:
    return load_checkpoint(path)["train_state"]


def metrics_rows(out: Path) -> list[tuple[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return [(row["epoch"], row["step"]) for row in csv.DictReader(f)]


def assert_finite_checkpoints(out: Path) -> None:
    """Every .pt loads and holds finite weights; no temp file of an atomic writer is left."""
    for path in out.glob("*.pt"):
        model = load_checkpoint(path)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point()), path
    assert not [p.name for p in out.iterdir() if re.fullmatch(r"\..+\.\d+\.[0-9a-f]{8}\.tmp", p.name)]


# --------------------------------------------------------------------------------------------
# Signals in distributed runs
# --------------------------------------------------------------------------------------------
def test_sigterm_to_the_whole_torchrun_job_saves_once_and_resumes_exactly(driver, shapes_folder, tmp_path):
    """SIGTERM to every process of the job, as a scheduler preempts: each worker also gets the agent's
    forward of it, which must not count as a second signal (it did: no rank saved, all exited 130)."""
    out = tmp_path / "ddp"
    args = [*TINY, f"data_folder={shapes_folder}", f"out_dir={out}", "epochs=2"]
    result = torchrun(driver, *args, SIG_AT="9:0:job")  # step 9: epoch 2, mid-way
    assert result.returncode != 0  # torchrun's agent, signalled itself, exits 1: the job did not finish
    stops = reports(result, "stopped at step")
    assert stops[0] == stops[1] and len(stops[0]) == 1, result.stdout[-3000:]  # every rank at the same step
    step = int(stops[0][0])
    assert reports(result, "exit") == {0: ["143"], 1: ["143"]}, result.stderr[-3000:]
    assert reports(result, "saved") == {0: ["last.pt at step 7", "best.pt at step 7", f"last.pt at step {step}"],
                                        1: []}  # epoch 1's two, then the stop's: rank 0 alone, once
    assert f"interrupted by SIGTERM at epoch 2 step {step}" in result.stderr
    state = train_state(out / "last.pt")
    assert (state["epoch"], state["step"], state["epoch_step"]) == (1, step, step - 7)
    assert_finite_checkpoints(out)

    resumed = torchrun(ROOT / "train.py", f"resume={out / 'last.pt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = train_state(out / "last.pt")
    assert (state["epoch"], state["step"], state["epoch_step"]) == (2, 14, 0)  # as an unbroken run: 2 x 7 steps
    assert metrics_rows(out) == [("1", "7"), ("2", "14")]


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(driver, shapes_folder, tmp_path):
    """The signal reaches rank 1 only; reads every 10 steps (a GPU run's). Rank 1 must not exit while rank
    0 saves: torchrun's agent stops the other workers as soon as one exits non-zero, and rank 0, told of
    the stop by the all-reduce, took that SIGTERM as a second signal and lost the save. The same job shows
    the ranks agreeing on a NaN loss that one of them saw (the probe)."""
    out = tmp_path / "ddp"
    args = [*TINY, f"data_folder={shapes_folder}", f"out_dir={out}", "epochs=2"]
    result = torchrun(driver, *args, SIG_AT="8:1:self", SIG_CHECK_EVERY="10", SIG_SLOW_SAVE="3", SIG_PROBE_NAN="1")
    assert result.returncode == 1  # the agent, not signalled, reports its workers' 143 as a failure
    assert reports(result, "stopped at step") == {0: ["10"], 1: ["10"]}, result.stdout[-3000:]
    assert reports(result, "saved")[0][-1] == "last.pt at step 10" and not reports(result, "saved")[1]
    exits = reports(result, "exit")
    # Once rank 1 has exited, the agent SIGTERMs rank 0: on its way out, past the save, it may end by it.
    assert exits[1] == ["143"] and exits[0] in (["143"], []), result.stderr[-3000:]
    assert "interrupted by SIGTERM at epoch 2 step 10" in result.stderr
    assert train_state(out / "last.pt")["step"] == 10
    # The lagged non-finite check all-reduces what it reads: rank 0 stops on rank 1's NaN too.
    probes = reports(result, "probe")
    assert probes[0] == probes[1] and probes[0][0].startswith("non-finite loss (nan) at epoch 2 step 9"), probes
    assert_finite_checkpoints(out)


def test_a_second_signal_stops_at_once_without_a_half_written_file(shapes_folder, tmp_path, capsys, monkeypatch):
    """The second SIGTERM arrives while the stop's last.pt is being written: the write is abandoned, the
    previous last.pt stays whole and no temp file is left."""
    out = tmp_path / "run"
    original_step = trainer.train_step

    def train_step(*args, **kwargs):
        parts = original_step(*args, **kwargs)
        if args[5].step == 17:  # epoch 2 of 15 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return parts

    def half_then_signal(f) -> None:
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the second signal did not interrupt the write")

    original_save = train.save_checkpoint

    def save_checkpoint(path, payload):
        if payload["train_state"]["step"] == 17:
            filesafety.atomic_write(path, half_then_signal)
        original_save(path, payload)

    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    assert train.main([*TINY, f"data_folder={shapes_folder}", f"out_dir={out}", "epochs=2"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"
    assert train_state(out / "last.pt")["step"] == 15  # epoch 1's, whole
    assert_finite_checkpoints(out)


# --------------------------------------------------------------------------------------------
# The non-finite loss check, lagged as on a GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nan_at,signal_at,last_loss,extra", [
    (17, None, 20, ()),
    (16, 18, 18, ()),
    (17, None, 17, ("attention=hard", "hard_expected_prob=0")),
], ids=["mid-epoch", "before-the-stop-save", "hard-attention"])
def test_a_lagged_nonfinite_check_stops_within_10_steps_and_never_saves_nan(nan_at, signal_at, last_loss, extra,
                                                                           shapes_folder, tmp_path, capsys,
                                                                           monkeypatch):
    """Losses read every 10 steps (the GPU's cadence, forced on the CPU): a NaN at step 17 stops the run at
    step 20's read; a NaN at step 16 and a stop signal at 18 stop it before the stop's save; with hard
    attention, sampling from the NaN weights fails at step 18, which names the NaN, not the failed
    sampling. Every time last.pt and best.pt stay epoch 1's (15 steps), with finite weights."""
    out = tmp_path / "run"
    monkeypatch.setitem(trainer.CHECK_EVERY, "cpu", 10)
    original, calls = trainer.compute_loss, [0]

    def compute_loss(*args, **kwargs):
        loss, parts = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == nan_at:
            loss = loss * float("nan")
        if calls[0] == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss, parts

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)
    assert train.main([*TINY, f"data_folder={shapes_folder}", f"out_dir={out}", "epochs=2", *extra]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: non-finite loss (nan) at epoch 2 step {nan_at}: training stopped and the "
                           "last checkpoint (epoch 1) is kept"), line
    assert calls[0] == last_loss
    for name in ("last.pt", "best.pt"):
        assert (train_state(out / name)["epoch"], train_state(out / name)["step"]) == (1, 15)
    assert_finite_checkpoints(out)
    assert metrics_rows(out) == [("1", "15")]
