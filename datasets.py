"""CaptionDataset: one packed split ({split}.h5 written by create_input_files.py), indexed by image.

Why by image rather than by caption (the tutorial indexes captions): an image is encoded once per
step for all its captions, and val/test need every reference of an image together for BLEU.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from utils import load_word_map

__all__ = ["CaptionDataset", "collate_captions", "normalize_image", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, S, S) -> float, scaled to [0, 1] and ImageNet-normalised: what the encoder sees.

    The one place this happens, for the training data and for caption.py's new images alike.
    """
    return TF.normalize(image.float() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))


REQUIRED_KEYS = ("images", "captions", "caplens", "references", "filenames")
REQUIRED_ATTRS = ("captions_per_image", "max_len", "image_size")


class CaptionDataset(Dataset):
    """Images with all their stored captions; val/test items also carry the raw references.

    Args:
        data_folder: folder written by create_input_files.py (has word_map.json and {split}.h5).
        split: train | val | test.
        transform: optional callable on the uint8 (3, S, S) image tensor, applied before the image is
            scaled to [0, 1] and normalised with the ImageNet mean/std (e.g. a v2 augmentation;
            note that a horizontal flip makes the shapes captions' "left"/"right" false).
        with_references: include every raw reference caption in each item; default: val/test only.

    The HDF5 file is opened lazily, once per process, on first access: h5py handles must not cross
    a fork or be pickled, so DataLoader workers (fork or spawn) each open their own.
    """

    def __init__(self, data_folder: str, split: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 with_references: bool | None = None):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split {split!r} is not one of train, val, test")
        self.path = os.path.join(data_folder, f"{split}.h5")
        if not os.path.isfile(self.path):
            raise ValueError(f"{self.path} not found; run create_input_files.py --output-folder {data_folder} first")
        self.split = split
        self.transform = transform
        self.with_references = split != "train" if with_references is None else with_references
        self.word_map = load_word_map(os.path.join(data_folder, "word_map.json"))
        try:
            with h5py.File(self.path, "r") as h5:
                missing = [k for k in REQUIRED_KEYS if k not in h5] + [a for a in REQUIRED_ATTRS if a not in h5.attrs]
                if missing:
                    raise ValueError(f"{self.path}: lacks {', '.join(missing)}; re-run create_input_files.py")
                self.num_images = h5["images"].shape[0]
                self.captions_per_image = int(h5.attrs["captions_per_image"])
                self.max_len = int(h5.attrs["max_len"])
                self.image_size = int(h5.attrs["image_size"])
                self.has_objects = "objects" in h5
                num_captions = h5["captions"].shape[0]
        except OSError as e:
            raise ValueError(f"{self.path}: not a readable HDF5 file ({e})") from None
        if num_captions != self.num_images * self.captions_per_image:
            raise ValueError(f"{self.path}: {num_captions} captions for {self.num_images} images "
                             f"x {self.captions_per_image} per image")
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():  # a forked worker must not reuse its parent's handle
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_images:
            raise IndexError(f"image index {i} out of range for {self.num_images} images in {self.path}")
        h5, cpi = self._file(), self.captions_per_image
        image = torch.from_numpy(h5["images"][i])  # (3, S, S) uint8
        if self.transform is not None:
            image = self.transform(image)
        image = normalize_image(image)  # (3, S, S) float
        item = {
            "image": image,
            "captions": torch.from_numpy(h5["captions"][i * cpi:(i + 1) * cpi].astype(np.int64)),  # (cpi, T)
            "caplens": torch.from_numpy(h5["caplens"][i * cpi:(i + 1) * cpi].astype(np.int64)),  # (cpi,)
            "index": i,
        }
        if self.with_references:
            item["references"] = self.references(i)
        return item

    def references(self, i: int) -> list[str]:
        """Every raw reference caption of image i (not only the stored captions_per_image)."""
        return json.loads(self._file()["references"].asstr()[i])

    def filename(self, i: int) -> str:
        """Source image path relative to the image folder it was packed from."""
        return self._file()["filenames"].asstr()[i]

    def objects(self, i: int) -> list[dict[str, Any]] | None:
        """Shapes only: [{"color", "shape", "box": [x0, y0, x1, y1] as fractions}] of image i; else None."""
        return json.loads(self._file()["objects"].asstr()[i]) if self.has_objects else None

    def word_objects(self, i: int) -> torch.Tensor | None:
        """Shapes only: (cpi, T) object index named by each caption token of image i (-1: none); else None."""
        if not self.has_objects:
            return None
        cpi = self.captions_per_image
        return torch.from_numpy(self._file()["word_objects"][i * cpi:(i + 1) * cpi].astype(np.int64))

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None


def collate_captions(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate_fn: stacks image (B, 3, S, S), captions (B, cpi, T), caplens (B, cpi),
    index (B,); keeps references (val/test) as a list of B lists of strings."""
    out: dict[str, Any] = {key: torch.stack([b[key] for b in batch]) for key in ("image", "captions", "caplens")}
    out["index"] = torch.tensor([b["index"] for b in batch], dtype=torch.long)
    if "references" in batch[0]:
        out["references"] = [b["references"] for b in batch]
    return out
