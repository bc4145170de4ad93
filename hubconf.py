"""torch.hub entry point: load a trained checkpoint as a ready-to-use `captioner.Captioner`.

    import torch
    captioner = torch.hub.load("path/to/this/repo", "show_attend_tell", checkpoint="runs/shapes/best.pt",
                               source="local")
    print(captioner("photo.jpg")[0].best.text)

`checkpoint` is a file path or a URL; a URL is downloaded once into torch's hub cache
(`<hub dir>/checkpoints/satkit/<hash of the URL>/<file name>`) and read from there afterwards. By the URL, not
the file name alone: two runs' `best.pt` at two URLs are two files.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from satkit.captioner import Captioner

# Modules (not pip names) torch.hub checks before calling an entry point: every third-party module the code behind
# it can import (tests/test_api.py checks the list against the imports), timm included: Lite encoders need it.
dependencies = ["torch", "torchvision", "numpy", "PIL", "h5py", "yaml", "skimage", "matplotlib", "timm", "tqdm",
                "nltk", "pycocoevalcap"]


def show_attend_tell(checkpoint: str, device: str = "cpu", check_hash: bool = False, **kwargs: Any) -> Captioner:
    """A Captioner for `checkpoint` (a best.pt / last.pt path, or a URL to one) on `device`.

    check_hash: for URLs named `name-<sha256 prefix>.pt`, verify the download against that prefix.
    Other keyword arguments go to `Captioner.from_checkpoint` (e.g. image_size).
    """
    from satkit.captioner import Captioner

    return Captioner.from_checkpoint(fetch_checkpoint(checkpoint, check_hash), device=device, **kwargs)


def fetch_checkpoint(checkpoint: str, check_hash: bool = False) -> Path:
    """A local path as it is; a URL downloaded into the hub cache unless already there."""
    import torch.hub

    from satkit.infra.runtime import UserError, one_line

    if "://" not in str(checkpoint):
        return Path(checkpoint)
    name = os.path.basename(urlparse(checkpoint).path)
    if not name:
        raise UserError(f"{checkpoint}: the URL names no file")
    cached = checkpoint_cache_path(checkpoint, name)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(name) if check_hash else None  # the file name's hash, not the folder's
        try:
            torch.hub.download_url_to_file(checkpoint, str(cached), match.group(1) if match else None)
        except OSError as e:  # urllib's URLError/HTTPError are OSErrors: no network, 404, refused, ...
            raise UserError(f"{checkpoint}: download failed ({one_line(e)})") from None
    return cached


def checkpoint_cache_path(url: str, name: str) -> Path:
    """Where a URL's download is kept: a folder named by a hash of the whole URL, so that two URLs ending in the
    same file name (every run has a best.pt) never share a cache entry, and the file keeps its own name."""
    import torch.hub

    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(torch.hub.get_dir()) / "checkpoints" / "satkit" / digest / name
