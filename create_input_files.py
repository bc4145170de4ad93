"""Pack a captioning dataset into one folder: {train,val,test}.h5, word_map.json and dataset.json.

Why one HDF5 file per split: training reads random images thousands of times, and a chunked uint8
array (one chunk per image, no compression) is the fastest thing to read from many DataLoader workers;
datasets.CaptionDataset reads what this writes. Sources:

    --dataset flickr8k|flickr30k|coco --karpathy-json FILE --image-folder DIR   (Karpathy split JSON)
    --dataset custom --captions-file FILE --image-folder DIR   (CSV `image,caption` or Flickr token.txt)
    --dataset shapes [--num-images N]                           (built-in synthetic data, see shapes.py)

Every image is decoded and validated (in parallel, streamed into temporary `*.h5.tmp` files) before
any final file is written; the final names appear by rename at the very end, dataset.json last.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import signal
import sys
import warnings
import zlib
from collections import Counter, deque
from contextlib import closing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import h5py
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from shapes import generate_image, shape_filename
from utils import SPECIAL_TOKENS, atomic_write_text, one_line

SPLITS = ("train", "val", "test")
KARPATHY_DATASETS = ("flickr8k", "flickr30k", "coco")
DATASETS = KARPATHY_DATASETS + ("custom", "shapes")
FINAL_FILES = tuple(f"{s}.h5" for s in SPLITS) + ("word_map.json", "dataset.json")
DEFAULT_IMAGE_SIZE = 256
DEFAULT_SHAPES_IMAGE_SIZE = 96
_WRITE_BATCH = 64  # images buffered before one HDF5 write
_SKIP_HINT = " (use --skip-bad-images to skip such images)"


def tokenize(raw: str) -> list[str]:
    """Lower-cased alphanumeric words: the rule behind the Karpathy JSON `tokens`."""
    return re.findall(r"[a-z0-9]+", raw.lower())


@dataclass
class Record:
    """One image to pack. `filename` is relative to the image folder and is stored in the HDF5 file."""

    filename: str
    path: str = ""  # file to decode; empty for generated (shapes) images
    tokens: list[list[str]] = field(default_factory=list)  # every caption, tokenised
    raw: list[str] = field(default_factory=list)  # every caption as text (the references)
    index: int = -1  # shapes: image index
    objects: list[dict[str, Any]] | None = None  # shapes only
    word_objects: list[list[int]] | None = None  # shapes only, aligned with `tokens`


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
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


def load_image(path: str, size: int) -> np.ndarray:
    """Decode one image file to a (3, size, size) uint8 RGB array, or raise ValueError naming the file.

    Honours the EXIF orientation, converts any mode to RGB (see `to_rgb`) and stretches to
    size x size with bilinear filtering (antialiased when shrinking), as the tutorial does.
    Images over PIL's decompression-bomb limit fail at open time, before any pixel is decoded.
    """
    try:
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path}: empty file")
    except OSError:
        raise ValueError(f"{path}: file not found") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                image = to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: image too large, over PIL's decompression-bomb limit ({e})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read") from None
    except Exception as e:  # truncated data, broken EXIF, exotic modes, ...
        message = one_line(e)
        if "truncated" in message.lower():
            raise ValueError(f"{path}: truncated image file") from None
        raise ValueError(f"{path}: cannot decode image ({message})") from None
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, S, S)


Result = tuple[np.ndarray | None, str | None, dict[str, Any] | None]  # (image, error, extra fields)


def _decode_job(job: tuple[str, int]) -> Result:
    path, size = job
    try:
        return load_image(path, size), None, None
    except ValueError as e:
        return None, str(e), None


def _shapes_job(job: tuple[int, int, int]) -> Result:
    seed, index, size = job
    image, objects, tokens, word_objects = generate_image(seed, index, size)
    extra = {"objects": objects, "tokens": tokens, "raw": [" ".join(t) for t in tokens], "word_objects": word_objects}
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy(), None, extra


def _run_chunk(fn: Callable[[Any], Result], jobs: list[Any]) -> list[Result]:
    return [fn(job) for job in jobs]


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent: a worker interrupted inside the executor's queues can
    deadlock the pool, whereas the parent cancels the queued chunks and waits for the running ones."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ordered_map(fn: Callable[[Any], Result], jobs: Sequence[Any], workers: int, chunk: int = 8) -> Iterator[Result]:
    """fn over jobs in order, in `workers` processes, with at most 4 chunks per worker in flight.

    Why not Pool.imap: it queues every task at once and buffers results without limit when the
    consumer (the HDF5 writer) is slower, so memory would grow with the dataset.
    """
    if workers <= 1:
        yield from map(fn, jobs)
        return
    chunks = iter([list(jobs[i:i + chunk]) for i in range(0, len(jobs), chunk)])
    executor = ProcessPoolExecutor(workers, initializer=_ignore_sigint)
    try:
        pending: deque[Future] = deque(executor.submit(_run_chunk, fn, c) for c in islice(chunks, 4 * workers))
        while pending:
            try:
                results = pending.popleft().result()
            except BrokenProcessPool:
                raise ValueError("an image worker process died (out of memory?); try fewer --workers") from None
            for c in islice(chunks, 1):
                pending.append(executor.submit(_run_chunk, fn, c))
            yield from results
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Sources: Karpathy JSON, custom captions file, shapes
# --------------------------------------------------------------------------------------------
def read_karpathy(json_path: str, image_folder: str) -> dict[str, list[Record]]:
    """Records per split from a Karpathy-split JSON; `restval` counts as train.

    The image is image_folder/filepath/filename when `filepath` is given (COCO: train2014/...),
    falling back to image_folder/filename when that file does not exist (for JSON files whose
    filepath names the image folder itself, e.g. "images").
    """
    try:
        with open(json_path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{json_path}: Karpathy JSON not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{json_path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: expected a Karpathy-split JSON object with an 'images' list")
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for n, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise ValueError(f"{json_path}: images[{n}] lacks a 'filename'")
        split = entry.get("split")
        split = {"restval": "train"}.get(split, split) if isinstance(split, str) else None
        if split not in SPLITS:
            raise ValueError(f"{json_path}: images[{n}] ({entry['filename']}) has split {entry.get('split')!r}, "
                             "expected train, restval, val or test")
        sentences = entry.get("sentences", [])
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("tokens", []), list) for s in sentences
        ):
            raise ValueError(f"{json_path}: images[{n}] ({entry['filename']}) has no valid 'sentences' list "
                             "(each a dict with 'raw' text and/or a 'tokens' list)")
        if not isinstance(entry.get("filepath") or "", str):
            raise ValueError(f"{json_path}: images[{n}] ({entry['filename']}) has a non-text 'filepath'")
        rel = os.path.join(entry.get("filepath") or "", entry["filename"])
        flat = os.path.join(image_folder, entry["filename"])
        if not os.path.isfile(os.path.join(image_folder, rel)) and os.path.isfile(flat):
            rel = entry["filename"]
        record = Record(filename=rel, path=os.path.join(image_folder, rel))
        for s in sentences:
            raw = str(s.get("raw", " ".join(s.get("tokens", [])))).strip()
            tokens = [str(t).lower() for t in s["tokens"]] if isinstance(s.get("tokens"), list) else tokenize(raw)
            if tokens:
                record.tokens.append(tokens)
                record.raw.append(raw)
        splits[split].append(record)
    return splits


def read_captions_file(path: str) -> dict[str, list[str]]:
    """Image name -> raw captions (file order), from a CSV with `image` and `caption` header columns
    (Flickr8k `captions.txt`) or Flickr `token.txt` lines (`name.jpg#0<TAB>caption`)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: captions file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    captions: dict[str, list[str]] = {}
    if re.match(r"[^\t]+#\d+\t", first):  # token.txt
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            match = re.match(r"(.+)#\d+\t(.*)$", line)
            if not match:
                raise ValueError(f"{path}:{n}: expected 'name.jpg#N<TAB>caption'")
            captions.setdefault(match.group(1).strip(), []).append(match.group(2).strip())
        return captions
    rows = list(csv.reader(io.StringIO(text)))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "image" not in header or "caption" not in header:
        raise ValueError(f"{path}: expected a CSV header with 'image' and 'caption' columns "
                         f"(found {', '.join(header) or 'nothing'}) or Flickr token.txt lines 'name.jpg#0<TAB>caption'")
    i_image, i_caption = header.index("image"), header.index("caption")
    for n, row in enumerate(rows[1:], 2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header) and i_caption == len(header) - 1:
            row = row[:i_caption] + [",".join(row[i_caption:])]  # unquoted commas inside the caption
        if len(row) != len(header):
            raise ValueError(f"{path}:{n}: expected {len(header)} columns, found {len(row)}")
        if "\n" in row[i_caption] or "\r" in row[i_caption]:  # an unclosed quote swallowed the next rows
            raise ValueError(f"{path}:{n}: caption spans several lines (an unclosed quote?)")
        captions.setdefault(row[i_image].strip(), []).append(row[i_caption].strip())
    return captions


def split_names(names: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Split image names into train/val/test with a fixed seed (independent of the file's row order)."""
    order = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
    shuffled = [order[i] for i in perm]
    return {"test": shuffled[:n_test], "val": shuffled[n_test:n_test + n_val], "train": shuffled[n_test + n_val:]}


def read_custom(captions_file: str, image_folder: str, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, list[Record]]:
    captions = read_captions_file(captions_file)
    if not captions:
        raise ValueError(f"{captions_file}: no captions found")
    splits: dict[str, list[Record]] = {}
    for split, names in split_names(list(captions), val_fraction, test_fraction, seed).items():
        splits[split] = []
        for name in names:
            record = Record(filename=name, path=os.path.join(image_folder, name))
            for raw in captions[name]:
                if tokenize(raw):
                    record.tokens.append(tokenize(raw))
                    record.raw.append(raw)
            splits[split].append(record)
    return splits


def shapes_records(num_images: int, val_fraction: float, test_fraction: float) -> dict[str, list[Record]]:
    """Contiguous index ranges train | val | test; the captions come with the generated images."""
    n_val, n_test = round(num_images * val_fraction), round(num_images * test_fraction)
    bounds = {"train": (0, num_images - n_val - n_test), "val": (num_images - n_val - n_test, num_images - n_test),
              "test": (num_images - n_test, num_images)}
    return {s: [Record(filename=shape_filename(i), index=i) for i in range(a, b)] for s, (a, b) in bounds.items()}


# --------------------------------------------------------------------------------------------
# Captions: vocabulary, sampling, encoding
# --------------------------------------------------------------------------------------------
def build_word_map(captions: Iterable[list[str]], min_word_freq: int) -> dict[str, int]:
    """<pad>=0, then words with count >= min_word_freq by descending count (ties alphabetical),
    then <unk>, <start>, <end>."""
    counts = Counter(w for c in captions for w in c)
    words = sorted((w for w, n in counts.items() if n >= min_word_freq and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    word_map = {"<pad>": 0}
    for w in words + ["<unk>", "<start>", "<end>"]:
        word_map[w] = len(word_map)
    return word_map


def choose_captions(n: int, captions_per_image: int, seed: int, key: str) -> list[int]:
    """Indices of the captions stored for one image: all of them if exactly enough, a seeded sample
    without replacement if more, and all plus seeded repeats if fewer. Seeded by (seed, key), so one
    image's choice does not depend on which other images were packed or skipped."""
    if n == captions_per_image:
        return list(range(n))
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    if n > captions_per_image:
        return sorted(int(i) for i in rng.choice(n, captions_per_image, replace=False))
    return list(range(n)) + [int(i) for i in rng.choice(n, captions_per_image - n, replace=True)]


def encode_caption(tokens: Sequence[str], word_map: dict[str, int], max_len: int) -> tuple[list[int], int]:
    """<start> w1..wn <end> <pad>... (length max_len + 2) and n + 2; callers truncate to max_len first."""
    ids = [word_map["<start>"]] + [word_map.get(w, word_map["<unk>"]) for w in tokens] + [word_map["<end>"]]
    return ids + [word_map["<pad>"]] * (max_len + 2 - len(ids)), len(ids)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------
def _write_images(tmp_path: str, split: str, records: list[Record], jobs: list[Any], fn: Callable[[Any], Result],
                  image_size: int, workers: int, skip_bad_images: bool, skipped: list[str]) -> list[Record]:
    """Decode (in parallel, in order) and stream images into tmp_path; return the records kept."""
    kept: list[Record] = []
    with h5py.File(tmp_path, "w") as h5:
        shape = (len(records), 3, image_size, image_size)
        images = h5.create_dataset("images", shape=shape, maxshape=(None,) + shape[1:], dtype=np.uint8,
                                   chunks=(1,) + shape[1:])
        buffer: list[np.ndarray] = []
        # closing(): stop the worker processes at once when a bad image raises, not at garbage collection.
        with closing(_ordered_map(fn, jobs, workers)) as results, tqdm(total=len(jobs), desc=split, unit="img") as bar:
            for record, (image, error, extra) in zip(records, results):
                bar.update()
                if error is not None:
                    if not skip_bad_images:
                        raise ValueError(error + _SKIP_HINT)
                    bar.write(f"warning: skipped {error}", file=sys.stderr)
                    skipped.append(error)
                    continue
                for key, value in (extra or {}).items():
                    setattr(record, key, value)
                kept.append(record)
                buffer.append(image)
                if len(buffer) == _WRITE_BATCH:
                    images[len(kept) - len(buffer):len(kept)] = np.stack(buffer)
                    buffer = []
        if buffer:
            images[len(kept) - len(buffer):len(kept)] = np.stack(buffer)
        images.resize(len(kept), axis=0)
    return kept


def _write_captions(tmp_path: str, split: str, records: list[Record], word_map: dict[str, int], *, dataset: str,
                    captions_per_image: int, max_len: int, image_size: int, seed: int) -> None:
    """Add captions, caplens, references, filenames, attrs (and the shapes extras) to a split file."""
    n, cpi, width = len(records), captions_per_image, max_len + 2
    captions = np.zeros((n * cpi, width), dtype=np.int32)
    caplens = np.zeros(n * cpi, dtype=np.int32)
    shapes = dataset == "shapes"
    if shapes:
        word_objects = np.full((n * cpi, width), -1, dtype=np.int8)
        boxes = np.full((n, 4, 4), np.nan, dtype=np.float32)
        num_objects = np.zeros(n, dtype=np.int32)
    for i, record in enumerate(records):
        for j, c in enumerate(choose_captions(len(record.tokens), cpi, seed, record.filename)):
            row = i * cpi + j
            captions[row], caplens[row] = encode_caption(record.tokens[c][:max_len], word_map, max_len)
            if shapes:
                wo = record.word_objects[c][:max_len]
                word_objects[row, 1:1 + len(wo)] = wo
        if shapes:
            num_objects[i] = len(record.objects)
            boxes[i, :len(record.objects)] = [o["box"] for o in record.objects]
    text = h5py.string_dtype("utf-8")
    with h5py.File(tmp_path, "a") as h5:
        h5.create_dataset("captions", data=captions)
        h5.create_dataset("caplens", data=caplens)
        h5.create_dataset("references", data=[json.dumps(r.raw) for r in records], dtype=text, shape=(n,))
        h5.create_dataset("filenames", data=[r.filename for r in records], dtype=text, shape=(n,))
        if shapes:
            h5.create_dataset("boxes", data=boxes)
            h5.create_dataset("num_objects", data=num_objects)
            h5.create_dataset("objects", data=[json.dumps(r.objects) for r in records], dtype=text, shape=(n,))
            h5.create_dataset("word_objects", data=word_objects)
        h5.attrs.update({"captions_per_image": cpi, "max_len": max_len, "image_size": image_size,
                         "dataset": dataset, "split": split})


def pack(records: dict[str, list[Record]], output_folder: str, *, dataset: str, image_size: int,
         captions_per_image: int = 5, min_word_freq: int = 5, max_len: int = 50, seed: int = 0,
         workers: int = 1, skip_bad_images: bool = False, force: bool = False) -> dict[str, Any]:
    """Write {train,val,test}.h5, word_map.json and dataset.json for `records`; return the summary.

    Captions longer than max_len tokens are truncated to max_len (Karpathy-style code drops them
    instead, which can leave an image with no caption). The vocabulary counts the train split only.
    A bad image (missing, empty, truncated, not an image, too large) or an image without captions
    raises ValueError naming it before any final file is written, unless skip_bad_images.
    """
    existing = [f for f in FINAL_FILES if os.path.exists(os.path.join(output_folder, f))]
    if existing and not force:
        raise ValueError(f"{output_folder}: already has {', '.join(existing)}; use --force to overwrite")
    skipped: list[str] = []

    def keep(record: Record, problem: str | None) -> bool:
        if problem is None:
            return True
        if not skip_bad_images:
            raise ValueError(problem + _SKIP_HINT)
        skipped.append(problem)
        return False

    # Cheap checks first, so that a missing file in test.h5 is reported before hours of decoding.
    records = {split: [r for r in records[split] if keep(r, _precheck(r))] for split in SPLITS}

    created = not os.path.isdir(output_folder)
    os.makedirs(output_folder, exist_ok=True)
    tmp = {s: os.path.join(output_folder, f"{s}.h5.tmp") for s in SPLITS}
    try:
        for split in SPLITS:
            if dataset == "shapes":
                jobs, fn = [(seed, r.index, image_size) for r in records[split]], _shapes_job
            else:
                jobs, fn = [(r.path, image_size) for r in records[split]], _decode_job
            records[split] = _write_images(tmp[split], split, records[split], jobs, fn, image_size, workers,
                                           skip_bad_images, skipped)
        if not records["train"]:
            raise ValueError("no training images left to pack")
        word_map = build_word_map((t[:max_len] for r in records["train"] for t in r.tokens), min_word_freq)
        for split in SPLITS:
            _write_captions(tmp[split], split, records[split], word_map, dataset=dataset,
                            captions_per_image=captions_per_image, max_len=max_len, image_size=image_size, seed=seed)
        summary = {"dataset": dataset, "splits": {s: len(records[s]) for s in SPLITS}, "vocab_size": len(word_map),
                   "captions_per_image": captions_per_image, "max_len": max_len, "image_size": image_size,
                   "min_word_freq": min_word_freq, "seed": seed, "skipped_images": len(skipped), "skipped": skipped}
        # dataset.json marks a complete folder: remove an old one first and write the new one last.
        if os.path.exists(os.path.join(output_folder, "dataset.json")):
            os.remove(os.path.join(output_folder, "dataset.json"))
        for split in SPLITS:
            os.replace(tmp[split], os.path.join(output_folder, f"{split}.h5"))
        atomic_write_text(os.path.join(output_folder, "word_map.json"), json.dumps(word_map, indent=1) + "\n")
        atomic_write_text(os.path.join(output_folder, "dataset.json"), json.dumps(summary, indent=1) + "\n")
    except BaseException:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if created and not os.listdir(output_folder):
            os.rmdir(output_folder)
        raise
    return summary


def _precheck(record: Record) -> str | None:
    """A one-line problem with this record that needs no decoding, or None."""
    if not record.path:
        return None  # generated image; its captions come with it
    if not record.tokens:
        return f"{record.path}: image has no captions"
    if not os.path.isfile(record.path):
        return f"{record.path}: file not found"
    if os.path.getsize(record.path) == 0:
        return f"{record.path}: empty file"
    return None


def create_input_files(dataset: str, output_folder: str, *, karpathy_json: str | None = None,
                       captions_file: str | None = None, image_folder: str | None = None,
                       image_size: int | None = None, captions_per_image: int = 5, min_word_freq: int = 5,
                       max_len: int = 50, num_images: int | None = None, val_fraction: float | None = None,
                       test_fraction: float | None = None, seed: int = 0, workers: int | None = None,
                       skip_bad_images: bool = False, force: bool = False) -> dict[str, Any]:
    """Read the source named by `dataset`, then `pack` it into output_folder; returns the summary.

    Args:
        dataset: flickr8k | flickr30k | coco (need karpathy_json, image_folder), custom (needs
            captions_file, image_folder) or shapes (generated; num_images of them).
        image_size: side S of the stored images; default 256, or 96 for shapes.
        val_fraction, test_fraction: custom and shapes only; default 0.1 each for custom and
            1/12 each for shapes (6000 -> 5000/500/500).
        workers: decoding processes; default: the CPUs this process may use.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    if dataset in KARPATHY_DATASETS and (val_fraction is not None or test_fraction is not None):
        raise ValueError(f"--dataset {dataset} takes its split from the Karpathy JSON; drop --val/--test-fraction")
    if dataset != "shapes" and num_images is not None:
        raise ValueError("--num-images applies to --dataset shapes only")
    num_images = 6000 if num_images is None else num_images
    if image_size is None:
        image_size = DEFAULT_SHAPES_IMAGE_SIZE if dataset == "shapes" else DEFAULT_IMAGE_SIZE
    default_fraction = 1 / 12 if dataset == "shapes" else 0.1
    val_fraction = default_fraction if val_fraction is None else val_fraction
    test_fraction = default_fraction if test_fraction is None else test_fraction
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for name, value, low in (("captions per image", captions_per_image, 1), ("max len", max_len, 1),
                             ("min word freq", min_word_freq, 1), ("image size", image_size, 1),
                             ("num images", num_images, 1), ("workers", workers, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val fraction {val_fraction} and test fraction {test_fraction} must be >= 0 and sum to < 1")
    needs = {"custom": ("captions_file", "image_folder"), "shapes": ()}.get(dataset, ("karpathy_json", "image_folder"))
    given = {"karpathy_json": karpathy_json, "captions_file": captions_file, "image_folder": image_folder}
    for name, value in given.items():
        if name in needs and not value:
            raise ValueError(f"--dataset {dataset} needs --{name.replace('_', '-')}")
        if name not in needs and value:
            raise ValueError(f"--dataset {dataset} does not use --{name.replace('_', '-')}")
    if image_folder and dataset != "shapes" and not os.path.isdir(image_folder):
        raise ValueError(f"{image_folder}: image folder not found")

    if dataset == "shapes":
        if image_size < 32:
            raise ValueError(f"shapes image size must be >= 32, got {image_size}")
        records = shapes_records(num_images, val_fraction, test_fraction)
    elif dataset == "custom":
        records = read_custom(captions_file, image_folder, val_fraction, test_fraction, seed)
    else:
        records = read_karpathy(karpathy_json, image_folder)
    return pack(records, output_folder, dataset=dataset, image_size=image_size, captions_per_image=captions_per_image,
                min_word_freq=min_word_freq, max_len=max_len, seed=seed, workers=workers,
                skip_bad_images=skip_bad_images, force=force)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS, help="source format")
    p.add_argument("--output-folder", required=True, help="folder for {train,val,test}.h5, word_map.json, dataset.json")
    p.add_argument("--karpathy-json", help="Karpathy split JSON (flickr8k, flickr30k, coco)")
    p.add_argument("--captions-file", help="custom: CSV with image,caption header, or Flickr token.txt")
    p.add_argument("--image-folder", help="folder the image file names are relative to")
    p.add_argument("--image-size", type=int, help="stored image side (default 256; 96 for shapes)")
    p.add_argument("--captions-per-image", type=int, default=5, help="captions stored per image (sampled)")
    p.add_argument("--min-word-freq", type=int, default=5, help="train-split count for a word to enter the vocabulary")
    p.add_argument("--max-len", type=int, default=50, help="longer captions are truncated to this many words")
    p.add_argument("--num-images", type=int, help="shapes: number of images (6000)")
    p.add_argument("--val-fraction", type=float, help="custom/shapes: share of images in val (0.1; shapes 1/12)")
    p.add_argument("--test-fraction", type=float, help="custom/shapes: share of images in test (0.1; shapes 1/12)")
    p.add_argument("--seed", type=int, default=0, help="seeds caption sampling, the custom split and shapes")
    p.add_argument("--workers", type=int, help="image decoding processes (default: number of CPUs)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable or caption-less images (and count them) instead of stopping")
    p.add_argument("--force", action="store_true", help="overwrite an existing packed dataset")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        summary = create_input_files(
            args.dataset, args.output_folder, karpathy_json=args.karpathy_json, captions_file=args.captions_file,
            image_folder=args.image_folder, image_size=args.image_size, captions_per_image=args.captions_per_image,
            min_word_freq=args.min_word_freq, max_len=args.max_len, num_images=args.num_images,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed, workers=args.workers,
            skip_bad_images=args.skip_bad_images, force=args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output folder that is a file, not writable, or a full disk
        print(f"error: {args.output_folder}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing new written to {args.output_folder}", file=sys.stderr)
        return 130
    counts = ", ".join(f"{s} {n}" for s, n in summary["splits"].items())
    skipped = f"; skipped {summary['skipped_images']} bad images" if summary["skipped_images"] else ""
    print(f"wrote {args.output_folder}: {counts} images; vocabulary {summary['vocab_size']} words{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
