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
import csv
import dataclasses
import itertools
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.transforms.v2 import RandomHorizontalFlip

from checkpoints import (
    checkpoint_configs,
    config_from_checkpoint,
    load_checkpoint,
    model_config_from_checkpoint,
    save_checkpoint,
)
from config import (
    MODEL_KEYS,
    Config,
    apply_overrides,
    load_config,
    parse_overrides,
    save_config,
)
from attention import is_stochastic
from datasets import CaptionDataset, collate_captions
from decoding import DecodeOptions, decode_split
from feature_cache import ensure_cache
from figures import write_curves
from filesafety import (
    atomic_write_text,
    check_writable,
    folder_lock,
    remove_stale_temporaries,
)
from losses import ConceptHead, compute_loss
from models import ShowAttendTell, build_model, model_from_checkpoint
from progress import progress_bar
from runtime import (
    DistInfo,
    StopSignals,
    UserError,
    autocast_context,
    cleanup_distributed,
    init_distributed,
    one_line,
    run_cli,
)
from scoring import caption_diversity, score_captions, warn_if_collapsed
from utils import rng_state, seed_everything, set_rng_state

VAL_METRICS = ("BLEU-4", "CIDEr")  # decoded on val every epoch; cfg.val_metric drives LR decay, early stop, best.pt
DIVERSITY_KEYS = ("distinct_captions", "vocab_used", "mean_length")  # collapse diagnostics, see eval.py
# Fixed by the saved weights and optimizer state: a resume may not change them (ModelConfig keys neither).
FIXED_ON_RESUME = ("fine_tune_encoder", "fine_tune_stages")
CSV_FIELDS = ["epoch", "step", "train_loss", "train_ce", "train_ds", "train_concept", "lr",
              *(f"val_{key}" for key in VAL_METRICS + DIVERSITY_KEYS), "epoch_seconds"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file in configs/ (overrides of utils.Config defaults)")
    parser.add_argument("--debug", action="store_true", help="show a traceback for every error")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 data_folder=DIR")
    return parser


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

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hard_baseline": float(self.hard_baseline)}


class ResumableSampler(DistributedSampler):
    """A DistributedSampler whose epoch can start part-way, after `skip` samples: an epoch interrupted
    mid-way continues with the very batches it had not trained, in the same order."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


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


def train_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: Config,
    state: TrainState,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One optimisation step around compute_loss: data to the device, the captions and the context mode
    of this step, the update, and the hard-attention baseline. Returns the loss parts, detached."""
    images, captions, caplens = prepare_batch(batch, cfg, device)
    unwrapped = getattr(model, "module", model)  # DistributedDataParallel keeps the module in .module
    # The concept targets use every stored caption of the image, not only this step's sample.
    concepts = unwrapped.targets(batch["captions"].to(device)) if isinstance(unwrapped, ConceptHead) else None
    # Hard attention: with probability hard_expected_prob the mini-batch uses the expected context
    # (Sec. 4.1's variance-reduction trick); otherwise locations are sampled.
    sample = is_stochastic(cfg.attention) and torch.rand(()).item() >= cfg.hard_expected_prob
    with autocast_context(device, cfg.amp):
        out = model(images, captions, caplens, "sample" if sample else "expected")
        loss, parts = compute_loss(out, cfg, state.hard_baseline, concepts)
    optimizer.zero_grad(set_to_none=True)
    # A NaN/inf loss would put NaN into every weight at this update. Checking costs one sync per step;
    # in DDP every rank must take the same decision, or the others wait in the gradient all-reduce forever.
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        where = f"epoch {state.epoch + 1} step {state.step + 1}"
        if cfg.nonfinite_loss == "stop":
            kept = f"the last checkpoint (epoch {state.epoch}) is kept" if state.epoch else "nothing was saved"
            raise UserError(f"non-finite loss ({float(loss.detach()):g}) at {where}: training stopped and {kept}; "
                            "lower the learning rate, or set nonfinite_loss=skip to skip such batches")
        print(f"warning: non-finite loss ({float(loss.detach()):g}) at {where}: batch skipped", file=sys.stderr)
        state.step += 1
        return {}
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
    stop: StopRequest | None = None,
) -> dict[str, float]:
    """One epoch (or its rest, after a mid-epoch resume); returns the mean loss parts, or {} when a stop
    signal ended it early (state.epoch_step and state.epoch_sums then say where)."""
    model.train()
    # A resumed, interrupted epoch starts from the sums of the steps it had done (state.epoch_sums).
    totals = {key: torch.tensor(state.epoch_sums.get(key, 0.0), device=device)
              for key in ("loss", "ce", "ds", "concept")}
    num_steps, start = state.epoch_step, time.time()
    bar = progress_bar(loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not info.is_main,
                       initial=state.epoch_step, total=state.epoch_step + len(loader))
    for batch in bar:
        parts = train_step(model, batch, optimizer, scaler, cfg, state, device)
        num_steps += 1
        state.epoch_step = num_steps
        for key, value in parts.items():
            if key in totals:
                totals[key] += value
        if stop is not None and stop.requested(state.step, info, device):
            state.epoch_sums = {key: float(value) for key, value in totals.items()}
            return {}
        if state.step % 10 == 0 and parts:  # reading the loss syncs with the GPU: do it now and then
            images_per_s = num_steps * cfg.batch_size * info.world_size / (time.time() - start)
            bar.set_postfix(loss=f"{float(parts['loss']):.3f}", img_s=f"{images_per_s:.0f}")
        if writer is not None and state.step % cfg.log_every == 0:
            for key, value in parts.items():
                writer.add_scalar(f"train/{key}", float(value), state.step)
    state.epoch_step, state.epoch_sums = 0, {}
    return {key: float(value) / max(num_steps, 1) for key, value in totals.items()}


class StopRequest(StopSignals):
    """StopSignals for the training loop: every rank of a DDP run must stop at the same step, so there
    the flag is all-reduced every 10 steps (a single process checks after every step)."""

    def requested(self, step: int, info: DistInfo, device: torch.device) -> bool:
        if not info.enabled:
            return self.received is not None
        if step % 10:
            return False
        flag = torch.tensor(float(self.received is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = "SIGTERM"  # another rank got it
        return bool(flag.item())


def val_scores(
    model: ShowAttendTell, loader: DataLoader, word_map: dict[str, int], cfg: Config, device: torch.device,
    tokenizer: str = "simple",
) -> dict[str, float]:
    """Decode val and score it (BLEU-1..4 and CIDEr; the number that selects the model is a decoded
    metric), with the collapse diagnostics."""
    opts = DecodeOptions(beam_size=cfg.val_beam_size, max_len=cfg.max_len, hard_decode=cfg.hard_decode,
                         batch_size=loader.batch_size or 1)
    decoded = decode_split(model, loader, word_map, opts, device=device, amp=cfg.amp, progress=False)
    references = {d["index"]: d["references"] for d in decoded}
    captions = {d["index"]: d["caption"] for d in decoded}
    scores = score_captions(captions, references, metrics=("BLEU", "CIDEr"), tokenizer=tokenizer)
    return {**scores, **caption_diversity(list(captions.values()))}


def make_loaders(cfg: Config, info: DistInfo, device: torch.device
                 ) -> tuple[DataLoader, DataLoader, ResumableSampler]:
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
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed), **common)
    if len(train_loader) == 0:  # drop_last would "train" zero steps
        raise UserError(f"{train_set.path}: {len(train_set)} images give no full batch of batch_size="
                        f"{cfg.batch_size} per process ({info.world_size} process(es)); lower batch_size")
    val_loader = DataLoader(val_set, batch_size=max(1, 64 // cfg.val_beam_size), shuffle=False,
                            generator=torch.Generator().manual_seed(cfg.seed), **common)
    return train_loader, val_loader, sampler


def use_feature_cache(cfg: Config) -> bool:
    """feature_cache=auto trains from cached annotations whenever the encoder is frozen and images are
    not augmented (a flipped image has other annotations than the cached ones)."""
    if cfg.feature_cache == "on":
        if cfg.fine_tune_encoder:
            raise UserError("feature_cache=on needs a frozen encoder: set fine_tune_encoder=false or feature_cache=off")
        if cfg.hflip:
            raise UserError("feature_cache=on cannot flip images (hflip=true): set one of them off")
    return cfg.feature_cache == "on" or (cfg.feature_cache == "auto" and not cfg.fine_tune_encoder and not cfg.hflip)


def cached_features(model: ShowAttendTell, cfg: Config, split: str, info: DistInfo, device: torch.device) -> Path:
    """The split's feature cache for this frozen encoder, built by rank 0 on first use."""
    if info.is_main:
        path = ensure_cache(model.encoder, cfg.model_config(), cfg.data_folder, split, build=True, device=device,
                            num_workers=cfg.num_workers)
    if info.enabled:
        dist.barrier()
    if not info.is_main:
        path = ensure_cache(model.encoder, cfg.model_config(), cfg.data_folder, split, build=False)
    return path


def build_optimizer(trained: ShowAttendTell | ConceptHead, cfg: Config) -> torch.optim.Optimizer:
    """Adam with the encoder's learning rate for the encoder and the decoder's for the rest (the decoder
    and any concept head); frozen encoder parameters are left out."""
    encoder = (trained.model if isinstance(trained, ConceptHead) else trained).encoder
    in_encoder = {id(p) for p in encoder.parameters()}
    groups = [{"params": [p for p in trained.parameters() if id(p) not in in_encoder], "lr": cfg.decoder_lr}]
    encoder_params = [p for p in encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.encoder_lr})
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def resolve_config(args: argparse.Namespace) -> tuple[Config, dict[str, Any] | None]:
    """--config + overrides; with resume=..., the checkpoint's config + the same overrides.

    On resume the architecture is the checkpoint's: overriding a model key is refused, since the saved
    weights could not be loaded into another shape.
    """
    cfg = load_config(args.config, args.overrides)
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(cfg.resume)
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


# --------------------------------------------------------------------------------------------
# Fine-tuning another run's model on new data (init_from, extend_vocab)
#
# Design: the model keeps the init checkpoint's word map (ids never move, so its rows keep their
# meaning), optionally extended by the pack's words it lacks, appended at new ids. The pack itself is
# not rewritten: its captions were encoded with its own word map, so CaptionDataset translates them on
# load through `caption_id_map` (pack id -> model id; words the model lacks become <unk>). Checkpoints
# store the model's word map, and the pack's as `pack_word_map`, which lets eval.py accept that pack.
# --------------------------------------------------------------------------------------------
def resolve_init(cfg: Config, overrides: Sequence[str]) -> tuple[Config, dict[str, Any] | None]:
    """With init_from (and not resuming): load that checkpoint and take its architecture.

    Model keys given as overrides are refused (the weights fit one shape only); a --config file's model
    keys are replaced by the checkpoint's, with a note naming those that differed.
    """
    if cfg.extend_vocab and not cfg.init_from:
        raise UserError("extend_vocab=true extends the word map of init_from=PATH; give init_from too")
    if not cfg.init_from or cfg.resume:
        return cfg, None
    init = load_checkpoint(cfg.init_from)
    changed = [key for key in parse_overrides(overrides) if key in MODEL_KEYS]
    if changed:
        raise UserError(f"init_from={cfg.init_from}: the architecture comes from that checkpoint; drop the "
                        f"override(s) of {', '.join(changed)}")
    model_cfg = dataclasses.asdict(model_config_from_checkpoint(init, cfg.init_from))
    differ = [key for key, value in model_cfg.items() if key != "vocab_size" and getattr(cfg, key) != value]
    if differ:
        print(f"note: init_from={cfg.init_from}: using its {', '.join(differ)} (the config file's differ)",
              file=sys.stderr)
    cfg = dataclasses.replace(cfg, **model_cfg)
    cfg.check()
    return cfg, init


def extend_word_map(base: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    """`base` unchanged, then the words of `new` it lacks at the next ids (in `new`'s order: most frequent first)."""
    extended = dict(base)
    for word in sorted(new, key=new.__getitem__):
        if word not in extended:
            extended[word] = len(extended)
    return extended


def caption_id_map(pack_word_map: dict[str, int], model_word_map: dict[str, int]) -> torch.Tensor:
    """(V_pack,) table: pack id -> model id of the same word, <unk> for words the model lacks."""
    table = torch.full((max(pack_word_map.values()) + 1,), model_word_map["<unk>"], dtype=torch.long)
    for word, i in pack_word_map.items():
        table[i] = model_word_map.get(word, model_word_map["<unk>"])
    return table


@torch.no_grad()
def extend_vocab(model: ShowAttendTell, vocab_size: int) -> None:
    """Grow the word embedding E and the output layer (L_o, or fc) to `vocab_size` rows in place.

    Old rows are copied unchanged; new embedding rows start as E does (uniform +-0.1), new output rows as
    a fresh nn.Linear, with their bias set to the lowest old bias so that a new word is not preferred
    before it has been trained.
    """
    decoder = model.decoder
    old_size = decoder.embedding.num_embeddings
    if vocab_size < old_size:
        raise ValueError(f"cannot shrink the vocabulary from {old_size} to {vocab_size}")
    if vocab_size == old_size:
        return
    device = decoder.embedding.weight.device
    embedding = nn.Embedding(vocab_size, decoder.embedding.embedding_dim).to(device)
    embedding.weight.uniform_(-0.1, 0.1)
    embedding.weight[:old_size] = decoder.embedding.weight
    decoder.embedding = embedding
    name = "L_o" if decoder.deep_output else "fc"
    old = getattr(decoder, name)
    out = nn.Linear(old.in_features, vocab_size).to(device)
    out.weight[:old_size] = old.weight
    out.bias[:old_size] = old.bias
    out.bias[old_size:] = old.bias.min()
    setattr(decoder, name, out)
    decoder.vocab_size = vocab_size


def model_word_map(cfg: Config, resume: dict[str, Any] | None, init: dict[str, Any] | None,
                   pack_word_map: dict[str, int]) -> dict[str, int]:
    """The word map the model speaks: the pack's, or, for a fine-tuning run, the init model's (extended)."""
    if resume is not None and cfg.init_from:
        return resume["word_map"]  # a resumed fine-tuning run keeps the map it started with
    if init is not None:
        return extend_word_map(init["word_map"], pack_word_map) if cfg.extend_vocab else dict(init["word_map"])
    return pack_word_map


def apply_resume_overrides(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: Config,
                           overridden: Sequence[str]) -> None:
    """The restored optimizer and scheduler carry the settings of the run as saved; the config (and so
    config.yaml) is the truth. Learning rates change only when given, since the scheduler may have
    decayed them; weight decay and the plateau schedule always follow the config."""
    groups = optimizer.param_groups
    if "decoder_lr" in overridden:
        groups[0]["lr"] = cfg.decoder_lr
    if "encoder_lr" in overridden and len(groups) > 1:
        groups[1]["lr"] = cfg.encoder_lr
    for group in groups:
        group["weight_decay"] = cfg.weight_decay
    scheduler.factor, scheduler.patience = cfg.lr_decay_factor, cfg.lr_patience


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
    """One row per epoch. A run resumed by newer code keeps the columns its file started with."""
    fieldnames = CSV_FIELDS
    if path.exists():
        with open(path, newline="") as f:
            fieldnames = next(csv.reader(f), CSV_FIELDS)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow(row)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        cfg, ckpt = resolve_config(args)
        cfg, init = resolve_init(cfg, args.overrides)
        info, device = init_distributed(cfg.device)
        try:
            with StopRequest() as stop:
                return _train(cfg, ckpt, info, device, init, stop, tuple(parse_overrides(args.overrides)))
        finally:
            cleanup_distributed(info)

    return run_cli(body, args.debug)


def _train(cfg: Config, ckpt: dict[str, Any] | None, info: DistInfo, device: torch.device,
           init: dict[str, Any] | None = None, stop: StopRequest | None = None,
           overridden: Sequence[str] = ()) -> int:
    seed_everything(cfg.seed)
    out_dir = cfg.resolved_out_dir()
    feature_cache = use_feature_cache(cfg)  # refuses impossible settings before any work
    if info.is_main:
        check_writable(out_dir, "the run folder")
    if ckpt is None and (out_dir / "last.pt").exists():
        raise UserError(f"{out_dir} already holds a run; continue it with resume={out_dir / 'last.pt'} "
                        "or pick another out_dir=")
    train_loader, val_loader, sampler = make_loaders(cfg, info, device)
    # The packed train and val splits (val_max_images wraps val in a Subset).
    packed = [train_loader.dataset, val_loader.dataset.dataset if isinstance(val_loader.dataset, Subset)
              else val_loader.dataset]
    pack_word_map = train_loader.dataset.word_map
    word_map = model_word_map(cfg, ckpt, init, pack_word_map)
    if word_map != pack_word_map:  # fine-tuning: the pack's caption ids are translated on load
        id_map = caption_id_map(pack_word_map, word_map)
        for dataset in packed:
            dataset.caption_id_map = id_map
    cfg.vocab_size = len(word_map)
    if init is not None:
        loaded, _ = model_from_checkpoint(init, cfg.init_from)  # UserError if its weights do not fit its config
        model = build_model(dataclasses.replace(cfg.model_config(), vocab_size=len(init["word_map"])),
                            encoder_weights="none", fine_tune=cfg.fine_tune_encoder,
                            fine_tune_stages=cfg.fine_tune_stages)  # the same net, with this run's frozen stages
        model.load_state_dict(loaded.state_dict())
        extend_vocab(model, len(word_map))
        model.to(device)
        if info.is_main:
            unknown = sum(word not in word_map for word in pack_word_map)
            print(f"init_from {cfg.init_from}: its {len(init['word_map'])} words kept, "
                  f"{len(word_map) - len(init['word_map'])} added from {cfg.data_folder}"
                  f"{f', {unknown} of its words read as <unk> (extend_vocab=true adds them)' if unknown else ''}")
    else:
        model = build_model(cfg.model_config(), encoder_weights=cfg.encoder_weights, fine_tune=cfg.fine_tune_encoder,
                            fine_tune_stages=cfg.fine_tune_stages).to(device)
    if cfg.compile_step:
        model.decoder.compile_step()
    trained = ConceptHead(model, word_map).to(device) if cfg.concept_loss_weight > 0 else model
    optimizer = build_optimizer(trained, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.lr_decay_factor, patience=cfg.lr_patience
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16" and device.type == "cuda")
    state = TrainState()
    if ckpt is not None:
        if ckpt["word_map"] != word_map:
            raise UserError(f"{cfg.resume}: word map differs from {cfg.data_folder}/word_map.json")
        model.load_state_dict(ckpt["model"])
        if isinstance(trained, ConceptHead):
            if "concept_head" not in ckpt:
                raise UserError(f"{cfg.resume}: has no concept head to resume with concept_loss_weight > 0")
            trained.head.load_state_dict(ckpt["concept_head"])
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError:  # its parameter groups differ in size: older code had another parameter set
            raise UserError(f"{cfg.resume}: its optimizer state does not fit this code's model (written before "
                            "the attention's unused score bias was dropped?); start a new run from it with "
                            f"init_from={cfg.resume}") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        apply_resume_overrides(optimizer, scheduler, cfg, overridden)
        state = TrainState(**ckpt["train_state"])
        set_rng_state(ckpt["rng"])
    if feature_cache:  # the frozen encoder's annotations, once per image (after the checks on out_dir)
        for dataset in packed:
            dataset.features_path = cached_features(model, cfg, dataset.split, info, device)
    ddp_model = DistributedDataParallel(trained) if info.enabled else trained
    try:
        with folder_lock(out_dir, "training") if info.is_main else nullcontext():
            return _train_loop(cfg, out_dir, info, device, stop, model, trained, ddp_model, optimizer, scheduler,
                               scaler, state, train_loader, val_loader, sampler, word_map, pack_word_map,
                               resumed=ckpt is not None)
    finally:
        stop_workers(train_loader, val_loader)


def _train_loop(cfg: Config, out_dir: Path, info: DistInfo, device: torch.device, stop: StopRequest | None,
                model: ShowAttendTell, trained: ShowAttendTell | ConceptHead, ddp_model: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler, state: TrainState,
                train_loader: DataLoader, val_loader: DataLoader, sampler: ResumableSampler,
                word_map: dict[str, int], pack_word_map: dict[str, int], resumed: bool) -> int:
    """The epochs, with out_dir locked by this process (rank 0)."""

    def payload() -> dict[str, Any]:
        saved = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            **checkpoint_configs(cfg),
            "word_map": word_map,
            **({"pack_word_map": pack_word_map} if word_map != pack_word_map else {}),  # for eval.py; see init_from
            "image_size": train_loader.dataset.image_size,  # caption.py resizes new images to this
            "train_state": state.to_dict(),
            "rng": rng_state(),
        }
        if isinstance(trained, ConceptHead):
            saved["concept_head"] = trained.head.state_dict()
        return saved

    def stopped() -> int:
        """Save where the run stands (rank 0) and exit with the shell's code for the signal."""
        last = out_dir / "last.pt"
        if info.is_main:
            writer.close()
            save_checkpoint(last, payload())
            print(f"interrupted by {stop.received} at epoch {state.epoch + 1} step {state.step}: saved {last}; "
                  f"continue with resume={last}", file=sys.stderr)
        return stop.exit_code

    writer = None
    if info.is_main:
        from torch.utils.tensorboard import (
            SummaryWriter,  # imported late: it is slow to import
        )

        if not resumed and (out_dir / "last.pt").exists():  # another run got here first
            raise UserError(f"{out_dir} already holds a run; continue it with resume={out_dir / 'last.pt'} "
                            "or pick another out_dir=")
        remove_stale_temporaries(out_dir)
        truncate_metrics(out_dir / "metrics.csv", state.epoch)
        save_config(cfg, out_dir / "config.yaml")
        writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=state.step or None)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"train: {len(train_loader.dataset)} images x {train_loader.dataset.captions_per_image} captions, "
            f"vocab {len(word_map)}, {trainable / 1e6:.2f}M trainable parameters, device {device}, "
            f"{info.world_size} process(es), attention {cfg.attention}, run folder {out_dir}"
        )

    val_tokenizer = "unicode" if train_loader.dataset.tokenizer == "unicode" else "simple"
    while state.epoch < cfg.epochs:
        sampler.set_epoch(state.epoch)
        sampler.skip = state.epoch_step * cfg.batch_size  # > 0 only in an epoch resumed part-way
        start = time.time()
        try:
            losses = train_one_epoch(ddp_model, train_loader, optimizer, scaler, cfg, state, device, info, writer, stop)
        except RuntimeError as e:  # torch notices a dead worker; it was most likely the OOM killer's
            if not str(e).startswith("DataLoader worker"):
                raise
            raise UserError(f"{one_line(e)} (out of memory? lower num_workers= or batch_size=); "
                            f"{out_dir / 'last.pt'} holds the last finished epoch") from None
        sampler.skip = 0
        if not losses:  # a stop signal, after a step
            return stopped()
        state.epoch += 1
        # Rank 0 decodes val; every rank gets the scores so LR decay and early stopping agree.
        val = [val_scores(model, val_loader, word_map, cfg, device, tokenizer=val_tokenizer) if info.is_main else {}]
        if info.enabled:
            dist.broadcast_object_list(val, src=0)
        val = val[0]
        score = val[cfg.val_metric]
        scheduler.step(score)
        improved = score > state.best_score
        state.best_score = max(state.best_score, score)
        state.epochs_since_improvement = 0 if improved else state.epochs_since_improvement + 1
        seconds = time.time() - start
        if info.is_main:
            lr = optimizer.param_groups[0]["lr"]
            row = {"epoch": state.epoch, "step": state.step, "train_loss": f"{losses['loss']:.4f}",
                   "train_ce": f"{losses['ce']:.4f}", "train_ds": f"{losses['ds']:.4f}",
                   "train_concept": f"{losses['concept']:.4f}" if cfg.concept_loss_weight > 0 else "",
                   "lr": f"{lr:.3g}",
                   "epoch_seconds": f"{seconds:.1f}",
                   **{f"val_{key}": f"{val[key]:.4g}" for key in VAL_METRICS + DIVERSITY_KEYS}}
            append_metrics_row(out_dir / "metrics.csv", row)
            write_curves(out_dir / "metrics.csv", out_dir / "curves.png")
            for key in VAL_METRICS + DIVERSITY_KEYS:
                writer.add_scalar(f"val/{key}", val[key], state.step)
            writer.add_scalar("train/lr", lr, state.step)
            writer.flush()
            saved = payload()
            save_checkpoint(out_dir / "last.pt", saved)
            if improved:
                save_checkpoint(out_dir / "best.pt", saved)
            print(
                f"epoch {state.epoch}: loss {losses['loss']:.3f} (ce {losses['ce']:.3f}, ds {losses['ds']:.4f}) "
                f"val BLEU-4 {val['BLEU-4']:.4f} CIDEr {val['CIDEr']:.4f}{' (best)' if improved else ''} "
                f"distinct {val['distinct_captions']:.0%} "
                f"words {val['vocab_used']} lr {lr:.2g} {seconds:.0f}s"
            )
            warn_if_collapsed(val)
        if stop is not None and stop.requested(0, info, device):  # arrived during val or the save: saved above
            if info.is_main:
                print(f"interrupted by {stop.received} after epoch {state.epoch}: {out_dir / 'last.pt'} holds it; "
                      f"continue with resume={out_dir / 'last.pt'}", file=sys.stderr)
            return stop.exit_code
        if cfg.early_stop_patience and state.epochs_since_improvement >= cfg.early_stop_patience:
            if info.is_main:
                print(f"early stop: no val {cfg.val_metric} improvement for {state.epochs_since_improvement} epochs")
            break
    if writer is not None:
        writer.close()
        print(f"done: best val {cfg.val_metric} {state.best_score:.4f}; checkpoints in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
