"""The packing library: a captioning dataset -> one folder of {train,val,test}.h5, word_map.json and dataset.json.

Why one HDF5 file per split: training reads random images thousands of times, and a chunked uint8
array (one chunk per image, no compression) is the fastest thing to read from many DataLoader workers;
dataset.CaptionDataset reads what this writes. Sources (`read_records`): a Karpathy split JSON
(`read_karpathy`), a custom captions file (`read_custom`), or the built-in shapes set (`shapes_records`);
any other source is a reader that returns each split's `Record`s (a record may carry its encoded image
in `data` instead of a file `path`), then `pack`.

Every image is decoded and validated (in parallel, streamed into temp files named as filesafety names
them) before any final file is written; the final names appear by rename at the very end, dataset.json last.
From Python: `create_input_files(PackOptions(dataset="shapes", output_folder="data/shapes"))`; the command
line is create_input_files.py.

Each image's CRC32 is stored beside it (`checksums`): `create_input_files.py --verify DATA` recomputes them
all and names the images that changed since packing (a failing disk, a bad copy); training and eval check a sample.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import signal
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np

from satkit.data.dataset import SPLITS, image_checksum, load_image, load_image_bytes
from satkit.infra.filesafety import (_temporary_beside, check_writable, fsync_file, fsync_folder,
                                     remove_stale_temporaries, staged_h5)
from satkit.infra.progress import progress_bar
from satkit.data.records import Record, build_word_map, choose_captions, encode_caption
from satkit.infra.runtime import UserError, one_line
from satkit.data.shapes import DEFAULT_IMAGE_SIZE as DEFAULT_SHAPES_IMAGE_SIZE
from satkit.data.shapes import MIN_IMAGE_SIZE as MIN_SHAPES_IMAGE_SIZE
from satkit.data.shapes import generate_image, shape_filename
from satkit.data import shard_writer  # it shares records.py with this module
from satkit.data.text import TOKENIZERS, tokenize
from satkit.validation import check_fields, option

__all__ = [
    "PackOptions", "Record", "read_records", "read_karpathy", "read_custom", "read_captions_file", "split_names",
    "shapes_records", "build_word_map", "choose_captions", "encode_caption", "pack", "create_input_files",
    "DATASETS", "KARPATHY_DATASETS", "FINAL_FILES", "DEFAULT_IMAGE_SIZE", "DEFAULT_SHAPES_IMAGE_SIZE",
    "DEFAULT_SHAPES_NUM_IMAGES", "SOURCE_INPUTS",
]

KARPATHY_DATASETS = ("flickr8k", "flickr30k", "coco")
DATASETS = KARPATHY_DATASETS + ("custom", "shapes", "webdataset")
OUTPUT_FORMATS = ("hdf5", "webdataset")
FINAL_FILES = tuple(f"{s}.h5" for s in SPLITS) + ("word_map.json", "dataset.json")  # renamed in this order
DEFAULT_IMAGE_SIZE = 256
DEFAULT_SHAPES_NUM_IMAGES = 6000
SOURCE_INPUTS = {  # what each dataset is read from; it must not be given the others
    **{name: ("karpathy_json", "image_folder") for name in KARPATHY_DATASETS},
    "custom": ("captions_file", "image_folder"),
    "shapes": (),
    "webdataset": ("shards",),
}
_WRITE_BATCH = 64  # images buffered before one HDF5 write
_SKIP_HINT = " (use --skip-bad-images to skip such images)"


@dataclass
class PackOptions:
    """What to pack and how: one field per command-line flag, with its default, choices and bounds.
    main() builds it from the command line; Python callers build it directly. None means the
    dataset's default, filled in by `resolved`."""

    dataset: str = option(choices=DATASETS)  # Karpathy JSON, custom captions file, or generated shapes
    output_folder: str = option()  # gets {train,val,test}.h5, word_map.json and dataset.json
    karpathy_json: str | None = None  # flickr8k, flickr30k, coco: the Karpathy split JSON
    captions_file: str | None = None  # custom: CSV with an image,caption header, or Flickr token.txt
    image_folder: str | None = None  # the folder image file names are relative to (all but shapes)
    image_size: int | None = option(None, min=1)  # stored side S; None: 256, or 96 for shapes (drawn natively at S)
    captions_per_image: int = option(5, min=1)  # stored per image: a seeded sample, or all plus seeded repeats
    min_word_freq: int = option(5, min=1)  # train-split count for a word to enter the vocabulary
    max_caption_words: int = option(50, min=1)  # longer captions are truncated to this many words
    num_images: int | None = option(None, min=1)  # shapes only; None: 6000
    val_fraction: float | None = option(None, min=0.0, below=1.0)  # custom, shapes: share of images in val
    test_fraction: float | None = option(None, min=0.0, below=1.0)  # custom, shapes: share in test
    seed: int = option(0, min=0)  # seeds caption sampling, the custom split and the shapes images
    tokenizer: str = option("ascii", choices=TOKENIZERS)  # eval scores with the pack's tokenizer
    num_workers: int | None = option(None, min=1)  # image decoding processes; None: the CPUs this process may use
    skip_bad_images: bool = False  # skip (and count) unreadable or caption-less images instead of stopping
    allow_split_overlap: bool = False  # Karpathy JSON: allow one image in two splits (refused by default)
    force: bool = False  # overwrite an existing packed dataset
    # webdataset: shard patterns (shards.py). Alone, --shards makes the word-map pass for training from them;
    # with --output-format hdf5 the splits' shards are packed.
    shards: str | None = None
    val_shards: str | None = None
    test_shards: str | None = None
    # What is written: None = an HDF5 pack (webdataset: the word-map pass), or shards of --shard-size samples
    output_format: str | None = option(None, choices=OUTPUT_FORMATS)
    shard_size: int = option(1000, min=1)

    def resolved(self) -> PackOptions:
        """A copy with the dataset's defaults in place of None; raises UserError naming a bad flag.

        The one place where packing options are checked, for the command line and Python callers alike.
        """
        if self.dataset == "shapes" and self.image_size is not None and self.image_size < MIN_SHAPES_IMAGE_SIZE:
            raise UserError(f"--image-size={self.image_size} must be >= {MIN_SHAPES_IMAGE_SIZE} for --dataset shapes")
        check_fields(self, as_flags=True)
        self._check_sources()
        shapes = self.dataset == "shapes"
        fraction = {"shapes": 1 / 12, "custom": 0.1}.get(self.dataset)  # None: the Karpathy JSON splits
        defaults = {"image_size": DEFAULT_SHAPES_IMAGE_SIZE if shapes else DEFAULT_IMAGE_SIZE,
                    "num_images": DEFAULT_SHAPES_NUM_IMAGES if shapes else None,
                    "val_fraction": fraction, "test_fraction": fraction, "num_workers": _available_cpus()}
        options = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if fraction is not None and not options.val_fraction + options.test_fraction < 1:
            raise UserError(f"--val-fraction={options.val_fraction} and --test-fraction={options.test_fraction} "
                            "must sum to < 1")
        if options.image_folder and not os.path.isdir(options.image_folder):
            raise UserError(f"{options.image_folder}: image folder not found")
        return options

    def _check_sources(self) -> None:
        """Each dataset is read from its own inputs (SOURCE_INPUTS) and refuses the others' flags."""
        for name in ("karpathy_json", "captions_file", "image_folder", "shards"):
            flag, needed = "--" + name.replace("_", "-"), name in SOURCE_INPUTS[self.dataset]
            if needed and not getattr(self, name):
                raise UserError(f"--dataset {self.dataset} needs {flag}")
            if not needed and getattr(self, name):
                raise UserError(f"--dataset {self.dataset} does not use {flag}")
        if self.dataset in KARPATHY_DATASETS and (self.val_fraction is not None or self.test_fraction is not None):
            raise UserError(f"--dataset {self.dataset} takes its split from the Karpathy JSON; "
                            "drop --val/--test-fraction")
        if self.dataset != "shapes" and self.num_images is not None:
            raise UserError("--num-images applies to --dataset shapes only")
        webdataset = self.dataset == "webdataset"
        if (self.val_shards or self.test_shards) and not (webdataset and self.output_format == "hdf5"):
            raise UserError("--val-shards/--test-shards are packed with --dataset webdataset --output-format hdf5")
        if webdataset and self.output_format == "webdataset":
            raise UserError("--dataset webdataset is already shards: --output-format hdf5 packs them, no "
                            "--output-format makes the word-map pass")
        if webdataset and self.output_format == "hdf5" and not self.val_shards:
            raise UserError("--dataset webdataset --output-format hdf5 needs --val-shards (model selection reads val)")


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Images (decoding itself is dataset.load_image / load_image_bytes, shared with caption.py)
# --------------------------------------------------------------------------------------------
Result = tuple[np.ndarray | None, str | None, dict[str, Any] | None]  # (image, error, extra fields)


def _decode_job(job: tuple[str | bytes, int, str]) -> Result:
    """Decode one image, a file path or encoded bytes (named `name` in errors); a bad image is returned as its
    one-line problem, for skip or stop."""
    source, image_size, name = job
    try:
        if isinstance(source, str):
            return load_image(source, image_size), None, None
        return load_image_bytes(source, image_size, name), None, None
    except UserError as e:
        return None, str(e), None


def _shapes_job(job: tuple[int, int, int]) -> Result:
    """Draw one shapes image; its captions and objects come back with it."""
    seed, index, image_size = job
    image, objects, tokens, _ = generate_image(seed, index, image_size)
    extra = {"objects": objects, "tokens": tokens, "references": [" ".join(t) for t in tokens]}
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy(), None, extra  # (3, S, S)


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
        pending: deque[Future] = deque(executor.submit(_run_chunk, fn, jobs_of_chunk)
                                       for jobs_of_chunk in islice(chunks, 4 * workers))
        while pending:
            try:
                results = pending.popleft().result()
            except BrokenProcessPool:
                raise UserError("an image worker process died (out of memory?); try fewer --num-workers") from None
            for jobs_of_chunk in islice(chunks, 1):
                pending.append(executor.submit(_run_chunk, fn, jobs_of_chunk))
            yield from results
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Sources: Karpathy JSON, custom captions file, shapes
# --------------------------------------------------------------------------------------------
def _inside_image_folder(name: str, source: str) -> str:
    """An image name from a captions source, refused when it points outside the image folder (absolute,
    or climbing with `..`): a captions file must never make us read, and pack, other files."""
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep):
        raise UserError(f"{source}: image name {name!r} points outside the image folder; refused")
    return name


def read_karpathy(json_path: str, image_folder: str, tokenizer: str = "ascii", allow_split_overlap: bool = False
                  ) -> dict[str, list[Record]]:
    """Records per split from a Karpathy-split JSON; `restval` counts as train. An image listed in two
    splits is refused unless allow_split_overlap: a model would be scored on an image it trained on."""
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    split_of: dict[str, str] = {}  # image -> the split it was first seen in
    for n, entry in enumerate(_read_karpathy_images(json_path)):
        where = f"{json_path}: images[{n}]"
        split, record = _karpathy_record(entry, where, image_folder, tokenizer)
        seen = split_of.setdefault(os.path.normpath(record.filename), split)
        if seen != split and not allow_split_overlap:
            raise UserError(f"{where} ({record.filename}) is in both {seen} and {split}: a model would be "
                            "scored on an image it trained on; use --allow-split-overlap to pack it anyway")
        splits[split].append(record)
    return splits


def _read_karpathy_images(json_path: str) -> list[Any]:
    """The 'images' list of a Karpathy-split JSON, or UserError naming the file."""
    try:
        with open(json_path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{json_path}: Karpathy JSON not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{json_path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{json_path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{json_path}: expected a Karpathy-split JSON object with an 'images' list")
    return data["images"]


def _karpathy_record(entry: Any, where: str, image_folder: str, tokenizer: str) -> tuple[str, Record]:
    """(split, record) of one Karpathy JSON entry, checked field by field.

    Captions use the JSON's `tokens` with the ascii tokenizer, and are tokenised from `raw` with the
    unicode one. An integer `cocoid` becomes the image_id (what COCO results files are keyed by). The
    image is image_folder/filepath/filename when `filepath` is given (COCO: train2014/...), falling
    back to image_folder/filename when that file does not exist (for JSON files whose filepath names
    the image folder itself, e.g. "images").
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
        raise UserError(f"{where} lacks a 'filename'")
    split = entry.get("split")
    split = {"restval": "train"}.get(split, split) if isinstance(split, str) else None
    if split not in SPLITS:
        raise UserError(f"{where} ({entry['filename']}) has split {entry.get('split')!r}, "
                        f"expected restval or one of {', '.join(SPLITS)}")
    sentences = entry.get("sentences", [])
    if not isinstance(sentences, list) or not all(
        isinstance(sentence, dict) and isinstance(sentence.get("tokens", []), list) for sentence in sentences
    ):
        raise UserError(f"{where} ({entry['filename']}) has no valid 'sentences' list "
                        "(each a dict with 'raw' text and/or a 'tokens' list)")
    if not isinstance(entry.get("filepath") or "", str):
        raise UserError(f"{where} ({entry['filename']}) has a non-text 'filepath'")
    filename = _inside_image_folder(os.path.join(entry.get("filepath") or "", entry["filename"]), where)
    if not os.path.isfile(os.path.join(image_folder, filename)) and \
            os.path.isfile(os.path.join(image_folder, entry["filename"])):
        filename = entry["filename"]
    cocoid = entry.get("cocoid")
    record = Record(filename=filename, path=os.path.join(image_folder, filename),
                    image_id=cocoid if isinstance(cocoid, int) and not isinstance(cocoid, bool) else None)
    for sentence in sentences:  # "tokens", when present, is a list (checked above)
        words = [str(t) for t in sentence.get("tokens", [])]
        text = str(sentence.get("raw", " ".join(words))).strip()
        use_json_tokens = "tokens" in sentence and tokenizer == "ascii"
        record.add_caption(text, [w.lower() for w in words] if use_json_tokens else tokenize(text, tokenizer))
    return split, record


def read_captions_file(path: str) -> dict[str, list[str]]:
    """Image name -> raw captions (file order), from a CSV with `image` and `caption` header columns
    (Flickr8k `captions.txt`) or Flickr `token.txt` lines (`name.jpg#0<TAB>caption`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: captions file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's UTF-8 export starts with a byte order mark
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}; Latin-1 or a Windows code "
                        "page?); save it as UTF-8 (a spreadsheet's 'CSV UTF-8')") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    captions: dict[str, list[str]] = {}
    if re.match(r"[^\t]+#\d+\t", first):  # token.txt
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            match = re.match(r"(.+)#\d+\t(.*)$", line)
            if not match:
                raise UserError(f"{path}:{n}: expected 'name.jpg#N<TAB>caption'")
            name = _inside_image_folder(match.group(1).strip(), f"{path}:{n}")
            if match.group(2).strip() not in captions.setdefault(name, []):  # a duplicated row is one caption
                captions[name].append(match.group(2).strip())
        return captions
    # Spreadsheets export with ',' or, in many locales, ';' or tabs: the one whose header has both columns.
    delimiter = next((d for d in (",", ";", "\t", "|")
                      if {"image", "caption"} <= {cell.strip().lower() for cell in first.split(d)}), ",")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "image" not in header or "caption" not in header:
        raise UserError(f"{path}: expected a CSV header with 'image' and 'caption' columns "
                        f"(found {', '.join(header) or 'nothing'}) or Flickr token.txt lines 'name.jpg#0<TAB>caption'")
    i_image, i_caption = header.index("image"), header.index("caption")
    for n, row in enumerate(rows[1:], 2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header) and i_caption == len(header) - 1:
            row = row[:i_caption] + [delimiter.join(row[i_caption:])]  # unquoted delimiters inside the caption
        if len(row) != len(header):
            raise UserError(f"{path}:{n}: expected {len(header)} columns, found {len(row)}")
        if "\n" in row[i_caption] or "\r" in row[i_caption]:  # an unclosed quote swallowed the next rows
            raise UserError(f"{path}:{n}: caption spans several lines (an unclosed quote?)")
        name, caption = _inside_image_folder(row[i_image].strip(), f"{path}:{n}"), row[i_caption].strip()
        if caption not in captions.setdefault(name, []):  # a duplicated row is one caption, not two
            captions[name].append(caption)
    return captions


def split_names(names: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Split image names into train/val/test with a fixed seed (independent of the file's row order)."""
    order = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
    shuffled = [order[i] for i in perm]
    return {"test": shuffled[:n_test], "val": shuffled[n_test:n_test + n_val], "train": shuffled[n_test + n_val:]}


def read_custom(captions_file: str, image_folder: str, val_fraction: float, test_fraction: float,
                seed: int, tokenizer: str = "ascii") -> dict[str, list[Record]]:
    """Records per split from a captions file: the split is a seeded draw over the image names."""
    captions = read_captions_file(captions_file)
    if not captions:
        raise UserError(f"{captions_file}: no captions found")
    splits: dict[str, list[Record]] = {}
    for split, names in split_names(list(captions), val_fraction, test_fraction, seed).items():
        splits[split] = []
        for name in names:
            record = Record(filename=name, path=os.path.join(image_folder, name))
            for text in captions[name]:
                record.add_caption(text, tokenize(text, tokenizer))
            splits[split].append(record)
    return splits


def shapes_records(num_images: int, val_fraction: float, test_fraction: float) -> dict[str, list[Record]]:
    """Contiguous index ranges train | val | test; the captions come with the generated images."""
    n_val, n_test = round(num_images * val_fraction), round(num_images * test_fraction)
    bounds = {"train": (0, num_images - n_val - n_test), "val": (num_images - n_val - n_test, num_images - n_test),
              "test": (num_images - n_test, num_images)}
    return {s: [Record(filename=shape_filename(i), index=i) for i in range(a, b)] for s, (a, b) in bounds.items()}


def read_records(options: PackOptions) -> dict[str, list[Record]]:
    """The records of every split from the source `options` (resolved) names."""
    if options.dataset == "shapes":
        return shapes_records(options.num_images, options.val_fraction, options.test_fraction)
    if options.dataset == "custom":
        return read_custom(options.captions_file, options.image_folder, options.val_fraction, options.test_fraction,
                           options.seed, options.tokenizer)
    return read_karpathy(options.karpathy_json, options.image_folder, options.tokenizer, options.allow_split_overlap)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------
def _skip_or_raise(problem: str, options: PackOptions, skipped: list[str]) -> None:
    """A bad image stops the packing (before any final file is written), or is counted as skipped."""
    if not options.skip_bad_images:
        raise UserError(problem + _SKIP_HINT)
    skipped.append(problem)


def _write_images(tmp_path: Path, split: str, records: list[Record], options: PackOptions,
                  skipped: list[str]) -> list[Record]:
    """Decode (in parallel, in order) and stream images into tmp_path; return the records kept."""
    size = options.image_size
    if options.dataset == "shapes":
        jobs, fn = [(options.seed, r.index, size) for r in records], _shapes_job
    else:
        jobs, fn = [(r.path if r.data is None else r.data, size, r.filename) for r in records], _decode_job
    kept: list[Record] = []
    checksums: list[int] = []  # per image kept, for check_packed and --verify (dataset.image_checksum)
    with staged_h5(tmp_path, "w") as (h5, check_written):
        shape = (len(records), 3, size, size)
        images = h5.create_dataset("images", shape=shape, maxshape=(None,) + shape[1:], dtype=np.uint8,
                                   chunks=(1,) + shape[1:])
        buffer: list[np.ndarray] = []
        # closing(): stop the worker processes at once when a bad image raises, not at garbage collection.
        with (closing(_ordered_map(fn, jobs, options.num_workers)) as results,
              progress_bar(total=len(jobs), desc=split, unit="img") as bar):
            for record, (image, error, extra) in zip(records, results):
                bar.update()
                if error is not None:
                    _skip_or_raise(error, options, skipped)
                    bar.write(f"warning: skipped {error}", file=sys.stderr)
                    continue
                for key, value in (extra or {}).items():
                    setattr(record, key, value)
                kept.append(record)
                buffer.append(image)
                checksums.append(image_checksum(image))
                if len(buffer) == _WRITE_BATCH:
                    images[len(kept) - len(buffer):len(kept)] = np.stack(buffer)
                    check_written()  # a full disk stops the packing here, not after every image is decoded
                    buffer = []
        if buffer:
            images[len(kept) - len(buffer):len(kept)] = np.stack(buffer)
        images.resize(len(kept), axis=0)
        h5.create_dataset("checksums", data=np.array(checksums, dtype=np.uint32))
    return kept


def _write_captions(tmp_path: Path, split: str, records: list[Record], word_map: dict[str, int],
                    options: PackOptions) -> None:
    """Add captions, caplens, references, filenames, attrs (and the shapes objects) to a split file."""
    captions_per_image, max_words = options.captions_per_image, options.max_caption_words
    num_rows = len(records) * captions_per_image
    captions = np.zeros((num_rows, max_words + 2), dtype=np.int32)
    caplens = np.zeros(num_rows, dtype=np.int32)
    for i, record in enumerate(records):
        chosen = choose_captions(len(record.tokens), captions_per_image, options.seed, record.filename)
        for j, c in enumerate(chosen):
            row = i * captions_per_image + j
            captions[row], caplens[row] = encode_caption(record.tokens[c][:max_words], word_map, max_words)
    text = h5py.string_dtype("utf-8")
    num_images = len(records)
    with staged_h5(tmp_path, "a") as (h5, _):
        h5.create_dataset("captions", data=captions)
        h5.create_dataset("caplens", data=caplens)
        h5.create_dataset("references", data=[json.dumps(r.references) for r in records], dtype=text,
                          shape=(num_images,))
        h5.create_dataset("filenames", data=[r.filename for r in records], dtype=text, shape=(num_images,))
        if records and all(r.image_id is not None for r in records):  # else eval keys results by file name
            h5.create_dataset("image_ids", data=np.array([r.image_id for r in records], dtype=np.int64))
        if options.dataset == "shapes":  # the boxes eval scores attention against
            h5.create_dataset("objects", data=[json.dumps(r.objects) for r in records], dtype=text,
                              shape=(num_images,))
        h5.attrs.update({"captions_per_image": captions_per_image, "max_caption_words": max_words,
                         "image_size": options.image_size, "dataset": options.dataset, "split": split,
                         "tokenizer": options.tokenizer})


def pack(records: dict[str, list[Record]], options: PackOptions) -> dict[str, Any]:
    """Write {train,val,test}.h5, word_map.json and dataset.json for `records`; return the summary.

    `options` must be resolved (`PackOptions.resolved`; create_input_files does it). Captions longer
    than max_caption_words tokens are truncated to that many (Karpathy-style code drops them instead,
    which can leave an image with no caption). The vocabulary counts the train split only. A bad image
    (missing, empty, truncated, not an image, too large) or an image without captions raises
    UserError naming it before any final file is written, unless skip_bad_images.

    All or nothing: every file is staged under filesafety's temp name beside its final name, and the
    set is renamed into place only once all of it is written (`_rename_into_place`).
    """
    folder = Path(options.output_folder)
    _claim_output_folder(folder, options.force)
    skipped: list[str] = []
    records = _prechecked(records, options, skipped)
    created = not folder.is_dir()
    staged: dict[str, Path] = {}  # final file name -> its temp file
    try:
        for split in SPLITS:
            staged[f"{split}.h5"] = _temporary_beside(folder / f"{split}.h5")
            records[split] = _write_images(staged[f"{split}.h5"], split, records[split], options, skipped)
        if not records["train"]:
            raise UserError("no training images left to pack")
        word_map = build_word_map((t[:options.max_caption_words] for r in records["train"] for t in r.tokens),
                                  options.min_word_freq)
        for split in SPLITS:
            _write_captions(staged[f"{split}.h5"], split, records[split], word_map, options)
        summary = _summary(records, word_map, options, skipped)
        for name, content in (("word_map.json", word_map), ("dataset.json", summary)):
            staged[name] = _temporary_beside(folder / name)
            with open(staged[name], "x", encoding="utf-8") as f:
                f.write(json.dumps(content, indent=1) + "\n")
        _rename_into_place(folder, staged)
    except OSError as e:  # images are read by load_image, which names its file: this is the output side
        _remove_staged(staged, folder, created)
        raise UserError(f"{folder}: cannot write ({e.strerror or one_line(e)})") from e
    except BaseException:
        _remove_staged(staged, folder, created)
        raise
    return summary


def _claim_output_folder(folder: Path, force: bool) -> None:
    """Refuse to overwrite a pack without --force, before any work. A folder without dataset.json but
    with temp files of a pack is what a killed pack left: nothing to protect, so it is redone and its
    temp files removed. (Packs have no folder lock: two packs into one folder would clash anyway.)"""
    check_writable(folder, "the packed dataset")
    existing = [name for name in FINAL_FILES if (folder / name).exists()]
    leftovers = [p for name in FINAL_FILES for p in (*folder.glob(f".{name}.*.tmp"), folder / f"{name}.tmp")
                 if p.is_file()]  # NAME.tmp: the temp name of packs written before filesafety's
    if existing and not (force or ("dataset.json" not in existing and leftovers)):
        raise UserError(f"{folder}: already has {', '.join(existing)}; use --force to overwrite")
    if folder.is_dir():
        remove_stale_temporaries(folder)
        for path in leftovers:
            path.unlink(missing_ok=True)


def _prechecked(records: dict[str, list[Record]], options: PackOptions,
                skipped: list[str]) -> dict[str, list[Record]]:
    """The records that pass the checks needing no decoding, so that a missing file in test.h5 is
    reported before hours of decoding (or skipped, with skip_bad_images)."""
    def keep(record: Record) -> bool:
        problem = _precheck(record)
        if problem is not None:
            _skip_or_raise(problem, options, skipped)
        return problem is None

    return {split: [r for r in records[split] if keep(r)] for split in SPLITS}


def _precheck(record: Record) -> str | None:
    """A one-line problem with this record that needs no decoding, or None."""
    if record.data is not None:  # an encoded image, named by its file name
        if not record.tokens:
            return f"{record.filename}: image has no captions"
        return f"{record.filename}: empty file" if not record.data else None
    if not record.path:
        return None  # generated image; its captions come with it
    if not record.tokens:
        return f"{record.path}: image has no captions"
    if not os.path.isfile(record.path):
        return f"{record.path}: file not found"
    if os.path.getsize(record.path) == 0:
        return f"{record.path}: empty file"
    return None


def _summary(records: dict[str, list[Record]], word_map: dict[str, int], options: PackOptions,
             skipped: list[str]) -> dict[str, Any]:
    """dataset.json: what was packed and how (written last, it marks a finished pack)."""
    return {"dataset": options.dataset, "splits": {s: len(records[s]) for s in SPLITS},
            "vocab_size": len(word_map), "captions_per_image": options.captions_per_image,
            "max_caption_words": options.max_caption_words, "image_size": options.image_size,
            "min_word_freq": options.min_word_freq, "seed": options.seed, "tokenizer": options.tokenizer,
            "skipped_images": len(skipped), "skipped": skipped}


def _rename_into_place(folder: Path, staged: dict[str, Path]) -> None:
    """Rename the staged set over the old pack. Every new file is complete before the old pack is
    touched, so a full disk fails earlier with the older pack intact; renames need no space. dataset.json,
    which marks a complete folder, goes first and comes back last (FINAL_FILES ends with it).

    Durable too: every file is fsynced before the first rename and the folder after the last, so a power
    loss leaves the old pack, a set without its marker, or the new pack; never a marked pack of empty files."""
    for name in FINAL_FILES:
        fsync_file(staged[name])
    (folder / "dataset.json").unlink(missing_ok=True)
    for name in FINAL_FILES:
        os.replace(staged[name], folder / name)
    fsync_folder(folder)


def _remove_staged(staged: dict[str, Path], folder: Path, created: bool) -> None:
    """Leave the output folder as it was: no temp files, and no folder if this run created it."""
    for path in staged.values():
        path.unlink(missing_ok=True)
    if created and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def create_input_files(options: PackOptions) -> dict[str, Any]:
    """Check `options`, read the source it names, then `pack` it into options.output_folder.

    Returns the summary also written to dataset.json (split sizes, vocabulary size, skipped images).
    Raises UserError for a bad option, source file or image (naming it).
    """

    options = options.resolved()
    if options.output_format == "webdataset":
        return shard_writer.write_shards(read_records(options), options)
    if options.dataset != "webdataset":
        return pack(read_records(options), options)
    if options.output_format is None:
        return shard_writer.write_word_map_pass(options.shards, options.output_folder, image_size=options.image_size,
                                                captions_per_image=options.captions_per_image,
                                                max_caption_words=options.max_caption_words,
                                                min_word_freq=options.min_word_freq, tokenizer=options.tokenizer,
                                                seed=options.seed, force=options.force)
    records, problems = shard_writer.shard_records({"train": options.shards, "val": options.val_shards,
                                                    "test": options.test_shards or ""}, options.tokenizer)
    if problems and not options.skip_bad_images:
        raise UserError(problems[0] + _SKIP_HINT)
    return pack(records, options)
