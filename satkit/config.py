"""The one config system: ModelConfig (what rebuilds a network) and TrainConfig (how it was trained),
seen by users as one flat namespace (YAML in configs/, then `key=value`). Fields declare their valid
values with validation.option, checked by validation.check_fields."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from satkit.attention import ATTENTIONS
from satkit.encoders import ENCODERS
from satkit.infra.filesafety import atomic_write_text
from satkit.plugins import import_plugins
from satkit.infra.runtime import UserError, one_line
from satkit.evaluation.scoring import SCORE_KEYS
from satkit.validation import check_fields, option


# --------------------------------------------------------------------------------------------
# Configs. ModelConfig is what rebuilds the network; TrainConfig is how it was trained. Users see one
# flat namespace (Config: YAML files in configs/, then `key=value`); checkpoints keep the two apart,
# so a training key can be renamed or removed without breaking a single saved model (as nanoGPT keeps
# GPTConfig apart from its training globals). Each choice and bound is written once, in the field's
# metadata and read by every `check`; choice lists that argparse also offers are named constants.
# --------------------------------------------------------------------------------------------
HARD_DECODE_MODES = ("expected", "argmax", "sample")  # hard attention's context at decoding (see model.py)


@dataclass
class ModelConfig:
    """Everything `model.build_model` needs; stored in every checkpoint as `model_config`."""

    # --- encoder (paper: VGG conv5 14x14x512; we use a torchvision ResNet or EfficientNet-Lite, see encoders.py) ---
    encoder: str = option("resnet101", choices=ENCODERS)  # any registered encoder (encoders.register_encoder)
    encoder_stages: int = option(4, choices=(1, 2, 3, 4))  # keep stages 1..N, at strides 4..32 (3 halves the stride)
    enc_size: int = option(14, min=1)  # annotation grid is enc_size x enc_size, so L = enc_size**2
    # --- decoder ---
    attention: str = option("soft", choices=ATTENTIONS)  # soft: Sec. 4.2 | hard: stochastic, Sec. 4.1 | see attention.py
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
    # Your own modules (an attention variant, encoder or metric in a file of yours), imported before the
    # registries are read: `imports: [my_pkg.my_attention]` or `imports=[my_attention.py,other]` (or `a,b`; plugins.py).
    # Checkpoints record them; eval.py and caption.py then need `--import` for each.
    imports: list[str] = field(default_factory=list)
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
    # WebDataset shards instead of the HDF5 pack (shards.py, docs/data.md): data_folder then holds the
    # word map and marker of `create_input_files.py --dataset webdataset`; an epoch is train_num_samples.
    data_format: str = option("hdf5", choices=("hdf5", "webdataset"))
    train_shards: str = ""  # brace pattern, e.g. cc3m/{00000..00331}.tar (several joined by ::)
    val_shards: str = ""
    train_num_samples: int = option(0, min=0)  # samples per epoch over all processes
    shard_shuffle_buffer: int = option(1000, min=0)  # samples shuffled across shards in each worker
    shard_resampled: bool = False  # draw shards with replacement (no fixed epoch membership)

    # --- encoder initialisation and training ---
    encoder_weights: str = "imagenet"  # imagenet (torch hub cache) | none (random init) | path to a state_dict
    fine_tune_encoder: bool = False  # train the top encoder stages (frozen encoder runs BN in eval)
    fine_tune_stages: int = option(3, min=0)  # with fine_tune_encoder, stages >= this index are trained

    # --- loss ---
    alpha_c: float = option(1.0, min=0.0)  # lambda of the doubly stochastic regulariser (Sec. 4.2.1)
    ds_reduction: str = option("mean", choices=("sum", "mean"))  # sum: paper's formula | mean: sum / L
    # Not in the paper (off by default): weight of the mean entropy of alpha_t, in units of log L (so 1.0 is
    # uniform attention), added to the loss. Frozen ImageNet heads make the grid's mean a strong caption
    # feature, and a model then attends almost uniformly; this term makes it choose (docs/training.md).
    attention_entropy_weight: float = option(0.0, min=0.0)
    # Not in the paper (off by default): weight of an auxiliary loss that trains the encoder to tell which
    # words an image's captions use, from its mean annotation vector; a stand-in for the ImageNet
    # pretraining a random-init encoder lacks (see losses.ConceptHead and configs/flickr8k_cpu.yaml).
    concept_loss_weight: float = option(0.0, min=0.0)

    # --- objective: the paper's cross-entropy, or self-critical sequence training (Rennie et al. 2017):
    # REINFORCE on the CIDEr-D of captions the model samples itself, usually started with init_from= ---
    objective: str = option("xe", choices=("xe", "scst"))
    scst_samples: int = option(5, min=1)  # K captions sampled per image and step
    scst_baseline: str = option("greedy", choices=("greedy", "mean"))  # greedy caption's reward | other samples'
    scst_bleu_weight: float = option(0.0, min=0.0)  # reward = CIDEr-D + this x BLEU-4

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
    # costs a compile at start (~20 s on a 2-core CPU for the tiny test model). See tools/benchmark.py --device cuda.
    compile_step: bool = False

    # --- validation: decoded with the same options as eval.py / caption.py (see decoding.py) ---
    # The decoded val metric that selects best.pt and drives LR decay and early stopping: BLEU-4 (the
    # paper's criterion) or CIDEr (on Flickr8k from random init it kept improving with the captions'
    # variety while BLEU-4 stayed flat; see README).
    val_metric: str = option("BLEU-4", choices=SCORE_KEYS)  # any registered metric's score (scoring.py)
    val_beam_size: int = option(1, min=1)  # model selection decodes val with this beam (1 = greedy)
    val_max_images: int = option(0, min=0)  # decode at most this many val images per epoch (0 = all)
    max_len: int = option(50, min=1)  # longest caption decoded
    block_trigrams: bool = True  # validation decodes without repeating a trigram (decoding.DecodeOptions)
    hard_decode: str = option("expected", choices=HARD_DECODE_MODES)  # hard models' context at decoding


@dataclass
class Config(TrainConfig, ModelConfig):
    """The flat namespace of YAML files and `key=value` overrides: every ModelConfig and TrainConfig key."""

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir or os.path.join("runs", self.name))

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    def check(self) -> None:
        """Every field within its declared choices/bounds, and the rules that span two fields."""
        check_fields(self)
        if self.fine_tune_encoder and not self.fine_tune_stages <= self.encoder_stages:
            raise UserError(f"config fine_tune_stages={self.fine_tune_stages} must be in 0..{self.encoder_stages}")
        if self.objective == "scst" and self.scst_baseline == "mean" and self.scst_samples < 2:
            raise UserError(f"config scst_baseline=mean needs scst_samples >= 2 (the mean of the other samples); "
                            f"got {self.scst_samples}")
        if self.data_format == "webdataset":
            missing = [key for key in ("train_shards", "val_shards", "train_num_samples") if not getattr(self, key)]
            if missing:
                raise UserError(f"config data_format=webdataset needs {', '.join(missing)}")
            if self.objective == "scst":
                raise UserError("config objective=scst reads its CIDEr document frequencies from an HDF5 pack's train "
                                "split: convert the shards (create_input_files.py --dataset webdataset ... "
                                "--output-format hdf5) and train with data_format=hdf5")
        if self.objective == "scst" and self.concept_loss_weight > 0:
            raise UserError("config objective=scst trains on the captions' reward alone: set concept_loss_weight=0")


USER_KEYS = tuple(f.name for f in fields(Config) if not f.metadata.get("derived"))


MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))


TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig))


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Convert a CLI string to the type of the field's default (as nanoGPT's configurator does); a list
    is comma-separated, with or without the brackets YAML and Hydra write it in (`[a, b]`)."""
    if isinstance(current, list):
        return _parse_list(key, text)
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


def _parse_list(key: str, text: str) -> list[str]:
    """`a,b`, `[a, b]` or `['a', "b"]` -> ["a", "b"]; `[]` or nothing -> []. Without the brackets' reading,
    `imports=[my_attention]` would name one module called `[my_attention]`."""
    body = text.strip()
    if body.startswith("[") != body.endswith("]"):
        raise UserError(f"override {key}={text!r}: unbalanced brackets; write {key}=[a,b] or {key}=a,b")
    if body.startswith("["):
        body = body[1:-1]
    items = [item.strip() for item in body.split(",")]
    items = [item[1:-1].strip() if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item
             for item in items]
    return [item for item in items if item]


YAML_SWITCHES = {True: "on", False: "off"}  # YAML 1.1 reads on/off (and yes/no) as booleans


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Type-check a YAML value against the default's type (ints are accepted for floats). YAML reads
    `feature_cache: on` as true: a boolean for an option whose choices hold on/off is that word."""
    if isinstance(value, bool) and isinstance(current, str) and YAML_SWITCHES[value] in _choices(key):
        return YAML_SWITCHES[value]
    if isinstance(value, str) and not isinstance(current, str):
        return _parse_value(key, value, current)
    if isinstance(current, list):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise UserError(f"config {key}: expected a list of module names, got {value!r}")
        return list(value)
    if isinstance(current, bool) != isinstance(value, bool) or (
        not isinstance(value, type(current)) and not (isinstance(current, float) and isinstance(value, int))
    ):
        raise UserError(f"config {key}: expected {type(current).__name__}, got {value!r}")
    return float(value) if isinstance(current, float) else value


def _choices(key: str) -> Any:
    """The choices declared for config key `key` (empty when it has none)."""
    return next((f.metadata.get("choices") or () for f in fields(Config) if f.name == key), ())


def config_from_dict(values: dict[str, Any], base: Config | None = None, source: str = "config",
                     keys: Sequence[str] = USER_KEYS) -> Config:
    """Apply a dict of overrides to `base` (defaults when None); keys outside `keys` are an error."""
    cfg = dataclasses.replace(base) if base is not None else Config()
    for key, value in values.items():
        if key not in keys:
            raise UserError(f"{source}: unknown key {key!r} (valid keys: {', '.join(sorted(keys))})")
        setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    """One config file's own mapping, or UserError naming the file."""
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
    return values


def _config_files(path: Path, including: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """(file, its own values) for `path` and its `base:` chain, the deepest base first.

    Why `base:`: a variant (coco_hard.yaml) states only what differs from the config it varies, so a
    change to the shared settings is made once. The base's path is relative to the including file.
    """
    values = _read_yaml(path)
    if "base" not in values:
        return [(path, values)]
    base = values.pop("base")
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: base must be a file name, got {base!r}")
    base_path = path.parent / base
    chain = (*including, path)
    if any(base_path.resolve() == p.resolve() for p in chain):
        raise UserError(f"{path}: base files form a cycle: {' -> '.join(map(str, (*chain, base_path)))}")
    if not base_path.is_file():
        raise UserError(f"{path}: base {base_path} not found")
    return [*_config_files(base_path, chain), (path, values)]


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (after its `base:` files, recursively) <- `key=value` overrides, then checked."""
    cfg = Config()
    for file, values in _config_files(Path(path)) if path else ():
        cfg = config_from_dict(values, cfg, source=str(file))
    cfg = apply_overrides(cfg, overrides)
    import_plugins(cfg.imports)  # before check(): a plugin's names are valid choices
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
            raise UserError(f"override {item!r}: unknown key {key!r} (see config.py for the valid keys)")
        parsed[key] = text
    return parsed


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """`cfg` with `key=value` strings applied, each converted to its field's type."""
    parsed = {key: _parse_value(key, text, getattr(cfg, key)) for key, text in parse_overrides(overrides).items()}
    return config_from_dict(parsed, cfg, source="overrides")


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML that `--config` reads back: every key, no `base:`, so a run's
    config.yaml says all it was trained with (derived keys such as vocab_size left out)."""
    values = {key: getattr(cfg, key) for key in USER_KEYS}
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
