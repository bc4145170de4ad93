"""Plugins from the command line: a user's file outside the repo, with an attention variant and a metric,
named by `imports=` in training and `--import` in eval.py and caption.py (plugins.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from satkit import plugins
from satkit.infra.runtime import UserError

PLUGIN = '''
import torch
from satkit.attention import HardAttention, register_attention
from satkit.evaluation.scoring import register_metric


@register_attention("plugin_sharpened")
class SharpenedHardAttention(HardAttention):
    def weights(self, features_proj, h):
        sharp = super().weights(features_proj, h) ** 2
        return sharp / sharp.sum(dim=1, keepdim=True)


@register_metric("plugin_length")
def mean_words(references, results):
    return {"plugin_length": sum(len(r.split()) for (r,) in results.values()) / max(len(results), 1)}
'''
TINY = ["encoder=resnet18", "encoder_weights=none", "encoder_stages=2", "enc_size=4", "attention_dim=16",
        "embed_dim=16", "decoder_dim=16", "batch_size=8", "num_workers=0", "max_len=8", "epochs=1",
        "early_stop_patience=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_a_plugin_file_trains_evaluates_and_captions_from_the_command_line(shapes_folder, tmp_path):
    plugin = tmp_path / "elsewhere" / "my_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN)
    out = tmp_path / "run"
    trained = run("train.py", "--config", "configs/shapes.yaml", f"data_folder={shapes_folder}", f"out_dir={out}",
                  *TINY, f"imports={plugin}", "attention=plugin_sharpened", "val_metric=plugin_length")
    assert trained.returncode == 0, trained.stderr[-2000:]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert "val_plugin_length" in rows[0]

    args = ["--checkpoint", str(out / "best.pt"), "--data-folder", str(shapes_folder), "--num-workers", "0",
            "--beam-size", "2", "--max-len", "8", "--out", str(tmp_path / "test.json")]
    refused = run("eval.py", *args)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: {out / 'best.pt'}: its run imported {plugin}; add --import {plugin} "
                                      "(imported only when asked)")
    # From another folder, the plugin moved beside the user and named as a module: the same module name.
    moved = tmp_path / "cwd"
    moved.mkdir()
    (moved / "my_plugin.py").write_text(PLUGIN)
    evaluated = run("eval.py", *args, "--import", "my_plugin", "--metric", "plugin_length", cwd=moved)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads((tmp_path / "test.metrics.json").read_text())
    assert 1 <= metrics["plugin_length"] <= 8

    image = shapes_folder.parent / "fresh.png"
    from satkit.data.shapes import generate_image

    generate_image(5, 0, 48)[0].save(image)
    captioned = run("caption.py", "--img", str(image), "--checkpoint", str(out / "best.pt"), "--import", str(plugin),
                    "--beam-size", "2", "--out-dir", str(tmp_path / "captions"))
    assert captioned.returncode == 0, captioned.stderr[-2000:]
    assert captioned.stdout.startswith(f"{image}: ")


def test_a_missing_plugin_is_one_line_and_its_own_errors_keep_their_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"import no_such_plugin: no module named 'no_such_plugin'"):
        plugins.import_plugins(["no_such_plugin"])
    with pytest.raises(UserError, match=r"import .*absent\.py: no such file"):
        plugins.import_plugins([str(tmp_path / "absent.py")])
    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency_of_the_plugin\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_of_the_plugin"):
        plugins.import_plugins(["broken_plugin"])


def test_imports_in_a_yaml_config_are_imported_before_its_choices_are_checked(tmp_path, monkeypatch):
    from satkit.attention import ATTENTIONS
    from satkit.config import load_config

    (tmp_path / "yaml_plugin.py").write_text(
        "from satkit.attention import SoftAttention, register_attention\n"
        "register_attention('yaml_plugin_soft')(type('YamlSoft', (SoftAttention,), {}))\n")
    (tmp_path / "run.yaml").write_text("imports: [yaml_plugin]\nattention: yaml_plugin_soft\n")
    monkeypatch.chdir(tmp_path)
    try:
        cfg = load_config(str(tmp_path / "run.yaml"))
        assert cfg.imports == ["yaml_plugin"] and cfg.attention == "yaml_plugin_soft"
        assert load_config(None, ["imports=yaml_plugin, yaml_plugin"]).imports == ["yaml_plugin", "yaml_plugin"]
    finally:
        ATTENTIONS.pop("yaml_plugin_soft", None)
        sys.modules.pop("yaml_plugin", None)
        plugins._IMPORTED.remove("yaml_plugin")
    (tmp_path / "bad.yaml").write_text("imports: 3\n")
    with pytest.raises(UserError, match=r"config imports: expected a list of module names, got 3"):
        load_config(str(tmp_path / "bad.yaml"))
