"""`make gpu-bundle` and `make gpu-check` keep working between GPU loans (docs/gpu.md): the bundle's layout,
size bound and faithful slim JSON; eval.py scoring BLEU and CIDEr with neither Java, nor the PTB tokenizer,
nor the pycocoevalcap packages the bundle leaves out; and gpu_check.py's dry run end to end."""
from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
from tools import gpu_bundle
from satkit.evaluation import scoring
from conftest import write_checkpoint
from satkit.config import ModelConfig
from satkit.model import build_model
from satkit.data.packing import read_karpathy
from satkit.data.text import load_word_map, tokenize

ROOT = Path(__file__).resolve().parent.parent
COLOURS, ANIMALS, PLACES = ("black", "white", "brown"), ("dog", "cat"), ("grass", "beach", "road")
OUTPUTS = ("summary.md", "results.csv", "tests.csv", "benchmark.csv", "training.csv", "log.txt")


def fake_flickr8k(root: Path, images: int) -> Path:
    """A Flickr8k-like folder: noise JPEGs of 200x180 and a Karpathy JSON (3/5 train, 1/5 val, 1/5 test)
    whose template captions give every word the packer's minimum count; one caption's JSON tokens differ
    from its raw text's, as hand-edited JSON files' sometimes do."""
    folder = root / "flickr8k"
    (folder / "images").mkdir(parents=True)
    entries = []
    for i in range(images):
        name = f"{1000 + i}_fake.jpg"
        noise = np.random.default_rng(i).integers(0, 256, (180, 200, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / "images" / name, quality=90)
        split = "train" if i < images * 3 // 5 else "val" if i < images * 4 // 5 else "test"
        raws = [f"A {COLOURS[(i + c) % 3]} {ANIMALS[(i + c) % 2]} runs on the {PLACES[(i + 2 * c) % 3]} ."
                for c in range(5)]
        sentences = [{"tokens": tokenize(raw), "raw": raw, "imgid": i, "sentid": 5 * i + c}
                     for c, raw in enumerate(raws)]
        if i == 0:
            sentences[0] = {"tokens": ["a", "dogs", "toy"], "raw": "A dog's toy", "imgid": 0, "sentid": 0}
        entries.append({"filepath": "images", "filename": name, "imgid": i, "split": split,
                        "sentids": list(range(5 * i, 5 * i + 5)), "sentences": sentences})
    (folder / "dataset_flickr8k.json").write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    return folder


def load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem + "_from_bundle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundle_holds_the_slim_json_the_images_and_the_scorers(tmp_path):
    source = fake_flickr8k(tmp_path, 10)
    bundle = tmp_path / "bundle"
    assert gpu_bundle.main(["--source", str(source), "--out", str(bundle), "--max-mib", "2"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["images"] == 10 and manifest["jpeg_quality"] == 85 and manifest["image_size"] == 160
    assert sorted(p.name for p in bundle.iterdir()) == ["flickr8k", "manifest.json", "site"]
    images = sorted((bundle / "flickr8k" / "images").iterdir())
    assert len(images) == 10 and all(Image.open(p).size == (178, 160) for p in images)  # shorter side 180 -> 160
    site = bundle / "site" / "pycocoevalcap"
    assert sorted(p.name for p in site.iterdir() if p.is_dir()) == ["bleu", "cider"]  # no METEOR/SPICE jars
    assert (site / "bleu" / "bleu_scorer.py").is_file() and (site / "cider" / "cider_scorer.py").is_file()
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert manifest["bytes"] < total <= 2 * 2**20  # bytes: all but the manifest
    # The slim JSON packs the same captions: tokens kept only where they differ from the raw text's.
    slim = json.loads((bundle / "flickr8k" / "dataset_flickr8k.json").read_text())
    first = slim["images"][0]
    assert set(first) == {"filename", "split", "sentences"}
    assert "tokens" in first["sentences"][0] and "tokens" not in first["sentences"][1]
    ours = read_karpathy(str(bundle / "flickr8k" / "dataset_flickr8k.json"), str(bundle / "flickr8k" / "images"))
    theirs = read_karpathy(str(source / "dataset_flickr8k.json"), str(source / "images"))
    for split in ("train", "val", "test"):
        assert [(r.filename, r.tokens, r.references) for r in ours[split]] == \
               [(r.filename, r.tokens, r.references) for r in theirs[split]]


def test_the_bundles_scorers_are_pycocoevalcaps(tmp_path):
    """The copied BLEU and CIDEr scorers, loaded from the bundle's files, score as the installed ones."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    bundle = tmp_path / "bundle"
    assert gpu_bundle.main(["--source", str(fake_flickr8k(tmp_path, 3)), "--out", str(bundle)]) == 0
    site = bundle / "site" / "pycocoevalcap"
    pairs = [("a dog runs on the grass", ["a dog runs on grass", "the dog is running"]),
             ("a cat sits", ["a cat sits on a mat", "one cat"])]
    for installed, copied in ((BleuScorer, load_file(site / "bleu" / "bleu_scorer.py").BleuScorer),
                              (CiderScorer, load_file(site / "cider" / "cider_scorer.py").CiderScorer)):
        scores = []
        for scorer_class in (installed, copied):
            scorer = scorer_class(n=4)
            for hypothesis, references in pairs:
                scorer += (hypothesis, references)
            scores.append(scorer.compute_score()[0])
        assert np.allclose(scores[0], scores[1])


def test_a_bundle_over_its_bound_is_refused_and_the_old_one_kept(tmp_path, capsys):
    source = fake_flickr8k(tmp_path, 4)
    bundle = tmp_path / "bundle"
    assert gpu_bundle.main(["--source", str(source), "--out", str(bundle)]) == 0
    before = (bundle / "manifest.json").read_text()
    capsys.readouterr()
    assert gpu_bundle.main(["--source", str(source), "--out", str(bundle), "--max-mib", "0.02", "--quality", "85"]) == 1
    assert "over --max-mib 0.02" in capsys.readouterr().err
    assert (bundle / "manifest.json").read_text() == before
    assert not (tmp_path / "bundle.building").exists()
    assert gpu_bundle.main(["--source", str(source), "--out", str(bundle), "--max-mib", "0.001"]) == 1
    assert "would not fit" in capsys.readouterr().err


def test_eval_scores_bleu_and_cider_without_java_ptb_or_the_left_out_scorers(shapes_folder, tmp_path, monkeypatch,
                                                                          capsys):
    """What the GPU machine has: no java (so no PTB tokenizer, no METEOR) and, from pycocoevalcap, only
    the bundle's BLEU and CIDEr."""
    monkeypatch.setattr(scoring, "java_available", lambda: False)
    for package in ("rouge", "meteor", "spice", "tokenizer"):
        prefix = f"pycocoevalcap.{package}"
        for name in [prefix, *(m for m in sys.modules if m.startswith(prefix + "."))]:
            monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    word_map = load_word_map(shapes_folder / "word_map.json")
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=4, attention_dim=16, embed_dim=8,
                      decoder_dim=16, vocab_size=len(word_map))
    torch.manual_seed(0)
    checkpoint = write_checkpoint(tmp_path / "random.pt", build_model(cfg), cfg, word_map, image_size=48)
    argv = ["--checkpoint", str(checkpoint), "--data-folder", str(shapes_folder), "--beam-size", "2", "--max-len",
            "8", "--num-workers", "0", "--out", str(tmp_path / "test.json")]
    assert eval_script.main([*argv, "--metrics-only", "--metric", "BLEU", "--metric", "CIDEr"]) == 0
    metrics = json.loads((tmp_path / "test.metrics.json").read_text())
    assert metrics["scoring_words"] == "ascii" and 0 <= metrics["BLEU-4"] <= 1 and metrics["CIDEr"] >= 0
    assert "shuffled_CIDEr" in metrics and not {"METEOR", "ROUGE-L"} & set(metrics)
    capsys.readouterr()
    assert eval_script.main([*argv, "--metrics-only"]) == 1
    assert capsys.readouterr().err.strip() == "error: --metrics-only needs at least one --metric NAME"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    """Without CUDA: says so first, then tests (all skipped), benchmark --tiny, a tiny Flickr8k pack from
    the bundle, two epochs (the second resumed) and eval: every output file, with sane content."""
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    assert gpu_bundle.main(["--source", str(fake_flickr8k(tmp_path, 40)), "--out", str(bundle)]) == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--bundle", str(bundle), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    seconds = time.monotonic() - start
    log = (out / "log.txt").read_text()[-3000:] if (out / "log.txt").is_file() else ""
    assert done.returncode == 0, done.stdout + done.stderr + log
    assert done.stdout.splitlines()[0].startswith("no CUDA: dry run on the CPU")
    assert all((out / name).is_file() for name in OUTPUTS)
    tests = read_csv(out / "tests.csv")
    assert len(tests) >= 5 and {t["outcome"] for t in tests} == {"skipped"}
    bench = read_csv(out / "benchmark.csv")
    assert any(r["row"].startswith("decode") and float(r["A"]) > 0 for r in bench)
    epochs = read_csv(out / "training.csv")
    assert [e["epoch"] for e in epochs] == ["1", "2"] and float(epochs[-1]["images_per_s_incl_val"]) > 0
    results = {r["measure"]: r for r in read_csv(out / "results.csv")}
    assert 0 <= float(results["test CIDEr"]["value"]) and results["test CIDEr"]["verdict"] == "n/a (dry run)"
    assert 0 <= float(results["test BLEU-4"]["value"]) <= 1
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# gpu_check: DRY RUN") and "| failed" not in summary and "| skipped |" not in summary
    assert "40 Flickr8k images" in summary
    assert seconds < 150, f"the dry run took {seconds:.0f} s (aim: ~90 s)"


def test_the_cuda_rows_are_judged_against_the_targets(tmp_path, capsys):
    """The CUDA mode's parsing, without a GPU: benchmark.py's CUDA rows (names as cuda_rows writes them)
    and an eval result become results.csv's verdicts."""
    import inspect

    from tools import benchmark
    from tools import gpu_check

    source = inspect.getsource(benchmark.cuda_rows)
    assert all(part in source for part in ("cached-feature step", "the same step, fp32", "peak GPU memory"))
    rows = [benchmark.Row("CUDA (H200): cached-feature step, 32 images x 5 captions", "ms/step", "fp32", 30.0, "bf16",
                          20.0),
            benchmark.Row("CUDA (H200): the same step, fp32", "ms/step", "eager", 30.0, "compile_step", 25.0),
            benchmark.Row("CUDA (H200): peak GPU memory of that step (fp32)", "MB", "peak", 900.0, "-", 1.0)]
    benchmark.print_table(rows, "benchmark.py (quick) on cuda")
    check = gpu_check.Check(gpu_check.full_mode("H200", 480.0), tmp_path, tmp_path, tmp_path)
    check.bench_header, check.bench = gpu_check.parse_table(capsys.readouterr().out)
    assert check.bench_header == "benchmark.py (quick) on cuda" and len(check.bench) == 3
    check.tests = [{"test": "a", "outcome": "passed"}, {"test": "b", "outcome": "failed"}]
    check.training = {"epochs": 12, "wall_s": 290.0, "test": {"BLEU-4": 0.15, "CIDEr": 0.35}}
    verdicts = {r["measure"].split(" (")[0].split(",")[0]: (r["value"], r["verdict"])
                for r in gpu_check.results_rows(check)}
    assert verdicts["CUDA tests passed"] == ("1/2", "NOT met")
    assert verdicts["Flickr8k-config step"] == ("20", "met")  # the fastest variant, bf16: 20 <= 21 ms
    assert verdicts["fp32 / bf16 step time"] == ("1.5", "met")
    assert verdicts["eager / compile_step step time"] == ("1.2", "NOT met")  # 30 / 25 < 1.5
    assert verdicts["test CIDEr"] == ("0.35", "met") and verdicts["training epochs"] == ("12", "n/a")


def test_the_cider_to_beat_is_the_cpu_recipe_row():
    """tools.gpu_check.CPU_RECIPE_CIDER is the one place the CPU recipe's figure is written: it equals the
    XE `best.pt` row of configs/flickr8k_cpu.yaml in docs/training.md (test, beam 3), and docs/gpu.md
    names the constant instead of restating a number that goes stale."""
    from tools import gpu_check

    training = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    lines = training[training.index("## From random init: the baseline (configs/flickr8k_cpu.yaml)"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| checkpoint |"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    columns = [cell.strip() for cell in table[0].strip("|").split("|")]
    (xe,) = [line for line in table if line.startswith("| XE `best.pt`")]
    cells = [cell.strip(" *") for cell in xe.strip("|").split("|")]
    assert float(cells[columns.index("CIDEr")]) == gpu_check.CPU_RECIPE_CIDER
    gpu_md = (ROOT / "docs" / "gpu.md").read_text(encoding="utf-8")
    (target,) = [line for line in gpu_md.splitlines() if line.startswith("| the real training's test CIDEr")]
    assert "`tools.gpu_check.CPU_RECIPE_CIDER`" in target and not re.search(r"\d\.\d", target), target


@pytest.mark.parametrize("budget,first_wall,epoch_s,dry,expected", [
    (300, 40, 25, False, 9),  # a resumed start-up costs 15 s: floor((300 - 40 - 15) / 25) = 9, 280 s in all
    (300, 290, 25, False, 0),
    (30, 10, 5, True, 1),  # the dry run always resumes once
])
def test_epochs_after_the_first_fit_the_budget(budget, first_wall, epoch_s, dry, expected):
    from tools import gpu_check

    assert gpu_check.more_epochs(budget, first_wall, epoch_s, dry) == expected
