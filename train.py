"""Train Show, Attend and Tell (soft or hard attention) on a packed dataset.

    python train.py --config configs/shapes.yaml [key=value ...]
    torchrun --nproc_per_node 2 train.py --config configs/flickr8k.yaml
    python train.py --config configs/shapes.yaml resume=runs/shapes/last.pt
    python train.py --config configs/flickr8k.yaml data_folder=data/mine init_from=runs/coco/best.pt extend_vocab=true

Every run writes into its own folder: config.yaml, metrics.csv, curves.png, TensorBoard events, last.pt,
best.pt. Model selection uses a decoded metric on val (BLEU-4 of greedy/beam captions), not teacher forcing;
each epoch also reports the collapse diagnostics (distinct captions, vocabulary used, mean length).
"""
from __future__ import annotations

import omp_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from satkit.checkpoints import config_from_checkpoint, load_checkpoint, save_checkpoint
from satkit.config import MODEL_KEYS, Config, apply_overrides, load_config, parse_overrides, save_config
from satkit.infra.filesafety import check_writable, folder_lock, remove_stale_temporaries
from satkit.training.finetune import caption_id_map, model_from_init, model_word_map, resolve_init
from satkit.training.losses import ConceptHead
from satkit.model import build_model
from satkit.plugins import check_plugins
from satkit.infra.runtime import DistInfo, UserError, cleanup_distributed, init_distributed, run_cli
from satkit.evaluation.scoring import scoring_words
from satkit.data.shards import ShardLoader
from satkit.training.logger import RunLogger, truncate_metrics
from satkit.training.optim import apply_resume_overrides, build_optimizer
from satkit.training.trainer import (Run, StopRequest, TrainState, cached_features, check_losses, make_loaders,
                                     packed_splits, rank_states, self_critical, stop_workers, train_one_epoch,
                                     use_feature_cache, val_scores, warn_if_pooled_up)
from satkit.infra.seeding import seed_everything, set_rng_state

# Fixed by the saved weights and optimizer state: a resume may not change them (ModelConfig keys neither).
FIXED_ON_RESUME = ("fine_tune_encoder", "fine_tune_stages")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file in configs/ (overrides of config.Config defaults; may name a base:)")
    parser.add_argument("--debug", action="store_true", help="show a traceback for every error")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 data_folder=DIR")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, dict[str, Any] | None]:
    """--config + overrides; with resume=..., the checkpoint's config + the same overrides.

    On resume the architecture is the checkpoint's: overriding a model key is refused, since the saved
    weights could not be loaded into another shape.
    """
    cfg = load_config(args.config, args.overrides)
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(cfg.resume)
    check_plugins((ckpt.get("train_config") or {}).get("imports") or [], cfg.resume, flag="imports={}")
    if "train_state" not in ckpt:
        raise UserError(f"{cfg.resume}: has no training state to resume from (use last.pt)")
    overridden = parse_overrides(args.overrides)
    changed = [key for key in overridden if key in MODEL_KEYS]
    if changed:
        raise UserError(f"resume={cfg.resume}: cannot change the model's {', '.join(changed)} when resuming "
                        "(start a new run instead)")
    stored = config_from_checkpoint(ckpt, cfg.resume)
    resumed = apply_overrides(stored, args.overrides)
    fixed = [key for key in FIXED_ON_RESUME if getattr(resumed, key) != getattr(stored, key)]
    if (resumed.concept_loss_weight > 0) != (stored.concept_loss_weight > 0):
        fixed.append("concept_loss_weight")  # adds or drops the concept head: a weight change is fine
    if fixed:
        raise UserError(f"resume={cfg.resume}: cannot change {', '.join(fixed)} when resuming (its optimizer "
                        "state is for the trained parameters as they were); start a new run instead")
    if "out_dir" not in overridden:  # a run folder copied elsewhere goes on where its checkpoint now is
        resumed.out_dir = str(Path(cfg.resume).parent)
    if not os.path.isdir(resumed.data_folder):
        raise UserError(f"resume={cfg.resume}: its data folder {resumed.data_folder} is not there (moved?); "
                        "pass data_folder=WHERE_IT_IS_NOW")
    resumed.check()
    return resumed, ckpt


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        cfg, ckpt = resolve_config(args)
        cfg, init = resolve_init(cfg, args.overrides)
        info, device = init_distributed(cfg.device)
        try:
            with StopRequest() as stop:
                run = setup_run(cfg, ckpt, init, info, device, stop, tuple(parse_overrides(args.overrides)))
                try:
                    with folder_lock(run.out_dir, "training") if info.is_main else nullcontext():
                        return train(run, resumed=ckpt is not None)
                finally:
                    stop_workers(run.train_loader, run.val_loader)
        finally:
            cleanup_distributed(info)

    return run_cli(body, args.debug)


def setup_run(cfg: Config, ckpt: dict[str, Any] | None, init: dict[str, Any] | None, info: DistInfo,
              device: torch.device, stop: StopRequest | None, overridden: Sequence[str]) -> Run:
    """Data, model (new, from init_from, or resumed), optimizer and state: everything the epochs need."""
    seed_everything(cfg.seed)
    out_dir = cfg.resolved_out_dir()
    feature_cache = use_feature_cache(cfg)  # refuses impossible settings before any work
    if info.is_main:
        check_writable(out_dir, "the run folder")
    if ckpt is None:
        refuse_existing_run(out_dir)
    train_loader, val_loader, sampler = make_loaders(cfg, info, device)
    packed = packed_splits(train_loader, val_loader)
    pack_word_map = train_loader.dataset.word_map
    word_map = model_word_map(cfg, ckpt, init, pack_word_map)
    if word_map != pack_word_map:  # fine-tuning: the pack's caption ids are translated on load
        id_map = caption_id_map(pack_word_map, word_map)
        for dataset in packed:
            dataset.caption_id_map = id_map
    cfg.vocab_size = len(word_map)
    if init is not None:
        model = model_from_init(init, cfg, word_map, pack_word_map, verbose=info.is_main)
    else:
        model = build_model(cfg.model_config(), encoder_weights=cfg.encoder_weights, fine_tune=cfg.fine_tune_encoder,
                            fine_tune_stages=cfg.fine_tune_stages)
    model.to(device)
    if cfg.compile_step:
        model.decoder.compile_step()
    trained = ConceptHead(model, word_map).to(device) if cfg.concept_loss_weight > 0 else model
    if info.is_main:
        warn_if_pooled_up(model, train_loader.dataset.image_size, cfg)
    if info.enabled:
        # seed + rank: each rank its own dropout masks, hard-attention draws and captions per step. Only now,
        # so that every rank builds the same initial weights (and finds rank 0's feature cache by their hash).
        seed_everything(cfg.seed + info.rank)
    optimizer = build_optimizer(trained, cfg)
    run = Run(cfg, info, device, out_dir, model, trained, trained, optimizer,
              torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_decay_factor,
                                                         patience=cfg.lr_patience),
              torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16" and device.type == "cuda"),
              train_loader, val_loader, sampler, word_map, pack_word_map, stop=stop)
    if ckpt is not None:
        restore(run, ckpt, overridden)
    if cfg.objective == "scst":
        run.objective = self_critical(cfg, model, word_map, pack_word_map, info)
    if feature_cache:  # the frozen encoder's annotations, once per image (after the checks on out_dir)
        for dataset in packed:
            dataset.features_path = cached_features(model, cfg, dataset.split, info, device)
    if info.enabled:
        run.ddp_model = DistributedDataParallel(trained)
    return run


def refuse_existing_run(out_dir: Path) -> None:
    if (out_dir / "last.pt").exists():
        raise UserError(f"{out_dir} already holds a run; continue it with resume={out_dir / 'last.pt'} "
                        "or pick another out_dir=")


def restore(run: Run, ckpt: dict[str, Any], overridden: Sequence[str]) -> None:
    """Weights, optimizer, schedule, RNG and training state of a last.pt: the run goes on exactly."""
    cfg = run.cfg
    if ckpt["word_map"] != run.word_map:
        raise UserError(f"{cfg.resume}: word map differs from {cfg.data_folder}/word_map.json")
    run.model.load_state_dict(ckpt["model"])
    if isinstance(run.trained, ConceptHead):
        if "concept_head" not in ckpt:
            raise UserError(f"{cfg.resume}: has no concept head to resume with concept_loss_weight > 0")
        run.trained.head.load_state_dict(ckpt["concept_head"])
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError:  # its parameter groups differ in size: older code had another parameter set
        raise UserError(f"{cfg.resume}: its optimizer state does not fit this code's model (written before "
                        "the attention's unused score bias was dropped?); start a new run from it with "
                        f"init_from={cfg.resume}") from None
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    apply_resume_overrides(run.optimizer, run.scheduler, cfg, overridden)
    run.state = TrainState(**ckpt["train_state"])
    if isinstance(run.sampler, ShardLoader) and run.state.stream:  # an epoch interrupted mid-way
        run.sampler.resume(run.state.stream, run.info.rank, run.info.world_size)
    set_rng_state(ckpt["rng"])
    baseline = run.state.hard_baseline
    ranks = ckpt.get("ranks")
    if ranks is not None and len(ranks) == run.info.world_size:  # this rank's own (trainer.rank_states)
        set_rng_state(ranks[run.info.rank]["rng"])
        baseline = ranks[run.info.rank]["hard_baseline"]
    # A 0-dim float32 tensor, as in the unbroken run: from a Python float the next update rounds otherwise.
    run.state.hard_baseline = torch.tensor(baseline, dtype=torch.float32, device=run.device)


def open_run_folder(run: Run, resumed: bool) -> RunLogger:
    """Rank 0 takes the locked run folder: stale temp files go, metrics.csv is cut back to the checkpoint,
    the resolved config is written. Other ranks get a silent logger."""
    if not run.info.is_main:
        return RunLogger(None)
    out_dir, cfg = run.out_dir, run.cfg
    if not resumed:
        refuse_existing_run(out_dir)  # another run got here first, between the check and the lock
    remove_stale_temporaries(out_dir)
    truncate_metrics(out_dir / "metrics.csv", run.state.epoch)
    save_config(cfg, out_dir / "config.yaml")
    dataset = run.train_loader.dataset
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    log = RunLogger(out_dir, cfg.log_every, start_step=run.state.step)
    log.line(f"train: {len(dataset)} images x {dataset.captions_per_image} captions, vocab {len(run.word_map)}, "
             f"{trainable / 1e6:.2f}M trainable parameters, device {run.device}, {run.info.world_size} "
             f"process(es), attention {cfg.attention}, run folder {out_dir}")
    return log


def train(run: Run, resumed: bool) -> int:
    """The epochs: train, validate, log, save; stop on a signal (saving where the run stands) or early."""
    cfg, state, info = run.cfg, run.state, run.info
    log = open_run_folder(run, resumed)
    last = run.out_dir / "last.pt"
    while state.epoch < cfg.epochs:
        run.sampler.set_epoch(state.epoch)
        run.sampler.skip = state.epoch_step * cfg.batch_size  # > 0 only in an epoch resumed part-way
        start = time.time()
        losses = train_one_epoch(run, log)
        run.sampler.skip = 0
        check_losses(state)  # the epoch's unchecked losses, before validation and any checkpoint
        if not losses:  # a stop signal, after a step
            ranks = rank_states(run)  # every rank takes part, before rank 0 saves
            if info.is_main:
                save_checkpoint(last, run.checkpoint(ranks))
            if info.enabled:  # no rank exits before last.pt is written: torchrun's agent would then stop rank 0
                dist.barrier()
            log.close(f"interrupted by {run.stop.received} at epoch {state.epoch + 1} step {state.step}: saved "
                      f"{last}; continue with resume={last}", error=True)
            return run.stop.exit_code
        state.epoch += 1
        val = validate(run)
        lr = run.optimizer.param_groups[0]["lr"]  # what the epoch trained at: record_score's schedule may lower it
        improved = run.record_score(val[cfg.val_metric])
        log.epoch(cfg, state.epoch, state.step, lr, losses, val, improved, time.time() - start)
        ranks = rank_states(run)
        if info.is_main:
            saved = run.checkpoint(ranks)
            save_checkpoint(last, saved)
            if improved:
                save_checkpoint(run.out_dir / "best.pt", saved)
        if run.stop is not None and run.stop.requested(0, info, run.device):  # during val or the save: saved
            log.close(f"interrupted by {run.stop.received} after epoch {state.epoch}: {last} holds it; "
                      f"continue with resume={last}", error=True)
            return run.stop.exit_code
        if cfg.early_stop_patience and state.epochs_since_improvement >= cfg.early_stop_patience:
            log.line(f"early stop: no val {cfg.val_metric} improvement for {state.epochs_since_improvement} epochs")
            break
    log.close(f"done: best val {cfg.val_metric} {state.best_score:.4f}; checkpoints in {run.out_dir}")
    return 0


def validate(run: Run) -> dict[str, float]:
    """Rank 0 decodes and scores val; every rank gets the scores, so LR decay and early stopping agree."""
    words = scoring_words(run.train_loader.dataset.tokenizer, ptb=False)
    val = [val_scores(run.model, run.val_loader, run.word_map, run.cfg, run.device, words=words)
           if run.info.is_main else {}]
    if run.info.enabled:
        dist.broadcast_object_list(val, src=0)
    return val[0]


if __name__ == "__main__":
    sys.exit(main())
