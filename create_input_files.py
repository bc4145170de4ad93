"""Pack a captioning dataset into one folder: {train,val,test}.h5, word_map.json and dataset.json.

    python create_input_files.py SOURCE --output-folder DATA, where SOURCE is one of
        --dataset flickr8k|flickr30k|coco --karpathy-json FILE --image-folder DIR   (Karpathy split JSON)
        --dataset custom --captions-file FILE --image-folder DIR   (CSV `image,caption` or Flickr token.txt)
        --dataset shapes [--num-images N]                           (built-in synthetic data, see shapes.py)
    python create_input_files.py --verify DATA   (every image of a pack against its checksum from packing)

The command line only: the packing is packing.py (also what to call from Python); docs/data.md.
"""
from __future__ import annotations

import omp_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)

import argparse
import dataclasses
import sys
from dataclasses import fields
from typing import Any, Sequence

from satkit.data.dataset import verify_pack
from satkit.data.packing import (DATASETS, DEFAULT_IMAGE_SIZE, DEFAULT_SHAPES_IMAGE_SIZE, DEFAULT_SHAPES_NUM_IMAGES,
                                 OUTPUT_FORMATS, PackOptions, create_input_files)
from satkit.infra.runtime import UserError, run_cli
from satkit.data.text import TOKENIZERS


def get_args_parser() -> argparse.ArgumentParser:
    """One flag per PackOptions field, with the field's default and choices."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--dataset", choices=DATASETS, help="source format (required unless --verify)")
    add("--output-folder", help="folder for {train,val,test}.h5, word_map.json, dataset.json (unless --verify)")
    add("--karpathy-json", help="Karpathy split JSON (flickr8k, flickr30k, coco)")
    add("--captions-file", help="custom: CSV with image,caption header, or Flickr token.txt")
    add("--image-folder", help="folder the image file names are relative to")
    add("--image-size", type=int,
        help=f"stored image side ({DEFAULT_IMAGE_SIZE}; {DEFAULT_SHAPES_IMAGE_SIZE} for shapes)")
    add("--captions-per-image", type=int, help="captions stored per image (sampled)")
    add("--min-word-freq", type=int, help="train-split count for a word to enter the vocabulary")
    add("--max-caption-words", type=int, help="longer captions are truncated to this many words")
    add("--num-images", type=int, help=f"shapes: number of images ({DEFAULT_SHAPES_NUM_IMAGES})")
    add("--val-fraction", type=float, help="custom/shapes: share of images in val (0.1; shapes 1/12)")
    add("--test-fraction", type=float, help="custom/shapes: share of images in test (0.1; shapes 1/12)")
    add("--seed", type=int, help="seeds caption sampling, the custom split and shapes")
    add("--tokenizer", choices=TOKENIZERS,
        help="ascii: a-z0-9 words (English); unicode: letters of any script, lower-cased (eval scores alike)")
    add("--num-workers", "--workers", dest="num_workers", type=int,
        help="image decoding processes (the CPUs this process may use)")
    add("--skip-bad-images", action="store_true",
        help="skip unreadable or caption-less images (and count them) instead of stopping")
    add("--allow-split-overlap", action="store_true",
        help="Karpathy JSON: pack an image listed in two splits (refused by default: it leaks test images)")
    add("--force", action="store_true", help="overwrite an existing packed dataset")
    add("--shards", help="webdataset: train shards, a brace pattern (dir/{00000..00099}.tar); alone: the word-map "
        "pass for training from them (docs/distributed.md)")
    add("--val-shards", help="webdataset with --output-format hdf5: the val split's shards")
    add("--test-shards", help="webdataset with --output-format hdf5: the test split's shards (optional)")
    add("--output-format", choices=OUTPUT_FORMATS,
        help="hdf5: a pack (the default for every dataset but webdataset); webdataset: shards of any dataset")
    add("--shard-size", type=int, help="samples per shard with --output-format webdataset")
    add("--verify", metavar="DATA", help="check every image of the pack in DATA against its checksum from packing "
        "(names the changed ones) instead of packing")
    add("--debug", action="store_true", help="show the traceback of an error, not one line")
    # The defaults are PackOptions' own (written once there); None means "the dataset's default".
    parser.set_defaults(**{f.name: f.default for f in fields(PackOptions) if f.default is not dataclasses.MISSING})
    return parser


def verify(data_folder: str) -> int:
    """--verify DATA: recompute every image's checksum; one line per changed image (split, index, file
    name) and a summary. Exit 0 only when every split could be checked and every image is intact."""
    checked, changed, without = verify_pack(data_folder)
    if without and not checked:
        raise UserError(f"{data_folder}: packed without image checksums (before they were stored), so there is "
                        "nothing to verify; repack it with --force to add them")
    for split, index, filename in changed:
        print(f"{split}.h5 image {index} ({filename}): changed since packing")
    unchecked = (f"; {', '.join(without)} packed without checksums, not checked" if without else "")
    if changed:
        raise UserError(f"{len(changed)} of {checked} images in {data_folder} changed since packing (rotted or "
                        f"edited); repack it, or restore it from a copy{unchecked}")
    if without:
        raise UserError(f"{data_folder}: {checked} images intact{unchecked}")
    print(f"{data_folder}: all {checked} images intact")
    return 0


def summary_line(folder: str, summary: dict[str, Any]) -> str:
    """What was written, in one line: a pack's splits, shards and their patterns, or the word-map pass."""
    vocab = f"vocabulary {summary['vocab_size']} words"
    if "splits" not in summary:  # the word-map pass
        return (f"wrote {folder}/word_map.json and dataset.json: {summary['num_samples']} samples in "
                f"{summary['num_shards']} shards, {summary['bad_samples']} bad; {vocab}")
    counts = ", ".join(f"{s} {n}" for s, n in summary["splits"].items())
    if "patterns" in summary:
        patterns = " ".join(f"{s}={p}" for s, p in summary["patterns"].items())
        return f"wrote shards to {folder}: {counts} images; {vocab}; patterns: {patterns}"
    skipped = f"; skipped {summary['skipped_images']} bad images" if summary["skipped_images"] else ""
    return f"wrote {folder}: {counts} images; {vocab}{skipped}"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: pack, then print one summary line; errors are one `error:` line (exit 1).
    With --verify DATA: check an existing pack's images against their checksums instead."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.dataset or args.output_folder:
            parser.error("--verify DATA checks an existing pack: drop --dataset and --output-folder")
        return run_cli(lambda: verify(args.verify), args.debug)
    if not args.dataset or not args.output_folder:
        parser.error("the following arguments are required: --dataset, --output-folder (or --verify DATA)")
    options = PackOptions(**{f.name: getattr(args, f.name) for f in fields(PackOptions)})

    def body() -> int:
        try:
            summary = create_input_files(options)
        except KeyboardInterrupt:
            print(f"error: interrupted; nothing new written to {options.output_folder}", file=sys.stderr)
            return 130
        print(summary_line(options.output_folder, summary))
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
