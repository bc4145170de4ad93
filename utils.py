"""Shared pieces: the one config system, checkpoints, seeding, devices and distributed helpers.

Everything here is imported by train.py, eval.py and caption.py so that they cannot drift apart.
Nothing runs at import time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ContextManager, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml

SPECIAL_TOKENS = ("<pad>", "<unk>", "<start>", "<end>")


# --------------------------------------------------------------------------------------------
# Config: one dataclass of defaults, YAML files in configs/ hold overrides, CLI `key=value` last.
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    # --- run ---
    name: str = "run"  # run name; the run folder defaults to runs/<name>
    out_dir: str = ""  # run folder (config, metrics.csv, TensorBoard events, last.pt, best.pt)
    seed: int = 0  # seeds python, numpy and torch (CPU and CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | bf16 | fp16 (CUDA only; ignored on CPU)
    resume: str = ""  # path to a last.pt to continue from exactly

    # --- data ---
    data_folder: str = "data/shapes"  # folder written by create_input_files.py
    num_workers: int = 2  # DataLoader workers (each opens the HDF5 file itself)
    captions_per_step: int = 0  # captions of each image trained per step; 0 = all stored

    # --- encoder (paper: VGG conv5 14x14x512; we use a torchvision ResNet, see models.py) ---
    encoder: str = "resnet101"  # resnet18 | resnet34 | resnet50 | resnet101 | resnet152
    encoder_weights: str = "imagenet"  # imagenet | none (random init; all tests and the demo)
    encoder_stages: int = 4  # keep ResNet stages layer1..layerN (3 halves the stride: finer grid)
    enc_size: int = 14  # annotation grid is enc_size x enc_size, so L = enc_size**2
    fine_tune_encoder: bool = False  # train the top encoder stages (frozen encoder runs BN in eval)
    fine_tune_stages: int = 3  # with fine_tune_encoder, stages >= this index are trained (1-based)

    # --- decoder ---
    attention: str = "soft"  # soft (deterministic, Sec. 4.2) | hard (stochastic, Sec. 4.1)
    attention_dim: int = 512  # hidden size of the attention MLP f_att
    embed_dim: int = 512  # m, word embedding size
    decoder_dim: int = 512  # n, LSTM size
    dropout: float = 0.5  # dropout before the output layer
    gate: str = "scalar"  # scalar (paper's beta_t) | vector (size-D beta, a common variant) | none
    deep_output: bool = True  # paper's L_o(E y_{t-1} + L_h h_t + L_z z_t); false = linear on h_t
    max_decode_len: int = 50  # longest caption decoded at validation/test time

    # --- loss ---
    alpha_c: float = 1.0  # lambda of the doubly stochastic regulariser (Sec. 4.2.1)
    ds_reduction: str = "mean"  # sum (paper's formula) | mean (sum / L); see configs/shapes.yaml

    # --- hard attention (Sec. 4.1; defaults follow the paper and the original Theano code) ---
    hard_reinforce_weight: float = 0.1  # lambda_r: scales the REINFORCE term (original code)
    hard_entropy_weight: float = 0.002  # lambda_e: entropy bonus (original code)
    hard_baseline_decay: float = 0.9  # b_k = 0.9 b_{k-1} + 0.1 log p(y|s,a) (paper Eq. 12)
    hard_expected_prob: float = 0.5  # per mini-batch probability of using alpha instead of s (paper)
    hard_decode: str = "expected"  # expected (original code) | argmax | sample

    # --- optimisation ---
    epochs: int = 20
    batch_size: int = 32  # images per step (each with captions_per_step captions)
    decoder_lr: float = 4e-4
    encoder_lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # clip gradient norm (0 = off)
    lr_decay_factor: float = 0.8  # ReduceLROnPlateau factor on the validation metric
    lr_patience: int = 2  # epochs without improvement before the LR decays
    early_stop_patience: int = 8  # epochs without improvement before training stops (0 = off)
    val_beam_size: int = 1  # model selection decodes val with this beam (1 = greedy)
    val_max_images: int = 0  # decode at most this many val images per epoch (0 = all)
    log_every: int = 50  # steps between TensorBoard scalars

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir or os.path.join("runs", self.name))

    def validate(self) -> None:
        """Reject enum-like values that are not one of the valid choices (with the choices listed)."""
        choices = {
            "amp": ("off", "bf16", "fp16"),
            "encoder": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
            "encoder_weights": ("imagenet", "none"),
            "attention": ("soft", "hard"),
            "gate": ("scalar", "vector", "none"),
            "ds_reduction": ("sum", "mean"),
            "hard_decode": ("expected", "argmax", "sample"),
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"config {key}={getattr(self, key)!r} is not one of {', '.join(valid)}")
        if self.encoder_stages not in (1, 2, 3, 4):
            raise ValueError(f"config encoder_stages={self.encoder_stages} must be 1, 2, 3 or 4")
        for key in ("enc_size", "batch_size", "epochs", "attention_dim", "embed_dim", "decoder_dim",
                    "val_beam_size", "max_decode_len", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"config {key}={getattr(self, key)} must be >= 1")
        for key in ("decoder_lr", "encoder_lr", "weight_decay", "grad_clip", "alpha_c", "num_workers",
                    "captions_per_step", "val_max_images", "early_stop_patience", "lr_patience",
                    "hard_reinforce_weight", "hard_entropy_weight"):
            if not getattr(self, key) >= 0:  # also rejects NaN
                raise ValueError(f"config {key}={getattr(self, key)} must be >= 0")
        if self.fine_tune_encoder and not 0 <= self.fine_tune_stages <= self.encoder_stages:
            raise ValueError(f"config fine_tune_stages={self.fine_tune_stages} must be in 0..{self.encoder_stages}")
        for key in ("hard_baseline_decay", "hard_expected_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"config {key}={getattr(self, key)} must be in [0, 1]")
        if not 0.0 < self.lr_decay_factor <= 1.0:
            raise ValueError(f"config lr_decay_factor={self.lr_decay_factor} must be in (0, 1]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config dropout={self.dropout} must be in [0, 1)")


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Convert a CLI string to the type of the field's default (as nanoGPT's configurator does)."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"override {key}={text!r}: expected true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"override {key}={text!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"override {key}={text!r}: expected a number") from None
    return text


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Type-check a YAML value against the default's type (ints are accepted for floats)."""
    if isinstance(value, str) and not isinstance(current, str):
        return _parse_value(key, value, current)
    if isinstance(current, bool) != isinstance(value, bool) or (
        not isinstance(value, type(current)) and not (isinstance(current, float) and isinstance(value, int))
    ):
        raise ValueError(f"config {key}: expected {type(current).__name__}, got {value!r}")
    return float(value) if isinstance(current, float) else value


def config_from_dict(values: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
    """Apply a dict of overrides to `base` (defaults when None); unknown keys are an error."""
    cfg = dataclasses.replace(base) if base is not None else Config()
    known = {f.name for f in fields(Config)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{source}: unknown key {key!r} (valid keys: {', '.join(sorted(known))})")
        setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
    return cfg


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then validated."""
    cfg = Config()
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the config file ({one_line(e)})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({one_line(e)})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of key: value")
        cfg = config_from_dict(values, cfg, source=path)
    cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    parsed = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        key = key.lstrip("-").replace("-", "_")
        if key not in {f.name for f in fields(Config)}:
            raise ValueError(f"override {item!r}: unknown key {key!r} (see utils.Config for the valid keys)")
        parsed[key] = _parse_value(key, text, getattr(cfg, key))
    return config_from_dict(parsed, cfg, source="overrides")


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Files: atomic writes (temp file in the same folder + rename), word maps.
# --------------------------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (YAML and h5py errors span several)."""
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_word_map(path: str | Path) -> dict[str, int]:
    """Read word_map.json and check it has the special tokens every script relies on."""
    try:
        with open(path, encoding="utf-8") as f:
            word_map = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: word map not found (run create_input_files.py first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the word map ({one_line(e)})") from None
    check_word_map(word_map, str(path))
    return word_map


def check_word_map(word_map: Any, source: str) -> None:
    if not isinstance(word_map, dict) or not all(isinstance(v, int) for v in word_map.values()):
        raise ValueError(f"{source}: word map must map words to integer ids")
    missing = [t for t in SPECIAL_TOKENS if t not in word_map]
    if missing:
        raise ValueError(f"{source}: word map lacks {', '.join(missing)}")
    if word_map["<pad>"] != 0:
        raise ValueError(f"{source}: <pad> must have id 0")


def decode_ids(ids: Sequence[int], rev_word_map: dict[int, str]) -> str:
    """Token ids -> caption text without <start>/<end>/<pad>; stops at the first <end>."""
    words = []
    for i in ids:
        word = rev_word_map.get(int(i), "<unk>")
        if word == "<end>":
            break
        if word not in ("<start>", "<pad>"):
            words.append(word)
    return " ".join(words)


# --------------------------------------------------------------------------------------------
# Checkpoints: plain data only, so torch.load(..., weights_only=True) reads them.
# --------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load on CPU with weights_only=True and check it is one of ours; one clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickled module, ...
        # torch's own message is a paragraph that suggests weights_only=False: not advice to pass on.
        raise ValueError(f"{path}: not a readable checkpoint (corrupt, truncated, not a torch file, or it "
                         f"pickles objects weights-only loading refuses; {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "word_map"} <= set(ckpt):
        raise ValueError(f"{path}: not a Show, Attend and Tell checkpoint (needs model, config, word_map)")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["config"], dict):
        raise ValueError(f"{path}: not a Show, Attend and Tell checkpoint (model and config must be dicts)")
    check_word_map(ckpt["word_map"], str(path))
    return ckpt


def rng_state() -> dict[str, Any]:
    """RNG states as tensors/ints (weights_only-safe) so that resume continues exactly."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --------------------------------------------------------------------------------------------
# Devices, mixed precision and distributed training.
# --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} asked for, but CUDA is not available (use device=cpu or auto)")
    return device


def autocast_context(device: torch.device, amp: str) -> ContextManager:
    """One autocast-or-null context, so the training loop has no AMP branches (as nanoGPT)."""
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class DistInfo:
    enabled: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    is_main: bool = field(default=True)


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Detect torchrun from the environment; nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return DistInfo(), resolve_device(device_name)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(True, rank, local_rank, world, rank == 0), device


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

