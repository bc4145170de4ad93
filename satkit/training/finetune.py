"""Fine-tuning another run's model on new data (init_from, extend_vocab).

The model keeps the init checkpoint's word map (ids never move, so its rows keep their meaning),
optionally extended by the pack's words it lacks, appended at new ids. The pack itself is not rewritten:
its captions were encoded with its own word map, so CaptionDataset translates them on load through
`caption_id_map` (pack id -> model id; words the model lacks become <unk>). Checkpoints store the
model's word map, and the pack's as `pack_word_map`, which lets eval.py accept that pack.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import torch
import torch.nn as nn

from satkit.checkpoints import load_checkpoint, model_config_from_checkpoint
from satkit.config import MODEL_KEYS, Config, parse_overrides
from satkit.model import ShowAttendTell, build_model, model_from_checkpoint
from satkit.plugins import check_plugins
from satkit.infra.runtime import UserError, one_line


# --------------------------------------------------------------------------------------------
# Fine-tuning another run's model on new data (init_from, extend_vocab)
#
# Design: the model keeps the init checkpoint's word map (ids never move, so its rows keep their
# meaning), optionally extended by the pack's words it lacks, appended at new ids. The pack itself is
# not rewritten: its captions were encoded with its own word map, so CaptionDataset translates them on
# load through `caption_id_map` (pack id -> model id; words the model lacks become <unk>). Checkpoints
# store the model's word map, and the pack's as `pack_word_map`, which lets eval.py accept that pack.
# --------------------------------------------------------------------------------------------
SAME_WEIGHTS_KEYS = ("attention",)  # model keys a run may change on init_from: soft and hard share f_att's weights


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
    # Before its config is read: a plugin's attention or encoder is unknown until imported (#34 d).
    check_plugins((init.get("train_config") or {}).get("imports") or [], cfg.init_from, flag="imports={}")
    changed = [key for key in parse_overrides(overrides) if key in MODEL_KEYS and key not in SAME_WEIGHTS_KEYS]
    if changed:
        raise UserError(f"init_from={cfg.init_from}: the architecture comes from that checkpoint; drop the "
                        f"override(s) of {', '.join(changed)}")
    model_cfg = dataclasses.asdict(model_config_from_checkpoint(init, cfg.init_from))
    # The run's attention variant, not the checkpoint's: a hard-attention run warm-started from a soft model
    # (model_from_init refuses a variant whose weights differ).
    for key in SAME_WEIGHTS_KEYS:
        if model_cfg[key] != getattr(cfg, key):
            print(f"note: init_from={cfg.init_from}: {key}={getattr(cfg, key)} (the checkpoint's: {model_cfg[key]}; "
                  f"the same weights)", file=sys.stderr)
            model_cfg[key] = getattr(cfg, key)
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


def model_from_init(init: dict[str, Any], cfg: Config, word_map: dict[str, int], pack_word_map: dict[str, int],
                    verbose: bool = True) -> ShowAttendTell:
    """The init checkpoint's network with this run's frozen stages, its vocabulary grown to `word_map`."""
    loaded, _ = model_from_checkpoint(init, cfg.init_from)  # UserError if its weights do not fit its config
    model = build_model(dataclasses.replace(cfg.model_config(), vocab_size=len(init["word_map"])),
                        encoder_weights="none", fine_tune=cfg.fine_tune_encoder, fine_tune_stages=cfg.fine_tune_stages)
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as error:  # another attention variant with other weights than the checkpoint's
        raise UserError(f"init_from={cfg.init_from}: its weights do not fit attention={cfg.attention} "
                        f"({one_line(error)})") from None
    extend_vocab(model, len(word_map))
    if verbose:
        unknown = sum(word not in word_map for word in pack_word_map)
        print(f"init_from {cfg.init_from}: its {len(init['word_map'])} words kept, "
              f"{len(word_map) - len(init['word_map'])} added from {cfg.data_folder}"
              f"{f', {unknown} of its words read as <unk> (extend_vocab=true adds them)' if unknown else ''}")
    return model
