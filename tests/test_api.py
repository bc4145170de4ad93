"""Using a trained model: the Captioner API, torch.hub, caption.py's n-best JSON/CSV, and the overlays."""
from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_caption import GRID, SIZE, WORD_MAP, make_checkpoint, shapes_image

import caption
from satkit import figures
from satkit.captioner import Captioned, Captioner, Skipped, caption_files
from satkit.data.dataset import load_image_tensor
from satkit.decoding import DecodeOptions, beam_search
from satkit.model import load_model
from satkit.infra.runtime import UserError

ROOT = Path(__file__).resolve().parent.parent
REV = {v: k for k, v in WORD_MAP.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """Untrained, <end> banned: every caption has max_len words (tests/test_decoding.py ranks finished ones)."""
    return make_checkpoint(tmp_path_factory.mktemp("api") / "soft.pt")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(3):
        shapes_image(seed=i).save(folder / f"im{i}.png")
        paths.append(folder / f"im{i}.png")
    return paths


# --------------------------------------------------------------------------------------------
# Captioner
# --------------------------------------------------------------------------------------------
def test_captioner_mixes_paths_and_pil_images(ckpt, photos):
    captioner = Captioner.from_checkpoint(ckpt, device="cpu")
    assert captioner.image_size == SIZE  # from the checkpoint
    with Image.open(photos[1]) as opened:
        pil = opened.copy()  # a PIL image with no file name behind it
    results = captioner([photos[0], pil, str(photos[1])], beam_size=4, n_best=3, max_len=8)
    assert [r.source for r in results] == [str(photos[0]), "<image 1>", str(photos[1])]
    assert results[1].best.text == results[2].best.text  # the same picture, as a PIL image or a file
    assert results[1].best.score == pytest.approx(results[2].best.score, abs=1e-5)
    for result in results:
        assert result.image.size == (SIZE, SIZE) and result.image.mode == "RGB"
        assert len(result.captions) == 3 and result.best is result.captions[0]
        assert len({c.text for c in result.captions}) == 3
        keys = [(c.finished, c.normalized_score) for c in result.captions]
        assert keys == sorted(keys, reverse=True)
        for c in result.captions:
            assert c.text == " ".join(c.words) and c.words == [REV[t] for t in c.tokens]
            assert c.alphas.shape == (len(c.words), GRID, GRID)
            assert torch.allclose(c.alphas.sum(dim=(1, 2)), torch.ones(len(c.words)), atol=1e-5)
            assert c.betas is not None and c.betas.shape == (len(c.words),)
            assert -1e3 < c.score <= 0 and len(c.words) == 8 and not c.finished
    assert len({r.best.text for r in results}) == 2  # two different pictures, two different captions


def test_captioner_goes_through_beam_search(ckpt, photos):
    """The API's captions and scores are decoding.beam_search's on the same preprocessed image."""
    captioner = Captioner.from_checkpoint(ckpt)
    result = captioner(photos[2], beam_size=3, n_best=2, max_len=6, length_penalty=0.5)[0]  # one image, no list
    model, _, _ = load_model(ckpt)
    tensor, _ = load_image_tensor(photos[2], SIZE)
    (hyps,) = beam_search(model, tensor[None], WORD_MAP, beam_size=3, max_len=6, length_penalty=0.5, n_best=2,
                          block_trigrams=True)  # the API's default
    assert [c.tokens for c in result.captions] == [h.tokens for h in hyps]
    assert [c.score for c in result.captions] == pytest.approx([h.score for h in hyps], abs=1e-6)
    assert [c.normalized_score for c in result.captions] == pytest.approx([h.normalized_score for h in hyps], abs=1e-6)


def test_captioner_figures(ckpt, photos, tmp_path):
    captioner = Captioner.from_checkpoint(ckpt)
    result = captioner(photos[0], beam_size=2, n_best=2, max_len=5)[0]
    png, gif = captioner.save_figures(result, tmp_path / "x", rank=1, overlay="colormap")
    assert (png, gif) == (tmp_path / "x_attention.png", tmp_path / "x_attention.gif")
    with Image.open(gif) as frames:
        assert frames.n_frames == len(result.captions[1].words) + 1


def test_captioner_rejects_bad_requests(ckpt, tmp_path):
    captioner = Captioner.from_checkpoint(ckpt)
    image = shapes_image()
    with pytest.raises(UserError, match=r"^config n_best=4 must be in 1..beam_size \(3\)$"):
        captioner(image, beam_size=3, n_best=4)
    with pytest.raises(UserError, match=r"^config beam_size=0 must be >= 1$"):
        captioner(image, beam_size=0)
    with pytest.raises(UserError, match=r"^config hard_decode='max' is not one of expected, argmax, sample$"):
        captioner(image, hard_decode="max")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'missing.jpg'}: file not found$"):
        captioner([image, tmp_path / "missing.jpg"])
    with pytest.raises(UserError, match=r"^config image_size=0 must be >= 1$"):
        Captioner.from_checkpoint(ckpt, image_size=0)
    with pytest.raises(UserError, match=r"^config image_size=5000 must be <= 2048$"):
        Captioner.from_checkpoint(ckpt, image_size=5000)


# --------------------------------------------------------------------------------------------
# torch.hub
# --------------------------------------------------------------------------------------------
def test_torch_hub_load_local(ckpt, photos):
    captioner = torch.hub.load(str(ROOT), "show_attend_tell", checkpoint=str(ckpt), source="local", device="cpu")
    assert isinstance(captioner, Captioner)
    via_hub = captioner(photos[0], beam_size=3, max_len=6)[0].best
    direct = Captioner.from_checkpoint(ckpt)(photos[0], beam_size=3, max_len=6)[0].best
    assert via_hub.text == direct.text and via_hub.text
    assert via_hub.score == pytest.approx(direct.score, abs=1e-6)


def test_torch_hub_checkpoint_url_is_cached(ckpt, photos, tmp_path, monkeypatch):
    """A URL is downloaded once into <hub dir>/checkpoints (file:// here: no network), then reused."""
    import hubconf

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    captioner = hubconf.show_attend_tell(ckpt.as_uri())
    cached = hubconf.checkpoint_cache_path(ckpt.as_uri(), ckpt.name)
    assert cached.is_relative_to(tmp_path / "hub" / "checkpoints") and cached.name == ckpt.name
    assert cached.read_bytes() == ckpt.read_bytes()
    assert captioner(photos[0], max_len=4)[0].best.text
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded again"))
    assert hubconf.fetch_checkpoint(ckpt.as_uri()) == cached
    assert hubconf.fetch_checkpoint(str(ckpt)) == ckpt  # a path is used where it is


def test_torch_hub_failed_download_is_one_line(tmp_path, monkeypatch):
    import hubconf

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    url = (tmp_path / "nowhere.pt").as_uri()
    with pytest.raises(UserError, match=rf"^{url}: download failed \(.*No such file"):
        hubconf.fetch_checkpoint(url)
    assert not list((tmp_path / "hub").rglob("nowhere.pt*"))


def test_torch_hub_two_urls_of_one_file_name_are_two_cache_entries(ckpt, tmp_path, monkeypatch):
    """#34 h: two runs' best.pt at two URLs; the second must not be served the first's cached file."""
    import hubconf

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    first, second = tmp_path / "run_a" / "best.pt", tmp_path / "run_b" / "best.pt"
    for path, payload in ((first, ckpt.read_bytes()), (second, b"another run's checkpoint")):
        path.parent.mkdir()
        path.write_bytes(payload)
    cached = [hubconf.fetch_checkpoint(path.as_uri()) for path in (first, second)]
    assert cached[0] != cached[1] and {p.name for p in cached} == {"best.pt"}
    assert cached[0].read_bytes() == first.read_bytes() and cached[1].read_bytes() == second.read_bytes()


def third_party_imports(start: str) -> set[str]:
    """Top-level names of the non-stdlib modules that `start` (a project module) and every project module it
    imports can import, at module level or inside functions (tests/test_structure.py's import reader)."""
    import sys

    from test_structure import MODULES, imported_modules, module_name

    paths = {module_name(p): p for p in MODULES}
    seen, todo, found = set(), [start], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in imported_modules(paths[name]):
            if imported in paths:
                todo.append(imported)
            elif "." not in imported and imported not in {*sys.stdlib_module_names, "satkit", "tools"}:
                found.add(imported)
    return found


def test_hubconf_dependencies_name_every_module_captioning_imports():
    """#34 h: torch.hub checks `dependencies` before the entry point runs; without timm there, a Lite checkpoint
    failed later with a raw ModuleNotFoundError."""
    import hubconf

    needed = third_party_imports("hubconf")
    assert "timm" in needed  # the reader sees the Lite encoder's function-level import
    missing = sorted(needed - set(hubconf.dependencies))
    assert not missing, f"missing from hubconf.dependencies: {missing}"


def test_torch_hub_load_names_a_missing_dependency(ckpt, monkeypatch):
    """torch.hub refuses before the entry point when a listed module is missing (timm stands in for any)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "timm" else real(name, *a, **k))
    with pytest.raises(RuntimeError, match="Missing dependencies: timm"):
        torch.hub.load(str(ROOT), "show_attend_tell", checkpoint=str(ckpt), source="local")


# --------------------------------------------------------------------------------------------
# caption.py --n-best, --json, --csv
# --------------------------------------------------------------------------------------------
def test_json_and_csv_round_trip(ckpt, photos, tmp_path, capsys):
    out_dir, json_path, csv_path = tmp_path / "figs", tmp_path / "res" / "captions.json", tmp_path / "captions.csv"
    code = caption.main(["--img", str(photos[0].parent), "--checkpoint", str(ckpt), "--out-dir", str(out_dir),
                         "--beam-size", "3", "--n-best", "2", "--max-len", "8", "--json", str(json_path),
                         "--csv", str(csv_path)])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(json_path.read_text())
    assert data["decode"] == {"beam_size": 3, "max_len": 8, "length_penalty": 0.0, "hard_decode": "expected",
                              "batch_size": 32, "block_trigrams": True, "n_best": 2}
    assert data["overlay"] == "highlight" and data["checkpoint"] == str(ckpt)
    images = data["images"]
    assert [r["file"] for r in images] == [str(p) for p in photos]
    api = Captioner.from_checkpoint(ckpt)(photos, beam_size=3, n_best=2, max_len=8)
    lines = out.splitlines()
    for record, result in zip(images, api):
        assert [e["rank"] for e in record["n_best"]] == [1, 2]
        assert [e["caption"] for e in record["n_best"]] == [c.text for c in result.captions]
        assert [e["score"] for e in record["n_best"]] == pytest.approx([c.score for c in result.captions], abs=1e-6)
        assert (record["caption"], record["score"], record["finished"]) == (
            record["n_best"][0]["caption"], record["n_best"][0]["score"], record["n_best"][0]["finished"])
        stem = Path(record["file"]).stem
        assert record["attention_png"] == str(out_dir / f"{stem}_attention.png")
        assert record["attention_gif"] == str(out_dir / f"{stem}_attention.gif")
        assert Path(record["attention_png"]).is_file() and Path(record["attention_gif"]).is_file()
        # printed: `path: best`, then the runner-up indented with its log-probability
        at = lines.index(f"{record['file']}: {record['caption']}")
        second = record["n_best"][1]
        assert lines[at + 1] == f"    2. {second['caption']}  (log p = {second['score']:.2f})"
    rows = list(csv.DictReader(csv_path.open(newline="")))
    assert len(rows) == 2 * len(images)
    for row, (record, entry) in zip(rows, [(r, e) for r in images for e in r["n_best"]]):
        assert row["file"] == record["file"] and int(row["rank"]) == entry["rank"]
        assert row["caption"] == entry["caption"] and float(row["score"]) == entry["score"]
        assert float(row["normalized_score"]) == entry["normalized_score"]
        assert row["finished"] == str(entry["finished"]) and row["attention_gif"] == record["attention_gif"]
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["captions.json"]  # no temp file left


def test_n_best_over_beam_size_is_one_error_line(ckpt, photos, tmp_path, capsys):
    code = caption.main(["--img", str(photos[0]), "--checkpoint", str(ckpt), "--beam-size", "2", "--n-best", "3",
                         "--out-dir", str(tmp_path / "o"), "--json", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 1 and err == "error: --n-best=3 must be in 1..--beam-size (2)\n"
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("flags, line", [
    (["--image-size", "0"], "--image-size=0 must be >= 1"),
    (["--image-size", "5000"], "--image-size=5000 must be <= 2048"),
    (["--n-best", "0"], "--n-best=0 must be >= 1"),
])
def test_bad_caption_flags_are_one_error_line_before_any_work(flags, line, photos, tmp_path, capsys):
    """Checked before the checkpoint is read: a missing one is not what gets reported."""
    code = caption.main(["--img", str(photos[0]), "--checkpoint", str(tmp_path / "missing.pt"), *flags,
                         "--out-dir", str(tmp_path / "o")])
    assert code == 1 and capsys.readouterr().err == f"error: {line}\n"
    assert not (tmp_path / "o").exists()


def test_caption_files_skips_bad_files_in_order(ckpt, photos, tmp_path):
    """The library behind caption.py: one outcome per file, a batch's unreadable files first."""
    (tmp_path / "broken.png").write_text("not an image\n")
    (tmp_path / "figs").mkdir()
    paths = [photos[0], tmp_path / "broken.png", photos[1]]
    captioner = Captioner.from_checkpoint(ckpt)
    opts = DecodeOptions(beam_size=2, max_len=3, batch_size=2)
    outcomes = list(caption_files(captioner, paths, tmp_path / "figs", opts, n_best=2))
    assert [type(o) for o in outcomes] == [Skipped, Captioned, Captioned]
    assert outcomes[0].source == str(tmp_path / "broken.png")
    assert outcomes[0].message.startswith(f"{tmp_path / 'broken.png'}: ")
    for outcome, path in zip(outcomes[1:], photos[:2]):
        assert outcome.result.source == str(path) and len(outcome.result.captions) == 2
        assert (outcome.png, outcome.gif) == (tmp_path / "figs" / f"{path.stem}_attention.png",
                                              tmp_path / "figs" / f"{path.stem}_attention.gif")
        assert outcome.png.is_file() and outcome.gif.is_file()
    assert len(list((tmp_path / "figs").iterdir())) == 4


def test_caption_py_is_a_thin_script():
    """caption.py imports library modules only, never another script."""
    tree = ast.parse((ROOT / "caption.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"train", "eval", "create_input_files", "benchmark"}
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert functions == ["get_args_parser", "main", "caption"]


# --------------------------------------------------------------------------------------------
# Overlays: the paper's highlight, one scale per caption, the peak in the title
# --------------------------------------------------------------------------------------------
def bump(peak_cell: tuple[int, int], peak: float, grid: int = GRID) -> torch.Tensor:
    """An alpha (g, g) with `peak` at one cell and the rest spread evenly."""
    alpha = torch.full((grid, grid), (1.0 - peak) / (grid * grid - 1))
    alpha[peak_cell] = peak
    return alpha


def test_highlight_keeps_colours_where_attention_is_high_and_dims_the_rest():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    weight = np.zeros((SIZE, SIZE))
    weight[:16, :16] = 1.0
    out = figures.highlight(image, weight)
    assert np.array_equal(out[:16, :16], image[:16, :16])  # the image's own colours, exactly
    dimmed = np.rint(image[16:].astype(float) * figures.HIGHLIGHT_FLOOR)
    assert np.array_equal(out[16:], dimmed.astype(np.uint8))


def test_nearly_flat_alpha_draws_as_an_even_dimming():
    """Beside a peaked step, a nearly flat one (peak 1.5x uniform) is nearly even, and dim: its weights
    span a few hundredths, where stretching each panel to its own min-max would span 0..1."""
    uniform = 1.0 / (GRID * GRID)
    alphas = torch.stack([bump((1, 1), 0.8), bump((2, 2), 1.5 * uniform)]).numpy()
    weights = figures.attention_weights(alphas, (SIZE, SIZE))
    assert weights.shape == (2, SIZE, SIZE) and weights.max() == pytest.approx(1.0)
    flat = weights[1]
    assert flat.max() - flat.min() < 0.05 and flat.max() < 0.3
    image = np.full((SIZE, SIZE, 3), 200, dtype=np.uint8)
    shaded = figures.highlight(image, flat).astype(int)
    assert shaded.max() - shaded.min() <= 8 and shaded.max() < 200 * 0.5


def test_panels_of_a_caption_share_one_scale():
    """The step with half the peak gets a dimmer highlight than the step with the peak, in the weights
    and in the rendered panels."""
    alphas = torch.stack([bump((1, 2), 0.6), bump((1, 2), 0.3)])
    weights = figures.attention_weights(alphas.numpy(), (SIZE, SIZE))
    assert weights[0].max() == pytest.approx(1.0)
    assert 0.4 < weights[1].max() < 0.6
    white = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    panels = figures.render_panels(figures.AttentionMaps(white, ["red", "circle"], alphas))
    strong, weak = (np.asarray(p.convert("L"), dtype=int) for p in panels[1:])
    assert strong.shape == weak.shape
    assert strong.max() == 255  # the peak keeps the image's own white (the figure's margins are white too)
    # the peak cell's middle: row 1, column 2 of the 4x4 grid, inside the image axes
    h, w = strong.shape
    axes_top = h - 0.02 * h - 0.96 * w  # the image sits at the bottom of a taller panel (title above)
    y, x = int(axes_top + 0.96 * w * 1.5 / GRID), int(0.02 * w + 0.96 * w * 2.5 / GRID)
    assert strong[y, x] > 240 and 100 < weak[y, x] < strong[y, x] - 60, (strong[y, x], weak[y, x])


def test_panel_title_gives_the_peak_against_uniform():
    alpha = torch.full((8, 8), (1 - 0.038) / 63)
    alpha[3, 4] = 0.038
    assert figures.step_title(3, "dog", alpha.numpy(), 0.52) == "3: dog (β=0.52)\npeak 0.038 = 2.4x uniform"
    assert figures.step_title(1, "a", np.full((6, 6), 1 / 36), None) == "1: a\npeak 0.028 = 1.0x uniform"


def test_overlay_flag_colormap(ckpt, photos, tmp_path, capsys):
    figures = {}
    for style in ("highlight", "colormap"):
        assert caption.main(["--img", str(photos[0]), "--checkpoint", str(ckpt), "--max-len", "3",
                             "--overlay", style, "--out-dir", str(tmp_path / style)]) == 0
        with Image.open(tmp_path / style / "im0_attention.png") as png:
            figures[style] = np.asarray(png.convert("RGB"), dtype=int)
    assert figures["highlight"].shape == figures["colormap"].shape
    assert np.abs(figures["highlight"] - figures["colormap"]).mean() > 5
    with pytest.raises(SystemExit):
        caption.get_args_parser().parse_args(["--img", "x", "--checkpoint", "y", "--overlay", "jet"])
