"""Train Show, Attend and Tell (soft or hard attention) on a packed dataset.

    python train.py --config configs/shapes.yaml [key=value ...]
    torchrun --nproc_per_node 2 train.py --config configs/flickr8k.yaml
    python train.py --config configs/shapes.yaml resume=runs/shapes/last.pt

Every run writes into its own folder: config.yaml, metrics.csv, TensorBoard events, last.pt, best.pt.
Model selection uses a decoded metric on val (BLEU-4 of greedy/beam captions), not teacher forcing.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from datasets import CaptionDataset, collate_captions
from eval import decode_split, score_captions
from models import (
    ShowAttendTell,
    WeightsDownloadError,
    build_model,
    doubly_stochastic_penalty,
    reinforce_surrogate,
    target_log_probs,
)
from utils import (
    Config,
    DistInfo,
    apply_overrides,
    autocast_context,
    cleanup_distributed,
    config_from_dict,
    init_distributed,
    load_checkpoint,
    load_config,
    one_line,
    rng_state,
    save_checkpoint,
    save_config,
    seed_everything,
    set_rng_state,
)

VAL_METRIC = "BLEU-4"  # decoded on val, drives LR decay, early stopping and best.pt
CSV_FIELDS = ["epoch", "step", "train_loss", "train_ce", "train_ds", "lr", "val_" + VAL_METRIC, "epoch_seconds"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file in configs/ (overrides of utils.Config defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 data_folder=DIR")
    return parser


@dataclasses.dataclass
class TrainState:
    """Everything besides weights that an exact resume needs."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best_score: float = float("-inf")
    epochs_since_improvement: int = 0
    hard_baseline: float = 0.0  # b of Sec. 4.1, a moving average of log p(y|s,a)


def compute_loss(
    model: torch.nn.Module, batch: dict[str, Any], cfg: Config, state: TrainState, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy over real words + doubly stochastic term (+ REINFORCE and entropy for hard)."""
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
    captions, caplens = batch["captions"], batch["caplens"]  # (B, C, T+1), (B, C)
    if 0 < cfg.captions_per_step < captions.size(1):
        keep = torch.randperm(captions.size(1))[: cfg.captions_per_step]
        captions, caplens = captions[:, keep], caplens[:, keep]
    captions, caplens = captions.to(device, non_blocking=True), caplens.to(device, non_blocking=True)

    hard = cfg.attention == "hard"
    # Hard attention: with probability hard_expected_prob the mini-batch uses the expected context
    # (Sec. 4.1's variance-reduction trick); otherwise locations are sampled.
    mode = "expected" if not hard or torch.rand(()).item() < cfg.hard_expected_prob else "sample"
    out = model(images, captions, caplens, mode)
    mask = out["mask"]  # (N, T)
    log_probs = target_log_probs(out["logits"], out["targets"])  # (N, T), shared by CE and the reward
    ce = -log_probs[mask].mean()  # cross-entropy, mean over real words
    ds = doubly_stochastic_penalty(out["alphas"], mask, cfg.ds_reduction)
    loss = ce + cfg.alpha_c * ds
    if hard:
        words = mask.sum(dim=1).clamp_min(1)  # (N,)
        # Entropy bonus lambda_e * H[s] (Eq. 12), averaged over real steps.
        loss = loss - cfg.hard_entropy_weight * (out["entropy"] * mask).sum() / words.sum()
        if "log_p_s" in out:
            # Reward log p(y|s,a) per word, as the original code (it averages the cost over time).
            log_lik = (log_probs * mask).sum(dim=1) / words  # (N,)
            log_p_s = (out["log_p_s"] * mask).sum(dim=1)  # (N,) log p(s|a) over real steps
            loss = loss + reinforce_surrogate(log_lik, log_p_s, state.hard_baseline, cfg.hard_reinforce_weight)
            decay = cfg.hard_baseline_decay
            state.hard_baseline = decay * state.hard_baseline + (1 - decay) * float(log_lik.detach().mean())
    # Detached tensors, not floats: converting would force a GPU sync every step.
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "ds": ds.detach()}


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: Config,
    state: TrainState,
    device: torch.device,
    info: DistInfo,
    writer: Any,
) -> dict[str, float]:
    model.train()
    totals = {"loss": torch.zeros((), device=device), "ce": torch.zeros((), device=device),
              "ds": torch.zeros((), device=device)}
    seen, start = 0, time.time()
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not info.is_main, dynamic_ncols=True)
    for batch in bar:
        with autocast_context(device, cfg.amp):
            loss, parts = compute_loss(model, batch, cfg, state, device)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        seen += 1
        for key in totals:
            totals[key] += parts[key]
        if state.step % 10 == 0:  # reading the loss syncs with the GPU: do it now and then
            images_per_s = seen * batch["image"].size(0) * info.world_size / (time.time() - start)
            bar.set_postfix(loss=f"{float(parts['loss']):.3f}", img_s=f"{images_per_s:.0f}")
        if writer is not None and state.step % cfg.log_every == 0:
            for key, value in parts.items():
                writer.add_scalar(f"train/{key}", float(value), state.step)
    return {key: float(value) / max(seen, 1) for key, value in totals.items()}


def validate(
    model: ShowAttendTell, loader: DataLoader, word_map: dict[str, int], cfg: Config, device: torch.device
) -> dict[str, float]:
    """Decode val and score it: the number that selects the model is a decoded metric."""
    decoded = decode_split(
        model,
        loader,
        word_map,
        device=device,
        beam_size=cfg.val_beam_size,
        max_len=cfg.max_decode_len,
        mode=cfg.hard_decode,
        amp=cfg.amp,
        progress=False,
    )
    references = {d["index"]: d["references"] for d in decoded}
    captions = {d["index"]: d["caption"] for d in decoded}
    return score_captions(captions, references, metrics=("BLEU",), tokenizer="simple")


def make_loaders(cfg: Config, info: DistInfo) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    train_set = CaptionDataset(cfg.data_folder, "train")
    val_set = CaptionDataset(cfg.data_folder, "val")
    if len(val_set) == 0:  # fail now, not after an epoch: model selection needs a val score
        raise ValueError(f"{val_set.path}: the val split is empty; repack with a val fraction > 0")
    if cfg.val_max_images:
        val_set = Subset(val_set, range(min(cfg.val_max_images, len(val_set))))
    # A DistributedSampler with world size 1 is a seeded shuffle whose order is a function of the epoch,
    # which is what makes resume exact.
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    # Own generators: worker seeds then never draw from the global RNG, which resume restores exactly.
    common = {"num_workers": cfg.num_workers, "collate_fn": collate_captions, "persistent_workers": cfg.num_workers > 0}
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed), **common)
    if len(train_loader) == 0:  # drop_last would "train" zero steps
        raise ValueError(f"{train_set.path}: {len(train_set)} images give no full batch of batch_size="
                         f"{cfg.batch_size} per process ({info.world_size} process(es)); lower batch_size")
    val_loader = DataLoader(val_set, batch_size=max(1, 64 // cfg.val_beam_size), shuffle=False,
                            generator=torch.Generator().manual_seed(cfg.seed), **common)
    return train_loader, val_loader, sampler


def build_optimizer(model: ShowAttendTell, cfg: Config) -> torch.optim.Optimizer:
    """Adam with separate encoder and decoder learning rates (frozen encoder parameters are left out)."""
    groups = [{"params": list(model.decoder.parameters()), "lr": cfg.decoder_lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.encoder_lr})
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def resolve_config(argv: Sequence[str] | None) -> tuple[Config, dict[str, Any] | None]:
    """--config + overrides; with resume=..., the checkpoint's config + the same overrides."""
    args = get_args_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(cfg.resume)
    if "train_state" not in ckpt:
        raise ValueError(f"{cfg.resume}: has no training state to resume from (use last.pt)")
    resumed = apply_overrides(config_from_dict(ckpt["config"]), args.overrides)
    resumed.validate()
    return resumed, ckpt


def append_metrics_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, ckpt = resolve_config(argv)
        info, device = init_distributed(cfg.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return _train(cfg, ckpt, info, device)
    except (ValueError, WeightsDownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an unwritable or clashing run folder, a vanished data file, a full disk
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed(info)


def _train(cfg: Config, ckpt: dict[str, Any] | None, info: DistInfo, device: torch.device) -> int:
    seed_everything(cfg.seed)
    out_dir = cfg.resolved_out_dir()
    if ckpt is None and (out_dir / "last.pt").exists():
        raise ValueError(f"{out_dir} already holds a run; continue it with resume={out_dir / 'last.pt'} "
                         "or pick another out_dir=")
    train_loader, val_loader, sampler = make_loaders(cfg, info)
    word_map = train_loader.dataset.word_map
    model = build_model(cfg, len(word_map)).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.lr_decay_factor, patience=cfg.lr_patience
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16" and device.type == "cuda")
    state = TrainState()
    if ckpt is not None:
        if ckpt["word_map"] != word_map:
            raise ValueError(f"{cfg.resume}: word map differs from {cfg.data_folder}/word_map.json")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["train_state"])
        set_rng_state(ckpt["rng"])
    ddp_model = DistributedDataParallel(model) if info.enabled else model

    writer = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=state.step or None)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"train: {len(train_loader.dataset)} images x {train_loader.dataset.captions_per_image} captions, "
            f"vocab {len(word_map)}, {trainable / 1e6:.2f}M trainable parameters, device {device}, "
            f"{info.world_size} process(es), attention {cfg.attention}, run folder {out_dir}"
        )

    while state.epoch < cfg.epochs:
        sampler.set_epoch(state.epoch)
        start = time.time()
        losses = train_one_epoch(ddp_model, train_loader, optimizer, scaler, cfg, state, device, info, writer)
        state.epoch += 1
        # Rank 0 decodes val; every rank gets the score so LR decay and early stopping agree.
        score = [validate(model, val_loader, word_map, cfg, device)[VAL_METRIC] if info.is_main else 0.0]
        if info.enabled:
            dist.broadcast_object_list(score, src=0)
        score = score[0]
        scheduler.step(score)
        improved = score > state.best_score
        state.best_score = max(state.best_score, score)
        state.epochs_since_improvement = 0 if improved else state.epochs_since_improvement + 1
        seconds = time.time() - start
        if info.is_main:
            lr = optimizer.param_groups[0]["lr"]
            row = {"epoch": state.epoch, "step": state.step, "train_loss": f"{losses['loss']:.4f}",
                   "train_ce": f"{losses['ce']:.4f}", "train_ds": f"{losses['ds']:.4f}", "lr": f"{lr:.3g}",
                   f"val_{VAL_METRIC}": f"{score:.4f}", "epoch_seconds": f"{seconds:.1f}"}
            append_metrics_row(out_dir / "metrics.csv", row)
            writer.add_scalar(f"val/{VAL_METRIC}", score, state.step)
            writer.add_scalar("train/lr", lr, state.step)
            writer.flush()
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "config": dataclasses.asdict(cfg),
                "word_map": word_map,
                "image_size": train_loader.dataset.image_size,  # caption.py resizes new images to this
                "train_state": dataclasses.asdict(state),
                "rng": rng_state(),
            }
            save_checkpoint(out_dir / "last.pt", payload)
            if improved:
                save_checkpoint(out_dir / "best.pt", payload)
            print(
                f"epoch {state.epoch}: loss {losses['loss']:.3f} (ce {losses['ce']:.3f}, ds {losses['ds']:.4f}) "
                f"val {VAL_METRIC} {score:.4f}{' (best)' if improved else ''} lr {lr:.2g} {seconds:.0f}s"
            )
        if cfg.early_stop_patience and state.epochs_since_improvement >= cfg.early_stop_patience:
            if info.is_main:
                print(f"early stop: no val {VAL_METRIC} improvement for {state.epochs_since_improvement} epochs")
            break
    if writer is not None:
        writer.close()
        print(f"done: best val {VAL_METRIC} {state.best_score:.4f}; checkpoints in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
