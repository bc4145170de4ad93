"""Checkpoints outlive config edits: the model config is stored apart from the training config, old
(format 1) checkpoints still load, and only a model key this code cannot understand is refused."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import caption
from satkit.checkpoints import (
    CHECKPOINT_FORMAT,
    config_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from satkit.config import ModelConfig
from satkit.model import build_model, load_model
from satkit.infra.runtime import UserError

WORD_MAP = {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3, "a": 4, "red": 5, "circle": 6}
TINY_MODEL = dict(encoder="resnet18", encoder_stages=1, enc_size=2, attention="soft", attention_dim=8, embed_dim=8,
                  decoder_dim=8, dropout=0.0, gate="scalar", deep_output=True)

# The flat config every checkpoint carried before the split (format 1), key for key as the code of the
# time wrote it: 42 keys, model and training mixed, including keys that no longer exist (max_decode_len).
FORMAT_1_CONFIG = {
    "name": "run", "out_dir": "runs/old", "seed": 0, "device": "auto", "amp": "off", "resume": "",
    "data_folder": "data/shapes", "num_workers": 2, "captions_per_step": 0, "encoder": "resnet18",
    "encoder_weights": "none", "encoder_stages": 1, "enc_size": 2, "fine_tune_encoder": True, "fine_tune_stages": 0,
    "attention": "soft", "attention_dim": 8, "embed_dim": 8, "decoder_dim": 8, "dropout": 0.0, "gate": "scalar",
    "deep_output": True, "max_decode_len": 30, "alpha_c": 1.0, "ds_reduction": "sum", "hard_reinforce_weight": 0.1,
    "hard_entropy_weight": 0.002, "hard_baseline_decay": 0.9, "hard_expected_prob": 0.5, "hard_decode": "expected",
    "epochs": 8, "batch_size": 32, "decoder_lr": 0.002, "encoder_lr": 0.001, "weight_decay": 0.0, "grad_clip": 5.0,
    "lr_decay_factor": 0.8, "lr_patience": 2, "early_stop_patience": 3, "val_beam_size": 1, "val_max_images": 0,
    "log_every": 50,
}


def tiny_model() -> tuple[torch.nn.Module, ModelConfig]:
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_MODEL, vocab_size=len(WORD_MAP))
    return build_model(cfg).eval(), cfg


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    captions = torch.tensor([[[2, 4, 5, 6, 3]], [[2, 4, 6, 3, 0]]])
    with torch.no_grad():
        return model(images, captions, torch.tensor([[5], [4]]))["logits"]


def test_a_format_1_checkpoint_still_loads_and_captions(tmp_path, capsys):
    model, _ = tiny_model()
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": FORMAT_1_CONFIG, "word_map": WORD_MAP,
                           "image_size": 16, "train_state": {"epoch": 8, "step": 100, "best_score": 0.5,
                                                              "epochs_since_improvement": 0, "hard_baseline": 0.0}})
    restored, model_cfg, ckpt = load_model(path)
    assert ckpt["format_version"] == CHECKPOINT_FORMAT
    assert dataclasses.asdict(model_cfg) == {**TINY_MODEL, "vocab_size": len(WORD_MAP)}
    torch.testing.assert_close(logits_of(restored), logits_of(model))
    # Its training keys come through for resume; the one this code dropped is named once, not fatal.
    cfg = config_from_checkpoint(ckpt, str(path))
    assert (cfg.decoder_lr, cfg.ds_reduction, cfg.epochs, cfg.encoder_stages) == (0.002, "sum", 8, 1)
    assert capsys.readouterr().err.count("ignoring training keys this code does not know: max_decode_len") == 1
    # And the command-line tools use it as they always did.
    from PIL import Image

    Image.new("RGB", (30, 20), (200, 40, 40)).save(tmp_path / "img.png")
    assert caption.main(["--img", str(tmp_path / "img.png"), "--checkpoint", str(path), "--max-len", "3",
                         "--out-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "img_attention.png").is_file()


def format_2(model: torch.nn.Module, cfg: ModelConfig, **train_config) -> dict:
    return {"model": model.state_dict(), "format_version": 2, "model_config": dataclasses.asdict(cfg),
            "train_config": train_config, "word_map": WORD_MAP}


def test_unknown_training_keys_are_ignored(tmp_path, capsys):
    model, cfg = tiny_model()
    path = tmp_path / "new.pt"
    save_checkpoint(path, format_2(model, cfg, epochs=3, renamed_someday=1, log_every=10))
    restored, _, ckpt = load_model(path)  # inference reads the model config only: nothing to say
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(logits_of(restored), logits_of(model))
    resumed = config_from_checkpoint(ckpt, "new.pt")
    assert (resumed.epochs, resumed.log_every, resumed.decoder_dim) == (3, 10, 8)
    assert "ignoring training keys this code does not know: renamed_someday" in capsys.readouterr().err


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(attention_heads=4), "model config key 'attention_heads' is unknown to this code"),
    (lambda m: m.pop("gate"), "model config lacks 'gate'"),
    (lambda m: m.update(gate="diagonal"), "gate='diagonal' is not one of scalar, vector, none"),
    (lambda m: m.update(vocab_size=99), "vocab_size=99 but its word map has 7 words"),
    (lambda m: m.update(decoder_dim=16), "weights do not match its model config"),
])
def test_model_keys_this_code_cannot_build_are_refused_by_name(edit, message, tmp_path):
    model, cfg = tiny_model()
    payload = format_2(model, cfg)
    edit(payload["model_config"])
    path = tmp_path / "edited.pt"
    save_checkpoint(path, payload)
    with pytest.raises(UserError, match=message) as error:
        load_model(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_newer_format_is_refused(tmp_path):
    model, cfg = tiny_model()
    path = tmp_path / "future.pt"
    save_checkpoint(path, {**format_2(model, cfg), "format_version": CHECKPOINT_FORMAT + 1})
    with pytest.raises(UserError, match=f"format {CHECKPOINT_FORMAT + 1} is not one this code reads"):
        load_checkpoint(path)
