"""Checkpoints: plain data only (state_dicts, configs, word map, training state), so that
`torch.load(..., weights_only=True)` reads them; written atomically; older formats upgraded on load."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn as nn

from satkit.config import (
    MODEL_KEYS,
    TRAIN_KEYS,
    Config,
    ModelConfig,
    _coerce,
    config_from_dict,
)
from satkit.infra.filesafety import atomic_write
from satkit.infra.runtime import UserError
from satkit.data.text import check_word_map

# --------------------------------------------------------------------------------------------
# Checkpoints: plain data only, so torch.load(..., weights_only=True) reads them.
# --------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = 2  # 1: one flat "config" (before the split); 2: "model_config" + "train_config"


def build_checkpoint(model: nn.Module, model_cfg: ModelConfig, word_map: dict[str, int], *,
                     image_size: int | None = None, cfg: Config | None = None, **training: Any) -> dict[str, Any]:
    """The one checkpoint layout (train.py, benchmark.py, the tests): weights, what rebuilds the model and
    its word map; `image_size` tells caption.py how large an image the model saw; `cfg` records how it was
    trained, kept apart from the model config; `training` adds what resume needs (optimizer, RNG, ...)."""
    payload: dict[str, Any] = {"format_version": CHECKPOINT_FORMAT, "model": model.state_dict(),
                               "model_config": dataclasses.asdict(model_cfg), "word_map": word_map}
    if image_size is not None:
        payload["image_size"] = image_size
    if cfg is not None:
        payload["train_config"] = {key: getattr(cfg, key) for key in TRAIN_KEYS}
    return {**payload, **training}


class _WriteErrors:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports a full disk only as
    an opaque RuntimeError from its zip writer."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically write a checkpoint; refuse weights that are not finite (a NaN model must never replace
    a good last.pt or best.pt), and report a full disk as the OSError it is."""
    model = payload.get("model")
    if isinstance(model, dict) and any(torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
                                       for t in model.values()):
        raise UserError(f"{path}: not saved: the model has non-finite weights (NaN or inf); "
                        "the previous file is kept")

    def write(f: BinaryIO) -> None:
        wrapped = _WriteErrors(f)
        try:
            torch.save(payload, wrapped)
        except RuntimeError:
            if wrapped.error is not None:
                raise wrapped.error from None
            raise

    atomic_write(path, write)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load on CPU with weights_only=True, check it is one of ours, and return it in the current format.

    A format-1 checkpoint (one flat config) is split on the fly, so checkpoints from before the split load.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickled module, ...
        # torch's own message is a paragraph that suggests weights_only=False: not advice to pass on.
        raise UserError(f"{path}: not a readable checkpoint (corrupt, truncated, not a torch file, or it "
                        f"pickles objects weights-only loading refuses; {type(e).__name__})") from None
    has_config = isinstance(ckpt, dict) and ("model_config" in ckpt or "config" in ckpt)  # format 2 or 1
    if not has_config or not {"model", "word_map"} <= set(ckpt):
        raise UserError(f"{path}: not a Show, Attend and Tell checkpoint (needs model, model_config, word_map)")
    version = ckpt.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_FORMAT:
        raise UserError(f"{path}: checkpoint format {version!r} is not one this code reads (1..{CHECKPOINT_FORMAT}); "
                        "update the code")
    check_word_map(ckpt["word_map"], str(path))
    if version == 1:
        flat = dict(ckpt.pop("config")) if isinstance(ckpt.get("config"), dict) else {}
        ckpt["model_config"] = {key: flat.pop(key) for key in MODEL_KEYS if key in flat}
        ckpt["model_config"]["vocab_size"] = len(ckpt["word_map"])
        ckpt["train_config"] = flat
        ckpt["format_version"] = CHECKPOINT_FORMAT
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["model_config"], dict):
        raise UserError(f"{path}: not a Show, Attend and Tell checkpoint (model and model_config must be dicts)")
    return ckpt


def model_config_from_checkpoint(ckpt: dict[str, Any], source: str) -> ModelConfig:
    """The checkpoint's ModelConfig; a model key this code does not know, or lacks, is refused by name."""
    values, defaults = ckpt["model_config"], ModelConfig()
    for key in values:
        if key not in MODEL_KEYS:
            raise UserError(f"{source}: model config key {key!r} is unknown to this code (a newer version wrote it?)")
    for key in MODEL_KEYS:
        if key not in values:
            raise UserError(f"{source}: model config lacks {key!r}")
    try:
        model_cfg = ModelConfig(**{key: _coerce(key, values[key], getattr(defaults, key)) for key in MODEL_KEYS})
        model_cfg.check()
    except UserError as e:
        raise UserError(f"{source}: model {e}") from None
    return model_cfg


def config_from_checkpoint(ckpt: dict[str, Any], source: str) -> Config:
    """The full Config a run was trained with, for resume: training keys this code no longer knows are
    ignored (said once), missing ones take today's defaults; the model keys must all be understood."""
    model_cfg = model_config_from_checkpoint(ckpt, source)
    train = ckpt.get("train_config") or {}
    unknown = sorted(key for key in train if key not in TRAIN_KEYS)
    if unknown:
        print(f"note: {source}: ignoring training keys this code does not know: {', '.join(unknown)}", file=sys.stderr)
    cfg = config_from_dict({k: v for k, v in train.items() if k in TRAIN_KEYS}, source=source, keys=TRAIN_KEYS)
    return dataclasses.replace(cfg, **dataclasses.asdict(model_cfg))
