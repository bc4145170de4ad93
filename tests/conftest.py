"""Shared test fixtures: a small packed shapes dataset and image/fixture writers.

Everything is tiny (tens of images, 48 px) so the whole suite stays fast on 2 CPU cores.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `import create_input_files` works however pytest is started
    sys.path.insert(0, str(ROOT))
import omp_env  # noqa: E402,F401  (before any test module loads torch)

FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
SHAPES_ARGS = ["--dataset", "shapes", "--num-images", "36", "--image-size", "48", "--seed", "3", "--workers", "2"]


def pack_main(args: list[str]) -> None:
    """Run create_input_files.main in-process; fail the test (its stderr is in pytest's report) on error."""
    import create_input_files

    rc = create_input_files.main(args)
    assert rc == 0, f"create_input_files {' '.join(args)} returned {rc}"


@pytest.fixture(autouse=True)
def _jvm_only_where_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring in-process without Java (Python tokenisation, no METEOR) unless a test is marked `java`:
    each JVM start costs seconds, and most tests that score are not about coco-caption's Java parts."""
    if request.node.get_closest_marker("java") is None:
        from satkit.evaluation import scoring

        monkeypatch.setattr(scoring, "java_available", lambda: False)


@pytest.fixture
def pack() -> Callable[[list[str]], None]:
    """pack(args): create_input_files.main(args) in-process, asserting success."""
    return pack_main


@pytest.fixture
def flickr8k() -> Path:
    """The shared Flickr8k folder; skips the test when it is not there."""
    if not (FLICKR8K / "dataset_flickr8k.json").is_file() or not (FLICKR8K / "images").is_dir():
        pytest.skip(f"{FLICKR8K} not present")
    return FLICKR8K


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 shapes images at 48 px (train 30, val 3, test 3), seed 3, packed with 2 workers."""
    out = tmp_path_factory.mktemp("shapes") / "packed"
    pack_main(SHAPES_ARGS + ["--output-folder", str(out)])
    return out


def solid_image(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """write_image(path, image=None, **save_kwargs): save a PIL image (default: solid red) creating folders."""

    def write(path: Path, image: Image.Image | None = None, **kwargs: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        (image if image is not None else solid_image()).save(path, **kwargs)
        return path

    return write


def write_checkpoint(path: Path, model: Any, model_cfg: Any, word_map: dict[str, int], **extra: Any) -> Path:
    """An inference checkpoint in today's format (what eval.py and caption.py need), plus `extra` entries."""
    from satkit.checkpoints import build_checkpoint, save_checkpoint

    save_checkpoint(path, build_checkpoint(model, model_cfg, word_map, **extra))
    return path
