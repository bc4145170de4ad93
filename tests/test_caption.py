"""caption.py: image loading for any mode, batched decoding, the attention PNG/GIF, and bad inputs."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_checkpoint
from PIL import Image, ImageSequence

import caption
from satkit import captioner
from satkit.data import dataset as datasets
from satkit import figures
from satkit.checkpoints import save_checkpoint
from satkit.config import ModelConfig
from satkit.data.dataset import load_image_tensor
from satkit.model import build_model

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["a", "red", "blue", "circle", "square", "triangle", "on", "left"]
WORD_MAP = {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
SIZE = 64  # image side stored in the tiny checkpoints
GRID = 4  # enc_size of the tiny models


def make_checkpoint(path: Path, *, attention: str = "soft", end_bias: float = -1e4, seed: int = 0, **extra) -> Path:
    """A tiny untrained checkpoint. <pad>/<start>/<unk> are never emitted, so every token is a printed word;
    end_bias=-1e4 bans <end>, so every caption has exactly max_len words. The context and initial-state
    weights are scaled up so that, untrained, different images still get different captions."""
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=GRID, attention_dim=16, embed_dim=16,
                      decoder_dim=32, attention=attention, vocab_size=len(WORD_MAP), **extra)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        out = model.decoder.L_o if cfg.deep_output else model.decoder.fc
        out.bias[[WORD_MAP["<pad>"], WORD_MAP["<start>"], WORD_MAP["<unk>"]]] = -1e4
        out.bias[WORD_MAP["<end>"]] = end_bias
        model.decoder.init_h.weight *= 5
        if cfg.deep_output:
            model.decoder.L_z.weight *= 5
    return write_checkpoint(path, model, cfg, WORD_MAP, image_size=SIZE)


@pytest.fixture(scope="module")
def soft_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "soft.pt")


@pytest.fixture(scope="module")
def hard_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "hard.pt", attention="hard")


def shapes_image(seed: int = 0, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = caption.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def printed_captions(out: str) -> dict[str, str]:
    """`path: caption` lines -> {path: caption}."""
    lines = [line for line in out.splitlines() if ": " in line and not line.startswith("figures:")]
    return dict(line.rsplit(": ", 1) for line in lines)


def open_gif(path: Path) -> tuple[int, list[int], int | None, list[tuple[int, int]]]:
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        frames = [(frame.info.get("duration"), frame.size) for frame in ImageSequence.Iterator(gif)]
        return gif.n_frames, [d for d, _ in frames], gif.info.get("loop"), [s for _, s in frames]


def open_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as png:
        assert png.format == "PNG"
        png.load()  # fully decodes: a truncated file fails here
        return png.size


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["soft", "hard"])
def test_png_grid_and_gif_frames_match_the_words(which, soft_ckpt, hard_ckpt, tmp_path, capsys):
    ckpt = soft_ckpt if which == "soft" else hard_ckpt
    shapes_image().save(tmp_path / "img.png")
    out_dir = tmp_path / "out"
    max_len = 6
    code, out, err = run(["--img", str(tmp_path / "img.png"), "--checkpoint", str(ckpt), "--out-dir", str(out_dir),
                          "--max-len", str(max_len), "--beam-size", "2"], capsys)
    assert code == 0, err
    words = printed_captions(out)[str(tmp_path / "img.png")].split()
    assert len(words) == max_len  # <end> is banned, so exactly max_len words
    assert all(w in WORDS for w in words)
    # GIF: frame 0 is the plain image, then one frame per word; 800 ms each, looping forever.
    n_frames, durations, loop, sizes = open_gif(out_dir / "img_attention.gif")
    assert n_frames == len(words) + 1
    assert durations == [figures.GIF_FRAME_MS] * n_frames
    assert loop == 0
    # PNG: the same panels tiled GRID_COLUMNS per row.
    panel_w, panel_h = sizes[0]
    columns = min(figures.GRID_COLUMNS, n_frames)
    rows = -(-n_frames // columns)
    assert open_png(out_dir / "img_attention.png") == (columns * panel_w, rows * panel_h)
    assert sorted(p.name for p in out_dir.iterdir()) == ["img_attention.gif", "img_attention.png"]  # no temp files


def test_frames_follow_a_caption_that_ends_by_itself(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ends.pt", end_bias=2.0, seed=1)
    for i in range(3):
        shapes_image(seed=i).save(tmp_path / f"im{i}.png")
    code, out, err = run(["--img", str(tmp_path / "im*.png"), "--checkpoint", str(ckpt), "--out-dir",
                          str(tmp_path / "out"), "--max-len", "12"], capsys)
    assert code == 0, err
    captions = printed_captions(out)
    assert len(captions) == 3
    assert any(len(c.split()) < 12 for c in captions.values())  # some caption really finished early
    for path, text in captions.items():
        n_frames, *_ = open_gif(tmp_path / "out" / f"{Path(path).stem}_attention.gif")
        assert n_frames == len(text.split()) + 1


def test_png_and_gif_come_from_the_same_panels(tmp_path):
    maps = figures.AttentionMaps(shapes_image().resize((SIZE, SIZE)), ["a", "red", "circle"],
                                 torch.softmax(torch.randn(3, GRID * GRID), 1).view(3, GRID, GRID), torch.rand(3))
    panels = figures.render_panels(maps)
    assert len(panels) == 4 and len({p.size for p in panels}) == 1
    figures.save_attention_png(tmp_path / "x.png", panels)
    figures.save_attention_gif(tmp_path / "x.gif", panels)
    with Image.open(tmp_path / "x.png") as png:
        grid = np.asarray(png.convert("RGB"))
    w, h = panels[0].size
    for i, panel in enumerate(panels):  # the grid holds the panels exactly (PNG is lossless)
        assert np.array_equal(grid[:h, i * w : (i + 1) * w], np.asarray(panel))
    with Image.open(tmp_path / "x.gif") as gif:
        frames = [np.asarray(f.convert("RGB"), dtype=int) for f in ImageSequence.Iterator(gif)]
    assert len(frames) == len(panels)
    for i, frame in enumerate(frames):  # GIF frames are the panels up to the 256-colour palette
        distances = [np.abs(frame - np.asarray(panel, dtype=int)).mean() for panel in panels]
        assert int(np.argmin(distances)) == i and distances[i] < 15, (i, distances)  # octree palette: ~10


def test_stochastic_attention_outlines_the_argmax_cell():
    alphas = torch.full((1, GRID, GRID), 0.1 / (GRID * GRID - 1))
    alphas[0, 0, GRID - 1] = 0.9  # peak in the top-right cell
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    soft = figures.render_panels(figures.AttentionMaps(image, ["circle"], alphas))[1]
    outlined = figures.render_panels(figures.AttentionMaps(image, ["circle"], alphas, stochastic=True))[1]
    diff = np.abs(np.asarray(soft, dtype=int) - np.asarray(outlined, dtype=int)).sum(axis=2) > 30  # (H, W)
    ys, xs = np.nonzero(diff)
    assert len(xs) > 20  # an outline was drawn
    h, w = diff.shape
    assert xs.min() > w / 2 and ys.max() < h / 2  # ... only around the top-right cell


def test_smoothed_attention_keeps_the_peak_where_alpha_peaks():
    alpha = np.zeros((GRID, GRID))
    alpha[2, 1] = 1.0
    heat = figures.smooth_attention(alpha, (SIZE, SIZE))
    assert heat.shape == (SIZE, SIZE)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    cell = SIZE // GRID
    assert 2 * cell <= y < 3 * cell and 1 * cell <= x < 2 * cell


# --------------------------------------------------------------------------------------------
# Images: any mode, real photos, EXIF orientation
# --------------------------------------------------------------------------------------------
def test_real_photos_any_mode(soft_ckpt, tmp_path, capsys):
    from skimage import data  # sample photos shipped inside scikit-image (no download)

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg", quality=90)
    Image.fromarray(data.chelsea()).convert("L").save(folder / "chelsea_grey.png")
    coffee = Image.fromarray(data.coffee()).convert("RGBA")
    coffee.putalpha(128)
    coffee.save(folder / "coffee_rgba.png")
    Image.fromarray(data.chelsea()).convert("CMYK").save(folder / "chelsea_cmyk.jpg")
    Image.fromarray(data.coffee()).convert("P").save(folder / "coffee.gif")
    code, out, err = run(["--img", str(folder), "--checkpoint", str(soft_ckpt), "--out-dir", str(tmp_path / "out"),
                          "--max-len", "4", "--beam-size", "3"], capsys)
    assert code == 0, err
    assert "error" not in err
    names = ["astronaut.jpg", "chelsea_cmyk.jpg", "chelsea_grey.png", "coffee.gif", "coffee_rgba.png"]
    assert list(printed_captions(out)) == [str(folder / n) for n in names]  # sorted folder order
    for name in names:
        stem = Path(name).stem
        assert open_png(tmp_path / "out" / f"{stem}_attention.png")[0] > 0
        assert open_gif(tmp_path / "out" / f"{stem}_attention.gif")[0] == 5


def test_load_image_modes(tmp_path):
    cases = {
        "grey.png": Image.new("L", (30, 20), 100),
        "rgba.png": Image.new("RGBA", (30, 20), (255, 0, 0, 0)),  # fully transparent -> white
        "p_transparent.png": _transparent_palette_image(),
        "sixteen.tif": Image.fromarray(np.full((20, 30), 32896, dtype=np.uint16)),  # 32896 / 257 = 128
        "cmyk.jpg": Image.new("CMYK", (30, 20), (0, 255, 255, 0)),  # red
        "one_bit.png": Image.new("1", (30, 20), 1),
    }
    expected = {"grey.png": (100, 100, 100), "rgba.png": (255, 255, 255), "p_transparent.png": (255, 255, 255),
                "sixteen.tif": (128, 128, 128), "one_bit.png": (255, 255, 255)}
    for name, image in cases.items():
        image.save(tmp_path / name)
        tensor, display = load_image_tensor(tmp_path / name, 16)
        assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32, name
        assert display.mode == "RGB" and display.size == (16, 16), name
        pixel = display.getpixel((8, 8))
        if name in expected:
            assert pixel == expected[name], (name, pixel)
        if name == "cmyk.jpg":
            assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60, pixel
        # ToTensor + ImageNet normalisation of exactly the display pixels
        mean, std = torch.tensor(datasets.IMAGENET_MEAN), torch.tensor(datasets.IMAGENET_STD)
        raw = torch.from_numpy(np.array(display)).permute(2, 0, 1).float() / 255
        assert torch.allclose(tensor, (raw - mean[:, None, None]) / std[:, None, None], atol=1e-6), name


def _transparent_palette_image() -> Image.Image:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.info["transparency"] = 1
    return image


def test_load_image_honours_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # stored: red left half, blue right half
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    _, display = load_image_tensor(tmp_path / "rotated.jpg", 32)
    top, bottom = display.getpixel((16, 4)), display.getpixel((16, 28))
    assert top[0] > 200 and top[2] < 60  # red is on top once rotated clockwise
    assert bottom[2] > 200 and bottom[0] < 60


def test_load_image_matches_the_packed_training_images(tmp_path):
    from skimage import data

    from satkit.data.dataset import load_image

    images = {"photo.jpg": Image.fromarray(data.astronaut()),
              "rgba.png": Image.fromarray(data.coffee()).convert("RGBA"),
              "sixteen.png": Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))}
    for name, image in images.items():
        image.save(tmp_path / name)
        _, display = load_image_tensor(tmp_path / name, 40)
        packed = load_image(str(tmp_path / name), 40)  # (3, S, S) uint8, what create_input_files stores
        assert np.array_equal(np.asarray(display).transpose(2, 0, 1), packed), name


# --------------------------------------------------------------------------------------------
# Inputs: folders, patterns, duplicates, batching
# --------------------------------------------------------------------------------------------
def test_collect_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("a/z.JPG", "a/y.png", "a/notes.txt", "b/z.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "deep.png").write_bytes(b"x")
    paths, bad = captioner.collect_images([
        str(tmp_path / "a"), str(tmp_path / "b" / "*.webp"), str(tmp_path / "a" / "y.png"),
        str(tmp_path / "empty"), str(tmp_path / "nothing*.png"), str(tmp_path / "missing.jpg"),
    ])
    # folder: sorted, image extensions only (any case), not recursive; a repeated path is kept once
    assert paths == [tmp_path / "a" / "y.png", tmp_path / "a" / "z.JPG", tmp_path / "b" / "z.webp"]
    assert [source for source, _ in bad] == [str(tmp_path / "empty"), str(tmp_path / "nothing*.png"),
                                             str(tmp_path / "missing.jpg")]
    assert captioner.output_names(paths) == ["y", "z", "z_1"]
    assert captioner.output_names([Path("x/z_1.png"), Path("z.png"), Path("y/z.png")]) == ["z_1", "z", "z_2"]


def test_duplicate_stems_get_distinct_figures(soft_ckpt, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shapes_image().save(tmp_path / folder / "cat.png")
    code, _, err = run(["--img", str(tmp_path / "a"), str(tmp_path / "b"), "--checkpoint", str(soft_ckpt),
                        "--out-dir", str(tmp_path / "out"), "--max-len", "3"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cat_1_attention.gif", "cat_1_attention.png", "cat_attention.gif", "cat_attention.png"]


def test_images_are_decoded_in_batches(soft_ckpt, tmp_path, capsys, monkeypatch):
    from satkit import decoding

    calls = []
    real = decoding.beam_search

    def counting(model, images, *args, **kwargs):
        calls.append(images.shape[0])
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(decoding, "beam_search", counting)
    for i in range(5):
        shapes_image(seed=i).save(tmp_path / f"im{i}.png")
    code, out, err = run(["--img", str(tmp_path), "--checkpoint", str(soft_ckpt), "--out-dir", str(tmp_path / "out"),
                          "--max-len", "3", "--batch-size", "2"], capsys)
    assert code == 0, err
    assert calls == [2, 2, 1]
    assert len(printed_captions(out)) == 5


def test_decode_images_batched_equals_one_by_one(soft_ckpt):
    from satkit.checkpoints import load_checkpoint
    from satkit.decoding import DecodeOptions, decode_images
    from satkit.model import model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(soft_ckpt))
    torch.manual_seed(0)
    shift = torch.linspace(-2, 2, 5)[:, None, None, None] * torch.tensor([1.0, -1.0, 0.5])[None, :, None, None]
    images = torch.randn(5, 3, SIZE, SIZE) + shift  # (5, 3, S, S), images that differ in colour
    batched = decode_images(model, images, WORD_MAP, DecodeOptions(beam_size=3, max_len=5, batch_size=4))
    single = [decode_images(model, images[i : i + 1], WORD_MAP, DecodeOptions(beam_size=3, max_len=5))[0]
              for i in range(5)]
    assert [h.tokens for (h,) in batched] == [h.tokens for (h,) in single]
    assert len({tuple(h.tokens) for (h,) in batched}) > 1  # different images, different captions


def test_show_without_display_warns_and_continues(soft_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(caption, "show_grids", lambda *a: pytest.fail("tried to open a window"))
    shapes_image().save(tmp_path / "img.png")
    code, out, err = run(["--img", str(tmp_path / "img.png"), "--checkpoint", str(soft_ckpt), "--out-dir",
                          str(tmp_path / "out"), "--max-len", "3", "--show"], capsys)
    assert code == 0
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        "warning: --show: no display available; the figures are only saved"]
    assert (tmp_path / "out" / "img_attention.gif").is_file()


def test_import_has_no_side_effects():
    code = "import sys, caption; print('matplotlib' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------
# Bad inputs: one `error:` line each, no traceback, nothing half-written
# --------------------------------------------------------------------------------------------
def _bad_files(folder: Path) -> list[Path]:
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    buffer = io.BytesIO()
    shapes_image(size=64).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return [folder / "empty.jpg", folder / "text.png", folder / "truncated.jpg"]


def test_folder_with_bad_files_captions_the_good_one(soft_ckpt, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shapes_image().save(folder / "good.png")
    bad = _bad_files(folder)
    out_dir = tmp_path / "out"
    code, out, err = run(["--img", str(folder), "--checkpoint", str(soft_ckpt), "--out-dir", str(out_dir),
                          "--max-len", "3"], capsys)
    assert code == 0
    assert list(printed_captions(out)) == [str(folder / "good.png")]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3
    for path, line in zip(sorted(bad), errors):
        assert line.startswith(f"error: {path}: ")
    assert "skipped 3 bad image(s)" in err.splitlines()
    assert "Traceback" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["good_attention.gif", "good_attention.png"]


def test_only_bad_images_exit_1_and_write_nothing(soft_ckpt, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    _bad_files(folder)
    out_dir = tmp_path / "out"
    code, out, err = run(["--img", str(folder), "--checkpoint", str(soft_ckpt), "--out-dir", str(out_dir)], capsys)
    assert code == 1
    assert out == ""
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 3
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize("what", ["missing file", "empty folder", "pattern"])
def test_inputs_that_match_nothing(what, soft_ckpt, tmp_path, capsys):
    target = {"missing file": tmp_path / "nope.jpg", "empty folder": tmp_path, "pattern": tmp_path / "*.png"}[what]
    code, out, err = run(["--img", str(target), "--checkpoint", str(soft_ckpt), "--out-dir", str(tmp_path / "o")],
                         capsys)
    assert code == 1
    assert out == ""
    assert err.splitlines()[0].startswith(f"error: {target}: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"\x00\xff" * 500 + bytes(range(256)), b"model: not really\n", "module"])
def test_corrupt_checkpoint_is_one_error_line(content, tmp_path, capsys):
    ckpt = tmp_path / "bad.pt"
    if content == "module":  # a pickled module, which weights-only loading refuses
        torch.save(torch.nn.Linear(2, 2), ckpt)
    else:
        ckpt.write_bytes(content)
    shapes_image().save(tmp_path / "img.png")
    code, out, err = run(["--img", str(tmp_path / "img.png"), "--checkpoint", str(ckpt), "--out-dir",
                          str(tmp_path / "out")], capsys)
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(ckpt) in lines[0], err
    assert not (tmp_path / "out").exists()


def test_checkpoint_whose_weights_do_not_match_its_config(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "ok.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["decoder_dim"] = 48
    save_checkpoint(path, ckpt)
    shapes_image().save(tmp_path / "img.png")
    code, _, err = run(["--img", str(tmp_path / "img.png"), "--checkpoint", str(path)], capsys)
    assert code == 1
    assert err.startswith(f"error: {path}: ") and len(err.strip().splitlines()) == 1, err


def test_a_failed_write_leaves_no_file(soft_ckpt, tmp_path, capsys, monkeypatch):
    def disk_full(f):
        raise OSError(28, "No space left on device")

    # The PNG is staged, the GIF fails.
    monkeypatch.setattr(captioner, "gif_writer", lambda panels, frame_ms=0: disk_full)
    shapes_image().save(tmp_path / "img.png")
    out_dir = tmp_path / "out"
    code, out, err = run(["--img", str(tmp_path / "img.png"), "--checkpoint", str(soft_ckpt), "--out-dir",
                          str(out_dir), "--max-len", "3"], capsys)
    assert code == 1
    assert out == ""
    assert err.splitlines()[0].startswith(f"error: {tmp_path / 'img.png'}: cannot write")
    assert list(out_dir.iterdir()) == []  # no PNG without its GIF


def test_atomic_write_never_leaves_a_partial_file(tmp_path):
    """filesafety.atomic_write is the one writer behind figures, checkpoints and JSON."""
    from satkit.infra.filesafety import atomic_write

    def write_then_fail(f):
        f.write(b"\x89PNG half")
        raise OSError("disk full")

    (tmp_path / "x.png").write_bytes(b"old figure")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "x.png", write_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left behind
    assert (tmp_path / "x.png").read_bytes() == b"old figure"  # the previous figure is intact


def test_show_with_a_display_opens_the_grids(soft_ckpt, tmp_path, capsys, monkeypatch):
    shown = []
    monkeypatch.setattr(caption, "display_available", lambda: True)
    monkeypatch.setattr(caption, "show_grids", lambda grids: shown.extend(grids))
    shapes_image().save(tmp_path / "img.png")
    code, out, err = run(["--img", str(tmp_path / "img.png"), "--checkpoint", str(soft_ckpt), "--out-dir",
                          str(tmp_path / "out"), "--max-len", "3", "--show"], capsys)
    assert code == 0 and "warning" not in err
    assert len(shown) == 1
    text, png = shown[0]
    assert text == out.splitlines()[0] and png == tmp_path / "out" / "img_attention.png"
