"""Annotation vectors of a frozen encoder, computed once per image and stored beside the packed split.

A frozen encoder gives the same a (L, D) for an image every epoch, so running the CNN each step is
wasted work: the cache stores them as float16 in
`<data_folder>/features/<split>_<encoder>_l<stages>_g<grid>_<weights hash>.h5` (one HDF5 chunk per image, so
reading an image reads one chunk). The name carries a short hash of the encoder's weights, so two frozen
encoders of one architecture (ImageNet vs random init, or two seeds) cache side by side on one pack. The
file also records what made it (the encoder, the full hash, the grid, the image size, the packed data's
identity, which includes the per-image checksums packing stores): a cache made from an earlier pack of the
folder (a re-pack, even of other pixels under the same captions) is rebuilt by a run that may build it and
not used otherwise; one made by another encoder under this name is refused with a line saying what differs.

A build killed part-way leaves its temp file (`.NAME.PID.HEX.tmp`, as large as the cache: 0.75-3.3 GB for
Flickr8k). The next build removes such files once no other build is live (`remove_killed_builds`): every
build holds a shared lock on `features/.build.lock` while its temp file exists.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from satkit.config import ModelConfig
from satkit.data.dataset import CaptionDataset, collate_captions
from satkit.infra.filesafety import atomic_path, remove_stale_temporaries, staged_h5
from satkit.infra.progress import progress_bar
from satkit.infra.runtime import UserError, one_line

__all__ = ["cache_path", "weights_hash", "cache_identity", "check_cache", "build_cache", "ensure_cache",
           "remove_killed_builds"]

CACHE_DIR = "features"
CACHE_FORMAT = 1
BUILD_LOCK = ".build.lock"  # in CACHE_DIR: shared while a build's temp file exists (remove_killed_builds)
# Identity fields that only the pack decides: a cache differing in these alone is stale, and is rebuilt.
PACK_FIELDS = frozenset({"format", "image_size", "pack_sha1", "images_sha1"})


def cache_path(data_folder: str | os.PathLike[str], split: str, cfg: ModelConfig, weights_sha1: str) -> Path:
    """Where the cache of `split` for this encoder lives: one file per encoder, depth, grid and weights."""
    name = f"{split}_{cfg.encoder}_l{cfg.encoder_stages}_g{cfg.enc_size}_{weights_sha1[:8]}.h5"
    return Path(data_folder) / CACHE_DIR / name


def weights_hash(encoder: torch.nn.Module) -> str:
    """The encoder's weights and BatchNorm statistics, in state_dict order: what the features depend on."""
    digest = hashlib.sha1()
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _pack_identity(data_folder: str | os.PathLike[str], split: str) -> str:
    """The pack's dataset.json (written last by packing.py) and the split file's size."""
    marker = Path(data_folder) / "dataset.json"
    digest = hashlib.sha1(marker.read_bytes() if marker.is_file() else b"")
    digest.update(str(os.path.getsize(Path(data_folder) / f"{split}.h5")).encode())
    return digest.hexdigest()[:16]


def _images_identity(data_folder: str | os.PathLike[str], split: str) -> str:
    """The split's pixels, through the per-image checksums packing stores (CRC32 of each image): a re-pack of
    other photos under the same captions keeps dataset.json and the file's size, not these. A pack made
    before checksums has only its file's modification time (a copy of it then rebuilds its caches)."""
    path = Path(data_folder) / f"{split}.h5"
    with h5py.File(path, "r") as h5:
        if "checksums" in h5:
            checksums = np.ascontiguousarray(h5["checksums"][()], dtype="<u4")
            return hashlib.sha1(checksums.tobytes()).hexdigest()[:16]
    return f"mtime {os.stat(path).st_mtime_ns}"


def cache_identity(encoder: torch.nn.Module, cfg: ModelConfig, data_folder: str | os.PathLike[str], split: str,
                   image_size: int) -> dict[str, Any]:
    """What the cached features of `split` depend on; stored in the cache and compared when it is read."""
    return {
        "format": CACHE_FORMAT,
        "encoder": cfg.encoder,
        "encoder_stages": cfg.encoder_stages,
        "enc_size": cfg.enc_size,
        "encoder_weights_sha1": weights_hash(encoder),
        "image_size": image_size,
        "pack_sha1": _pack_identity(data_folder, split),
        "images_sha1": _images_identity(data_folder, split),
    }


def _differences(path: str | os.PathLike[str], identity: dict[str, Any]) -> dict[str, str]:
    """The fields in which the cache at `path` differs from `identity` ("features" if it holds none)."""
    try:
        with h5py.File(path, "r") as h5:
            stored = json.loads(h5.attrs.get("identity", "{}"))
            shape = h5["features"].shape if "features" in h5 else None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable feature cache ({one_line(e)}); delete it to rebuild") from None
    differs = {key: f"{key} {stored.get(key)!r} != {value!r}" for key, value in identity.items()
               if stored.get(key) != value}
    return differs if shape is not None else {**differs, "features": "no features"}


def check_cache(path: str | os.PathLike[str], identity: dict[str, Any]) -> None:
    """Raise a UserError naming every field in which the cache at `path` differs from `identity`."""
    differs = _differences(path, identity)
    if differs:
        raise UserError(f"{path}: made by another encoder or pack ({'; '.join(differs.values())}); "
                        "delete it to rebuild, or set feature_cache=off")


@contextmanager
def _live_build(folder: Path) -> Iterator[None]:
    """A shared lock on folder/BUILD_LOCK for as long as this build's temp file exists: while any build holds
    it, remove_killed_builds removes nothing. The kernel drops it when the process dies, however it dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / BUILD_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)  # waits only while a cleaner holds it exclusively (a glob and unlinks)
        yield


def remove_killed_builds(folder: str | os.PathLike[str]) -> None:
    """Delete the temp files of cache builds that were killed, when no build is live in `folder` (the
    exclusive lock is free); with a live build, leave everything to the next build."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    try:
        handle = open(folder / BUILD_LOCK, "a")
    except OSError:  # a read-only pack: nothing was built there to clean up after
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        remove_stale_temporaries(folder)


def build_cache(
    encoder: torch.nn.Module,
    data_folder: str | os.PathLike[str],
    split: str,
    identity: dict[str, Any],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
) -> Path:
    """Run the frozen encoder once over every image of `split`; write the cache atomically.

    Written through filesafety.staged_h5 under a temp name: a full disk raises UserError naming the cache
    and leaves no file under its name (the temp file is deleted), as packing does for the split files. A kill
    leaves the temp file, under the shared build lock that lets the next build remove it."""
    cfg = ModelConfig(encoder=identity["encoder"], encoder_stages=identity["encoder_stages"],
                      enc_size=identity["enc_size"])
    path = cache_path(data_folder, split, cfg, identity["encoder_weights_sha1"])
    dataset = CaptionDataset(str(data_folder), split, with_references=False)
    # Its own generator: iterating a loader draws a seed from the global RNG otherwise, and a run would then
    # train differently depending on whether the cache was already there (resume would not be exact).
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_captions,
                        generator=torch.Generator())
    was_training = encoder.training
    encoder.eval()
    in_body = False  # an OSError outside the body is the cache's (temp file, fsync, rename); inside, the pack's
    try:
        with _live_build(path.parent), atomic_path(path) as tmp, staged_h5(tmp, "w") as (h5, check_written):
            in_body = True
            _write_features(h5, lambda: _checked_write(check_written, path), encoder, loader, device, split)
            h5.attrs["identity"] = json.dumps(identity, sort_keys=True)
            in_body = False
    except OSError as e:
        if in_body:
            raise
        raise _cannot_write(path, e) from e
    finally:
        dataset.close()
        encoder.train(was_training)
    return path


@torch.no_grad()
def _write_features(h5: h5py.File, check_written: Callable[[], None], encoder: torch.nn.Module, loader: DataLoader,
                    device: torch.device | str, split: str) -> None:
    """The encoder's annotations of every image of the loader into h5["features"], a batch at a time."""
    features = None
    for batch in progress_bar(loader, desc=f"cache {split} features"):
        a = encoder(batch["image"].to(device, non_blocking=True)).cpu().numpy().astype(np.float16)
        if features is None:  # (N, L, D), one chunk per image
            features = h5.create_dataset("features", (len(loader.dataset), *a.shape[1:]), dtype=np.float16,
                                         chunks=(1, *a.shape[1:]))
        first = int(batch["index"][0])
        features[first : first + len(a)] = a
        check_written()  # a full disk stops the build here, not after every image is encoded


def _checked_write(check_written: Callable[[], None], path: Path) -> None:
    try:
        check_written()
    except OSError as e:
        raise _cannot_write(path, e) from e


def _cannot_write(path: Path, e: OSError) -> UserError:
    return UserError(f"{path}: cannot write the feature cache ({e.strerror or one_line(e)})")


def ensure_cache(
    encoder: torch.nn.Module,
    cfg: ModelConfig,
    data_folder: str | os.PathLike[str],
    split: str,
    *,
    build: bool,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> Path | None:
    """The checked cache of `split` for this encoder: built when missing and `build`; None when missing
    and not `build`. One made from an earlier pack of the folder (it differs in PACK_FIELDS alone) is rebuilt
    when `build`; any other mismatch, or a stale cache without `build`, is refused (UserError)."""
    with h5py.File(Path(data_folder) / f"{split}.h5", "r") as h5:
        image_size = int(h5.attrs["image_size"])
    identity = cache_identity(encoder, cfg, data_folder, split, image_size)
    path = cache_path(data_folder, split, cfg, identity["encoder_weights_sha1"])
    if build:
        remove_killed_builds(path.parent)
    if not path.exists() and not build:
        return None
    if path.exists():
        differs = _differences(path, identity)
        if not differs:
            return path
        if not (build and differs.keys() <= PACK_FIELDS):
            check_cache(path, identity)
        print(f"note: {path}: made from an earlier pack of {data_folder} ({', '.join(differs)} differ): rebuilding",
              file=sys.stderr)
    return build_cache(encoder, data_folder, split, identity, device=device, num_workers=num_workers)
