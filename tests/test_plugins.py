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


# --------------------------------------------------------------------------------------------
# #34: plugin refusals (init_from, resume, Captioner), plugin files' own module names, list overrides
# --------------------------------------------------------------------------------------------
PLUGIN_SOFT = '''
from satkit.attention import SoftAttention, register_attention


@register_attention("{name}")
class PluginSoft(SoftAttention):
    """Soft attention under another name: a checkpoint trained with it needs this file imported."""
'''


@pytest.fixture
def forget_plugins(tmp_path, monkeypatch):
    """What a test imports as a plugin is forgotten after it: its registrations, its sys.modules entries (plugin
    files' `satkit_plugin_*` names, modules from tmp_path), plugins' list of imported names, sys.path."""
    from satkit.attention import ATTENTIONS

    attentions, modules = set(ATTENTIONS), set(sys.modules)
    monkeypatch.setattr(plugins, "_IMPORTED", list(plugins._IMPORTED))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in set(ATTENTIONS) - attentions:
        del ATTENTIONS[name]
    for name in set(sys.modules) - modules:
        where = getattr(sys.modules[name], "__file__", None) or ""
        if name.startswith("satkit_plugin_") or where.startswith(str(tmp_path)):
            del sys.modules[name]


def write_plugin(path: Path, attention: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PLUGIN_SOFT.format(name=attention))
    return path


def plugin_checkpoint(path: Path, attention: str, imports: list[str], **training) -> Path:
    """A tiny untrained checkpoint as a run with `imports` and `attention=<the plugin's variant>` writes it."""
    from satkit.checkpoints import build_checkpoint, save_checkpoint
    from satkit.config import Config, ModelConfig
    from satkit.model import build_model

    word_map = {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3, "red": 4, "square": 5}
    model_cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=4, attention_dim=16, embed_dim=16,
                            decoder_dim=16, vocab_size=len(word_map))
    cfg = Config()
    cfg.imports = list(imports)
    ckpt = build_checkpoint(build_model(model_cfg), model_cfg, word_map, image_size=48, cfg=cfg, **training)
    ckpt["model_config"]["attention"] = attention  # PluginSoft has soft attention's parameters
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, ckpt)
    return path


def test_init_from_refuses_a_checkpoint_whose_plugin_is_not_imported(tmp_path, capsys, forget_plugins):
    """#34 d: init_from= ran no plugin check, so the plugin's attention failed as an unknown choice."""
    import train
    from satkit.config import load_config
    from satkit.training.finetune import resolve_init

    plugin = write_plugin(tmp_path / "d_plugin.py", "d_plugin_soft")
    ckpt = plugin_checkpoint(tmp_path / "base" / "best.pt", "d_plugin_soft", [str(plugin)])
    assert train.main([f"init_from={ckpt}", f"out_dir={tmp_path / 'tuned'}"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {ckpt}: its run imported {plugin}; add imports={plugin} "
                                               "(imported only when asked)")
    overrides = [f"init_from={ckpt}", f"imports={plugin}"]
    _, init = resolve_init(load_config(None, overrides), overrides)  # with the plugin imported: no refusal
    assert init is not None and init["model_config"]["attention"] == "d_plugin_soft"


def test_resume_refuses_a_run_whose_plugin_is_not_imported(tmp_path, capsys, forget_plugins):
    """#34 l: deleting train.py's check on resume= passed every test; here the run would go on without it."""
    import train

    plugin = write_plugin(tmp_path / "l_plugin.py", "l_plugin_soft")
    ckpt = plugin_checkpoint(tmp_path / "run" / "last.pt", "l_plugin_soft", [str(plugin)], train_state={"epoch": 1})
    assert train.main([f"resume={ckpt}", "epochs=2"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {ckpt}: its run imported {plugin}; add imports={plugin} "
                                               "(imported only when asked)")


def test_captioner_imports_the_plugin_it_is_given(tmp_path, forget_plugins):
    """#34 l: Captioner.from_checkpoint refuses a plugin checkpoint in one line, and with imports= captions with
    the plugin's class. The plugin is a file named models.py (#34 f): it must not become `models`."""
    from PIL import Image

    from satkit.captioner import Captioner

    plugin = write_plugin(tmp_path / "elsewhere" / "models.py", "api_plugin_soft")
    ckpt = plugin_checkpoint(tmp_path / "best.pt", "api_plugin_soft", [str(plugin)])
    with pytest.raises(UserError, match=rf"^{ckpt}: its run imported {plugin}; add --import {plugin} "):
        Captioner.from_checkpoint(ckpt)
    captioner = Captioner.from_checkpoint(ckpt, imports=[str(plugin)])
    assert type(captioner.model.decoder.attention).__name__ == "PluginSoft"
    best = captioner(Image.new("RGB", (60, 50), (200, 30, 30)), max_len=4)[0].best  # untrained: may be empty
    assert best.finished and best.score < 0 and len(best.words) <= 4
    assert sys.modules.get("models") is not sys.modules[plugins.file_module_name(plugin)]


def test_a_plugin_file_named_like_a_module_takes_its_own_name(tmp_path, forget_plugins):
    """#34 f: a plugin at some/path/models.py entered sys.modules as `models`, so any later `import models` got
    the plugin. It now has a name of its own, one per file (two models.py in two folders are two modules)."""
    from satkit.attention import ATTENTIONS

    plugin = write_plugin(tmp_path / "some" / "path" / "models.py", "f_plugin_soft")
    plugins.import_plugins([str(plugin)])
    name = plugins.file_module_name(plugin)
    assert name.startswith("satkit_plugin_models_") and sys.modules[name].PluginSoft is ATTENTIONS["f_plugin_soft"]
    assert sys.modules.get("models") is not sys.modules[name]
    assert plugins.file_module_name(tmp_path / "other" / "models.py") != name
    assert plugins.file_module_name(tmp_path / "my-plugin.v2.py").startswith("satkit_plugin_my_plugin_v2_")
    plugins.check_plugins([str(plugin)], "best.pt")  # the check still knows it by its file name


@pytest.mark.parametrize("text", ["m_plugin_a,m_plugin_b", "[m_plugin_a,m_plugin_b]", "[m_plugin_a, m_plugin_b]",
                                  "['m_plugin_a', \"m_plugin_b\"]"])
def test_a_list_key_takes_the_bracketed_list_form(text, tmp_path, monkeypatch, forget_plugins):
    """#34 m: `imports=[a,b]` (as Hydra and YAML write a list) named one module called `[a`."""
    from satkit.config import load_config

    for name in ("m_plugin_a", "m_plugin_b"):
        (tmp_path / f"{name}.py").write_text("LOADED = True\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(None, [f"imports={text}"]).imports == ["m_plugin_a", "m_plugin_b"]
    assert sys.modules["m_plugin_b"].LOADED


def test_a_list_key_reads_an_empty_list_and_refuses_half_a_bracket():
    from satkit.config import load_config

    assert load_config(None, ["imports=[]"]).imports == []
    with pytest.raises(UserError, match=r"^override imports='\[a,b': unbalanced brackets; write imports=\[a,b\] or "
                                        r"imports=a,b$"):
        load_config(None, ["imports=[a,b"])
