"""Where a training run reports: console lines, metrics.csv (one row per epoch, cut back on resume),
TensorBoard and curves.png (RunLogger)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import torch

from satkit.evaluation.scoring import DIVERSITY_KEYS, validation_keys, warn_if_collapsed
from satkit.figures import write_curves
from satkit.infra.filesafety import atomic_write_text
from satkit.config import Config
from satkit.training.losses import epoch_parts


class RunLogger:
    """Where a run reports, in one place: console lines, metrics.csv, TensorBoard and curves.png.

    Only rank 0 writes (out_dir given); other ranks hold a silent one, so the loop has no rank tests.
    """

    def __init__(self, out_dir: Path | None, log_every: int = 1, start_step: int = 0) -> None:
        self.out_dir, self.log_every, self.writer = out_dir, log_every, None
        if out_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step or None)

    def line(self, text: str, error: bool = False) -> None:
        if self.out_dir is not None:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def step(self, step: int, parts: dict[str, torch.Tensor]) -> None:
        if self.writer is not None and step % self.log_every == 0:
            for key, value in parts.items():
                self.writer.add_scalar(f"train/{key}", float(value), step)

    def epoch(self, cfg: Config, epoch: int, step: int, lr: float, losses: dict[str, float], val: dict[str, float],
              improved: bool, seconds: float) -> None:
        """One epoch's row, scalars and line. Plain values, not the trainer's Run: the log does not import the
        trainer (which imports the log)."""
        if self.writer is None:
            return
        val_keys = validation_keys(cfg.val_metric) + DIVERSITY_KEYS
        row = {"epoch": epoch, "step": step,
               **{f"train_{key}": f"{losses[key]:.4f}" for key in epoch_parts(cfg)},
               **({"train_bad_samples": int(losses["bad_samples"])} if "bad_samples" in losses else {}),
               "lr": f"{lr:.3g}", **{f"val_{key}": f"{val[key]:.4g}" for key in val_keys},
               "epoch_seconds": f"{seconds:.1f}"}
        if "train_concept" in row and cfg.concept_loss_weight == 0:
            row["train_concept"] = ""
        append_metrics_row(self.out_dir / "metrics.csv", row)
        write_curves(self.out_dir / "metrics.csv", self.out_dir / "curves.png")
        for key in val_keys:
            self.writer.add_scalar(f"val/{key}", val[key], step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.flush()
        detail = (f"reward {losses['reward']:.3f}, baseline {losses['baseline']:.3f}, entropy {losses['entropy']:.2f}"
                  if "reward" in losses else f"ce {losses['ce']:.3f}, ds {losses['ds']:.4f}")
        self.line(f"epoch {epoch}: loss {losses['loss']:.3f} ({detail}) "
                  f"val BLEU-4 {val['BLEU-4']:.4f} CIDEr {val['CIDEr']:.4f}{' (best)' if improved else ''} "
                  f"distinct {val['distinct_captions']:.0%} words {val['vocab_used']} lr {lr:.2g} {seconds:.0f}s")
        if "bad_samples" in losses:
            self.line(f"epoch {epoch}: {int(losses['bad_samples'])} bad samples skipped (corrupt image, no "
                      "caption, unreadable tar member or shard)")
        warn_if_collapsed(val)

    def close(self, last_line: str, error: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
        self.line(last_line, error)


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop rows past `epoch`: a run killed after writing an epoch's row but before its checkpoint
    trains that epoch again on resume, which must not list it twice."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    # A row cut by a kill mid-append has no line end: drop it too, or the next row would be glued onto it.
    kept = lines[:1] + [line for line in lines[1:] if line.endswith("\n") and line.split(",", 1)[0].isdigit()
                        and int(line.split(",", 1)[0]) <= epoch]
    if kept != lines:
        atomic_write_text(path, "".join(kept))


def append_metrics_row(path: Path, row: dict[str, Any]) -> None:
    """One row per epoch, its keys the columns of a new file. A run resumed by newer code keeps the
    columns its file started with."""
    fieldnames = list(row)
    if path.exists():
        with open(path, newline="") as f:
            fieldnames = next(csv.reader(f), fieldnames)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow(row)
