"""Tests of config.py: the shipped configs resolve to fixed values, and `base:` includes."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from satkit.config import Config, load_config, save_config
from satkit.infra.runtime import UserError

# What each shipped config resolves to: only the keys that differ from config.py's defaults. Generated
# from the configs before they were rewritten with `base:` and without restated defaults, so a rewrite
# that changes what any of them trains fails here.
RESOLVED = {
    "shapes_scst.yaml": {"encoder": "resnet18", "encoder_stages": 2, "enc_size": 6, "attention_dim": 128,
                         "embed_dim": 64, "decoder_dim": 256, "dropout": 0.2, "name": "shapes_scst", "num_workers": 1,
                         "encoder_weights": "none", "fine_tune_stages": 0, "ds_reduction": "sum", "objective": "scst",
                         "scst_baseline": "mean", "epochs": 2, "decoder_lr": 5e-05, "encoder_lr": 0.001,
                         "early_stop_patience": 3, "max_len": 30},
    "flickr8k_cpu_scst.yaml": {"encoder": "resnet18", "encoder_stages": 3, "enc_size": 8, "attention_dim": 256,
                               "embed_dim": 256, "decoder_dim": 256, "name": "flickr8k_cpu_scst",
                               "data_folder": "data/flickr8k_128", "num_workers": 1, "captions_per_step": 2,
                               "encoder_weights": "none", "fine_tune_stages": 0, "objective": "scst",
                               "scst_baseline": "mean", "scst_bleu_weight": 0.5, "epochs": 3, "decoder_lr": 5e-05,
                               "encoder_lr": 0.001,
                               "lr_decay_factor": 0.5, "early_stop_patience": 0, "val_metric": "CIDEr", "max_len": 30},
    "coco.yaml": {"name": "coco", "data_folder": "data/coco", "num_workers": 4, "batch_size": 64},
    "coco_hard.yaml": {"attention": "hard", "name": "coco_hard", "data_folder": "data/coco", "num_workers": 4,
                       "batch_size": 64},
    "flickr30k.yaml": {"name": "flickr30k", "data_folder": "data/flickr30k", "num_workers": 4, "epochs": 30},
    "flickr30k_hard.yaml": {"attention": "hard", "name": "flickr30k_hard", "data_folder": "data/flickr30k",
                            "num_workers": 4, "epochs": 30},
    "flickr8k.yaml": {"name": "flickr8k", "data_folder": "data/flickr8k", "num_workers": 4, "epochs": 30},
    "flickr8k_cpu.yaml": {"encoder": "resnet18", "encoder_stages": 3, "enc_size": 8, "attention_dim": 256,
                          "embed_dim": 256, "decoder_dim": 256, "name": "flickr8k_cpu",
                          "data_folder": "data/flickr8k_128", "num_workers": 1, "captions_per_step": 2, "hflip": True,
                          "encoder_weights": "none", "fine_tune_encoder": True, "fine_tune_stages": 0,
                          "concept_loss_weight": 1.0, "decoder_lr": 0.001, "encoder_lr": 0.001,
                          "lr_decay_factor": 0.5, "early_stop_patience": 0, "max_len": 30, "val_metric": "CIDEr"},
    "flickr8k_hard.yaml": {"attention": "hard", "name": "flickr8k_hard", "data_folder": "data/flickr8k",
                           "num_workers": 4, "epochs": 30},
    # Written with this table (not before it): the ImageNet Lite0 recipes of the README's real-data section.
    "flickr8k_lite.yaml": {"encoder": "efficientnet_lite0", "enc_size": 7, "name": "flickr8k_lite",
                           "data_folder": "data/flickr8k_224", "num_workers": 1, "epochs": 6, "lr_decay_factor": 0.5,
                           "lr_patience": 0, "early_stop_patience": 0, "val_metric": "CIDEr", "max_len": 30,
                           "attention_entropy_weight": 0.5},
    "flickr8k_lite_hard.yaml": {"encoder": "efficientnet_lite0", "enc_size": 7, "attention": "hard",
                                "name": "flickr8k_lite_hard", "data_folder": "data/flickr8k_224", "num_workers": 1,
                                "epochs": 2, "decoder_lr": 1e-4, "lr_decay_factor": 0.5, "lr_patience": 0,
                                "early_stop_patience": 0, "val_metric": "CIDEr", "max_len": 30,
                                "attention_entropy_weight": 0.5},
    "flickr8k_lite_scst.yaml": {"encoder": "efficientnet_lite0", "enc_size": 7, "name": "flickr8k_lite_scst",
                                "data_folder": "data/flickr8k_224", "num_workers": 1, "objective": "scst",
                                "scst_baseline": "mean", "scst_bleu_weight": 0.5, "epochs": 3, "decoder_lr": 5e-05,
                                "lr_decay_factor": 0.5, "lr_patience": 0, "early_stop_patience": 0,
                                "val_metric": "CIDEr", "max_len": 30, "attention_entropy_weight": 0.5},
    "shapes.yaml": {"encoder": "resnet18", "encoder_stages": 2, "enc_size": 6, "attention_dim": 128, "embed_dim": 64,
                    "decoder_dim": 256, "dropout": 0.2, "name": "shapes", "num_workers": 1, "encoder_weights": "none",
                    "fine_tune_encoder": True, "fine_tune_stages": 0, "ds_reduction": "sum", "epochs": 8,
                    "decoder_lr": 0.002, "encoder_lr": 0.001, "early_stop_patience": 3, "max_len": 30},
    "shapes_hard.yaml": {"encoder": "resnet18", "encoder_stages": 2, "enc_size": 6, "attention": "hard",
                         "attention_dim": 128, "embed_dim": 64, "decoder_dim": 256, "dropout": 0.2,
                         "name": "shapes_hard", "num_workers": 1, "encoder_weights": "none", "fine_tune_encoder": True,
                         "fine_tune_stages": 0, "alpha_c": 0.0, "ds_reduction": "sum", "epochs": 8,
                         "decoder_lr": 0.002, "encoder_lr": 0.001, "early_stop_patience": 3, "max_len": 30},
}


def test_every_shipped_config_is_in_the_table() -> None:
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == sorted(RESOLVED)


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_shipped_config_resolves_to_its_values(name: str) -> None:
    assert load_config(str(ROOT / "configs" / name)) == dataclasses.replace(Config(), **RESOLVED[name])


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_shipped_config_states_no_default(name: str) -> None:
    """Each file says only what differs from its base (or, without one, from config.py's defaults)."""
    values = yaml.safe_load((ROOT / "configs" / name).read_text())
    base = values.pop("base", None)
    under = load_config(str(ROOT / "configs" / base)) if base else Config()
    assert {k: v for k, v in values.items() if getattr(under, k) == v} == {}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_loads_first_and_the_including_file_wins(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "epochs: 3\nbatch_size: 8\nname: base\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nepochs: 5\n")
    cfg = load_config(str(child), ["name=cli"])
    assert (cfg.epochs, cfg.batch_size, cfg.name) == (5, 8, "cli")  # defaults <- base <- file <- overrides


def test_nested_base_is_relative_to_the_including_file(tmp_path: Path) -> None:
    write(tmp_path, "root.yaml", "epochs: 3\nbatch_size: 8\ndropout: 0.1\n")
    write(tmp_path, "sub/mid.yaml", "base: ../root.yaml\nbatch_size: 16\nembed_dim: 32\n")
    leaf = write(tmp_path, "sub/deeper/leaf.yaml", "base: ../mid.yaml\nembed_dim: 64\n")
    cfg = load_config(str(leaf))
    assert (cfg.epochs, cfg.batch_size, cfg.dropout, cfg.embed_dim) == (3, 16, 0.1, 64)


def test_base_cycle_is_refused_naming_the_files(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(UserError, match=r"a\.yaml -> .*b\.yaml -> .*a\.yaml") as raised:
        load_config(str(a))
    assert "\n" not in str(raised.value) and "cycle" in str(raised.value)
    itself = write(tmp_path, "self.yaml", "base: self.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(str(itself))


def test_missing_or_bad_base_is_one_line_naming_both_files(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", "base: nowhere.yaml\n")
    with pytest.raises(UserError, match=r"child\.yaml: base .*nowhere\.yaml not found") as raised:
        load_config(str(child))
    assert "\n" not in str(raised.value)
    write(tmp_path, "list.yaml", "base: [a.yaml]\n")
    with pytest.raises(UserError, match=r"list\.yaml: base must be a file name"):
        load_config(str(tmp_path / "list.yaml"))
    write(tmp_path, "typo.yaml", "epochz: 3\n")
    write(tmp_path, "uses_typo.yaml", "base: typo.yaml\n")
    with pytest.raises(UserError, match=r"typo\.yaml: unknown key 'epochz'"):  # the file that has the key
        load_config(str(tmp_path / "uses_typo.yaml"))


def test_saved_config_is_self_contained(tmp_path: Path) -> None:
    cfg = load_config(str(ROOT / "configs" / "shapes_hard.yaml"))
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "base" not in saved and saved["attention"] == "hard" and saved["encoder"] == "resnet18"
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_yaml_on_and_off_are_the_words_for_on_off_choices(tmp_path: Path) -> None:
    """YAML reads `feature_cache: on` (as docs/training.md spells it) as true: an option whose choices hold
    on and off takes the word. Anywhere else a boolean is still refused in one line."""
    cfg = load_config(str(write(tmp_path, "on.yaml", "feature_cache: on\namp: off\n")))
    assert (cfg.feature_cache, cfg.amp) == ("on", "off")  # amp's choices are off, bf16, fp16
    assert load_config(str(write(tmp_path, "off.yaml", "feature_cache: off\n"))).feature_cache == "off"
    assert load_config(str(write(tmp_path, "yes.yaml", "feature_cache: yes\n"))).feature_cache == "on"
    for text in ("amp: on\n", "encoder: true\n"):  # no such choice: "on" is not an amp mode
        with pytest.raises(UserError, match="expected str, got True") as raised:
            load_config(str(write(tmp_path, "bad.yaml", text)))
        assert "\n" not in str(raised.value)
