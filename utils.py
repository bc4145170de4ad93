"""Shared pieces: the one config system, checkpoints, seeding, devices and distributed helpers.

Everything here is imported by train.py, eval.py and caption.py so that they cannot drift apart.
Nothing runs at import time.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import random
import re
import secrets
import signal
import sys
import threading
import time
import unicodedata
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, Iterable, Iterator, Sequence, TextIO

import numpy as np
import torch
import torch.distributed as dist
import yaml

SPECIAL_TOKENS = ("<pad>", "<unk>", "<start>", "<end>")


class UserError(ValueError):
    """A problem with what the user gave us (a path, a value, a file): reported as one line, no traceback.

    Anything else that escapes a script's main is a bug in our code and keeps its traceback.
    """


def run_cli(body: Callable[[], int], debug: bool = False) -> int:
    """Run a script's body: a UserError or a failed file operation (full disk, permissions) becomes one
    `error:` line and exit 1; anything else is a bug and keeps its traceback. `--debug` shows them all."""
    try:
        return body()
    except BrokenPipeError:
        # Whoever read our stdout has gone (`caption.py ... | head -1`): stop quietly, as a command killed by
        # SIGPIPE would (exit 141), and point stdout at /dev/null so the exit-time flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:
        if debug:
            raise
        message = " ".join(str(e).split()) if isinstance(e, UserError) else one_line(e)  # one line, uncut
        print(f"error: {message}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------------------
# Configs. ModelConfig is what rebuilds the network; TrainConfig is how it was trained. Users see one
# flat namespace (Config: YAML files in configs/, then `key=value`); checkpoints keep the two apart,
# so a training key can be renamed or removed without breaking a single saved model (as nanoGPT keeps
# GPTConfig apart from its training globals). Each choice and bound is written once, in the field's
# metadata and read by every `check`; choice lists that argparse also offers are named constants.
# --------------------------------------------------------------------------------------------
def option(default: Any, *, choices: Sequence[Any] | None = None, min: float | None = None,
           max: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A config field with its valid values: choices, or bounds min <= x <= max, above < x < below."""
    meta = {"choices": tuple(choices) if choices else None, "min": min, "max": max, "above": above, "below": below}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def check_fields(obj: Any, as_flags: bool = False) -> None:
    """Raise UserError naming the first field of dataclass `obj` outside its declared choices or bounds,
    as `config key` or, with as_flags, as the command-line flag `--key`."""
    for f in fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        label = f"--{f.name.replace('_', '-')}" if as_flags else f"config {f.name}"
        if "choices" in meta and value not in meta["choices"]:
            raise UserError(f"{label}={value!r} is not one of {', '.join(map(str, meta['choices']))}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{label}={value} must be a finite number")
        for name, ok, text in (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
                               ("above", lambda v, b: v > b, ">"), ("below", lambda v, b: v < b, "<")):
            if name in meta and not ok(value, meta[name]):
                raise UserError(f"{label}={value} must be {text} {meta[name]}")


HARD_DECODE_MODES = ("expected", "argmax", "sample")  # hard attention's context at decoding (see models.py)


@dataclass
class ModelConfig:
    """Everything `models.build_model` needs; stored in every checkpoint as `model_config`."""

    # --- encoder (paper: VGG conv5 14x14x512; we use a torchvision ResNet, see models.py) ---
    encoder: str = option("resnet101", choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"))
    encoder_stages: int = option(4, choices=(1, 2, 3, 4))  # keep layer1..layerN (3 halves the stride)
    enc_size: int = option(14, min=1)  # annotation grid is enc_size x enc_size, so L = enc_size**2
    # --- decoder ---
    attention: str = option("soft", choices=("soft", "hard"))  # soft: Sec. 4.2 | hard: stochastic, Sec. 4.1
    attention_dim: int = option(512, min=1)  # hidden size of the attention MLP f_att
    embed_dim: int = option(512, min=1)  # m, word embedding size
    decoder_dim: int = option(512, min=1)  # n, LSTM size
    dropout: float = option(0.5, min=0.0, below=1.0)  # dropout before the output layer
    gate: str = option("scalar", choices=("scalar", "vector", "none"))  # paper's scalar beta_t | size-D | none
    deep_output: bool = True  # paper's L_o(E y_{t-1} + L_h h_t + L_z z_t); false = linear on h_t
    vocab_size: int = field(default=0, metadata={"min": 0, "derived": True})  # from the word map, not a config key

    def check(self) -> None:
        check_fields(self)


@dataclass
class TrainConfig:
    """How a model is trained: run, data, initialisation, loss, optimisation and validation decoding."""

    # --- run ---
    name: str = "run"  # run name; the run folder defaults to runs/<name>
    out_dir: str = ""  # run folder (config, metrics.csv, curves.png, TensorBoard events, last.pt, best.pt)
    seed: int = 0  # seeds python, numpy and torch (CPU and CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = option("off", choices=("off", "bf16", "fp16"))  # CUDA only; ignored on CPU
    resume: str = ""  # path to a last.pt to continue from exactly
    # Fine-tuning: start a new run (fresh optimiser, epoch 0) from another run's checkpoint: its weights,
    # architecture and word map; with extend_vocab, the word map gains the new data's words (new rows).
    init_from: str = ""
    extend_vocab: bool = False

    # --- data ---
    data_folder: str = "data/shapes"  # folder written by create_input_files.py
    num_workers: int = option(2, min=0)  # DataLoader workers (each opens the HDF5 file itself)
    captions_per_step: int = option(0, min=0)  # captions of each image trained per step; 0 = all stored
    hflip: bool = False  # augment: flip training images left-right with probability 0.5
    # Train and validate from the frozen encoder's annotations, computed once per image and cached
    # beside the pack (feature_cache.py): auto = whenever the encoder is frozen and hflip is off.
    feature_cache: str = option("auto", choices=("auto", "on", "off"))

    # --- encoder initialisation and training ---
    encoder_weights: str = "imagenet"  # imagenet (torch hub cache) | none (random init) | path to a state_dict
    fine_tune_encoder: bool = False  # train the top encoder stages (frozen encoder runs BN in eval)
    fine_tune_stages: int = option(3, min=0)  # with fine_tune_encoder, stages >= this index are trained

    # --- loss ---
    alpha_c: float = option(1.0, min=0.0)  # lambda of the doubly stochastic regulariser (Sec. 4.2.1)
    ds_reduction: str = option("mean", choices=("sum", "mean"))  # sum: paper's formula | mean: sum / L
    # Not in the paper (off by default): weight of an auxiliary loss that trains the encoder to tell which
    # words an image's captions use, from its mean annotation vector; a stand-in for the ImageNet
    # pretraining a random-init encoder lacks (see train.ConceptHead and configs/flickr8k_cpu.yaml).
    concept_loss_weight: float = option(0.0, min=0.0)

    # --- hard attention (Sec. 4.1; defaults follow the paper and the original Theano code) ---
    hard_reinforce_weight: float = option(0.1, min=0.0)  # lambda_r: scales the REINFORCE term
    hard_entropy_weight: float = option(0.002, min=0.0)  # lambda_e: entropy bonus
    hard_baseline_decay: float = option(0.9, min=0.0, max=1.0)  # b_k = 0.9 b_{k-1} + 0.1 log p(y|s,a), Eq. 12
    hard_expected_prob: float = option(0.5, min=0.0, max=1.0)  # per mini-batch probability of alpha instead of s

    # --- optimisation ---
    epochs: int = option(20, min=1)
    batch_size: int = option(32, min=1)  # images per step (each with captions_per_step captions)
    decoder_lr: float = option(4e-4, min=0.0)
    encoder_lr: float = option(1e-4, min=0.0)
    weight_decay: float = option(0.0, min=0.0)
    grad_clip: float = option(5.0, min=0.0)  # clip gradient norm (0 = off)
    lr_decay_factor: float = option(0.8, above=0.0, max=1.0)  # ReduceLROnPlateau factor on the val metric
    lr_patience: int = option(2, min=0)  # epochs without improvement before the LR decays
    early_stop_patience: int = option(8, min=0)  # epochs without improvement before training stops (0 = off)
    nonfinite_loss: str = option("stop", choices=("stop", "skip"))  # a NaN/inf loss stops the run, or skips its batch
    log_every: int = option(50, min=1)  # steps between TensorBoard scalars
    # torch.compile the decoder's per-word step for teacher forcing (fused ops: fewer GPU kernel launches);
    # costs a compile at start (~20 s on a 2-core CPU for the tiny test model). See benchmark.py --device cuda.
    compile_step: bool = False

    # --- validation: decoded with the same options as eval.py / caption.py (see decoding.py) ---
    # The decoded val metric that selects best.pt and drives LR decay and early stopping: BLEU-4 (the
    # paper's criterion) or CIDEr (on Flickr8k from random init it kept improving with the captions'
    # variety while BLEU-4 stayed flat; see README).
    val_metric: str = option("BLEU-4", choices=("BLEU-4", "CIDEr"))
    val_beam_size: int = option(1, min=1)  # model selection decodes val with this beam (1 = greedy)
    val_max_images: int = option(0, min=0)  # decode at most this many val images per epoch (0 = all)
    max_len: int = option(50, min=1)  # longest caption decoded
    hard_decode: str = option("expected", choices=HARD_DECODE_MODES)  # hard models' context at decoding


@dataclass
class Config(TrainConfig, ModelConfig):
    """The flat namespace of YAML files and `key=value` overrides: every ModelConfig and TrainConfig key."""

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir or os.path.join("runs", self.name))

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    def check(self) -> None:
        """Every field within its declared choices/bounds, and the one rule that spans two fields."""
        check_fields(self)
        if self.fine_tune_encoder and not self.fine_tune_stages <= self.encoder_stages:
            raise UserError(f"config fine_tune_stages={self.fine_tune_stages} must be in 0..{self.encoder_stages}")


USER_KEYS = tuple(f.name for f in fields(Config) if not f.metadata.get("derived"))
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig))


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Convert a CLI string to the type of the field's default (as nanoGPT's configurator does)."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"override {key}={text!r}: expected true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"override {key}={text!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"override {key}={text!r}: expected a number") from None
    return text


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Type-check a YAML value against the default's type (ints are accepted for floats)."""
    if isinstance(value, str) and not isinstance(current, str):
        return _parse_value(key, value, current)
    if isinstance(current, bool) != isinstance(value, bool) or (
        not isinstance(value, type(current)) and not (isinstance(current, float) and isinstance(value, int))
    ):
        raise UserError(f"config {key}: expected {type(current).__name__}, got {value!r}")
    return float(value) if isinstance(current, float) else value


def config_from_dict(values: dict[str, Any], base: Config | None = None, source: str = "config",
                     keys: Sequence[str] = USER_KEYS) -> Config:
    """Apply a dict of overrides to `base` (defaults when None); keys outside `keys` are an error."""
    cfg = dataclasses.replace(base) if base is not None else Config()
    for key, value in values.items():
        if key not in keys:
            raise UserError(f"{source}: unknown key {key!r} (valid keys: {', '.join(sorted(keys))})")
        setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
    return cfg


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then checked."""
    cfg = Config()
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read the config file ({one_line(e)})") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({one_line(e)})") from None
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of key: value")
        cfg = config_from_dict(values, cfg, source=path)
    cfg = apply_overrides(cfg, overrides)
    cfg.check()
    return cfg


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """`key=value` strings -> {key: text}; `--key=value` and dashes in keys are accepted."""
    parsed = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value")
        key = key.lstrip("-").replace("-", "_")
        if key not in USER_KEYS:
            raise UserError(f"override {item!r}: unknown key {key!r} (see utils.Config for the valid keys)")
        parsed[key] = text
    return parsed


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    parsed = {key: _parse_value(key, text, getattr(cfg, key)) for key, text in parse_overrides(overrides).items()}
    return config_from_dict(parsed, cfg, source="overrides")


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML that `--config` reads back (derived keys such as vocab_size left out)."""
    values = {key: getattr(cfg, key) for key in USER_KEYS}
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


# --------------------------------------------------------------------------------------------
# Files: atomic writes (temp file in the same folder + rename), word maps.
# --------------------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(file)` to a temp file beside `path`, then rename: never a half-written file.

    The one atomic writer (checkpoints, JSON, figures). The temp file is created with mode "xb" rather
    than mkstemp, so it gets the usual umask permissions rather than 0600. A process killed mid-write
    leaves only a `.NAME.PID.HEX.tmp` file (see remove_stale_temporaries), never a damaged NAME.
    """
    atomic_write_all([(path, write)])


def atomic_write_all(writes: Sequence[tuple[str | Path, Callable[[BinaryIO], None]]]) -> None:
    """atomic_write for files that belong together (eval's results and metrics): every temp file is
    written before any is renamed, so a full disk or a crash leaves the previous set, not a mix."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in writes:
            path = Path(path)
            tmp = _temporary_beside(path)
            staged.append((tmp, path))
            with open(tmp, "xb") as f:
                write(f)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` for writers that want a file name (h5py); renamed to `path` on success."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temporary_beside(path: Path) -> Path:
    """`.NAME.PID.HEX.tmp` in path's folder (created if missing): the one temp name remove_stale_temporaries knows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temp files of atomic writers that were killed (call only while holding the folder's lock)."""
    for tmp in folder.glob(".*.*.tmp"):
        if re.fullmatch(r"\..+\.\d+\.[0-9a-f]{8}\.tmp", tmp.name):
            tmp.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str) -> None:
    """Refuse an output location that cannot be written (read-only disk, no permission, a file in the
    way) before any work starts, rather than after hours of it."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: cannot write {what} there ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise UserError(f"{path}: cannot write {what} there "
                        f"({'read-only file system' if read_only else 'permission denied'})")


@contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on folder/.lock (with our pid in it) while writing into `folder`.

    A second writer is refused with one line naming the holder. The kernel drops the lock when its
    process dies, however it dies, so a lock file left by a killed run never blocks the next one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{folder} is in use by another {what} (pid {holder}); wait for it to end or pick "
                        f"another folder (the lock: {folder / '.lock'})") from None
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


class StopSignals:
    """SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) only set `received`, which the training loop
    reads at a safe point (after a step, after a checkpoint), so a checkpoint is never cut mid-write and
    the run can save where it stands. A second signal interrupts at once (KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + signal.Signals[self.received].value if self.received else 0


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


TOKENIZERS = ("ascii", "unicode")  # how packing and scoring split captions into words (see `tokenize`)


def tokenize(text: str, tokenizer: str = "ascii") -> list[str]:
    """Caption text -> lower-cased words, by one of TOKENIZERS; the same rule packs and scores a dataset.

    ascii: runs of a-z0-9, the rule behind the Karpathy JSON `tokens` (English).
    unicode: runs of letters, digits and combining marks of any script (NFC), lower-cased by Unicode
        rules, so Greek, Cyrillic or Devanagari words survive. Scripts written without spaces
        (Japanese, Chinese) must be segmented beforehand: a run between spaces is one word.
    """
    if tokenizer == "ascii":
        return re.findall(r"[a-z0-9]+", text.lower())
    if tokenizer != "unicode":
        raise ValueError(f"tokenizer {tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    words, word = [], []
    for char in unicodedata.normalize("NFC", text).lower():
        if unicodedata.category(char)[0] in "LNM":  # letter, number, mark (a vowel sign is part of its word)
            word.append(char)
        elif word:
            words.append("".join(word))
            word = []
    return words + ["".join(word)] if word else words


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (YAML and h5py errors span several)."""
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__


def load_word_map(path: str | Path) -> dict[str, int]:
    """Read word_map.json and check it has the special tokens every script relies on."""
    try:
        with open(path, encoding="utf-8") as f:
            word_map = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: word map not found (run create_input_files.py first)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the word map ({one_line(e)})") from None
    check_word_map(word_map, str(path))
    return word_map


def check_word_map(word_map: Any, source: str) -> None:
    if not isinstance(word_map, dict) or not all(isinstance(v, int) for v in word_map.values()):
        raise UserError(f"{source}: word map must map words to integer ids")
    missing = [t for t in SPECIAL_TOKENS if t not in word_map]
    if missing:
        raise UserError(f"{source}: word map lacks {', '.join(missing)}")
    if word_map["<pad>"] != 0:
        raise UserError(f"{source}: <pad> must have id 0")


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
CHECKPOINT_FORMAT = 2  # 1: one flat "config" (before the split); 2: "model_config" + "train_config"


def checkpoint_configs(cfg: Config) -> dict[str, Any]:
    """The config part of a checkpoint: what rebuilds the model, kept apart from how it was trained."""
    return {
        "format_version": CHECKPOINT_FORMAT,
        "model_config": dataclasses.asdict(cfg.model_config()),
        "train_config": {key: getattr(cfg, key) for key in TRAIN_KEYS},
    }


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
        raise UserError(f"device={name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} asked for, but CUDA is not available (use device=cpu or auto)")
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



# --------------------------------------------------------------------------------------------
# Progress: tqdm on a terminal, plain lines in a log file
# --------------------------------------------------------------------------------------------
PROGRESS_LINES = 20  # lines per pass of known length when the output is not a terminal


class PlainProgress:
    """tqdm's interface (iterate, update, set_postfix, write, close) printing one whole line every
    `every` steps: in a log file, CI or nohup output, tqdm's carriage-return redraws are junk."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None,
                 unit: str = "it", every: int | None = None, disable: bool = False, file: TextIO | None = None,
                 initial: int = 0):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.desc, self.total, self.unit, self.disable = iterable, desc, total, unit, disable
        self.every = every or (max(1, math.ceil(total / PROGRESS_LINES)) if total else 100)
        self.file = file
        self.n, self.printed_at, self.initial, self.postfix = initial, initial, initial, ""  # initial: resumed
        self.start = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self.printed_at >= self.every or (self.total is not None and self.n == self.total):
            self._print_line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or self._stream(), flush=True)

    def close(self) -> None:
        if self.n > self.printed_at:  # the last partial stretch, once
            self._print_line()

    def _stream(self) -> TextIO:
        return self.file or sys.stderr  # looked up at each write, so redirections made later still apply

    def _print_line(self) -> None:
        self.printed_at = self.n
        if self.disable:
            return
        from tqdm import tqdm

        elapsed = time.monotonic() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        eta = (f", ETA {tqdm.format_interval((self.total - self.n) / rate)}"
               if self.total and rate > 0 else "")
        postfix = f" {self.postfix}," if self.postfix else ""
        print(f"{self.desc}: {done}{postfix} {rate:.1f} {self.unit}/s, elapsed {tqdm.format_interval(elapsed)}{eta}",
              file=self._stream(), flush=True)


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None, unit: str = "it",
             every: int | None = None, disable: bool = False, file: TextIO | None = None, initial: int = 0) -> Any:
    """A progress bar for train.py, eval.py and packing: tqdm when `file` (default stderr) is a terminal,
    otherwise a PlainProgress printing one line every `every` steps (default: ~20 lines a pass)."""
    stream = file or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True, file=stream,
                    initial=initial)
    return PlainProgress(iterable, desc=desc, total=total, unit=unit, every=every, disable=disable, file=file,
                         initial=initial)
