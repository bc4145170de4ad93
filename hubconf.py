"""torch.hub entry point: load a trained checkpoint as a ready-to-use `captioner.Captioner`.

    import torch
    captioner = torch.hub.load("path/to/this/repo", "show_attend_tell", checkpoint="runs/shapes/best.pt",
                               source="local")
    print(captioner("photo.jpg")[0].best.text)

`checkpoint` is a file path or a URL; a URL is downloaded once into torch's hub cache
(`<hub dir>/checkpoints/`, as torch.hub.load_state_dict_from_url does) and read from there afterwards.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from satkit.captioner import Captioner

# Modules (not pip names) torch.hub checks before calling an entry point: what captioning and its figures import.
dependencies = ["torch", "torchvision", "numpy", "PIL", "h5py", "yaml", "skimage", "matplotlib"]


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
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(name) if check_hash else None
        try:
            torch.hub.download_url_to_file(checkpoint, str(cached), match.group(1) if match else None)
        except OSError as e:  # urllib's URLError/HTTPError are OSErrors: no network, 404, refused, ...
            raise UserError(f"{checkpoint}: download failed ({one_line(e)})") from None
    return cached
