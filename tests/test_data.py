"""Tests of the data layer: shapes generator, packing (packing.py, create_input_files.py), satkit.data.dataset.CaptionDataset."""
from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, SHAPES_ARGS
from PIL import Image

import create_input_files
from satkit.data import dataset as datasets
from satkit.data import packing
from satkit.data import shapes
from satkit.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    CaptionDataset,
    collate_captions,
    load_image,
)
from satkit.data.packing import PackOptions
from satkit.infra.runtime import UserError
from satkit.data.text import SPECIAL_TOKENS, decode_ids, load_word_map, tokenize


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def read_h5(path: Path) -> dict[str, Any]:
    """Every dataset (as numpy / lists of str) and attribute of one packed split."""
    with h5py.File(path, "r") as h5:
        out = {k: (h5[k].asstr()[()].tolist() if h5[k].dtype == object else h5[k][()]) for k in h5}
        out["attrs"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in h5.attrs.items()}
    return out


def karpathy_entry(filename: str, split: str, captions: list[str], filepath: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"filename": filename, "split": split, "imgid": 0, "sentids": [],
                             "sentences": [{"raw": c, "tokens": tokenize(c)} for c in captions]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def png_with_size(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels (with almost no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


COMMON = ["a dog runs on the grass", "a black dog runs", "the dog is on the grass", "a dog plays", "a dog on grass"]


@pytest.fixture
def tiny_karpathy(tmp_path: Path, write_image: Callable[..., Path]) -> dict[str, Any]:
    """A COCO-like Karpathy JSON: filepath sub-folders, a restval image, val/test-only words."""
    images = tmp_path / "images"
    entries = [
        karpathy_entry("t0.jpg", "train", COMMON, "train2014"),
        karpathy_entry("t1.jpg", "train", ["a dog runs", "a black dog"], "train2014"),  # 2 captions: topped up
        karpathy_entry("t2.png", "train", COMMON + ["a dog", "the grass"], "train2014"),  # 7: sampled down
        karpathy_entry("t3.jpg", "train", ["A dog runs on the grass , and the dog runs far away ."] + COMMON[:4],
                       "train2014"),  # 12 words: truncated with --max-caption-words 8
        karpathy_entry("r0.jpg", "restval", COMMON, "val2014"),
        karpathy_entry("v0.jpg", "val", ["a zebra on the grass", "a zebra runs", "zebra", "a zebra", "the zebra"],
                       "val2014"),
        karpathy_entry("v1.jpg", "val", COMMON + ["a dog sleeps on a sofa"], "val2014"),
        karpathy_entry("s0.jpg", "test", ["a giraffe eats", "a tall giraffe", "giraffe", "a giraffe", "the giraffe"],
                       "val2014"),
    ]
    rng = np.random.default_rng(0)
    for e in entries:
        pixels = rng.integers(0, 256, (30, 40, 3), np.uint8)
        write_image(images / e["filepath"] / e["filename"], Image.fromarray(pixels))
    json_path = tmp_path / "dataset_coco.json"
    json_path.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return {"json": json_path, "images": images, "entries": entries, "out": tmp_path / "out"}


def karpathy_args(source: dict[str, Any], *extra: str) -> list[str]:
    return ["--dataset", "coco", "--karpathy-json", str(source["json"]), "--image-folder", str(source["images"]),
            "--output-folder", str(source["out"]), "--image-size", "32", "--num-workers", "1", *extra]


# --------------------------------------------------------------------------------------------
# shapes.py
# --------------------------------------------------------------------------------------------
def test_shapes_is_deterministic() -> None:
    for index in range(5):
        a, b = shapes.generate_image(7, index, 64), shapes.generate_image(7, index, 64)
        assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]
        assert shapes.generate_image(8, index, 64)[0].tobytes() != a[0].tobytes()
    assert shapes.generate_image(7, 0, 64)[0].tobytes() != shapes.generate_image(7, 1, 64)[0].tobytes()


@pytest.mark.parametrize("size", [48, 96])
def test_shapes_boxes_match_pixels(size: int) -> None:
    # Object colours are > 36 apart in some channel and noise is <= 18, so "within 18 of colour c on
    # every channel" classifies a pixel exactly.
    for index in range(40):
        image, objects, _, _ = shapes.generate_image(0, index, size)
        pixels = np.asarray(image, dtype=np.int16)
        assert 1 <= len(objects) <= shapes.MAX_OBJECTS
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)
        for color in {o["color"] for o in objects}:
            close = np.all(np.abs(pixels - np.array(shapes.COLORS[color])) <= shapes.NOISE, axis=2)
            boxes = [np.round(np.array(o["box"]) * size).astype(int) for o in objects if o["color"] == color]
            inside = np.zeros_like(close)
            for x0, y0, x1, y1 in boxes:
                inside[y0:y1, x0:x1] = True
                ys, xs = np.nonzero(close[y0:y1, x0:x1])
                # tight: the coloured pixels reach each edge of the box (to the pixel)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x1 - x0, y1 - y0)
            assert not np.any(close & ~inside), f"image {index}: {color} pixels outside its boxes"
        for o in objects:
            assert all(0 <= v <= 1 for v in o["box"]) and o["box"][0] < o["box"][2] and o["box"][1] < o["box"][3]


def check_caption_true(tokens: list[str], word_objects: list[int], objects: list[dict[str, Any]]) -> None:
    """An independent reading of a shapes caption against the boxes."""
    gap = shapes.MIN_GAP - 1e-9
    box = [o["box"] for o in objects]
    assert len(tokens) == len(word_objects)
    mentions: list[int] = []
    for p, (word, obj) in enumerate(zip(tokens, word_objects)):
        if word in shapes.COLORS:
            assert obj >= 0 and objects[obj]["color"] == word and tokens[p + 1] == objects[obj]["shape"]
            assert word_objects[p + 1] == obj
            mentions.append(obj)
        elif word in shapes.SHAPES:
            assert obj >= 0 and objects[obj]["shape"] == word
        else:
            assert obj == -1, (tokens, word)
    text = " ".join(tokens)
    left = lambda a, b: box[a][2] + gap <= box[b][0]  # noqa: E731
    above = lambda a, b: box[a][3] + gap <= box[b][1]  # noqa: E731
    relations = {"to the left of": left, "to the right of": lambda a, b: left(b, a), "above": above,
                 "below": lambda a, b: above(b, a)}
    for phrase, holds in relations.items():
        if f" {phrase} " in text:
            assert len(mentions) == 2 and holds(*mentions), (text, objects)
            return
    assert sorted(mentions) == list(range(len(objects))), text  # every other caption lists all objects once
    if text.startswith("from left to right"):
        assert all(left(a, b) for a, b in zip(mentions, mentions[1:])), (text, objects)
    if text.startswith("from top to bottom"):
        assert all(above(a, b) for a, b in zip(mentions, mentions[1:])), (text, objects)
    counts = [w for w in tokens if w in shapes.COUNT_WORDS]
    if counts:
        assert counts == [shapes.COUNT_WORDS[len(objects) - 1]], text


def test_shapes_captions_are_true() -> None:
    seen = set()
    for index in range(300):
        _, objects, captions, word_objects = shapes.generate_image(1, index, 96)
        assert len({tuple(c) for c in captions}) == len(captions) >= 5
        for tokens, wo in zip(captions, word_objects):
            check_caption_true(tokens, wo, objects)
            seen.add(" ".join(tokens[:4]))  # the template's opening words
    assert {"from left to right", "from top to bottom"} <= seen


# --------------------------------------------------------------------------------------------
# packing: shapes
# --------------------------------------------------------------------------------------------
def test_pack_shapes_layout_and_round_trip(shapes_folder: Path) -> None:
    word_map = load_word_map(shapes_folder / "word_map.json")
    rev = {i: w for w, i in word_map.items()}
    summary = json.loads((shapes_folder / "dataset.json").read_text())
    assert summary["splits"] == {"train": 30, "val": 3, "test": 3} and summary["skipped_images"] == 0
    assert summary["vocab_size"] == len(word_map) and summary["image_size"] == 48
    index = 0
    for split in SPLITS:
        packed = read_h5(shapes_folder / f"{split}.h5")
        num_images, captions_per_image = summary["splits"][split], 5
        assert set(packed) == {"images", "checksums", "captions", "caplens", "references", "filenames", "objects",
                               "attrs"}
        assert packed["attrs"] == {"captions_per_image": 5, "max_caption_words": 50, "image_size": 48, "dataset": "shapes",
                                   "split": split, "tokenizer": "ascii"}
        assert packed["images"].shape == (num_images, 3, 48, 48) and packed["images"].dtype == np.uint8
        assert packed["checksums"].dtype == np.uint32 and list(packed["checksums"]) == [
            zlib.crc32(image.tobytes()) for image in packed["images"]]
        assert packed["captions"].shape == (num_images * captions_per_image, 52)
        assert packed["captions"].dtype == packed["caplens"].dtype == np.int32
        with h5py.File(shapes_folder / f"{split}.h5") as h5:
            assert h5["images"].chunks == (1, 3, 48, 48) and h5["images"].compression is None
        for i in range(num_images):
            image, objects, captions, _ = shapes.generate_image(3, index, 48)
            assert packed["filenames"][i] == shapes.shape_filename(index)
            assert np.array_equal(packed["images"][i], np.asarray(image).transpose(2, 0, 1))
            assert json.loads(packed["objects"][i]) == objects
            assert json.loads(packed["references"][i]) == [" ".join(c) for c in captions]
            texts = [" ".join(c) for c in captions]
            for row in range(i * captions_per_image, (i + 1) * captions_per_image):
                ids = packed["captions"][row]
                text = decode_ids(ids, rev)
                j = texts.index(text)  # every stored caption is one of the image's own captions
                length = packed["caplens"][row]
                assert ids[0] == word_map["<start>"] and ids[length - 1] == word_map["<end>"] and not ids[length:].any()
                assert length == len(captions[j]) + 2
            index += 1


def test_word_map_order_and_special_ids(shapes_folder: Path) -> None:
    word_map = json.loads((shapes_folder / "word_map.json").read_text())
    assert word_map["<pad>"] == 0
    n = len(word_map)
    assert [word_map[t] for t in ("<unk>", "<start>", "<end>")] == [n - 3, n - 2, n - 1]
    assert sorted(word_map.values()) == list(range(len(word_map)))
    counts: dict[str, int] = {}
    for caps in read_h5(shapes_folder / "train.h5")["references"]:
        for c in json.loads(caps):
            for w in c.split():
                counts[w] = counts.get(w, 0) + 1
    words = [w for w in word_map if w not in SPECIAL_TOKENS]
    assert words == sorted(words, key=lambda w: (-counts[w], w))


def test_pack_is_byte_identical_across_runs_and_worker_counts(tmp_path: Path, shapes_folder: Path, pack) -> None:
    pack(SHAPES_ARGS[:-1] + ["1", "--output-folder", str(tmp_path / "again")])  # same seed, 1 worker
    for name in ("word_map.json", "dataset.json"):
        assert (tmp_path / "again" / name).read_bytes() == (shapes_folder / name).read_bytes()
    for split in SPLITS:
        a, b = read_h5(shapes_folder / f"{split}.h5"), read_h5(tmp_path / "again" / f"{split}.h5")
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], np.ndarray):
                assert a[key].tobytes() == b[key].tobytes(), key
            else:
                assert a[key] == b[key], key
    other = SHAPES_ARGS + ["--output-folder", str(tmp_path / "other")]
    other[other.index("--seed") + 1] = "4"
    pack(other)
    other_images = read_h5(tmp_path / "other" / "train.h5")["images"]
    assert not np.array_equal(other_images, read_h5(shapes_folder / "train.h5")["images"])


def test_python_entry_point_and_options(tmp_path: Path) -> None:
    out = tmp_path / "api"
    options = PackOptions(dataset="shapes", output_folder=str(out), num_images=12, image_size=32, num_workers=1)
    summary = packing.create_input_files(options)
    assert summary["splits"] == {"train": 10, "val": 1, "test": 1} and summary["image_size"] == 32
    assert sorted(os.listdir(out)) == sorted(packing.FINAL_FILES)
    assert options.val_fraction is None  # the caller's options are not changed; `resolved` returns a copy
    resolved = options.resolved()
    assert (resolved.val_fraction, resolved.test_fraction, resolved.captions_per_image) == (1 / 12, 1 / 12, 5)
    assert PackOptions(dataset="shapes", output_folder="x").resolved().image_size == 96
    custom = PackOptions(dataset="custom", output_folder="x", captions_file="c.csv", image_folder=str(tmp_path))
    assert (custom.resolved().image_size, custom.resolved().val_fraction) == (256, 0.1)
    assert custom.resolved().num_workers >= 1
    bad = {"dataset": ("mnist", "--dataset='mnist' is not one of flickr8k, flickr30k, coco, custom, shapes"),
           "tokenizer": ("nltk", "--tokenizer='nltk' is not one of ascii, unicode"),
           "captions_per_image": (0, "--captions-per-image=0 must be >= 1"),
           "image_size": (31, "--image-size=31 must be >= 32 for --dataset shapes"),  # the generator's own bound
           "seed": (-1, "--seed=-1 must be >= 0"),
           "num_workers": (0, "--num-workers=0 must be >= 1"),
           "val_fraction": (float("nan"), "--val-fraction=nan must be a finite number"),
           "test_fraction": (1.0, "--test-fraction=1.0 must be < 1.0"),
           "karpathy_json": ("k.json", "--dataset shapes does not use --karpathy-json")}
    for name, (value, message) in bad.items():
        with pytest.raises(UserError, match=re.escape(message)):
            packing.create_input_files(PackOptions(**{"dataset": "shapes", "output_folder": "x", name: value}))


def test_cli_flags_map_onto_pack_options() -> None:
    """Every PackOptions field is a flag with the same default (written once, in PackOptions)."""
    parser = create_input_files.get_args_parser()
    args = vars(parser.parse_args(["--dataset", "shapes", "--output-folder", "o"]))
    flags = {k: v for k, v in args.items() if k not in ("debug", "verify")}  # --verify is not a packing option
    assert flags == dataclasses.asdict(PackOptions("shapes", "o"))
    for spelling in ("--num-workers", "--workers"):
        assert parser.parse_args(["--dataset", "shapes", "--output-folder", "o", spelling, "3"]).num_workers == 3


def test_debug_flag_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--dataset", "shapes", "--output-folder", str(tmp_path / "o"), "--max-caption-words", "0"]
    assert create_input_files.main(argv) == 1 and "error: --max-caption-words=0 must be >= 1" in capsys.readouterr().err
    with pytest.raises(UserError, match="--max-caption-words=0 must be >= 1"):
        create_input_files.main(argv + ["--debug"])


# --------------------------------------------------------------------------------------------
# packing: Karpathy JSON and custom captions
# --------------------------------------------------------------------------------------------
def test_karpathy_json_subfolders_restval_vocab_and_sampling(tiny_karpathy: dict[str, Any], pack) -> None:
    source = tiny_karpathy
    pack(karpathy_args(source, "--min-word-freq", "1", "--max-caption-words", "8", "--seed", "5"))
    out = source["out"]
    word_map = load_word_map(out / "word_map.json")
    rev = {i: w for w, i in word_map.items()}
    assert "zebra" not in word_map and "giraffe" not in word_map and "sofa" not in word_map  # val/test-only words
    assert {"dog", "grass", "runs", "and"} <= set(word_map)  # "and" only in the first 8 words of t3's long caption
    assert "far" not in word_map and "away" not in word_map  # only past --max-caption-words
    train, val, test = (read_h5(out / f"{s}.h5") for s in SPLITS)
    assert train["filenames"] == ["train2014/t0.jpg", "train2014/t1.jpg", "train2014/t2.png", "train2014/t3.jpg",
                                  "val2014/r0.jpg"]  # restval counts as train
    assert val["filenames"] == ["val2014/v0.jpg", "val2014/v1.jpg"] and test["filenames"] == ["val2014/s0.jpg"]
    by_name = {e["filename"]: e for e in source["entries"]}
    for packed in (train, val, test):
        assert packed["captions"].shape[1] == 10
        for i, name in enumerate(packed["filenames"]):
            entry = by_name[os.path.basename(name)]
            raws = [s["raw"] for s in entry["sentences"]]
            assert json.loads(packed["references"][i]) == raws  # all references, not only the 5 sampled
            tokenised = [" ".join(w if w in word_map else "<unk>" for w in tokenize(r)[:8]) for r in raws]
            decoded = [decode_ids(packed["captions"][r], rev) for r in range(5 * i, 5 * i + 5)]
            assert all(c in tokenised for c in decoded), (decoded, tokenised)
            if len(raws) == 5:  # exactly enough: each caption once
                assert sorted(decoded) == sorted(tokenised)
            if name.endswith("t1.jpg"):  # 2 captions topped up to 5 from its own
                assert set(decoded) == set(tokenised)
            if name.endswith("t2.png"):  # 7 distinct captions sampled down to 5 distinct
                assert len(set(decoded)) == 5
    t3 = train["filenames"].index("train2014/t3.jpg")
    assert 10 in train["caplens"][5 * t3:5 * t3 + 5]  # the 12-word caption is truncated to 8 (+2)
    # the same inputs and seed give the same bytes; another seed samples differently
    pack(karpathy_args(source, "--min-word-freq", "1", "--max-caption-words", "8", "--seed", "5", "--output-folder",
                       str(out.parent / "again")))
    assert np.array_equal(read_h5(out.parent / "again" / "train.h5")["captions"], train["captions"])


def test_karpathy_json_real_flickr8k_subset(flickr8k: Path, tmp_path: Path, pack) -> None:
    data = json.loads((flickr8k / "dataset_flickr8k.json").read_text())
    keep, want = [], {"train": 10, "val": 3, "test": 3}
    for entry in data["images"]:
        if want[entry["split"]] > 0:
            want[entry["split"]] -= 1
            keep.append(entry)
    small = tmp_path / "flickr8k_small.json"
    small.write_text(json.dumps({"dataset": "flickr8k", "images": keep}))
    out = tmp_path / "out"
    pack(["--dataset", "flickr8k", "--karpathy-json", str(small), "--image-folder", str(flickr8k / "images"),
          "--output-folder", str(out), "--image-size", "64", "--min-word-freq", "1"])
    word_map = load_word_map(out / "word_map.json")
    rev = {i: w for w, i in word_map.items()}
    train = read_h5(out / "train.h5")
    assert train["images"].shape == (10, 3, 64, 64) and train["filenames"][0] == keep[0]["filename"]
    decoded = [decode_ids(train["captions"][r], rev) for r in range(5)]
    assert sorted(decoded) == sorted(" ".join(s["tokens"]) for s in keep[0]["sentences"])
    dataset = CaptionDataset(str(out), "test")
    assert len(dataset) == 3 and dataset[0]["references"] == [s["raw"] for s in keep[13]["sentences"]]


@pytest.mark.parametrize("fmt", ["csv", "token"])
def test_custom_captions_file(fmt: str, tmp_path: Path, write_image: Callable[..., Path], pack) -> None:
    names = [f"img{i:02d}.jpg" for i in range(20)]
    for name in names:
        write_image(tmp_path / "imgs" / name)
    if fmt == "csv":  # the Kaggle Flickr8k captions.txt layout, with a quoted and an unquoted comma
        lines = ["image,caption"] + [f'{n},"A Dog, running {i}."' if j == 0 else f"{n},a dog runs {j} , fast"
                                     for i, n in enumerate(names) for j in range(3)]
    else:
        lines = [f"{n}#{j}\t{'A Dog, running ' + str(i) + '.' if j == 0 else f'a dog runs {j} , fast'}"
                 for i, n in enumerate(names) for j in range(3)]
    captions = tmp_path / ("captions.txt" if fmt == "csv" else "token.txt")
    captions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    pack(["--dataset", "custom", "--captions-file", str(captions), "--image-folder", str(tmp_path / "imgs"),
          "--output-folder", str(out), "--image-size", "32", "--val-fraction", "0.2", "--test-fraction", "0.1",
          "--min-word-freq", "1", "--num-workers", "2"])
    splits = {s: read_h5(out / f"{s}.h5") for s in SPLITS}
    assert {s: len(packed["filenames"]) for s, packed in splits.items()} == {"train": 14, "val": 4, "test": 2}
    assert sorted(sum((packed["filenames"] for packed in splits.values()), [])) == names
    word_map = load_word_map(out / "word_map.json")
    rev = {i: w for w, i in word_map.items()}
    i = int(splits["train"]["filenames"][0][3:5])
    refs = json.loads(splits["train"]["references"][0])
    assert refs == [f"A Dog, running {i}.", "a dog runs 1 , fast", "a dog runs 2 , fast"]
    decoded = {decode_ids(splits["train"]["captions"][r], rev) for r in range(5)}
    assert decoded <= {f"a dog running {i}", "a dog runs 1 fast", "a dog runs 2 fast"}
    val_only = {w for packed in (splits["val"], splits["test"]) for r in packed["references"] for c in json.loads(r)
                for w in tokenize(c)} - {w for r in splits["train"]["references"] for c in json.loads(r)
                                         for w in tokenize(c)}
    assert val_only and not val_only & set(word_map)


def test_custom_bad_header_and_missing_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = create_input_files.main
    (tmp_path / "imgs").mkdir()
    bad = tmp_path / "captions.csv"
    bad.write_text("file,text\na.jpg,a dog\n")
    base = ["--dataset", "custom", "--image-folder", str(tmp_path / "imgs"), "--output-folder", str(tmp_path / "o")]
    cases = {
        str(bad): "expected a CSV header with 'image' and 'caption' columns",
        str(tmp_path / "nope.csv"): "captions file not found",
    }
    for path, message in cases.items():
        assert main(base + ["--captions-file", path]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}: ") and message in err and "\n" not in err
    assert main(["--dataset", "custom", "--captions-file", str(bad), "--image-folder", str(tmp_path / "none"),
                     "--output-folder", str(tmp_path / "o")]) == 1
    assert "image folder not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["--dataset", "coco", "--karpathy-json", str(tmp_path / "bad.json"), "--image-folder",
                     str(tmp_path / "imgs"), "--output-folder", str(tmp_path / "o")]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["--dataset", "coco", "--image-folder", str(tmp_path / "imgs"), "--output-folder", "x"]) == 1
    assert "needs --karpathy-json" in capsys.readouterr().err
    assert main(["--dataset", "coco", "--karpathy-json", str(tmp_path / "bad.json"), "--image-folder",
                     str(tmp_path / "imgs"), "--output-folder", "x", "--val-fraction", "0.2"]) == 1
    assert "takes its split from the Karpathy JSON" in capsys.readouterr().err
    assert main(["--dataset", "shapes", "--output-folder", "x", "--image-folder", str(tmp_path / "imgs")]) == 1
    assert "does not use --image-folder" in capsys.readouterr().err
    assert main(["--dataset", "shapes", "--output-folder", "x", "--val-fraction", "0.6",
                     "--test-fraction", "0.5"]) == 1
    assert "sum to < 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_error_is_one_line_with_exit_code(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    argv = ["--dataset", "flickr8k", "--karpathy-json", str(missing), "--image-folder", str(tmp_path),
            "--output-folder", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, str(ROOT / "create_input_files.py"), *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr == f"error: {missing}: Karpathy JSON not found\n"


# --------------------------------------------------------------------------------------------
# images: modes, orientation, bad files
# --------------------------------------------------------------------------------------------
def test_load_image_converts_modes(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    grey = write_image(tmp_path / "grey.png", Image.new("L", (20, 10), 128))
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 10, 10))  # left half fully transparent -> white
    rgba_path = write_image(tmp_path / "rgba.png", rgba)
    cmyk = write_image(tmp_path / "cmyk.jpg", Image.new("CMYK", (20, 10), (0, 255, 255, 0)))  # red in CMYK
    i16 = write_image(tmp_path / "i16.png", Image.fromarray(np.full((10, 20), 32896, dtype=np.uint16)))
    palette = Image.new("P", (20, 10), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(0, (0, 0, 10, 10))
    pal_path = write_image(tmp_path / "pal.png", palette, transparency=0)  # index 0 transparent
    assert Image.open(i16).mode.startswith("I")
    got = {p.name: load_image(str(p), 16) for p in (grey, rgba_path, cmyk, i16, pal_path)}
    for name, arr in got.items():
        assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8, name
    assert (got["grey.png"] == 128).all()
    assert (got["rgba.png"][:, :, :7] == 255).all() and (got["rgba.png"][:, :, 9:] == [[[255]], [[0]], [[0]]]).all()
    assert got["cmyk.jpg"][0].min() > 200 and got["cmyk.jpg"][1:].max() < 60
    assert (got["i16.png"] == 128).all()  # 16-bit scaled by 1/257, not clipped to 255
    assert (got["pal.png"][:, :, :7] == 255).all() and (got["pal.png"][:, :, 9:] == [[[0]], [[200]], [[0]]]).all()


def test_load_image_honours_exif_orientation(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display = stored rotated 90 degrees clockwise, so left -> top
    path = write_image(tmp_path / "rot.jpg", stored, exif=exif.tobytes(), quality=95)
    arr = load_image(path, 32)  # a Path works too
    top, bottom = arr[:, :12].reshape(3, -1).mean(1), arr[:, 20:].reshape(3, -1).mean(1)
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_load_image_tensor_is_the_packed_image_normalised(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
    path = write_image(tmp_path / "photo.png", Image.fromarray(pixels))
    tensor, display = datasets.load_image_tensor(path, 24)
    packed = load_image(path, 24)  # (3, S, S) uint8, as create_input_files.py stores it
    assert tensor.shape == (3, 24, 24) and tensor.dtype == torch.float32 and display.size == (24, 24)
    assert torch.equal(tensor, datasets.normalize_image(torch.from_numpy(packed)))
    assert np.array_equal(np.asarray(display), packed.transpose(1, 2, 0))
    with pytest.raises(UserError, match=r"missing\.png: file not found"):
        datasets.load_image_tensor(tmp_path / "missing.png", 24)


def test_datasets_does_not_import_the_packer() -> None:
    """caption.py reads images through satkit/data/dataset.py; it must not pull in the packing library or script."""
    tree = ast.parse((ROOT / "satkit" / "data" / "dataset.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for name in (node.module, *(f"{node.module}.{alias.name}" for alias in node.names))}
    assert not imported & {"create_input_files", "satkit.data.packing", "satkit.data.shapes"}


def write_bad_images(folder: Path, write_image: Callable[..., Path]) -> dict[str, str]:
    """Bad files by kind -> the expected message fragment ("missing" is not written)."""
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)).save(good, "JPEG")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(png_with_size(20000, 20000))  # > 2x the limit: DecompressionBombError
    (folder / "bomb_warn.png").write_bytes(png_with_size(10000, 10000))  # > 1x the limit: warning made an error
    return {"truncated.jpg": "truncated image file", "empty.jpg": "empty file", "text.jpg": "not an image file",
            "missing.jpg": "file not found", "bomb.png": "decompression-bomb limit",
            "bomb_warn.png": "decompression-bomb limit"}


@pytest.mark.parametrize("kind", ["truncated.jpg", "empty.jpg", "text.jpg", "missing.jpg", "bomb.png", "bomb_warn.png"])
def test_bad_image_stops_before_writing(kind: str, tiny_karpathy: dict[str, Any], write_image: Callable[..., Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    source = tiny_karpathy
    messages = write_bad_images(source["images"] / "val2014", write_image)
    data = json.loads(source["json"].read_text())
    data["images"].append(karpathy_entry(kind, "test", COMMON, "val2014"))  # the last split: train/val already done
    source["json"].write_text(json.dumps(data))
    assert create_input_files.main(karpathy_args(source, "--workers", "2")) == 1  # the old spelling of --num-workers
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {source['images'] / 'val2014' / kind}: ") and messages[kind] in err, err
    assert not source["out"].exists()  # nothing written, not even temporary files


def test_skip_bad_images_and_images_without_captions(tiny_karpathy: dict[str, Any], write_image: Callable[..., Path],
                                                     capsys: pytest.CaptureFixture[str], pack) -> None:
    source = tiny_karpathy
    messages = write_bad_images(source["images"] / "val2014", write_image)
    data = json.loads(source["json"].read_text())
    data["images"].append(karpathy_entry("t9.jpg", "test", ["", " , ."], "train2014"))  # no words at all
    source["json"].write_text(json.dumps(data))
    assert create_input_files.main(karpathy_args(source)) == 1
    assert "train2014/t9.jpg: image has no captions" in capsys.readouterr().err
    for kind in messages:
        data["images"].append(karpathy_entry(kind, "val", COMMON, "val2014"))
    source["json"].write_text(json.dumps(data))
    pack(karpathy_args(source, "--skip-bad-images"))
    summary = json.loads((source["out"] / "dataset.json").read_text())
    assert summary["skipped_images"] == len(messages) + 1 and summary["splits"] == {"train": 5, "val": 2, "test": 1}
    assert read_h5(source["out"] / "val.h5")["images"].shape[0] == 2
    assert "skipped 7 bad images" in capsys.readouterr().out


def test_existing_output_needs_force(tiny_karpathy: dict[str, Any], capsys: pytest.CaptureFixture[str], pack) -> None:
    source = tiny_karpathy
    source["out"].mkdir()
    (source["out"] / "word_map.json").write_text("{}")
    assert create_input_files.main(karpathy_args(source)) == 1
    assert "already has word_map.json; use --force" in capsys.readouterr().err
    assert sorted(os.listdir(source["out"])) == ["word_map.json"]
    pack(karpathy_args(source, "--force"))
    assert sorted(os.listdir(source["out"])) == sorted(packing.FINAL_FILES)


def test_records_with_image_bytes_pack_the_same_pixels_as_files(tmp_path: Path,
                                                               write_image: Callable[..., Path]) -> None:
    """A Record may carry its encoded image in `data` (a WebDataset shard's member): packed with the very
    preprocessing of a file (EXIF, modes, resize), decoded in the worker processes, errors named by filename."""
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the bytes path must honour EXIF too
    files = {"a.jpg": write_image(tmp_path / "imgs" / "a.jpg", photo, exif=exif.tobytes()),
             "b.png": write_image(tmp_path / "imgs" / "b.png", Image.new("RGBA", (20, 40), (0, 90, 200, 128))),
             "c.png": write_image(tmp_path / "imgs" / "c.png", Image.new("L", (16, 16), 77)),
             "d.jpg": write_image(tmp_path / "imgs" / "d.jpg", Image.new("CMYK", (24, 24), (0, 255, 255, 0)))}
    splits = {"train": ["a.jpg", "b.png"], "val": ["c.png"], "test": ["d.jpg"]}

    def records(by_bytes: bool) -> dict[str, list[packing.Record]]:
        out: dict[str, list[packing.Record]] = {}
        for split, names in splits.items():
            out[split] = []
            for name in names:
                record = (packing.Record(filename=name, data=files[name].read_bytes()) if by_bytes
                          else packing.Record(filename=name, path=str(files[name])))
                record.add_caption("a red square", ["a", "red", "square"])
                out[split].append(record)
        return out

    def options(name: str, workers: int) -> PackOptions:
        return PackOptions(dataset="custom", output_folder=str(tmp_path / name), image_size=24, num_workers=workers,
                           min_word_freq=1, val_fraction=0.1, test_fraction=0.1)

    packing.pack(records(by_bytes=False), options("by_path", 1))
    packing.pack(records(by_bytes=True), options("by_bytes", 2))
    for split in SPLITS:
        by_path = read_h5(tmp_path / "by_path" / f"{split}.h5")
        by_bytes = read_h5(tmp_path / "by_bytes" / f"{split}.h5")
        assert by_bytes["images"].shape == (len(splits[split]), 3, 24, 24)
        assert np.array_equal(by_bytes["images"], by_path["images"]), split
        assert np.array_equal(by_bytes["checksums"], by_path["checksums"]) and by_bytes["filenames"] == splits[split]
    assert "data=" not in repr(records(by_bytes=True)["val"][0])  # no image bytes in a repr
    bad = records(by_bytes=True)
    bad["test"][0].data = files["d.jpg"].read_bytes()[:200]
    with pytest.raises(UserError, match=r"^d\.jpg: truncated image file"):
        packing.pack(bad, options("bad", 1))
    bad["test"][0].data = b""
    with pytest.raises(UserError, match=r"^d\.jpg: empty file"):
        packing.pack(bad, options("bad", 1))
    assert not (tmp_path / "bad").exists()


def test_pack_stages_under_filesafety_temp_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pack) -> None:
    """Split files are staged as `.NAME.PID.HEX.tmp`, the one temp name of filesafety; a pack killed
    before its dataset.json leaves such files, and the next pack redoes the folder without --force."""
    out, staged = tmp_path / "packed", []
    write_captions = packing._write_captions

    def spy(tmp: Path, split: str, *args: Any) -> None:
        staged.append(tmp.name)
        write_captions(tmp, split, *args)

    monkeypatch.setattr(packing, "_write_captions", spy)
    args = ["--dataset", "shapes", "--num-images", "12", "--image-size", "32", "--workers", "1",
            "--output-folder", str(out)]
    pack(args)
    assert [re.fullmatch(rf"\.(\w+)\.h5\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", name)[1] for name in staged] == list(SPLITS)
    (out / "dataset.json").unlink()
    (out / ".val.h5.1.0123abcd.tmp").write_bytes(b"")
    pack(args)
    assert sorted(os.listdir(out)) == sorted(packing.FINAL_FILES)


def test_choose_captions() -> None:
    assert packing.choose_captions(5, 5, 0, "a") == [0, 1, 2, 3, 4]
    up = packing.choose_captions(2, 5, 0, "a")
    assert up[:2] == [0, 1] and set(up) <= {0, 1} and up == packing.choose_captions(2, 5, 0, "a")
    down = packing.choose_captions(9, 5, 0, "a")
    assert len(set(down)) == 5 and max(down) < 9 and down == packing.choose_captions(9, 5, 0, "a")
    assert {tuple(packing.choose_captions(9, 5, s, "a")) for s in range(10)} != {tuple(down)}


# --------------------------------------------------------------------------------------------
# satkit/data/dataset.py
# --------------------------------------------------------------------------------------------
def test_caption_dataset_items(shapes_folder: Path) -> None:
    dataset = CaptionDataset(str(shapes_folder), "val")
    sizes = (len(dataset), dataset.num_images, dataset.captions_per_image, dataset.image_size)
    assert sizes == (3, 3, 5, 48)
    raw = read_h5(shapes_folder / "val.h5")
    item = dataset[1]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 48, 48)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(item["image"] * std + mean, torch.from_numpy(raw["images"][1]).float() / 255, atol=1e-5)
    assert item["captions"].dtype == torch.long and item["captions"].tolist() == raw["captions"][5:10].tolist()
    assert item["caplens"].tolist() == raw["caplens"][5:10].tolist() and item["index"] == 1
    assert item["references"] == json.loads(raw["references"][1]) == dataset.references(1)
    assert dataset.objects(1) == json.loads(raw["objects"][1]) and dataset.filename(1) == raw["filenames"][1]
    assert "references" not in CaptionDataset(str(shapes_folder), "train")[0]
    flipped = CaptionDataset(str(shapes_folder), "val", transform=lambda im: im.flip(-1))[1]["image"]
    assert torch.equal(flipped, item["image"].flip(-1))
    with pytest.raises(IndexError):
        dataset[3]


def test_caption_dataset_errors(shapes_folder: Path, tmp_path: Path, tiny_karpathy: dict[str, Any], pack) -> None:
    with pytest.raises(ValueError, match=r"nowhere/val.h5 not found; run create_input_files.py"):
        CaptionDataset(str(tmp_path / "nowhere"), "val")
    with pytest.raises(ValueError, match="split 'dev'"):
        CaptionDataset(str(shapes_folder), "dev")
    pack(karpathy_args(tiny_karpathy))
    out = tiny_karpathy["out"]
    assert CaptionDataset(str(out), "val").objects(0) is None
    with h5py.File(out / "val.h5", "a") as h5:
        del h5["references"]
    with pytest.raises(ValueError, match="val.h5: lacks references"):
        CaptionDataset(str(out), "val")


def test_packs_with_the_old_max_len_attribute_still_load(shapes_folder: Path, tmp_path: Path) -> None:
    """Packs written before --max-caption-words store the same value as the attribute "max_len"."""
    old = tmp_path / "old"
    old.mkdir()
    for path in shapes_folder.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    with h5py.File(old / "val.h5", "a") as h5:
        h5.attrs["max_len"] = h5.attrs.pop("max_caption_words")
    assert datasets.check_packed(str(old), "val")["max_caption_words"] == 50
    assert CaptionDataset(str(old), "val")[0]["captions"].shape == (5, 52)


def check_loader(dataset: CaptionDataset, **kwargs: Any) -> None:
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_captions, **kwargs)
    seen = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 48, 48) and batch["captions"].shape[1:] == (5, 52)
        for b, i in enumerate(batch["index"].tolist()):
            item = dataset[i]
            assert torch.equal(batch["image"][b], item["image"]) and torch.equal(batch["captions"][b], item["captions"])
            assert torch.equal(batch["caplens"][b], item["caplens"]) and batch["references"][b] == item["references"]
            seen += 1
    assert seen == len(dataset)


def test_dataloader_with_fork_workers(shapes_folder: Path) -> None:
    dataset = CaptionDataset(str(shapes_folder), "val")
    dataset[0]  # a handle opened in the parent must not be reused by forked workers
    check_loader(dataset, num_workers=2)
    train = torch.utils.data.DataLoader(CaptionDataset(str(shapes_folder), "train"), batch_size=8, num_workers=2,
                                        shuffle=True, collate_fn=collate_captions)
    assert sum(len(b["index"]) for b in train) == 30 and "references" not in next(iter(train))


def test_dataloader_with_spawn_workers(shapes_folder: Path) -> None:
    dataset = CaptionDataset(str(shapes_folder), "test")
    dataset[0]
    check_loader(dataset, num_workers=1, multiprocessing_context="spawn")
