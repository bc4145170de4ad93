"""eval.py's results ids (cocoid / file name), per-image scores, the --report HTML page (opened in a real
headless browser), and --spice."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch
from conftest import pack_main, write_checkpoint
from PIL import Image

import eval as eval_cli
from satkit import figures
from satkit.evaluation import scoring
from satkit.config import ModelConfig
from satkit.data.dataset import CaptionDataset
from satkit.model import build_model
from satkit.data.text import tokenize

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEEDS_CHROMIUM = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


def tiny_checkpoint(path: Path, folder: Path, seed: int = 0) -> Path:
    """A random tiny model for the pack in `folder` (its captions are noise, but real decoder output)."""
    word_map = json.loads((folder / "word_map.json").read_text())
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=3, attention_dim=16, embed_dim=16,
                      decoder_dim=32, dropout=0.0, vocab_size=len(word_map))
    torch.manual_seed(seed)
    return write_checkpoint(path, build_model(cfg), cfg, word_map)


def run_eval(ckpt: Path, folder: Path, out: Path, *extra: str, split: str = "test") -> int:
    return eval_cli.main(["--checkpoint", str(ckpt), "--data-folder", str(folder), "--split", split,
                            "--beam-size", "2", "--max-len", "6", "--device", "cpu", "--num-workers", "0",
                            "--out", str(out), *extra])


# --------------------------------------------------------------------------------------------
# Results keyed by the image's own id
# --------------------------------------------------------------------------------------------
@pytest.fixture
def coco_like(tmp_path: Path, write_image: Callable[..., Path]) -> Path:
    """A packed Karpathy-style COCO JSON: cocoids and filepath sub-folders."""
    images, entries = tmp_path / "images", []
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    for n, (split, colour) in enumerate(zip(["train", "train", "restval", "val", "test", "test"], colours)):
        sub = "val2014" if split in ("val", "test") else "train2014"
        name = f"COCO_{sub}_{n:012d}.jpg"
        write_image(images / sub / name, Image.new("RGB", (40, 30), colour))
        captions = ["a red square on a table", "a square of colour", "a plain coloured square"]
        entries.append({"filename": name, "filepath": sub, "split": split, "cocoid": 1000 + n, "imgid": n,
                        "sentences": [{"raw": c, "tokens": tokenize(c)} for c in captions]})
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    folder = tmp_path / "packed"
    pack_main(["--dataset", "coco", "--karpathy-json", str(karpathy), "--image-folder", str(images),
               "--output-folder", str(folder), "--image-size", "32", "--min-word-freq", "1", "--workers", "1"])
    return folder


def test_results_use_cocoid_and_old_packs_fall_back_to_file_names(coco_like, tmp_path, capsys):
    with h5py.File(coco_like / "test.h5", "r") as h5:
        assert h5["image_ids"][()].tolist() == [1004, 1005]
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", coco_like)
    out = tmp_path / "new.json"
    assert run_eval(ckpt, coco_like, out, "--control", "none") == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    # The COCO results format (a list of image_id + caption), the split index kept as a field.
    assert [(r["image_id"], r["index"]) for r in results] == [(1004, 0), (1005, 1)]
    assert all(set(r) == {"image_id", "caption", "index"} and isinstance(r["caption"], str) for r in results)

    # A pack written before image ids were stored: the results are keyed by file name.
    with h5py.File(coco_like / "test.h5", "a") as h5:
        del h5["image_ids"]
        del h5.attrs["tokenizer"]
    out = tmp_path / "old.json"
    assert run_eval(ckpt, coco_like, out, "--control", "none") == 0, capsys.readouterr().err
    assert [(r["image_id"], r["index"]) for r in json.loads(out.read_text())] == [
        ("val2014/COCO_val2014_000000000004.jpg", 0), ("val2014/COCO_val2014_000000000005.jpg", 1)]


def test_packs_without_cocoid_store_no_image_ids(shapes_folder):
    with h5py.File(shapes_folder / "test.h5", "r") as h5:
        assert "image_ids" not in h5 and h5.attrs["tokenizer"] == "ascii"


# --------------------------------------------------------------------------------------------
# Per-image scores: pycocoevalcap's own per-image numbers
# --------------------------------------------------------------------------------------------
def test_per_image_scores_are_pycocoevalcaps():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    captions = {1: "a red circle and a blue square", 2: "a green triangle", 7: "a purple diamond on grey"}
    references = {1: ["a red circle and a blue square", "a blue square and a red circle"],
                  2: ["a green triangle and a yellow circle", "two shapes"],
                  7: ["a purple diamond", "a purple diamond on a grey background"]}
    per_image: dict[int, dict[str, float]] = {}
    corpus = scoring.score_captions(captions, references, metrics=["BLEU", "CIDEr"], words="ascii",
                                       per_image=per_image)
    gts = {i: [" ".join(tokenize(r)) for r in references[i]] for i in captions}
    res = {i: [" ".join(tokenize(captions[i]))] for i in captions}
    _, cider = Cider().compute_score(gts, res)
    _, bleu = Bleu(4).compute_score(gts, res, verbose=0)
    assert [per_image[i]["CIDEr"] for i in gts] == pytest.approx(list(cider), abs=1e-12)
    assert [per_image[i]["BLEU-4"] for i in gts] == pytest.approx(bleu[3], abs=1e-12)
    assert np.mean([s["CIDEr"] for s in per_image.values()]) == pytest.approx(corpus["CIDEr"])
    assert per_image[1]["CIDEr"] > per_image[7]["CIDEr"] > per_image[2]["CIDEr"]


# --------------------------------------------------------------------------------------------
# The HTML report
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory, shapes_folder) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("report")
    ckpt = tiny_checkpoint(root / "tiny.pt", shapes_folder)
    out = root / "test.json"
    # val has 3 images, as test: GIFs for the 2 worst only. No JVM (module scope: conftest's fixture is per test).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scoring, "java_available", lambda: False)
        assert run_eval(ckpt, shapes_folder, out, "--report", str(root / "report"), "--report-limit", "2",
                        split="val") == 0
    return root / "report", json.loads(out.with_name("test.metrics.json").read_text())


def test_report_files_and_order(report):
    folder, metrics = report
    page = (folder / "index.html").read_text()
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    gifs = sorted((folder / "attention").iterdir())
    assert len(gifs) == 2
    assert all(Image.open(g).n_frames >= 2 for g in gifs)  # the plain image, then one frame per word
    rows = re.findall(r"<tr><td class='num'>(\d+)</td>.*?</tr>", page, flags=re.S)
    assert rows == ["1", "2", "3"]
    ciders = [float(x) for x in re.findall(r"</ol></td><td class='num'>([0-9.]+)</td>", page)]
    assert len(ciders) == 3 and ciders == sorted(ciders)  # worst first
    assert f"{metrics['CIDEr']:.4f}" in page and "distinct_captions" in page and "shuffled_CIDEr" in page
    assert "bad_endings" in page  # the diagnostics block lists every caption_diversity key
    for gif in gifs:  # the GIFs go with the worst rows
        assert page.index(f"attention/{gif.name}") < page.index("beyond --report-limit")
    assert "http://" not in page and "https://" not in page  # nothing to fetch: it opens offline


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000",
                           "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=120)


@NEEDS_CHROMIUM
def test_report_renders_in_a_headless_browser(report, tmp_path):
    folder, _ = report
    url = (folder / "index.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    result = chromium("--hide-scrollbars", "--window-size=1000,900", f"--screenshot={shot}", url, tmp=tmp_path)
    assert shot.is_file(), result.stderr
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text, tables and pictures, not a blank page
    dom = chromium("--window-size=1000,3000", "--dump-dom", url, tmp=tmp_path)
    marker = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert marker, dom.stdout[:500]
    assert marker.group(1) == marker.group(2) == "5"  # 3 thumbnails + 2 GIFs, every one decoded
    console = [line for line in dom.stderr.splitlines() + result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    # The check can fail: a missing picture is counted.
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "images" / "1.jpg").unlink()
    dom = chromium("--window-size=1000,3000", "--dump-dom", (broken / "index.html").as_uri(), tmp=tmp_path)
    assert 'data-images-loaded="4/5"' in dom.stdout


def test_report_failure_leaves_no_index(shapes_folder, tmp_path, monkeypatch):

    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", shapes_folder)
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "index.html").write_text("<html>an older report</html>")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "save_attention_gif", disk_full)
    with pytest.raises(RuntimeError, match="disk full"):
        run_eval(ckpt, shapes_folder, tmp_path / "test.json", "--report", str(folder), "--control", "none")
    assert not (folder / "index.html").exists()


def test_report_limit_must_be_non_negative(shapes_folder, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", shapes_folder)
    assert run_eval(ckpt, shapes_folder, tmp_path / "t.json", "--report", str(tmp_path / "r"),
                    "--report-limit", "-1") == 1
    assert capsys.readouterr().err.strip() == "error: --report-limit=-1 must be >= 0"
    (tmp_path / "file").write_text("")
    assert run_eval(ckpt, shapes_folder, tmp_path / "t.json", "--report", str(tmp_path / "file")) == 1
    assert capsys.readouterr().err.strip() == f"error: --report {tmp_path / 'file'}: exists and is not a folder"
    assert not (tmp_path / "t.json").exists()  # refused before decoding


# --------------------------------------------------------------------------------------------
# SPICE
# --------------------------------------------------------------------------------------------
def test_spice_missing_says_what_in_one_line(shapes_folder, tmp_path, capsys):
    missing = scoring.spice_missing()
    assert missing is not None and "\n" not in missing
    assert missing.startswith("SPICE skipped: missing java") and "stanford-corenlp-3.6.0-models.jar" in missing
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", shapes_folder)
    out = tmp_path / "test.json"
    assert run_eval(ckpt, shapes_folder, out, "--spice", "--control", "none") == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "SPICE" in line and "METEOR" not in line] == [f"warning: {missing}"]
    metrics = json.loads(out.with_name("test.metrics.json").read_text())
    assert "SPICE" not in metrics and {"BLEU-4", "ROUGE-L", "CIDEr"} <= set(metrics)


def test_spice_runs_when_its_jars_are_there(shapes_folder, tmp_path, capsys, monkeypatch):
    import pycocoevalcap.spice.spice as spice_module

    seen = {}

    class FakeSpice:
        def compute_score(self, gts, res):
            seen["gts"], seen["res"] = gts, res
            return 0.25, [{"All": {"f": 0.25}}] * len(gts)

    monkeypatch.setattr(scoring, "spice_missing", lambda: None)
    monkeypatch.setattr(spice_module, "Spice", FakeSpice)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", shapes_folder)
    out = tmp_path / "test.json"
    assert run_eval(ckpt, shapes_folder, out, "--spice", "--control", "none") == 0, capsys.readouterr().err
    metrics = json.loads(out.with_name("test.metrics.json").read_text())
    assert metrics["SPICE"] == 0.25 and "CIDEr" in metrics
    assert sorted(seen["gts"]) == [0, 1, 2] and all(len(v) == 1 for v in seen["res"].values())
    # Without --spice it is not run.
    seen.clear()
    assert run_eval(ckpt, shapes_folder, out, "--control", "none") == 0
    assert not seen and "SPICE" not in json.loads(out.with_name("test.metrics.json").read_text())


# --------------------------------------------------------------------------------------------
# A metric registered outside the library: eval scores it, the report and val_metric list it
# --------------------------------------------------------------------------------------------
@pytest.fixture
def length_ratio():
    """A metric defined here, not in scoring.py: caption length over mean reference length, per image."""

    @scoring.register_metric("LENGTH", keys=["LENGTH-ratio"], per_image=["LENGTH-ratio"])
    def length(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> scoring.Scored:
        ratios = {i: len(res[i][0].split()) / max(np.mean([len(r.split()) for r in gts[i]]), 1) for i in gts}
        return scoring.Scored({"LENGTH-ratio": float(np.mean(list(ratios.values())))},
                              {i: {"LENGTH-ratio": r} for i, r in ratios.items()})

    yield length
    scoring.METRICS.pop("LENGTH")
    del scoring.SCORE_KEYS["LENGTH-ratio"]


def test_a_metric_registered_outside_the_library_reaches_eval_report_and_config(length_ratio, shapes_folder,
                                                                                  tmp_path, capsys):
    from satkit.config import Config

    Config(val_metric="LENGTH-ratio").check()  # a valid val_metric as soon as it is registered
    assert scoring.validation_metrics("LENGTH-ratio") == ("BLEU", "CIDEr", "LENGTH")
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", shapes_folder)
    out = tmp_path / "test.json"
    assert run_eval(ckpt, shapes_folder, out, "--report", str(tmp_path / "report")) == 0, capsys.readouterr().err
    assert "LENGTH-ratio" in capsys.readouterr().out  # eval's table
    metrics = json.loads(out.with_name("test.metrics.json").read_text())
    dataset = CaptionDataset(str(shapes_folder), "test")
    ratios = [len(tokenize(r["caption"])) / max(np.mean([len(tokenize(t)) for t in dataset.references(r["index"])]), 1)
              for r in json.loads(out.read_text())]  # no java here: the ascii rule splits the words
    dataset.close()
    assert metrics["LENGTH-ratio"] == pytest.approx(np.mean(ratios))
    assert "shuffled_LENGTH-ratio" in metrics  # a default metric: in the control too
    page = (tmp_path / "report" / "index.html").read_text()
    corpus = page[page.index("Corpus metrics"):page.index("Does the model use the image?")]
    assert f"<td>LENGTH-ratio</td><td class='num'>{metrics['LENGTH-ratio']:.4f}</td>" in corpus
    assert "<th>CIDEr</th><th>BLEU-4</th><th>LENGTH-ratio</th>" in page  # a per-image column too
    assert len(re.findall(r"<tr><td class='num'>\d+</td>", page)) == 3
