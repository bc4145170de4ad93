"""Prepare the folder that travels to a GPU machine for `make gpu-check` (docs/gpu.md).

    python -m tools.gpu_bundle                # ../shared/data/flickr8k -> .gpu_bundle/ (what `make gpu-bundle` runs)
    python -m tools.gpu_bundle --quality 80 --max-mib 50

A lent GPU machine has no package index and receives at most 64 MiB: the working tree plus the folders
named in `carry`. So the bundle holds what is not in the tree and not on that machine:

    .gpu_bundle/
        flickr8k/dataset_flickr8k.json   the Karpathy JSON, slimmed to filename, split and raw captions
        flickr8k/images/*.jpg            the images re-encoded at 160 px (shorter side) as JPEG
        site/pycocoevalcap/{bleu,cider}  the pure-Python scorers BLEU and CIDEr need (no Java, no jars)
        manifest.json                    what was built, from what, and its size

The JPEG quality is the highest of QUALITIES whose size, projected from a sample of the images, keeps the
bundle under --max-mib (or the one given). The bundle is built beside the target and renamed into place
only when it fits: a failed build leaves the old bundle as it was.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageOps

from satkit.infra.runtime import UserError, run_cli
from satkit.data.text import tokenize

ROOT = Path(__file__).resolve().parents[1]
QUALITIES = (85, 80, 75, 70, 65, 60, 55, 50)  # tried in this order by --quality auto
DEVICE_LIMIT_MIB = 64.0  # what the device machine receives: the working tree + carried folders
SAMPLE_EVERY = 40  # --quality auto encodes every 40th image to project the size
SCORERS = ("bleu", "cider")  # pycocoevalcap's packages BLEU and CIDEr need; METEOR/SPICE need Java
MIB = 2 ** 20


@dataclass
class BundleOptions:
    source: Path  # a Flickr8k folder: dataset_flickr8k.json and images/
    out: Path
    image_size: int = 160
    quality: int | None = None  # None: the highest of QUALITIES that fits
    max_mib: float = 56.0  # the bundle's bound: 64 MiB less the ~6 MiB working tree, with a margin


def slim_karpathy(data: dict[str, Any]) -> dict[str, Any]:
    """The Karpathy JSON with only what create_input_files.py reads: filename, split, each caption's raw
    text, and its `tokens` only where they differ from text.tokenize(raw) (which the packer would use
    without them), so the pack is the same and the file a third of the size."""
    images = []
    for entry in data["images"]:
        sentences = []
        for sentence in entry.get("sentences", []):
            raw = str(sentence.get("raw", " ".join(sentence.get("tokens", []))))
            slim = {"raw": raw}
            tokens = [str(t).lower() for t in sentence.get("tokens", [])]
            if "tokens" in sentence and tokens != tokenize(raw, "ascii"):
                slim["tokens"] = tokens
            sentences.append(slim)
        kept = {"filename": entry["filename"], "split": entry["split"], "sentences": sentences}
        if "cocoid" in entry:
            kept["cocoid"] = entry["cocoid"]
        images.append(kept)
    return {"dataset": data.get("dataset", "flickr8k"), "images": images}


def read_karpathy_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{path}: Karpathy JSON not found (is the Flickr8k folder there?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: expected a Karpathy-split JSON object with an 'images' list")
    return data


def encode_image(path: Path, image_size: int, quality: int) -> bytes:
    """The image with its shorter side at image_size (never enlarged), as JPEG bytes at `quality`."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        scale = image_size / min(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        buffer = BytesIO()
        image.save(buffer, format="JPEG", quality=quality, optimize=True)
        return buffer.getvalue()


def image_paths(data: dict[str, Any], image_folder: Path) -> list[Path]:
    """Each JSON image's file (image_folder/filename), all of them checked to exist first."""
    paths = [image_folder / entry["filename"] for entry in data["images"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the JSON not in {image_folder}, e.g. {missing[0].name}")
    return paths


def choose_quality(paths: list[Path], opts: BundleOptions, fixed_bytes: int) -> int:
    """The highest of QUALITIES whose projected bundle (from every SAMPLE_EVERY-th image) fits max_mib."""
    sample = paths[::SAMPLE_EVERY] or paths
    budget = opts.max_mib * MIB - fixed_bytes
    for quality in QUALITIES:
        mean = sum(len(encode_image(p, opts.image_size, quality)) for p in sample) / len(sample)
        if mean * len(paths) * 1.03 <= budget:  # 3% margin: the sample's mean is an estimate
            return quality
    raise UserError(f"even at quality {QUALITIES[-1]} the {len(paths)} images would not fit in "
                    f"{opts.max_mib} MiB; raise --max-mib or lower --image-size")


def copy_scorers(site: Path) -> list[str]:
    """pycocoevalcap's BLEU and CIDEr packages (their .py files) and its __init__.py where it has one."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("pycocoevalcap is not installed in this Python (run make test once to set up .venv)")
    package = Path(list(spec.submodule_search_locations)[0])
    target = site / "pycocoevalcap"
    target.mkdir(parents=True)
    copied = []
    if (package / "__init__.py").is_file():
        shutil.copy2(package / "__init__.py", target / "__init__.py")
        copied.append("pycocoevalcap/__init__.py")
    for name in SCORERS:
        (target / name).mkdir()
        for source in sorted((package / name).glob("*.py")):
            shutil.copy2(source, target / name / source.name)
            copied.append(f"pycocoevalcap/{name}/{source.name}")
    return copied


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tree_bytes() -> int | None:
    """Bytes of the working tree that travels with every device call (tracked and untracked files that
    git does not ignore), or None outside a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = [ROOT / name for name in listed.decode("utf-8", "replace").split("\0") if name]
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def write_images(paths: list[Path], folder: Path, opts: BundleOptions, quality: int) -> None:
    folder.mkdir(parents=True)
    for n, path in enumerate(paths, 1):
        (folder / path.name).write_bytes(encode_image(path, opts.image_size, quality))
        if n % 1000 == 0:
            print(f"  {n}/{len(paths)} images", file=sys.stderr, flush=True)


def build_bundle(opts: BundleOptions) -> dict[str, Any]:
    """Build the bundle in a folder beside opts.out, check its size, then put it in place; its manifest."""
    data = read_karpathy_json(opts.source / "dataset_flickr8k.json")
    paths = image_paths(data, opts.source / "images")
    staging = opts.out.with_name(opts.out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "flickr8k").mkdir(parents=True)
        slim = json.dumps(slim_karpathy(data), separators=(",", ":"), ensure_ascii=False)
        (staging / "flickr8k" / "dataset_flickr8k.json").write_text(slim, encoding="utf-8")
        scorers = copy_scorers(staging / "site")
        quality = opts.quality or choose_quality(paths, opts, folder_bytes(staging))
        write_images(paths, staging / "flickr8k" / "images", opts, quality)
        total = folder_bytes(staging)  # the manifest's `bytes`: all but the manifest itself
        manifest = {"source": str(opts.source), "images": len(paths), "image_size": opts.image_size,
                    "jpeg_quality": quality, "bytes": total, "mib": round(total / MIB, 2), "scorers": scorers,
                    "splits": {s: sum(e["split"] == s for e in data["images"]) for s in ("train", "val", "test")}}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if folder_bytes(staging) > opts.max_mib * MIB:
            raise UserError(f"the bundle is {folder_bytes(staging) / MIB:.2f} MiB, over --max-mib {opts.max_mib}; "
                            f"lower --quality (was {quality}) or --image-size")
        shutil.rmtree(opts.out, ignore_errors=True)
        os.replace(staging, opts.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "flickr8k"),
                        help="Flickr8k folder with dataset_flickr8k.json and images/ (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / ".gpu_bundle"), help="the bundle folder (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=160, help="shorter side in px (default: %(default)s)")
    parser.add_argument("--quality", default="auto",
                        help=f"JPEG quality 1-95, or auto: the highest of {QUALITIES} that fits (default: auto)")
    parser.add_argument("--max-mib", type=float, default=56.0,
                        help="refuse a bundle larger than this (default: %(default)s; the device machine receives "
                             f"{DEVICE_LIMIT_MIB:.0f} MiB with the working tree)")
    parser.add_argument("--debug", action="store_true", help="show a traceback for every error")
    return parser


def options_from_args(args: argparse.Namespace) -> BundleOptions:
    if args.quality != "auto" and not (args.quality.isdigit() and 1 <= int(args.quality) <= 95):
        raise UserError(f"--quality={args.quality!r} must be auto or an integer in 1..95")
    if args.image_size < 1 or args.max_mib <= 0:
        raise UserError("--image-size and --max-mib must be positive")
    return BundleOptions(Path(args.source), Path(args.out), args.image_size,
                         None if args.quality == "auto" else int(args.quality), args.max_mib)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        manifest = build_bundle(options_from_args(args))
        tree = tree_bytes()
        print(f"wrote {args.out}: {manifest['images']} images at {manifest['image_size']} px, JPEG quality "
              f"{manifest['jpeg_quality']}, {manifest['mib']:.1f} MiB")
        if tree is not None:
            together = (tree + manifest["bytes"]) / MIB
            print(f"working tree {tree / MIB:.1f} MiB + bundle = {together:.1f} MiB of the device's "
                  f"{DEVICE_LIMIT_MIB:.0f} MiB")
            if together > DEVICE_LIMIT_MIB:
                print("warning: too large to travel; lower --max-mib", file=sys.stderr)
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
