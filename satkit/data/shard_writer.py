"""Writing WebDataset shards (the reader is shards.py): any pack source's records as img2dataset-style
shards (`create_input_files.py <source> --output-format webdataset`), the word-map pass that makes a folder
of shards a data_folder (`--dataset webdataset --shards PATTERN`), and shards read back into packing
records (`--dataset webdataset --output-format hdf5`)."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from satkit.data.records import Record, build_word_map
from satkit.data.shards import (IMAGE_EXTENSIONS, MARKER, BadSample, check_shards, expand_shards, sample_captions,
                                scan_captions, shard_samples)
from satkit.infra.filesafety import atomic_write_text
from satkit.infra.progress import progress_bar
from satkit.infra.runtime import UserError, one_line


def write_word_map_pass(pattern: str, output_folder: str, *, image_size: int, captions_per_image: int,
                        max_caption_words: int, min_word_freq: int, tokenizer: str, seed: int = 0, force: bool = False,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`create_input_files.py --dataset webdataset --shards PATTERN`: word_map.json and dataset.json (the
    marker: shard list, sample counts, how to encode) for training from the shards; no image is written."""

    folder = Path(output_folder)
    if (folder / MARKER).exists() and not force:
        raise UserError(f"{folder} already holds {MARKER}; pass --force to overwrite it")
    urls = expand_shards(pattern, "--shards")
    check_shards(urls)
    counts, good, bad = scan_captions(urls, tokenizer, max_caption_words)
    if not good:
        raise UserError(f"{pattern}: no sample with an image and a caption in {len(urls)} shard(s)")
    word_map = build_word_map([counts.elements()], min_word_freq)  # streams the counts: memory stays flat
    summary = {"dataset": "webdataset", "data_format": "webdataset", "shards": pattern, "num_shards": len(urls),
               "shard_files": [os.path.basename(u) for u in urls], "num_samples": good, "bad_samples": bad,
               "vocab_size": len(word_map), "captions_per_image": captions_per_image,
               "max_caption_words": max_caption_words, "image_size": image_size, "min_word_freq": min_word_freq,
               "tokenizer": tokenizer, "seed": seed, **(extra or {})}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "word_map.json", json.dumps(word_map, indent=1) + "\n")
    atomic_write_text(folder / MARKER, json.dumps(summary, indent=1) + "\n")  # last: marks a finished pass
    return summary


def _sample_key(filename: str, seen: set[str]) -> str:
    """A webdataset key from a file name: no dots or slashes (webdataset splits a member's name at its
    first dot), unique within the conversion."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(filename)[0]) or "sample"
    unique, n = key, 1
    while unique in seen:
        unique, n = f"{key}_{n}", n + 1
    seen.add(unique)
    return unique


def _record_image(record: Any, image_size: int, seed: int) -> tuple[bytes, str]:
    """The bytes a shard stores for one record: the source file as it is (so the stream preprocesses the
    very file the packer would), or a generated shapes image as PNG."""
    if record.path:
        try:
            with open(record.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"{record.path}: cannot read ({e.strerror or one_line(e)})") from None
        ext = os.path.splitext(record.path)[1].lower().lstrip(".")
        return data, ext if ext in IMAGE_EXTENSIONS else "jpg"
    from satkit.data.shapes import generate_image

    image, objects, tokens, _ = generate_image(seed, record.index, image_size)
    record.objects, record.tokens, record.references = objects, tokens, [" ".join(t) for t in tokens]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def write_split_shards(records: Sequence[Any], folder: Path, split: str, *, shard_size: int, image_size: int,
                       seed: int) -> list[Path]:
    """One split's records as img2dataset-style shards `{split}-000000.tar`, ... under temp names (returned,
    renamed by the caller once every split is written): KEY.jpg|png, KEY.txt (the first caption) and KEY.json
    (`caption`, every reference in `captions`, their `tokens`, the source `filename`, `image_id`)."""
    import webdataset as wds

    written: list[Path] = []
    seen: set[str] = set()
    pattern = str(folder / f".tmp-{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0,
                         post=lambda name: written.append(Path(name))) as writer:
        for record in progress_bar(records, desc=f"{split} shards", unit="img"):
            data, ext = _record_image(record, image_size, seed)
            if not record.tokens:
                continue  # the packer refuses or skips an image without captions (packing._prechecked)
            meta = {"caption": record.references[0], "captions": record.references, "tokens": record.tokens,
                    "filename": record.filename, "image_id": record.image_id}
            writer.write({"__key__": _sample_key(record.filename, seen), ext: data,
                          "txt": record.references[0], "json": meta})
    return written


def write_shards(records: dict[str, list[Any]], options: Any) -> dict[str, Any]:
    """`create_input_files.py <source> --output-format webdataset`: every split as shards, then the word map
    and marker of the train shards (`write_word_map_pass`), so the folder is ready as a data_folder. All or
    nothing: shards are written under temp names and renamed once every split is done; the marker last."""
    folder = Path(options.output_folder)
    if (folder / MARKER).exists() and not options.force:
        raise UserError(f"{folder} already holds {MARKER}; pass --force to overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    try:
        for split, split_records in records.items():
            written[split] = write_split_shards(split_records, folder, split, shard_size=options.shard_size,
                                                image_size=options.image_size, seed=options.seed)
    except BaseException:
        for path in (p for paths in written.values() for p in paths):
            path.unlink(missing_ok=True)
        for path in folder.glob(".tmp-*.tar"):
            path.unlink()
        raise
    patterns = {}
    for split, paths in written.items():
        for old in folder.glob(f"{split}-*.tar"):  # --force over older shards: none of theirs stays
            old.unlink()
        for path in paths:
            path.rename(folder / path.name.removeprefix(".tmp-"))
        patterns[split] = _brace_pattern(folder, split, len(paths))
    if not written.get("train"):
        raise UserError("no training images to write")
    return write_word_map_pass(patterns["train"], str(folder), image_size=options.image_size,
                               captions_per_image=options.captions_per_image,
                               max_caption_words=options.max_caption_words, min_word_freq=options.min_word_freq,
                               tokenizer=options.tokenizer, seed=options.seed, force=True,
                               extra={"splits": {s: len(r) for s, r in records.items()},
                                      "patterns": {s: p for s, p in patterns.items() if p}})


def _brace_pattern(folder: Path, split: str, count: int) -> str:
    if count == 0:
        return ""
    last = f"{count - 1:06d}"
    return str(folder / (f"{split}-{last}.tar" if count == 1 else f"{split}-{{000000..{last}}}.tar"))


def shard_records(patterns: dict[str, str], tokenizer: str) -> tuple[dict[str, list[Any]], list[str]]:
    """The samples of each split's shards as packing records carrying their image bytes (`--dataset webdataset
    --output-format hdf5`), and the problems of the samples that cannot be packed. Holds every image's
    bytes in memory: for the small datasets an HDF5 pack is for."""

    records: dict[str, list[Any]] = {}
    problems: list[str] = []

    def count_error(error: Exception) -> bool:
        problems.append(f"unreadable tar member or shard ({one_line(error)})")
        return True

    split_urls = {split: expand_shards(pattern, "--shards" if split == "train" else f"--{split}-shards")
                  if pattern else [] for split, pattern in patterns.items()}
    check_shards([url for urls in split_urls.values() for url in urls])  # every split's, before any is read
    for split, urls in split_urls.items():
        records[split] = []
        for sample in progress_bar(shard_samples(urls, count_error), desc=f"{split} shards", unit="sample"):
            key, url = sample["__key__"], sample.get("__url__", "")
            data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            try:
                references, tokens, name = sample_captions(sample, tokenizer)
            except BadSample as e:
                problems.append(f"{url}: {key}: {e}")
                continue
            if data is None:
                problems.append(f"{url}: {key}: no image member")
                continue
            meta = json.loads(sample["json"]) if "json" in sample else {}
            image_id = meta.get("image_id") if isinstance(meta, dict) else None
            records[split].append(Record(filename=name, data=data, tokens=tokens, references=references,
                                         image_id=image_id if isinstance(image_id, int) else None))
    return records, problems
