"""The training engine train.py drives: the step, the epoch, validation, loaders and the run state an exact
resume needs. The run's log is logger.py, the optimizer optim.py, the resumable sampler sampler.py."""
from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2 import RandomHorizontalFlip

from satkit.attention import is_stochastic
from satkit.checkpoints import build_checkpoint
from satkit.config import Config
from satkit.data.dataset import CaptionDataset, collate_captions
from satkit.decoding import DecodeOptions, decode_split
from satkit.data.feature_cache import ensure_cache
from satkit.training.losses import ConceptHead, SelfCritical, compute_loss, epoch_parts
from satkit.model import ShowAttendTell
from satkit.infra.progress import progress_bar
from satkit.training.rewards import load_document_frequencies
from satkit.infra.runtime import DistInfo, UserError, autocast_context, dead_workers_explained
from satkit.infra.signals import StopSignals
from satkit.data.shards import (ShardLoader, ShardStream, check_shards, collate_stream, expand_shards, read_stream_info,
                                scan_captions)
from satkit.evaluation.scoring import caption_diversity, score_captions, validation_metrics
from satkit.training.sampler import ResumableSampler
from satkit.infra.seeding import rng_state

if TYPE_CHECKING:
    from satkit.training.logger import RunLogger


T = TypeVar("T")

@dataclasses.dataclass
class TrainState:
    """Everything besides weights that an exact resume needs."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best_score: float = float("-inf")
    epochs_since_improvement: int = 0
    # b of Sec. 4.1, a moving average of log p(y|s,a); a 0-dim tensor while training (no per-step sync)
    hard_baseline: float | torch.Tensor = 0.0
    # An interrupted epoch (SIGTERM, Ctrl-C): batches of epoch `epoch + 1` already trained, and the sums of
    # their loss parts, so that the resumed run trains only the rest and reports the whole epoch's mean.
    epoch_step: int = 0
    epoch_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    # data_format=webdataset, interrupted mid-epoch: each rank's workers' raw stream positions and the
    # epoch's bad samples so far (ShardLoader.position), so that the rest of the epoch skips what was read.
    stream: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # nonfinite_loss=stop's losses not yet checked for NaN/inf (check_losses): (epoch, step, loss), on
        # the device. Not a field: it is never saved, and a resumed run starts with none.
        self.unchecked: list[tuple[int, int, torch.Tensor]] = []

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hard_baseline": float(self.hard_baseline)}


@dataclasses.dataclass
class Run:
    """One training run's parts, built once by train.py's setup_run and handed around whole."""

    cfg: Config
    info: DistInfo
    device: torch.device
    out_dir: Path
    model: ShowAttendTell  # the captioner that checkpoints hold
    trained: nn.Module  # model, or model + ConceptHead: what the optimizer updates
    ddp_model: nn.Module  # trained, wrapped in DistributedDataParallel in a multi-process run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    train_loader: DataLoader | ShardLoader
    val_loader: DataLoader
    sampler: ResumableSampler | ShardLoader  # what orders an epoch: set_epoch, skip
    word_map: dict[str, int]  # the model's
    pack_word_map: dict[str, int]  # the pack's: differs when fine-tuning (see finetune.py)
    state: TrainState = dataclasses.field(default_factory=TrainState)
    stop: StopRequest | None = None
    objective: SelfCritical | None = None  # objective=scst; None: teacher-forced cross-entropy

    def record_score(self, score: float) -> bool:
        """A validation score drives the LR schedule, the best score and early stopping; True if it is the best."""
        state = self.state
        self.scheduler.step(score)
        improved = score > state.best_score
        state.best_score = max(state.best_score, score)
        state.epochs_since_improvement = 0 if improved else state.epochs_since_improvement + 1
        return improved

    def checkpoint(self, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """last.pt / best.pt: the model as eval and caption need it, plus what an exact resume needs
        (in a multi-process run, `ranks`: each rank's own state, from rank_states)."""
        extra = {"pack_word_map": self.pack_word_map} if self.word_map != self.pack_word_map else {}  # for eval.py
        if isinstance(self.trained, ConceptHead):
            extra["concept_head"] = self.trained.head.state_dict()
        if ranks is not None:
            extra["ranks"] = ranks
        return build_checkpoint(self.model, self.cfg.model_config(), self.word_map, cfg=self.cfg,
                                image_size=self.train_loader.dataset.image_size,  # caption.py resizes to it
                                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                                scaler=self.scaler.state_dict(), train_state=self.state.to_dict(), rng=rng_state(),
                                **extra)


def rank_states(run: Run) -> list[dict[str, Any]] | None:
    """Each rank's RNG states and hard-attention baseline, gathered for rank 0's checkpoint (every rank
    calls it; None in one process). They differ between ranks: dropout masks and sampled locations take
    as many draws as the rank's own captions are long, and the baseline follows the rank's own batches.
    Restoring rank 0's on every rank made a resumed DDP run's weights differ from an unbroken run's."""
    if not run.info.enabled:
        return None
    gathered: list[Any] = [None] * run.info.world_size
    dist.all_gather_object(gathered, {"rng": rng_state(), "hard_baseline": float(run.state.hard_baseline)})
    return gathered


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which saves and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(*loaders: DataLoader) -> None:
    """End the loaders' persistent workers now. They ignore SIGTERM (_ignore_stop_signals), and SIGTERM is
    how multiprocessing ends daemonic children at interpreter exit: left to it, the exit would wait on
    them forever. DataLoader keeps no public handle on them; its iterator does the usual shutdown."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def prepare_batch(batch: dict[str, Any], cfg: Config, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, S, S) and captions (B, C, T+1) on the device, cut to the batch's longest caption;
    caplens (B, C) stay on the CPU, where the decoder reads T without a GPU sync. C = captions_per_step,
    a fresh random choice among each image's stored captions every step."""
    captions, caplens = batch["captions"], batch["caplens"]
    if 0 < cfg.captions_per_step < captions.size(1):
        keep = torch.randperm(captions.size(1))[: cfg.captions_per_step]
        captions, caplens = captions[:, keep], caplens[:, keep]
    captions = captions[..., : int(caplens.max())]
    return batch["image"].to(device, non_blocking=True), captions.to(device, non_blocking=True), caplens


def teacher_forced_loss(model: torch.nn.Module, batch: dict[str, Any], cfg: Config, state: TrainState,
                        device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """objective=xe: the paper's loss on the batch's captions, with the context mode of this step."""
    images, captions, caplens = prepare_batch(batch, cfg, device)
    unwrapped = getattr(model, "module", model)  # DistributedDataParallel keeps the module in .module
    # The concept targets use every stored caption of the image, not only this step's sample.
    concepts = unwrapped.targets(batch["captions"].to(device)) if isinstance(unwrapped, ConceptHead) else None
    # Hard attention: with probability hard_expected_prob the mini-batch uses the expected context
    # (Sec. 4.1's variance-reduction trick); otherwise locations are sampled.
    sample = is_stochastic(cfg.attention) and torch.rand(()).item() >= cfg.hard_expected_prob
    out = model(images, captions, caplens, "sample" if sample else "expected")
    return compute_loss(out, cfg, state.hard_baseline, concepts)


# Steps between reads of what the device holds for the loop (stop requests across ranks, non-finite
# losses): on a GPU each read waits for the queued work, and in DDP adds an all-reduce; on the CPU it costs
# nothing, so it is every step there. Tests set "cpu" to 10 to run the lagged path on the CPU.
CHECK_EVERY = {"cpu": 1}
LAGGED_CHECK_EVERY = 10  # other devices; the loop also reads the loss every 10 steps for its progress bar


def check_every(device: torch.device) -> int:
    """Steps between the loop's reads of the device: rarely on a GPU, where each read stalls the queue."""
    return CHECK_EVERY.get(device.type, LAGGED_CHECK_EVERY)


def train_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: Config,
    state: TrainState,
    device: torch.device,
    objective: SelfCritical | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step: the loss (teacher-forced cross-entropy, or `objective`'s), the update, and
    the hard-attention baseline. Returns the loss parts, detached."""
    try:
        with autocast_context(device, cfg.amp):
            loss, parts = objective(model, batch, device) if objective else teacher_forced_loss(model, batch, cfg,
                                                                                                 state, device)
    except RuntimeError:
        # A NaN loss not yet read has made the weights NaN, on which sampling (hard attention, SCST) fails:
        # name the NaN, not its consequence. This rank's losses only: the others are not in this call.
        check_losses(state, across_ranks=False)
        raise
    optimizer.zero_grad(set_to_none=True)
    if cfg.nonfinite_loss == "skip":
        # Skipping a NaN/inf loss must be decided before its update, so this mode reads every loss (a sync
        # per step); in DDP every rank must decide alike, or the others wait in the gradient all-reduce forever.
        if not finite_on_every_rank(loss):
            print(f"warning: non-finite loss ({float(loss.detach()):g}) at epoch {state.epoch + 1} step "
                  f"{state.step + 1}: batch skipped", file=sys.stderr)
            state.step += 1
            return {}
    else:
        # A NaN/inf loss puts NaN into every weight at its update. nonfinite_loss=stop reads the losses only
        # every check_every steps (before that step's update) and before any checkpoint (train.py calls
        # check_losses): the run stops, and weights that saw such a loss are never saved.
        state.unchecked.append((state.epoch + 1, state.step + 1, loss.detach()))
        if (state.step + 1) % check_every(device) == 0:
            check_losses(state)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if "log_lik" in parts:
        decay = cfg.hard_baseline_decay
        state.hard_baseline = decay * state.hard_baseline + (1 - decay) * parts["log_lik"]
    state.step += 1
    return parts


def finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (one sync; an all-reduce in DDP)."""
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def check_losses(state: TrainState, across_ranks: bool = True) -> None:
    """Stop with one line if a loss not yet checked (state.unchecked) was NaN or inf, on any rank.

    One read for them all. In DDP the ranks all-reduce the same steps' losses here, so all of them stop,
    or go on, together; every rank must call this at the same point (unless across_ranks=False)."""
    if not state.unchecked:
        return
    values = torch.stack([loss.float() for _, _, loss in state.unchecked])
    values = torch.where(torch.isfinite(values), torch.zeros_like(values), values)  # 0, or the bad value
    if across_ranks and dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)  # a sum: a NaN or inf on any rank stays non-finite
    bad = [(epoch, step, value) for (epoch, step, _), value in zip(state.unchecked, values.tolist()) if value != 0]
    state.unchecked.clear()
    if bad:
        epoch, step, value = bad[0]
        kept = f"the last checkpoint (epoch {state.epoch}) is kept" if state.epoch else "nothing was saved"
        raise UserError(f"non-finite loss ({value:g}) at epoch {epoch} step {step}: training stopped and {kept}; "
                        "lower the learning rate, or set nonfinite_loss=skip to skip such batches")


def train_one_epoch(run: Run, log: RunLogger) -> dict[str, float]:
    """One epoch (or its rest, after a mid-epoch resume); returns the mean loss parts, or {} when a stop
    signal ended it early (state.epoch_step and state.epoch_sums then say where)."""
    cfg, state, info, device = run.cfg, run.state, run.info, run.device
    run.ddp_model.train()
    # A resumed, interrupted epoch starts from the sums of the steps it had done (state.epoch_sums).
    totals = {key: torch.tensor(state.epoch_sums.get(key, 0.0), device=device) for key in epoch_parts(cfg)}
    num_steps, start = state.epoch_step, time.time()
    bar = progress_bar(run.train_loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not info.is_main,
                       initial=state.epoch_step, total=state.epoch_step + len(run.train_loader))
    last = run.out_dir / "last.pt"
    with dead_workers_explained("num_workers= or batch_size=", f"{last} holds the last finished epoch"):
        for batch in bar:
            parts = train_step(run.ddp_model, batch, run.optimizer, run.scaler, cfg, state, device, run.objective)
            num_steps += 1
            state.epoch_step = num_steps
            for key, value in parts.items():
                if key in totals:
                    totals[key] += value
            if run.stop is not None and run.stop.requested(state.step, info, device):
                state.epoch_sums = {key: float(value) for key, value in totals.items()}
                if isinstance(run.train_loader, ShardLoader):
                    state.stream = run.train_loader.position(info.enabled)
                return {}
            if state.step % 10 == 0 and parts:  # reading the loss syncs with the GPU: do it now and then
                images_per_s = num_steps * cfg.batch_size * info.world_size / (time.time() - start)
                bar.set_postfix(loss=f"{float(parts['loss']):.3f}", img_s=f"{images_per_s:.0f}")
            log.step(state.step, parts)
    state.epoch_step, state.epoch_sums, state.stream = 0, {}, {}
    means = {key: float(value) / max(num_steps, 1) for key, value in totals.items()}
    if isinstance(run.train_loader, ShardLoader):
        means["bad_samples"] = run.train_loader.bad_samples(info.enabled)
    return means


class StopRequest(StopSignals):
    """StopSignals for the training loop: every rank of a DDP run must stop at the same step, so there
    the signal is all-reduced every check_every steps (a single process checks after every step)."""

    def requested(self, step: int, info: DistInfo, device: torch.device) -> bool:
        if not info.enabled:
            return self.received is not None
        if step % check_every(device):
            return False
        # The signal's number, not just a flag: every rank then exits with the code of the signal sent.
        signum = torch.tensor(signal.Signals[self.received].value if self.received else 0, device=device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        got = int(signum.item())
        if got and self.received is None:
            self.received = signal.Signals(got).name  # another rank got it
        return bool(got)


def val_scores(
    model: ShowAttendTell, loader: DataLoader, word_map: dict[str, int], cfg: Config, device: torch.device,
    words: str = "ascii",
) -> dict[str, float]:
    """Decode val and score it (scoring.validation_metrics: BLEU and CIDEr, and whatever gives val_metric;
    the number that selects the model is a decoded metric), with the collapse diagnostics."""
    opts = DecodeOptions(beam_size=cfg.val_beam_size, max_len=cfg.max_len, hard_decode=cfg.hard_decode,
                         block_trigrams=cfg.block_trigrams, batch_size=loader.batch_size or 1)
    with dead_workers_explained("num_workers="):
        decoded = decode_split(model, loader, word_map, opts, device=device, amp=cfg.amp, progress=False)
    references = {d["index"]: d["references"] for d in decoded}
    captions = {d["index"]: d["caption"] for d in decoded}
    scores = score_captions(captions, references, metrics=validation_metrics(cfg.val_metric), words=words)
    return {**scores, **caption_diversity(list(captions.values()))}


def make_loaders(cfg: Config, info: DistInfo, device: torch.device
                 ) -> tuple[DataLoader | ShardLoader, DataLoader, ResumableSampler | ShardLoader]:
    if cfg.data_format == "webdataset":
        return make_shard_loaders(cfg, info, device)
    train_set = CaptionDataset(cfg.data_folder, "train", transform=RandomHorizontalFlip() if cfg.hflip else None)
    val_set = CaptionDataset(cfg.data_folder, "val")
    if len(val_set) == 0:  # fail now, not after an epoch: model selection needs a val score
        raise UserError(f"{val_set.path}: the val split is empty; repack with a val fraction > 0")
    if cfg.val_max_images:
        val_set = Subset(val_set, range(min(cfg.val_max_images, len(val_set))))
    # A DistributedSampler with world size 1 is a seeded shuffle whose order is a function of the epoch,
    # which is what makes resume exact.
    sampler = ResumableSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    # Own generators: worker seeds then never draw from the global RNG, which resume restores exactly.
    # Pinned host memory lets prepare_batch's non_blocking copies overlap the GPU's work.
    common = {"num_workers": cfg.num_workers, "collate_fn": collate_captions, "persistent_workers": cfg.num_workers > 0,
              "pin_memory": device.type == "cuda",
              "worker_init_fn": _ignore_stop_signals if cfg.num_workers > 0 else None}
    # seed + rank: each rank's workers seed their own augmentation (hflip) draws (rank 0: as in one process)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed + info.rank), **common)
    if len(train_loader) == 0:  # drop_last would "train" zero steps
        raise UserError(f"{train_set.path}: {len(train_set)} images give no full batch of batch_size="
                        f"{cfg.batch_size} per process ({info.world_size} process(es)); lower batch_size")
    val_loader = DataLoader(val_set, batch_size=max(1, 64 // cfg.val_beam_size), shuffle=False,
                            generator=torch.Generator().manual_seed(cfg.seed), **common)
    return train_loader, val_loader, sampler


def make_shard_loaders(cfg: Config, info: DistInfo, device: torch.device
                       ) -> tuple[ShardLoader, DataLoader, ShardLoader]:
    """data_format=webdataset: train and val streamed from shards (shards.py), encoded by the word map and
    marker that create_input_files.py --dataset webdataset wrote into data_folder."""
    stream_info, word_map = read_stream_info(cfg.data_folder)
    train_urls, val_urls = expand_shards(cfg.train_shards, "train_shards"), expand_shards(cfg.val_shards, "val_shards")
    check_shards(train_urls + val_urls)
    workers = max(cfg.num_workers, 1)
    if not cfg.shard_resampled and len(train_urls) < info.world_size * workers:
        raise UserError(f"train_shards: {len(train_urls)} shard(s) cannot feed {info.world_size} process(es) x "
                        f"{workers} DataLoader worker(s): write more, smaller shards (--shard-size), lower "
                        "num_workers, or set shard_resampled=true")
    steps = cfg.train_num_samples // (cfg.batch_size * info.world_size)
    if steps == 0:
        raise UserError(f"train_num_samples={cfg.train_num_samples} gives no full batch of batch_size="
                        f"{cfg.batch_size} per process ({info.world_size} process(es))")
    train_set = ShardStream(train_urls, dataclasses.replace(stream_info, num_samples=cfg.train_num_samples), word_map,
                            train=True, seed=cfg.seed, shuffle_buffer=cfg.shard_shuffle_buffer,
                            resampled=cfg.shard_resampled, rank=info.rank, world_size=info.world_size,
                            transform=RandomHorizontalFlip() if cfg.hflip else None)
    train_loader = ShardLoader(train_set, cfg.batch_size, steps, cfg.num_workers, pin_memory=device.type == "cuda",
                               worker_init_fn=_ignore_stop_signals)
    # Val's size (for the loader's length), and one line naming val_shards before the first epoch if it has
    # no usable sample: a pass over its captions, no image decoded.
    _, num_val, _ = scan_captions(val_urls, stream_info.tokenizer, stream_info.max_caption_words, desc=None)
    if not num_val:
        raise UserError(f"val_shards={cfg.val_shards}: no sample with an image and a caption")
    num_val = min(num_val, cfg.val_max_images or num_val)
    val_set = ShardStream(val_urls, dataclasses.replace(stream_info, num_samples=num_val), word_map, train=False,
                          seed=cfg.seed, split="val")
    val_set.max_items = cfg.val_max_images
    # One process reads val in order (a second worker would read the same shards again).
    val_workers = min(cfg.num_workers, 1)
    val_loader = DataLoader(val_set, batch_size=max(1, 64 // cfg.val_beam_size), num_workers=val_workers,
                            collate_fn=collate_stream, worker_init_fn=_ignore_stop_signals if val_workers else None)
    return train_loader, val_loader, train_loader


def packed_splits(train_loader: DataLoader, val_loader: DataLoader) -> list[CaptionDataset]:
    """The packed train and val datasets behind the loaders (val_max_images wraps val in a Subset)."""
    val = val_loader.dataset
    return [train_loader.dataset, val.dataset if isinstance(val, Subset) else val]


def use_feature_cache(cfg: Config) -> bool:
    """feature_cache=auto trains from cached annotations whenever the encoder is frozen and images are
    not augmented (a flipped image has other annotations than the cached ones)."""
    if cfg.feature_cache == "on":
        if cfg.fine_tune_encoder:
            raise UserError("feature_cache=on needs a frozen encoder: set fine_tune_encoder=false or feature_cache=off")
        if cfg.hflip:
            raise UserError("feature_cache=on cannot flip images (hflip=true): set one of them off")
    if cfg.data_format == "webdataset":
        if cfg.feature_cache == "on":
            raise UserError("feature_cache=on needs an HDF5 pack (data_format=hdf5): shards are streamed, not cached")
        return False
    return cfg.feature_cache == "on" or (cfg.feature_cache == "auto" and not cfg.fine_tune_encoder and not cfg.hflip)


def warn_if_pooled_up(model: ShowAttendTell, image_size: int, cfg: Config) -> None:
    """One line when enc_size exceeds the encoder's native grid at this image size: adaptive pooling then
    copies cells (7x7 to 14x14: each four times), which costs attention and cache as a finer grid would and
    adds no detail. A warning, not a refusal: the common ports' ResNet-101 recipe (8x8 at 256 px, pooled to
    14x14, configs/flickr8k.yaml) does this on purpose."""
    native = model.encoder.grid(image_size)
    if cfg.enc_size > native:
        print(f"warning: enc_size={cfg.enc_size} pools {cfg.encoder}'s {native}x{native} grid (encoder_stages="
              f"{cfg.encoder_stages}, {image_size} px) up to {cfg.enc_size}x{cfg.enc_size}: copied cells, "
              f"{cfg.enc_size ** 2 / native ** 2:.1f}x the attention and feature-cache cost for no finer detail; "
              f"enc_size={native} attends over the grid itself", file=sys.stderr)


def built_by_rank_0(info: DistInfo, make: Callable[[bool], T]) -> T:
    """`make(build)` on every rank, rank 0 first with build=True while the others wait at a barrier, then
    reading what it built: a file beside the pack is written once, never by two processes."""
    if info.is_main:
        made = make(True)
    if info.enabled:
        dist.barrier()
    return made if info.is_main else make(False)


def cached_features(model: ShowAttendTell, cfg: Config, split: str, info: DistInfo, device: torch.device) -> Path:
    """The split's feature cache for this frozen encoder, built on first use."""
    return built_by_rank_0(info, lambda build: ensure_cache(model.encoder, cfg.model_config(), cfg.data_folder, split,
                                                            build=build, device=device, num_workers=cfg.num_workers))


def self_critical(cfg: Config, run_model: ShowAttendTell, word_map: dict[str, int], pack_word_map: dict[str, int],
                  info: DistInfo) -> SelfCritical:
    """objective=scst, with CIDEr-D's document frequencies from the pack's training references (built once,
    stored beside the pack: rewards.load_document_frequencies)."""
    if word_map != pack_word_map:
        raise UserError(f"objective=scst scores captions with the word map of {cfg.data_folder}, but the model has "
                        "another (init_from a model of another pack, or extend_vocab): train with objective=xe "
                        "on this pack first")
    df = built_by_rank_0(info, lambda build: load_document_frequencies(cfg.data_folder, build=build))
    return SelfCritical(run_model, word_map, df, cfg)
