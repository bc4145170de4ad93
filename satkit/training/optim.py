"""The optimizer: Adam's parameter groups (encoder and decoder learning rates), and the settings a resumed
run takes from its config rather than from the checkpoint."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from satkit.model import ShowAttendTell
from satkit.config import Config
from satkit.training.losses import ConceptHead


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
