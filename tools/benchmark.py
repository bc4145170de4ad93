"""Speed as ratios: each row runs two variants in this one process, alternating, and reports medians.

    python -m tools.benchmark            # the README's table (3.5 min on a 2-core CPU)
    python -m tools.benchmark --quick    # fewer repeats, smaller batches, no encoder rows (meant: < 3 min, 2 cores)
    python -m tools.benchmark --tiny     # tiny models: the test suite runs it so it cannot rot
    python -m tools.benchmark --device cuda   # adds ms per step fp32 vs bf16 and eager vs compile_step, peak GPU memory
    python -m tools.benchmark --rows decode,cuda   # only these groups of rows (ROW_GROUPS; gpu_check.py picks some)
    python -m tools.benchmark --rows shards   # WebDataset shards vs the HDF5 pack, Flickr8k at 128 px (docs/speed.md)
    python -m tools.benchmark --rows encoders   # Lite0/1/2 vs ResNet-50/101, the feature cache, Captioner end to end

Absolute times on a shared machine mean little; a ratio of two variants measured side by side does.
Models have random weights (decoding runs to max_len: no beam finishes early) and the dimensions of
the issue's reference figures: ResNet-101 annotations 14x14x2048, 512-d attention/embedding/LSTM,
a 2,600-word vocabulary, beam 5, 50 steps.
"""
from __future__ import annotations

import omp_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import torch
from torch.utils.data import DataLoader

from satkit.captioner import Captioner
from satkit.checkpoints import build_checkpoint, save_checkpoint
from satkit.config import Config, ModelConfig, load_config
from satkit.data.dataset import CaptionDataset, collate_captions
from satkit.encoders import build_encoder
from satkit.data.feature_cache import ensure_cache
from satkit.decoding import beam_search
from satkit.training.losses import ConceptHead, SelfCritical, target_log_probs
from satkit.data.packing import PackOptions, create_input_files
from satkit.training.rewards import DocumentFrequencies, reference_ids
from satkit.model import build_model
from satkit.infra.runtime import DistInfo, UserError, resolve_device
from satkit.data.shapes import generate_image
from satkit.data.shards import expand_shards, shard_samples
from satkit.data.text import load_word_map
from satkit.training.optim import build_optimizer
from satkit.training.trainer import TrainState, make_loaders, stop_workers, train_step

ROOT = Path(__file__).resolve().parents[1]
# The groups of rows, in the table's order (--rows picks some): shared and scst run on the CPU only, cuda on
# CUDA only.
ROW_GROUPS = ("decode", "frozen", "trainable", "data", "shared", "cuda", "memory", "scst", "shards", "encoders")
# Left out of --quick unless --rows names them: the encoder rows alone take minutes (five ImageNet-size CNNs at
# 224 px, a cache build, Captioner end to end), and --quick is the look that takes under 3 minutes.
NOT_QUICK = ("encoders",)
FLICKR8K_CPU = ROOT / "configs" / "flickr8k_cpu.yaml"  # the shards rows' config: data, batch, step


@dataclass(frozen=True)
class ShardSizes:
    """What the shards rows measure: the data, and how many batches a timed run takes."""

    shapes_images: int  # tiny, quick: shapes images, packed and sharded; 0: the Flickr8k pack (full)
    image_size: int  # of the shapes images (the Flickr8k pack has its own, 128 px)
    shard_size: int  # samples per shard of the loader and training rows
    batch: int  # images per batch (configs/flickr8k_cpu.yaml: 32)
    load_batches: int  # per timed loader run
    train_batches: int  # per timed training run


@dataclass
class Sizes:
    """What one mode measures: dimensions, batch sizes and repeats."""

    decoder: ModelConfig  # the decode and frozen-encoder rows
    trainable: ModelConfig  # the trainable-encoder, data and shared-machine rows
    frozen_image_size: int
    trainable_image_size: int
    vocab: int
    decode_images: int
    decode_batch: int
    max_len: int
    train_images: int  # images per training step, 5 captions each
    caption_len: int
    repeats: int
    pack_images: tuple[int, int]  # the two dataset sizes of the memory rows
    flags: tuple[str, ...] = ()  # this mode's command-line flag, for child processes
    eval_flags: tuple[str, ...] = ()  # the memory rows' eval.py: --tiny scores CIDEr alone (no JVM start)
    shards: ShardSizes = ShardSizes(0, 128, 500, 32, 12, 3)  # the shards rows (full: Flickr8k)


def sizes(mode: str) -> Sizes:
    if mode == "tiny":
        small = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=4, attention_dim=32, embed_dim=16,
                            decoder_dim=32, dropout=0.0)
        return Sizes(small, small, 64, 64, 50, 4, 4, 6, 2, 6, 1, (12, 24), ("--tiny",),
                     ("--metrics-only", "--metric", "CIDEr"), ShardSizes(48, 64, 5, 4, 3, 1))
    paper = ModelConfig(encoder="resnet101", encoder_stages=4, enc_size=14, attention_dim=512, embed_dim=512,
                        decoder_dim=512, dropout=0.5)
    flickr8k_cpu = ModelConfig(encoder="resnet18", encoder_stages=3, enc_size=8, attention_dim=256, embed_dim=256,
                               decoder_dim=256, dropout=0.5)  # configs/flickr8k_cpu.yaml
    if mode == "quick":
        return Sizes(paper, flickr8k_cpu, 256, 128, 2600, 32, 32, 50, 4, 15, 3, (100, 400), ("--quick",),
                     shards=ShardSizes(600, 128, 50, 32, 6, 2))
    return Sizes(paper, flickr8k_cpu, 256, 128, 2600, 64, 32, 50, 8, 15, 5, (200, 800))


@dataclass
class Row:
    name: str
    unit: str
    a: str
    a_value: float
    b: str
    b_value: float
    target: str = ""

    @property
    def ratio(self) -> float:
        return self.a_value / self.b_value if self.b_value else float("nan")


def side_by_side(run_a: Callable[[], None], run_b: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median seconds of a and of b, run alternately after one warm-up each."""
    run_a(), run_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for run, times in ((run_a, times_a), (run_b, times_b)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def random_model(cfg: ModelConfig, vocab: int, device: torch.device, **encoder_options) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": vocab})
    return build_model(cfg, **encoder_options).to(device)


def word_map_of(vocab: int) -> dict[str, int]:
    return {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}


def random_captions(images: int, per_image: int, length: int, vocab: int, device: torch.device):
    captions = torch.randint(4, vocab, (images, per_image, length + 2), device=device)
    captions[..., 0], captions[..., -1] = 1, 2  # <start> ... <end>
    return captions, torch.full((images, per_image), length + 2, device=device)


def train_step_fn(model: torch.nn.Module, inputs: torch.Tensor, captions: torch.Tensor, caplens: torch.Tensor,
                  device: torch.device, amp: torch.dtype | None = None) -> Callable[[], None]:
    """One optimisation step (forward, cross-entropy, backward, Adam) on fixed inputs."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(inputs, captions, caplens)
            loss = -target_log_probs(out["logits"], out["targets"])[out["mask"]].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def decode_row(s: Sizes, device: torch.device) -> Row:
    model = random_model(s.decoder, s.vocab, device).eval()
    word_map = word_map_of(s.vocab)
    with torch.no_grad():  # decode-only: from annotations, as the reference figures
        features = torch.randn(s.decode_images, s.decoder.enc_size ** 2, model.encoder.out_dim, device=device).relu()

    def batched() -> None:
        for first in range(0, s.decode_images, s.decode_batch):
            beam_search(model, features[first : first + s.decode_batch], word_map, beam_size=5, max_len=s.max_len)

    def one_at_a_time() -> None:
        for i in range(s.decode_images):
            beam_search(model, features[i : i + 1], word_map, beam_size=5, max_len=s.max_len)

    t_batched, t_single = side_by_side(batched, one_at_a_time, max(1, s.repeats - 2))
    return Row(f"decode, beam 5, {s.max_len} steps, batches of {s.decode_batch}", "images/s",
               "batched", s.decode_images / t_batched, "one image at a time", s.decode_images / t_single,
               ">= 15 images/s batched on the 2-core CPU (paper dims)")


def frozen_encoder_row(s: Sizes, device: torch.device) -> Row:
    model = random_model(s.decoder, s.vocab, device)  # encoder frozen (fine_tune=False)
    images = torch.randn(s.train_images, 3, s.frozen_image_size, s.frozen_image_size, device=device)
    with torch.no_grad():
        cached = model.encoder.eval()(images).half()  # what feature_cache.py stores
    captions, caplens = random_captions(s.train_images, 5, s.caption_len, s.vocab, device)
    t_cached, t_cnn = side_by_side(train_step_fn(model, cached, captions, caplens, device),
                                   train_step_fn(model, images, captions, caplens, device), s.repeats)
    samples = s.train_images * 5
    return Row(f"train, frozen encoder ({s.decoder.encoder}, {s.frozen_image_size} px, {s.train_images} images x 5 "
               "captions)", "captions/s", "cached features", samples / t_cached, "CNN every step", samples / t_cnn,
               ">= 5x")


def trainable_encoder_row(s: Sizes, device: torch.device) -> Row:
    model = random_model(s.trainable, s.vocab, device, fine_tune=True, fine_tune_stages=0)
    images = torch.randn(s.train_images, 3, s.trainable_image_size, s.trainable_image_size, device=device)
    captions, caplens = random_captions(s.train_images, 5, s.caption_len, s.vocab, device)
    per_image = train_step_fn(model, images, captions, caplens, device)
    per_caption = train_step_fn(model, images.repeat_interleave(5, dim=0), captions.flatten(0, 1)[:, None],
                                caplens.flatten()[:, None], device)  # the tutorial's way: a CNN pass per caption
    t_image, t_caption = side_by_side(per_image, per_caption, s.repeats)
    samples = s.train_images * 5
    return Row(f"train, trainable encoder ({s.trainable.encoder} to layer{s.trainable.encoder_stages}, "
               f"{s.trainable_image_size} px)", "captions/s", "CNN once per image", samples / t_image,
               "CNN once per caption", samples / t_caption, ">= 3x")


def pack_shapes(folder: Path, images: int, image_size: int) -> list[str]:
    return [sys.executable, str(ROOT / "create_input_files.py"), "--dataset", "shapes", "--num-images", str(images),
            "--image-size", str(image_size), "--output-folder", str(folder), "--workers", "1", "--force"]


def data_row(s: Sizes, device: torch.device, workdir: Path, num_workers: int) -> Row:
    folder = workdir / "data_row"
    subprocess.run(pack_shapes(folder, max(s.pack_images), s.trainable_image_size), check=True,
                   capture_output=True)
    dataset = CaptionDataset(str(folder), "train")
    loader = DataLoader(dataset, batch_size=s.train_images, shuffle=True, num_workers=num_workers,
                        collate_fn=collate_captions, persistent_workers=num_workers > 0, drop_last=True)
    batches = min(len(loader), 8 if s.repeats > 1 else 2)
    model = random_model(s.trainable, len(dataset.word_map), device, fine_tune=True, fine_tune_stages=0)
    first = next(iter(loader))
    step = train_step_fn(model, first["image"].to(device), first["captions"].to(device), first["caplens"].to(device),
                         device)

    def load() -> None:
        for _, batch in zip(range(batches), loader):
            batch["image"].to(device, non_blocking=True)

    def train() -> None:
        for _ in range(batches):
            step()

    t_load, t_train = side_by_side(load, train, max(1, s.repeats - 2))
    samples = batches * s.train_images
    return Row(f"data ({num_workers} DataLoader worker(s)) vs the trainable-encoder step", "images/s",
               "loader alone", samples / t_load, "training consumes", samples / t_train, ">= 2x")


def _busy_loop(niceness: int) -> subprocess.Popen:
    """One competing CPU-bound process at `niceness` (10: a polite neighbour; 0: as important as us)."""
    return subprocess.Popen(["nice", "-n", str(niceness), sys.executable, "-c", "while True: pass"])


def demo_step(s: Sizes, device: torch.device) -> Callable[[], None]:
    """A training step of `make demo` (configs/shapes.yaml: ResNet-18 to layer2, 96 px, 32 images x 5
    captions, 40 words), the step the issue measured at 0.25 s alone and 6-8 s beside another job."""
    if s.repeats == 1:  # --tiny
        cfg, size, images, vocab = s.trainable, 48, 4, 40
    else:
        cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=6, attention_dim=128, embed_dim=64,
                          decoder_dim=256, dropout=0.2)
        size, images, vocab = 96, 32, 40
    model = random_model(cfg, vocab, device, fine_tune=True, fine_tune_stages=0)
    captions, caplens = random_captions(images, 5, 10, vocab, device)
    return train_step_fn(model, torch.randn(images, 3, size, size, device=device), captions, caplens, device)


def shared_child(s: Sizes) -> None:
    """Run in a child process (its OpenMP settings fixed at start): the demo step's median seconds alone
    and beside a busy process, as one line of JSON."""
    step = demo_step(s, torch.device("cpu"))
    step()

    def median_seconds() -> float:
        times = []
        for _ in range(max(2, s.repeats)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    seconds = {"alone": median_seconds()}
    for niceness in (10, 0):
        neighbour = _busy_loop(niceness)
        try:
            time.sleep(0.2)
            seconds[f"nice {niceness}"] = median_seconds()
        finally:
            neighbour.kill()
            neighbour.wait()
    print(json.dumps(seconds))


def shared_machine_rows(s: Sizes, mode: str) -> list[Row]:
    """The demo step alone and beside a busy process, with OpenMP threads that sleep at barriers (this
    repo's default, omp_env.py) and with OpenMP's default spinning threads, each in a fresh process."""
    results = {}
    for policy in ("PASSIVE", "ACTIVE"):
        child = subprocess.run([sys.executable, "-m", "tools.benchmark", f"--{mode}" if mode != "full" else "--full",
                                "--shared-child"], env={**os.environ, "OMP_WAIT_POLICY": policy},
                               capture_output=True, text=True, check=True)
        results[policy] = json.loads(child.stdout.strip().splitlines()[-1])
    rows = [Row(f"shared CPU: demo step beside a busy process at {neighbour} / alone", "x slower",
                "OMP_WAIT_POLICY=PASSIVE (default here)", results["PASSIVE"][neighbour] / results["PASSIVE"]["alone"],
                "ACTIVE (OpenMP's default)", results["ACTIVE"][neighbour] / results["ACTIVE"]["alone"], "<= 2.5x")
            for neighbour in ("nice 10", "nice 0")]
    return rows + [Row("quiet CPU: demo step alone", "steps/s", "PASSIVE", 1 / results["PASSIVE"]["alone"], "ACTIVE",
                       1 / results["ACTIVE"]["alone"], "the price of PASSIVE")]


_PEAK_RSS = """import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
if done.returncode:
    sys.exit(done.stderr.decode()[-500:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"""


def peak_rss_mb(command: Sequence[str]) -> float:
    """Peak resident memory of `command`, in MB: the largest of it and the processes it waited for.

    It runs under a small launcher process: a child forked from this (large) process would count our
    memory as its own until its exec."""
    launcher = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], capture_output=True, text=True)
    if launcher.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {launcher.stderr}")
    return int(launcher.stdout) / 1024


def random_checkpoint(path: Path, data_folder: Path) -> Path:
    """A checkpoint eval.py can load: a random tiny model with the pack's word map."""
    word_map = load_word_map(data_folder / "word_map.json")
    cfg = ModelConfig(encoder="resnet18", encoder_stages=2, enc_size=4, attention_dim=32, embed_dim=16,
                      decoder_dim=32, vocab_size=len(word_map))
    torch.manual_seed(0)
    save_checkpoint(path, build_checkpoint(build_model(cfg), cfg, word_map, image_size=64))
    return path


def memory_rows(s: Sizes, workdir: Path) -> list[Row]:
    small, large = s.pack_images
    rss_pack, folders = {}, {}
    for n in (small, large):
        folders[n] = workdir / f"pack_{n}"
        rss_pack[n] = peak_rss_mb(pack_shapes(folders[n], n, 64))
    rss_eval = {}
    for n in (small, large):  # a random tiny model with each pack's word map, decoded greedily
        checkpoint = random_checkpoint(workdir / f"random_{n}.pt", folders[n])
        rss_eval[n] = peak_rss_mb([sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(checkpoint),
                                   "--data-folder", str(folders[n]), "--split", "train", "--beam-size", "1",
                                   "--max-len", "8", "--num-workers", "0", "--control", "none", "--out",
                                   str(workdir / f"eval_{n}.json"), *s.eval_flags])
    return [Row(f"peak RSS, packing {large} vs {small} images", "MB", f"{large} images", rss_pack[large],
                f"{small} images", rss_pack[small], "flat (~1x)"),
            Row(f"peak RSS, eval of {large} vs {small} images", "MB", f"{large} images", rss_eval[large],
                f"{small} images", rss_eval[small], "flat (~1x)")]


def scst_child(s: Sizes, samples: int) -> None:
    """--scst-child K: a few SCST steps with K samples per image (K=0: cross-entropy steps on 5 captions per
    image) on the Flickr8k CPU config from cached annotations; run under peak_rss_mb for the memory row."""
    step = scst_step_fn(s, samples) if samples else xe_step_fn(s)
    for _ in range(s.repeats):
        step()


def scst_inputs(s: Sizes) -> tuple[torch.nn.Module, torch.Tensor, dict, dict[str, int]]:
    """A random Flickr8k-config model, cached annotations of 32 images and their 5 random references."""
    model = random_model(s.trainable, s.vocab, torch.device("cpu"))
    images = 32 if s.vocab > 100 else 4
    with torch.no_grad():
        features = model.encoder.eval()(torch.randn(images, 3, s.trainable_image_size, s.trainable_image_size))
    captions, caplens = random_captions(images, 5, s.caption_len, s.vocab, torch.device("cpu"))
    return model, features, {"image": features, "captions": captions, "caplens": caplens}, word_map_of(s.vocab)


def xe_step_fn(s: Sizes) -> Callable[[], None]:
    model, features, batch, _ = scst_inputs(s)
    return train_step_fn(model, features, batch["captions"], batch["caplens"], torch.device("cpu"))


def scst_step_fn(s: Sizes, samples: int) -> Callable[[], None]:
    """One SCST step (sample K, reward, greedy baseline, re-read with a graph, Adam) on fixed inputs."""
    model, _, batch, word_map = scst_inputs(s)
    cfg = Config(objective="scst", scst_samples=samples, scst_baseline="greedy", max_len=s.max_len // 2 or 1)
    df = DocumentFrequencies.from_references(reference_ids(batch["captions"], batch["caplens"]))
    objective = SelfCritical(model, word_map, df, cfg)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        loss, _ = objective(model, batch, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def scst_rows(s: Sizes) -> list[Row]:
    """SCST step against a cross-entropy step, both from cached annotations (the SCST recipe's frozen encoder)."""
    rows = []
    for samples in (1, 5, 10) if s.flags != ("--tiny",) else (2,):
        t_scst, t_xe = side_by_side(scst_step_fn(s, samples), xe_step_fn(s), max(1, s.repeats - 2))
        rss_scst, rss_xe = (peak_rss_mb([sys.executable, "-m", "tools.benchmark", *s.flags, "--scst-child", str(k)])
                            for k in (samples, 0))
        name = f"SCST step, K={samples} samples, vs cross-entropy step (5 captions), {s.trainable.encoder} config"
        rows += [Row(name, "s/step", f"SCST K={samples}", t_scst, "cross-entropy", t_xe, "the cost"),
                 Row(f"peak RSS, {name}", "MB", f"SCST K={samples}", rss_scst, "cross-entropy", rss_xe, "the cost")]
    return rows


# ---------------------------------------------------------------------------------------------
# WebDataset shards against the HDF5 pack: the same images either way, read by the training loaders
# train.py builds (trainer.make_loaders) on configs/flickr8k_cpu.yaml
# ---------------------------------------------------------------------------------------------
@dataclass
class ShardData:
    """One dataset two ways: an HDF5 pack, and shards of the same images with their word map."""

    name: str  # for the rows' names
    pack: Path
    shards: Path  # the shards' data_folder: word_map.json, dataset.json and the shards themselves
    patterns: dict[str, str]  # brace pattern per split
    train_images: int


def quiet_pack(**options: Any) -> dict[str, Any]:
    """packing.create_input_files in this process (no second torch import), its progress lines dropped:
    they would land between the rows."""
    with contextlib.redirect_stderr(io.StringIO()):
        return create_input_files(PackOptions(**options, num_workers=1, force=True))


def shapes_data(z: ShardSizes, workdir: Path) -> ShardData:
    """--tiny, --quick: shapes images packed and sharded from the same seed (the same images)."""
    common = {"dataset": "shapes", "num_images": z.shapes_images, "image_size": z.image_size}
    quiet_pack(**common, output_folder=str(workdir / "shapes_pack"))
    summary = quiet_pack(**common, output_folder=str(workdir / "shapes_shards"), output_format="webdataset",
                         shard_size=z.shard_size)
    return ShardData(f"shapes {z.image_size} px", workdir / "shapes_pack", workdir / "shapes_shards",
                     summary["patterns"], summary["num_samples"])


def flickr8k_data(z: ShardSizes, workdir: Path, pack: Path, source: Path) -> ShardData:
    """The full rows: the Flickr8k pack (read only) and shards written here from the Karpathy JSON with the
    pack's own options, so both hold the same images, captions and word map."""
    try:
        packed = json.loads((pack / "dataset.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--flickr8k-pack {pack}: no readable dataset.json ({e}); pack it as "
                        "configs/flickr8k_cpu.yaml says") from None
    if packed.get("dataset") != "flickr8k":
        raise UserError(f"--flickr8k-pack {pack}: holds {packed.get('dataset')!r}, not flickr8k")
    keys = ("image_size", "captions_per_image", "min_word_freq", "max_caption_words", "seed", "tokenizer")
    summary = quiet_pack(dataset="flickr8k", karpathy_json=str(source / "dataset_flickr8k.json"),
                         image_folder=str(source / "images"), **{key: packed[key] for key in keys if key in packed},
                         output_folder=str(workdir / "flickr8k_shards"), output_format="webdataset",
                         shard_size=z.shard_size)
    return ShardData(f"Flickr8k {packed['image_size']} px", pack, workdir / "flickr8k_shards", summary["patterns"],
                     summary["num_samples"])


def reshard(pattern: str, count: int, folder: Path) -> str:
    """The samples of `pattern`'s shards dealt out, undecoded, into `count` shards: the same data as more
    or fewer files. Returns their brace pattern."""
    import webdataset as wds

    def reraise(error: Exception) -> bool:
        raise error

    folder.mkdir(parents=True, exist_ok=True)
    names = [folder / f"train-{i:06d}.tar" for i in range(count)]
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(wds.TarWriter(str(name))) for name in names]
        for i, sample in enumerate(shard_samples(expand_shards(pattern), reraise)):
            writers[i % count].write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
    return str(folder / f"train-{{000000..{count - 1:06d}}}.tar")


def loader_overrides(s: Sizes, data: ShardData, data_format: str, workers: int, **keys: Any) -> list[str]:
    """configs/flickr8k_cpu.yaml's overrides to read `data` as an HDF5 pack or as shards with `workers`
    DataLoader workers (and --tiny's batch and model)."""
    values: dict[str, Any] = {"data_folder": data.pack, "data_format": data_format, "num_workers": workers,
                              "batch_size": s.shards.batch}
    if data_format == "webdataset":  # an epoch: the train split once, as from the pack
        values.update(data_folder=data.shards, train_shards=data.patterns["train"], val_shards=data.patterns["val"],
                      train_num_samples=data.train_images)
    for key in ("encoder", "encoder_stages", "enc_size", "attention_dim", "embed_dim", "decoder_dim", "dropout"):
        values[key] = getattr(s.trainable, key)  # the config's own, but for --tiny
    return [f"{key}={value}" for key, value in {**values, **keys}.items()]


class Feed:
    """A training loader's batches without end (epoch after epoch, as training goes on). `drain` takes the
    batches its workers prefetched (2 each) while other runs were timed, so that no timed run gets them free."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.loader = make_loaders(cfg, DistInfo(), device)[0]
        self.word_map = self.loader.dataset.word_map
        self.batches = self._endless()

    def _endless(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.loader

    def drain(self) -> None:
        for _ in range(2 * self.cfg.num_workers):
            next(self.batches)

    def load(self, count: int) -> None:
        for _ in range(count):
            next(self.batches)["image"].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train(self, step: Callable[[dict[str, Any]], None], count: int) -> None:
        for _ in range(count):
            step(next(self.batches))

    def close(self) -> None:
        self.batches.close()  # a ShardLoader ends its workers
        stop_workers(self.loader)  # a DataLoader's persistent ones


def config_step(cfg: Config, word_map: dict[str, int], device: torch.device) -> Callable[[dict[str, Any]], None]:
    """train.py's step on `cfg` from random init: the concept head, captions_per_step, gradient clipping, Adam."""
    torch.manual_seed(cfg.seed)
    cfg = replace(cfg, vocab_size=len(word_map))
    model = build_model(cfg.model_config(), encoder_weights=cfg.encoder_weights, fine_tune=cfg.fine_tune_encoder,
                        fine_tune_stages=cfg.fine_tune_stages).to(device)
    trained = ConceptHead(model, word_map).to(device) if cfg.concept_loss_weight > 0 else model
    optimizer, state = build_optimizer(trained, cfg), TrainState()
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    trained.train()

    def step(batch: dict[str, Any]) -> None:
        train_step(trained, batch, optimizer, scaler, cfg, state, device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def interleaved(runs: dict[str, tuple[Callable[[], None], Callable[[], None]]], repeats: int) -> dict[str, float]:
    """side_by_side for any number of runs: median seconds of each, taken in turn after one warm-up round;
    each run's `prepare` (first of the pair) goes untimed just before it."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, (prepare, run) in runs.items():
            prepare()
            start = time.perf_counter()
            run()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def shards_speed_rows(s: Sizes, data: ShardData, device: torch.device) -> list[Row]:
    """Loader images/s from shards and from the pack with 1 and 2 workers, and images/s of the config's
    training step fed by each (its own num_workers: 1), all in one interleaved measurement."""
    z, config_workers = s.shards, load_config(str(FLICKR8K_CPU)).num_workers
    feeds = {(fmt, workers): Feed(load_config(str(FLICKR8K_CPU), loader_overrides(s, data, fmt, workers)), device)
             for workers in (1, 2) for fmt in ("webdataset", "hdf5")}
    runs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    for (fmt, workers), feed in feeds.items():
        runs[f"load {fmt} {workers}"] = (feed.drain, lambda feed=feed: feed.load(z.load_batches))
    for fmt in ("webdataset", "hdf5"):
        feed = feeds[fmt, config_workers]
        step = config_step(feed.cfg, feed.word_map, device)
        runs[f"train {fmt}"] = (feed.drain, lambda feed=feed, step=step: feed.train(step, z.train_batches))
    try:
        seconds = interleaved(runs, s.repeats)
    finally:
        for feed in feeds.values():
            feed.close()
    load = {name: z.load_batches * z.batch / t for name, t in seconds.items() if name.startswith("load")}
    train = {fmt: z.train_batches * z.batch / seconds[f"train {fmt}"] for fmt in ("webdataset", "hdf5")}
    rows = [Row(f"shards: loader alone, {data.name}, batches of {z.batch}, {workers} DataLoader worker(s)", "images/s",
                "shards", load[f"load webdataset {workers}"], "HDF5 pack", load[f"load hdf5 {workers}"], "")
            for workers in (1, 2)]
    step = f"the flickr8k_cpu step ({s.trainable.encoder} to layer{s.trainable.encoder_stages}, {data.name})"
    return rows + [
        Row(f"shards: training, {step}, {config_workers} worker(s)", "images/s", "from shards",
            train["webdataset"], "from the HDF5 pack", train["hdf5"], "~1x"),
        Row(f"shards keep the step fed ({config_workers} worker(s))", "images/s", "shards loader alone",
            load[f"load webdataset {config_workers}"], "training from shards", train["webdataset"], ">= 2x")]


def data_memory_mb(pids: Sequence[int]) -> float:
    """The memory these processes hold for data, in MB: their summed anonymous and shared-memory PSS (pages
    shared between them, as a forked worker shares its parent's, split among them; library code left out)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith("Pss")}
        except OSError:
            continue  # a worker that just ended
        total += fields.get("Pss_Anon", fields.get("Pss", 0)) + fields.get("Pss_Shmem", 0)  # (older kernels: Pss)
    return total / 1024


def shards_child(overrides: Sequence[str]) -> None:
    """--shards-child KEY=VALUE...: one epoch of the training loader that configs/flickr8k_cpu.yaml with these
    overrides builds, in a process of its own; prints the peak of data_memory_mb over it and its workers,
    sampled every 20 ms (the largest process alone, as peak_rss_mb gives, hides a worker's growth behind
    the main process's imports)."""
    loader = make_loaders(load_config(str(FLICKR8K_CPU), overrides), DistInfo(), torch.device("cpu"))[0]
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            pids = [os.getpid(), *(child.pid for child in multiprocessing.active_children())]
            peak[0] = max(peak[0], data_memory_mb(pids))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in loader:
            pass
    finally:
        done.set()
        sampler.join()
    print(json.dumps({"peak_mb": peak[0]}))


def shards_memory_row(s: Sizes, data: ShardData, workdir: Path) -> Row:
    """Peak data memory of an epoch streamed by 2 workers from 2 and from 16 shards of the same train split.
    The two children run at once: their data memory is their own, and the wait for their imports halves."""
    commands = {count: [sys.executable, "-m", "tools.benchmark", "--shards-child",
                        *loader_overrides(s, data, "webdataset", 2, train_shards=reshard(
                            data.patterns["train"], count, workdir / f"train_in_{count}_shards"))]
                for count in (2, 16)}

    def peak_mb(command: list[str]) -> float:
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f"{' '.join(command)} failed: {child.stderr[-2000:]}")
        return json.loads(child.stdout.strip().splitlines()[-1])["peak_mb"]

    with ThreadPoolExecutor(len(commands)) as pool:
        peak = dict(zip(commands, pool.map(peak_mb, commands.values())))
    return Row(f"shards: peak data memory (PSS) of the loader and its 2 workers, an epoch of {data.name} from 16 vs "
               "2 shards", "MB", "16 shards", peak[16], "2 shards", peak[2], "flat (~1x)")


def shards_rows(s: Sizes, device: torch.device, workdir: Path, pack: Path, source: Path) -> list[Row]:
    """The issue's shards measurements: on shapes (--tiny, --quick) or on Flickr8k at 128 px (the default)."""
    z = s.shards
    data = shapes_data(z, workdir) if z.shapes_images else flickr8k_data(z, workdir, pack, source)
    return [*shards_speed_rows(s, data, device), shards_memory_row(s, data, workdir)]


def cuda_rows(s: Sizes, device: torch.device) -> list[Row]:
    model = random_model(s.decoder, s.vocab, device)
    with torch.no_grad():
        features = model.encoder.eval()(torch.randn(32, 3, 256, 256, device=device)).half()
    captions, caplens = random_captions(32, 5, s.caption_len, s.vocab, device)
    t_fp32, t_bf16 = side_by_side(train_step_fn(model, features, captions, caplens, device),
                                  train_step_fn(model, features, captions, caplens, device, torch.bfloat16), 10)
    torch.cuda.reset_peak_memory_stats()
    train_step_fn(model, features, captions, caplens, device)()
    peak = torch.cuda.max_memory_allocated() / 2**20
    compiled = random_model(s.decoder, s.vocab, device)
    compiled.decoder.compile_step()
    step_compiled = train_step_fn(compiled, features, captions, caplens, device)
    step_compiled()  # compiles
    t_eager, t_compiled = side_by_side(train_step_fn(model, features, captions, caplens, device), step_compiled, 10)
    name = torch.cuda.get_device_name(device)
    return [Row(f"CUDA ({name}): cached-feature step, 32 images x 5 captions", "ms/step", "fp32", t_fp32 * 1e3,
                "bf16", t_bf16 * 1e3, "bf16 <= fp32"),
            Row(f"CUDA ({name}): the same step, fp32", "ms/step", "eager", t_eager * 1e3, "compile_step",
                t_compiled * 1e3, ">= 3x fewer ms than 62.7 (eager, frozen CNN in the step, before)"),
            Row(f"CUDA ({name}): peak GPU memory of that step (fp32)", "MB", "peak", peak, "-", 1.0)]


# ---------------------------------------------------------------------------------------------
# Encoders: frozen forward images/s, the feature cache's build, and Captioner end to end
# ---------------------------------------------------------------------------------------------
def encoder_forward(name: str, image_size: int, batch: int, channels_last: bool | None = None) -> Callable[[], None]:
    """A frozen encoder's forward on a fixed batch; channels_last None keeps the encoder's own layout."""
    encoder = build_encoder(name, weights="none", stages=4, enc_size=7).eval()
    images = torch.randn(batch, 3, image_size, image_size)
    if channels_last is not None:
        encoder.use_channels_last(channels_last)

    def forward() -> None:
        with torch.no_grad():
            encoder(images)

    return forward


def encoder_rows(s: Sizes, workdir: Path, pack: Path, photos: Path) -> list[Row]:
    tiny = s.vocab < 100
    size, batch, repeats = (64, 2, 1) if tiny else (224, 32, max(2, s.repeats - 2))
    rows = []
    pairs = [("efficientnet_lite0", "resnet50"), ("efficientnet_lite1", "resnet50"),
             ("efficientnet_lite2", "resnet101")][: 1 if tiny else 3]
    for lite, resnet in pairs:
        t_a, t_b = side_by_side(encoder_forward(lite, size, batch), encoder_forward(resnet, size, batch), repeats)
        rows.append(Row(f"frozen encoder forward, {size} px, batch {batch}", "images/s", lite, batch / t_a,
                        resnet, batch / t_b, "Lite faster"))
    for name in ("efficientnet_lite0", "resnet50"):
        t_a, t_b = side_by_side(encoder_forward(name, size, batch, True), encoder_forward(name, size, batch, False),
                                repeats)
        rows.append(Row(f"{name} forward layout, {size} px, batch {batch}", "images/s", "channels_last",
                        batch / t_a, "contiguous (NCHW)", batch / t_b, "keep the faster"))
    rows.append(feature_cache_row(s, workdir, pack, size, batch))
    rows.append(captioner_row(s, workdir, photos, size))
    return rows


def lite_checkpoint(path: Path, word_map: dict[str, int], image_size: int) -> Path:
    """A checkpoint of configs/flickr8k_lite.yaml's model (random decoder, ImageNet Lite0 when installed)."""
    cfg = replace(load_config(str(ROOT / "configs" / "flickr8k_lite.yaml")).model_config(), vocab_size=len(word_map))
    torch.manual_seed(0)
    save_checkpoint(path, build_checkpoint(build_model(cfg, encoder_weights="none"), cfg, word_map,
                                           image_size=image_size))
    return path


def feature_cache_row(s: Sizes, workdir: Path, pack: Path, size: int, batch: int) -> Row:
    """Building the Lite0 cache (reader + CNN + float16 HDF5 writes) vs the CNN alone on as many images."""
    if s.vocab < 100 or not (pack / "dataset.json").is_file():  # tiny, or no Flickr8k pack: a shapes pack
        pack = workdir / "cache_pack"
        subprocess.run(pack_shapes(pack, 64 if s.vocab < 100 else 320, size), check=True, capture_output=True)
    source = workdir / "cache_source"
    source.mkdir(exist_ok=True)
    for name in ("val.h5", "dataset.json", "word_map.json"):
        if not (source / name).exists():
            (source / name).symlink_to((pack / name).resolve())
    encoder = build_encoder("efficientnet_lite0", weights="none", stages=4, enc_size=7)
    cfg = ModelConfig(encoder="efficientnet_lite0", encoder_stages=4, enc_size=7)
    with h5py.File(source / "val.h5", "r") as h5:
        images, image_size = len(h5["images"]), int(h5.attrs["image_size"])
    forward = encoder_forward("efficientnet_lite0", image_size, batch)

    def build() -> None:
        shutil.rmtree(source / "features", ignore_errors=True)
        ensure_cache(encoder, cfg, source, "val", build=True, num_workers=1)

    def cnn_alone() -> None:
        for _ in range(-(-images // batch)):
            forward()

    t_cache, t_cnn = side_by_side(build, cnn_alone, 1)
    return Row(f"feature cache build, Lite0, {images} val images of {pack.name} ({image_size} px)", "images/s",
               "build (read, CNN, write)", images / t_cache, "CNN alone", images / t_cnn, "reported: what bounds it")


def captioner_row(s: Sizes, workdir: Path, photos: Path, size: int) -> Row:
    """Captioner on JPEG files (read, resize, Lite0, beam 3) vs the Lite0 forward alone, batches of 16."""
    files = sorted((photos / "images").glob("*.jpg"))[:16] if (photos / "images").is_dir() else []
    if s.vocab < 100 or not files:
        files = []
        for i in range(4 if s.vocab < 100 else 16):
            generate_image(i, 0, size)[0].save(workdir / f"photo_{i}.png")
            files.append(workdir / f"photo_{i}.png")
    word_map = word_map_of(s.vocab)
    captioner = Captioner.from_checkpoint(lite_checkpoint(workdir / "lite.pt", word_map, size), image_size=size)
    forward = encoder_forward("efficientnet_lite0", size, len(files))
    max_len = 6 if s.vocab < 100 else 20
    t_caption, t_cnn = side_by_side(lambda: captioner([str(f) for f in files], beam_size=3, max_len=max_len,
                                                      batch_size=16), forward, 1 if s.vocab < 100 else 2)
    return Row(f"Captioner end to end, Lite0, {len(files)} files, beam 3, {max_len} steps", "images/s",
               "Captioner", len(files) / t_caption, "Lite0 forward alone", len(files) / t_cnn, "")


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print("| row | unit | variant A | A | variant B | B | A/B | target |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.unit} | {r.a} | {r.a_value:.3g} | {r.b} | {r.b_value:.3g} | {r.ratio:.2f}x | "
              f"{r.target} |", flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="fewer repeats, smaller batches, no encoder rows unless --rows names them "
                           "(< 3 min on 2 cores)")
    mode.add_argument("--tiny", action="store_true", help="tiny models: checks that every row runs")
    mode.add_argument("--full", action="store_true", help=argparse.SUPPRESS)  # the default
    parser.add_argument("--shared-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scst-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards-child", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of the data row (default: 1)")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated groups of rows to measure (default: all: {','.join(ROW_GROUPS)}; "
                             f"--quick: all but {','.join(NOT_QUICK)})")
    parser.add_argument("--flickr8k-pack", type=Path, default=Path("data/flickr8k_128"),
                        help="the shards rows (full mode): the Flickr8k pack to compare with, only read "
                             "(default: %(default)s, as configs/flickr8k_cpu.yaml)")
    parser.add_argument("--flickr8k", type=Path, default=ROOT.parent / "shared" / "data" / "flickr8k",
                        help="the shards rows (full mode): Flickr8k's images/ and dataset_flickr8k.json, written "
                             "as shards in a temporary folder (default: %(default)s)")
    return parser


def missing_flickr8k(pack: Path, source: Path) -> str:
    """Why the full shards rows cannot run here ('' when they can)."""
    if not (pack / "dataset.json").is_file():
        return f"no Flickr8k pack at {pack} (--flickr8k-pack)"
    if not (source / "dataset_flickr8k.json").is_file() or not (source / "images").is_dir():
        return f"no Flickr8k images and dataset_flickr8k.json at {source} (--flickr8k)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    every = [name for name in ROW_GROUPS if not (mode == "quick" and name in NOT_QUICK)]
    wanted = [name.strip() for name in args.rows.split(",") if name.strip()] if args.rows is not None else every
    unknown = [name for name in wanted if name not in ROW_GROUPS]
    if unknown or not wanted:
        parser.error(f"--rows: {', '.join(unknown) or 'none given'}; choose from {','.join(ROW_GROUPS)}")
    s = sizes(mode)
    if args.shared_child:
        shared_child(s)
        return 0
    if args.scst_child is not None:
        scst_child(s, args.scst_child)
        return 0
    if args.shards_child is not None:
        shards_child(args.shards_child)
        return 0
    missing = missing_flickr8k(args.flickr8k_pack, args.flickr8k) if "shards" in wanted and mode == "full" else ""
    if missing and args.rows is not None:
        parser.error(f"--rows shards: {missing}")
    if missing:  # the default, every group: the others still run
        print(f"note: the shards rows are left out: {missing}", file=sys.stderr)
        wanted.remove("shards")
    device = resolve_device(args.device)
    header = (f"benchmark.py ({mode}) on {device}: torch "
              f"{torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s)")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        workdir = Path(tmp)
        measures = {"decode": lambda: [decode_row(s, device)], "frozen": lambda: [frozen_encoder_row(s, device)],
                    "trainable": lambda: [trainable_encoder_row(s, device)],
                    "data": lambda: [data_row(s, device, workdir, args.num_workers)],
                    "shared": lambda: shared_machine_rows(s, mode) if device.type == "cpu" else [],
                    "cuda": lambda: cuda_rows(s, device) if device.type == "cuda" else [],
                    "memory": lambda: memory_rows(s, workdir),
                    "scst": lambda: scst_rows(s) if device.type == "cpu" else [],
                    "shards": lambda: shards_rows(s, device, workdir, args.flickr8k_pack, args.flickr8k),
                    "encoders": lambda: encoder_rows(s, workdir, Path("data/flickr8k_224"), args.flickr8k)
                    if device.type == "cpu" else []}
        for name in (n for n in ROW_GROUPS if n in wanted):
            started = time.perf_counter()
            new = measures[name]()
            rows += new
            for r in new:
                print(f"  {r.name}: {r.a} {r.a_value:.3g} vs {r.b} {r.b_value:.3g} {r.unit} ({r.ratio:.2f}x)",
                      file=sys.stderr, flush=True)
            if new:  # what each group costs: --quick must stay a quick look
                print(f"  ({name} rows: {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    print_table(rows, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
