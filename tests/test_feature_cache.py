"""The feature cache (satkit/data/feature_cache.py) after a re-pack and after a killed build: a re-pack of
other pixels under the same captions rebuilds it, and a killed build's temp file does not outlive the next build."""
from __future__ import annotations

import fcntl
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, pack_main
from satkit.config import ModelConfig
from satkit.data.dataset import CaptionDataset, collate_captions
from satkit.data.feature_cache import BUILD_LOCK, CACHE_DIR, ensure_cache
from satkit.encoders import build_encoder
from satkit.infra.runtime import UserError

CFG = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=4)
NAMES = [f"photo{i:02d}.png" for i in range(12)]


def frozen_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder("resnet18", weights="none", stages=2, enc_size=4).eval()


def pack_photos(images: Path, captions: Path, out: Path, seed: int, force: bool = False) -> None:
    """12 noise photos drawn from `seed` under fixed names, packed at 32 px with the same captions file."""
    rng = np.random.default_rng(seed)
    images.mkdir(exist_ok=True)
    for name in NAMES:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / name)
    pack_main(["--dataset", "custom", "--captions-file", str(captions), "--image-folder", str(images),
               "--output-folder", str(out), "--image-size", "32", "--min-word-freq", "1", "--num-workers", "1",
               *(["--force"] if force else [])])


def pixel_features(encoder: torch.nn.Module, folder: Path, split: str) -> torch.Tensor:
    dataset = CaptionDataset(str(folder), split, with_references=False)
    try:
        with torch.no_grad():
            return encoder(collate_captions([dataset[i] for i in range(len(dataset))])["image"])
    finally:
        dataset.close()


def cached(path: Path) -> torch.Tensor:
    with h5py.File(path, "r") as h5:
        return torch.from_numpy(h5["features"][:]).float()


def test_a_repack_of_other_pixels_under_the_same_captions_rebuilds_the_cache(tmp_path, capsys):
    """The same captions file and names, other photos, `--force` into the same folder: dataset.json and the
    split file's size are the same, only the pixels (and their checksums) differ. The cache is rebuilt from
    the new pixels, never served from the old ones; without leave to build it is refused."""
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\n" + "".join(f"{n},a red square on grass\n" for n in NAMES))
    pack = tmp_path / "pack"
    pack_photos(tmp_path / "images", captions, pack, seed=1)
    encoder = frozen_encoder()
    first = ensure_cache(encoder, CFG, pack, "train", build=True)
    torch.testing.assert_close(cached(first), pixel_features(encoder, pack, "train"), rtol=2e-3, atol=2e-3)
    old = cached(first)
    marker, size = (pack / "dataset.json").read_bytes(), (pack / "train.h5").stat().st_size

    pack_photos(tmp_path / "images", captions, pack, seed=2, force=True)
    assert (pack / "dataset.json").read_bytes() == marker and (pack / "train.h5").stat().st_size == size
    capsys.readouterr()
    with pytest.raises(UserError, match="made by another encoder or pack .*images_sha1"):
        ensure_cache(encoder, CFG, pack, "train", build=False)  # eval's auto: decodes from the images instead
    second = ensure_cache(encoder, CFG, pack, "train", build=True)
    assert second == first
    assert "made from an earlier pack" in capsys.readouterr().err
    new_pixels = pixel_features(encoder, pack, "train")
    torch.testing.assert_close(cached(second), new_pixels, rtol=2e-3, atol=2e-3)
    assert not torch.allclose(old, new_pixels, rtol=2e-3, atol=2e-3)
    assert ensure_cache(encoder, CFG, pack, "train", build=False) == second  # now it matches


KILLED_BUILD = """
    import os, signal, sys
    import torch
    from satkit.config import ModelConfig
    from satkit.data import feature_cache
    from satkit.encoders import build_encoder

    def killed(*args):  # after the first batch is written to the temp file
        os.kill(os.getpid(), signal.SIGKILL)

    feature_cache._checked_write = killed
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", weights="none", stages=2, enc_size=4).eval()
    feature_cache.ensure_cache(encoder, ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=4),
                               sys.argv[1], "train", build=True)
"""


def test_a_killed_build_leaves_no_temp_file_after_the_next_build(shapes_folder, tmp_path):
    """A build SIGKILLed mid-write leaves its `.NAME.PID.HEX.tmp`; the next build removes it once no build
    holds the shared lock. While another build is live (its lock held), nothing is removed."""
    import shutil

    pack = Path(shutil.copytree(shapes_folder, tmp_path / "pack", ignore=shutil.ignore_patterns(CACHE_DIR)))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_BUILD), str(pack)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    features = pack / CACHE_DIR
    leftovers = list(features.glob(".*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0 and not list(features.glob("*.h5"))

    live = features / ".val_resnet18_l2_g4_0123abcd.h5.4242.0123abcd.tmp"  # another build's, still writing
    live.write_bytes(b"partial")
    with open(features / BUILD_LOCK, "a") as lock:  # that build's lock (flock: per open file, as in another process)
        fcntl.flock(lock, fcntl.LOCK_SH)
        path = ensure_cache(frozen_encoder(), CFG, pack, "train", build=True)
        assert leftovers[0].exists() and live.exists()  # a build is live: no temp file can be told stale
    assert path.is_file() and path.parent == features
    ensure_cache(frozen_encoder(), CFG, pack, "train", build=True)  # none live now; the cache is already there
    assert not list(features.glob(".*.tmp"))
