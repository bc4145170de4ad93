"""CaptionDataset: one packed split ({split}.h5 written by packing.py), indexed by image;
and the one image preprocessing path (`load_image`, `load_image_bytes`, `normalize_image`) that
packing, training and caption.py all share.

Why by image rather than by caption (the tutorial indexes captions): an image is encoded once per
step for all its captions, and val/test need every reference of an image together for BLEU.
"""
from __future__ import annotations

import io
import json
import os
import warnings
import zlib
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from satkit.infra.runtime import UserError, one_line
from satkit.data.text import load_word_map

__all__ = ["CaptionDataset", "changed_images", "check_packed", "collate_captions", "image_array", "image_checksum",
           "load_image", "load_image_bytes", "load_image_tensor", "normalize_image", "verify_pack", "IMAGENET_MEAN",
           "IMAGENET_STD", "SPLITS"]

SPLITS = ("train", "val", "test")  # the packed files {split}.h5

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, S, S) -> float, scaled to [0, 1] and ImageNet-normalised: what the encoder sees.

    The one place this happens, for the training data and for caption.py's new images alike.
    """
    return TF.normalize(image.float() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16/32-bit grey is scaled, not clipped."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float64)
        # PIL's own convert clips these to 255; values above 255 mean a 16-bit range (0..65535).
        if image.mode.startswith("I;16") or grey.max(initial=0) > 255:
            grey = grey / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str], image_size: int) -> np.ndarray:
    """Decode one image file to a (3, S, S) uint8 RGB array, S = image_size; UserError `PATH: reason` if it fails.

    Honours the EXIF orientation, converts any mode to RGB (transparency on white, 16-bit grey
    scaled) and stretches to S x S with bilinear filtering (antialiased when shrinking), as the
    tutorial does. Images over PIL's decompression-bomb limit fail at open time, before any pixel
    is decoded. The one image loader: packing.py packs with it, caption.py reads with it.
    """
    try:
        if os.path.getsize(path) == 0:
            raise UserError(f"{path}: empty file")
    except OSError:
        raise UserError(f"{path}: file not found") from None
    return _decode_image(path, image_size, str(path))


def load_image_bytes(data: bytes, image_size: int, name: str) -> np.ndarray:
    """`load_image` for an encoded image in memory (JPEG, PNG, ...: a WebDataset shard's member): the same
    pixels as the same bytes read from a file, and the same errors, as `NAME: reason`."""
    if not data:
        raise UserError(f"{name}: empty file")
    return _decode_image(io.BytesIO(data), image_size, name)


def _decode_image(source: str | os.PathLike[str] | io.BytesIO, image_size: int, name: str) -> np.ndarray:
    """Open, decode and prepare (`image_array`) one image; every failure is UserError `NAME: reason`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()
                return image_array(image, image_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{name}: image too large, over PIL's decompression-bomb limit ({e})") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image file PIL can read") from None
    except Exception as e:  # PIL's decoders raise anything: truncated data, broken EXIF, exotic modes, ...
        message = one_line(e)
        if "truncated" in message.lower():
            raise UserError(f"{name}: truncated image file") from None
        raise UserError(f"{name}: cannot decode image ({message})") from None


def image_array(image: Image.Image, image_size: int) -> np.ndarray:
    """An opened PIL image -> (3, S, S) uint8 RGB, the way `load_image` prepares files (EXIF, mode, size)."""
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, S, S)


def load_image_tensor(
    path: str | os.PathLike[str] | Image.Image, image_size: int
) -> tuple[torch.Tensor, Image.Image]:
    """Read a new image (a file, or an already opened PIL image) and prepare it exactly like the packed
    training images (`load_image`, then `normalize_image`).

    Returns:
        tensor: (3, S, S) float, normalised: what the encoder sees.
        display: the RGB image resized to S x S, what attention maps are drawn over.
    Raises:
        UserError: `PATH: reason` for a missing, empty, truncated or unreadable file.
    """
    pixels = image_array(path, image_size) if isinstance(path, Image.Image) else load_image(path, image_size)
    display = Image.fromarray(pixels.transpose(1, 2, 0))
    return normalize_image(torch.from_numpy(pixels)), display


REQUIRED_KEYS = ("images", "captions", "caplens", "references", "filenames")
REQUIRED_ATTRS = ("captions_per_image", "max_caption_words", "image_size")
# Attributes that packs written before a rename store under their old name: new name -> old name.
ATTR_OLD_NAMES = {"max_caption_words": "max_len"}
_CHECK_ROWS = 65536  # caption rows read at a time by check_packed
CHECKSUM_SAMPLE = 16  # images per split that check_packed compares with their checksums from packing


def check_packed(data_folder: str, split: str, word_map: dict[str, int] | None = None,
                 sample_images: int = CHECKSUM_SAMPLE) -> dict[str, Any]:
    """Check a packed split before any work starts, so nothing fails mid-epoch: the split file, the
    word map, the dataset.json marker of a finished pack, the HDF5 structure, that every stored
    caption id is a word of `word_map` (default: the folder's word_map.json), and `sample_images` random
    images against the checksums stored at packing. A truncated or bit-rotted file shows up here as
    unreadable HDF5, ids out of range or changed pixels (rot in a few images may escape the sample:
    `create_input_files.py --verify` checks them all). Raises UserError naming the file; returns the
    split's sizes and attributes.
    """
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    path = os.path.join(data_folder, f"{split}.h5")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; run create_input_files.py --output-folder {data_folder} first")
    word_map_path = os.path.join(data_folder, "word_map.json")
    folder_word_map = load_word_map(word_map_path)
    source = "the checkpoint's word map" if word_map is not None else word_map_path
    word_map = folder_word_map if word_map is None else word_map
    marker = os.path.join(data_folder, "dataset.json")
    if not os.path.isfile(marker):
        raise UserError(f"{marker} not found: packing never finished in {data_folder} (killed, or a full disk?); "
                        "re-run create_input_files.py")
    try:
        with h5py.File(path, "r") as h5:
            attrs = {a: h5.attrs.get(a, h5.attrs.get(ATTR_OLD_NAMES.get(a, a))) for a in REQUIRED_ATTRS}
            missing = [k for k in REQUIRED_KEYS if k not in h5] + [a for a, v in attrs.items() if v is None]
            if missing:
                raise UserError(f"{path}: lacks {', '.join(missing)}; re-run create_input_files.py")
            tokenizer = h5.attrs.get("tokenizer", "ascii")  # packs from before the option: ascii
            info = {"num_images": h5["images"].shape[0], "num_captions": h5["captions"].shape[0],
                    "has_objects": "objects" in h5, **{a: int(v) for a, v in attrs.items()},
                    "has_image_ids": "image_ids" in h5,
                    "tokenizer": tokenizer.decode() if isinstance(tokenizer, bytes) else str(tokenizer)}
            # Caption ids and lengths in bounded chunks: memory stays flat in the dataset's size.
            id_range, length_range = [np.iinfo(np.int64).max, -1], [np.iinfo(np.int64).max, -1]
            for first in range(0, info["num_captions"], _CHECK_ROWS):
                for name, bounds in (("captions", id_range), ("caplens", length_range)):
                    chunk = h5[name][first : first + _CHECK_ROWS]
                    if chunk.size:
                        bounds[0], bounds[1] = min(bounds[0], int(chunk.min())), max(bounds[1], int(chunk.max()))
            if info["num_images"]:  # the last image is the one a truncated copy loses first
                h5["images"][info["num_images"] - 1]
            info["has_checksums"] = _check_image_sample(h5, path, data_folder, sample_images)
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({one_line(e)})") from None
    if info["num_captions"] != info["num_images"] * info["captions_per_image"]:
        raise UserError(f"{path}: {info['num_captions']} captions for {info['num_images']} images "
                        f"x {info['captions_per_image']} per image")
    if id_range[1] >= 0 and (id_range[0] < 0 or id_range[1] >= len(word_map)):
        raise UserError(f"{path}: caption ids up to {id_range[1]} (lowest {id_range[0]}) but {source} has "
                        f"{len(word_map)} words: the word map does not belong to this pack, or the file is corrupt")
    longest = info["max_caption_words"] + 2  # <start> ... <end>
    if length_range[1] >= 0 and (length_range[0] < 2 or length_range[1] > longest):
        raise UserError(f"{path}: caption lengths outside 2..{longest}: the file is corrupt; repack it")
    return info


def image_checksum(pixels: np.ndarray) -> int:
    """CRC32 of one image's stored pixels (uint8 (3, S, S)): stored per image at packing and compared by
    check_packed and `create_input_files.py --verify`. CRC32 (zlib): cheap, and any flipped bit changes it."""
    return zlib.crc32(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())


def changed_images(h5: h5py.File, indices: Sequence[int] | None = None, block: int = 64) -> list[int]:
    """The images (all, or `indices`) of an open split file whose pixels no longer match the checksums
    stored at packing; all are read `block` images at a time, so memory stays flat in the split's size."""
    images, checksums = h5["images"], h5["checksums"][()]
    if indices is not None:
        return [i for i in indices if image_checksum(images[i]) != checksums[i]]
    changed = []
    for first in range(0, images.shape[0], block):
        pixels = images[first : first + block]
        changed += [first + j for j in range(len(pixels)) if image_checksum(pixels[j]) != checksums[first + j]]
    return changed


def _check_image_sample(h5: h5py.File, path: str, data_folder: str, count: int) -> bool:
    """Compare `count` random images with their checksums from packing: cheap enough for every start, and a
    pack that rotted as a whole (a failing disk, a bad copy) is refused before hours of training on noise.
    A new sample each time, so repeated starts cover more of the pack. False: packed before checksums."""
    if "checksums" not in h5:
        return False
    num_images = h5["images"].shape[0]
    if h5["checksums"].shape != (num_images,):
        raise UserError(f"{path}: {h5['checksums'].shape[0]} checksums for {num_images} images: the file is corrupt; "
                        "repack it")
    if count and num_images:
        sample = np.random.default_rng().choice(num_images, size=min(count, num_images), replace=False)
        changed = changed_images(h5, sorted(int(i) for i in sample))
        if changed:
            i = changed[0]
            raise UserError(f"{path}: image {i} ({h5['filenames'].asstr()[i]}) does not match its checksum from "
                            f"packing: the file has rotted or was changed; run create_input_files.py --verify "
                            f"{data_folder} to list every changed image")
    return True


def verify_pack(data_folder: str) -> tuple[int, list[tuple[str, int, str]], list[str]]:
    """Recompute the checksum of every image of a pack (`create_input_files.py --verify`). Returns the number
    of images checked, the changed ones as (split, index, file name), and the splits packed without
    checksums (before they were stored: nothing to compare with). Raises UserError as check_packed does."""
    checked, changed, without = 0, [], []
    for split in SPLITS:
        check_packed(data_folder, split, sample_images=0)
        path = os.path.join(data_folder, f"{split}.h5")
        try:
            with h5py.File(path, "r") as h5:
                if "checksums" not in h5:
                    without.append(split)
                    continue
                names = h5["filenames"].asstr()
                changed += [(split, i, names[i]) for i in changed_images(h5)]
                checked += h5["images"].shape[0]
        except OSError as e:
            raise UserError(f"{path}: not a readable HDF5 file ({one_line(e)})") from None
    return checked, changed, without


class CaptionDataset(Dataset):
    """Images with all their stored captions; val/test items also carry the raw references.

    Args:
        data_folder: folder written by create_input_files.py (has word_map.json and {split}.h5).
        split: train | val | test.
        transform: optional callable on the uint8 (3, S, S) image tensor, applied before the image is
            scaled to [0, 1] and normalised with the ImageNet mean/std (e.g. a v2 augmentation;
            note that a horizontal flip makes the shapes captions' "left"/"right" false).
        with_references: include every raw reference caption in each item; default: val/test only.
        features: a feature cache of this split (feature_cache.py): items then carry the cached
            annotations (L, D) float16 as "image" instead of pixels, and `transform` is not used.

    The HDF5 file is opened lazily, once per process, on first access: h5py handles must not cross
    a fork or be pickled, so DataLoader workers (fork or spawn) each open their own.
    """

    def __init__(self, data_folder: str, split: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 with_references: bool | None = None, features: str | os.PathLike[str] | None = None) -> None:
        info = check_packed(data_folder, split)
        self.path = os.path.join(data_folder, f"{split}.h5")
        self.split = split
        self.transform = transform
        self.with_references = split != "train" if with_references is None else with_references
        self.word_map = load_word_map(os.path.join(data_folder, "word_map.json"))
        self.num_images = info["num_images"]
        self.captions_per_image = info["captions_per_image"]
        self.image_size = info["image_size"]
        self.has_objects = info["has_objects"]
        self.has_image_ids = info["has_image_ids"]  # packs from before image ids fall back to file names
        self.tokenizer = info["tokenizer"]
        self.features_path = features
        self._h5: h5py.File | None = None
        self._features_h5: h5py.File | None = None
        self._pid: int | None = None
        # Packed caption id -> model id (a (V_pack,) tensor), set by train.py when the model's word map is
        # not the pack's (init_from); None: the pack's ids are the model's.
        self.caption_id_map: torch.Tensor | None = None

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():  # a forked worker must not reuse its parent's handle
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
            if self.features_path is not None:
                self._features_h5 = h5py.File(self.features_path, "r")
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_features_h5"], state["_pid"] = None, None, None
        return state

    def _caption_rows(self, i: int) -> slice:
        """Rows of image i in the per-caption datasets (captions, caplens)."""
        return slice(i * self.captions_per_image, (i + 1) * self.captions_per_image)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_images:
            raise IndexError(f"image index {i} out of range for {self.num_images} images in {self.path}")
        h5, rows = self._file(), self._caption_rows(i)
        if self._features_h5 is not None:
            image = torch.from_numpy(self._features_h5["features"][i])  # (L, D) float16 annotations
        else:
            image = torch.from_numpy(h5["images"][i])  # (3, S, S) uint8
            if self.transform is not None:
                image = self.transform(image)
            image = normalize_image(image)  # (3, S, S) float
        captions = torch.from_numpy(h5["captions"][rows].astype(np.int64))  # (captions_per_image, T)
        if self.caption_id_map is not None:
            captions = self.caption_id_map[captions]
        item = {
            "image": image,
            "captions": captions,
            "caplens": torch.from_numpy(h5["caplens"][rows].astype(np.int64)),  # (captions_per_image,)
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

    def image_id(self, i: int) -> int | str:
        """Image i's own id for results files: COCO's `cocoid` when the pack stored ids, else its file name."""
        if self.has_image_ids:
            return int(self._file()["image_ids"][i])
        return self.filename(i)

    def image(self, i: int) -> np.ndarray:
        """Image i as stored: uint8 (3, S, S), not normalised (for reports and figures)."""
        return self._file()["images"][i]

    def objects(self, i: int) -> list[dict[str, Any]] | None:
        """Shapes only: [{"color", "shape", "box": [x0, y0, x1, y1] as fractions}] of image i; else None."""
        return json.loads(self._file()["objects"].asstr()[i]) if self.has_objects else None

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
            if self._features_h5 is not None:
                self._features_h5.close()
        self._h5 = self._features_h5 = None


def collate_captions(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate_fn: stacks image (B, 3, S, S), captions (B, captions_per_image, T), caplens
    (B, captions_per_image), index (B,); keeps references (val/test) as a list of B lists of strings."""
    out: dict[str, Any] = {key: torch.stack([item[key] for item in batch]) for key in ("image", "captions", "caplens")}
    out["index"] = torch.tensor([item["index"] for item in batch], dtype=torch.long)
    if "references" in batch[0]:
        out["references"] = [item["references"] for item in batch]
    return out
