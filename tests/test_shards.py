"""WebDataset shards (shards.py): conversion from any pack source, the word-map pass, streaming split by
rank and worker, bad samples, mid-epoch resume, and training over shards under torchrun."""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import create_input_files
from conftest import ROOT, pack_main
from satkit.data.dataset import CaptionDataset
from satkit.infra.runtime import UserError
from satkit.data.shards import (ShardLoader, ShardStream, StreamInfo, check_shards, expand_shards, read_stream_info,
                                shard_samples)

# 48 shapes images: train 36, val 6, test 6; shards of 9 -> 4 train shards
SHAPES = ["--dataset", "shapes", "--num-images", "48", "--image-size", "48", "--seed", "3", "--val-fraction", "0.125",
          "--test-fraction", "0.125", "--num-workers", "1"]
TRAIN_SHARDS = "train-{000000..000003}.tar"


@pytest.fixture(scope="module")
def shapes_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same 48 shapes images as an HDF5 pack and as shards (+ word map and marker)."""
    root = tmp_path_factory.mktemp("shards")
    pack_main(SHAPES + ["--output-folder", str(root / "h5")])
    pack_main(SHAPES + ["--output-folder", str(root / "wds"), "--output-format", "webdataset", "--shard-size", "9"])
    return root / "h5", root / "wds"


def stream_items(folder: Path, pattern: str, split: str = "val") -> dict[str, dict]:
    """Every sample of the shards in order (validation mode: no shuffle, no split), by key."""
    info, word_map = read_stream_info(str(folder))
    stream = ShardStream(expand_shards(str(folder / pattern)), info, word_map, train=False, split=split)
    return {item["key"]: item for item in stream}


def assert_same_as_pack(pack_folder: Path, shard_folder: Path, split: str, pattern: str) -> None:
    pack = CaptionDataset(str(pack_folder), split, with_references=True)
    items = stream_items(shard_folder, pattern, split)
    assert len(items) == len(pack) > 0
    for i in range(len(pack)):
        key = os.path.splitext(pack.filename(i))[0].replace("/", "_").replace(".", "_")
        expected, got = pack[i], items[key]
        assert torch.equal(got["image"], expected["image"]), f"pixels differ for {key}"
        assert torch.equal(got["captions"], expected["captions"]) and torch.equal(got["caplens"], expected["caplens"])
        assert got["references"] == expected["references"]


def test_shards_hold_the_packs_pixels_and_captions(shapes_pair):
    h5, wds = shapes_pair
    marker = json.loads((wds / "dataset.json").read_text())
    assert marker["splits"] == {"train": 36, "val": 6, "test": 6} and marker["num_shards"] == 4
    assert sorted(p.name for p in wds.glob("*.tar")) == sorted(
        [f"train-{i:06d}.tar" for i in range(4)] + ["val-000000.tar", "test-000000.tar"])
    assert not list(wds.glob(".tmp-*"))
    for split, pattern in (("train", TRAIN_SHARDS), ("val", "val-000000.tar")):
        assert_same_as_pack(h5, wds, split, pattern)


def test_flickr8k_subset_shards_match_its_pack(flickr8k, tmp_path):
    """Real JPEGs (EXIF, resize): the stream decodes the very files the packer decodes, the same way."""
    data = json.loads((flickr8k / "dataset_flickr8k.json").read_text())
    subset = ([e for e in data["images"] if e["split"] == "train"][:8] + [e for e in data["images"] if
                                                                          e["split"] == "val"][:2]
              + [e for e in data["images"] if e["split"] == "test"][:2])
    (tmp_path / "subset.json").write_text(json.dumps({"images": subset}))
    args = ["--dataset", "flickr8k", "--karpathy-json", str(tmp_path / "subset.json"), "--image-folder",
            str(flickr8k / "images"), "--image-size", "64", "--min-word-freq", "1", "--num-workers", "1"]
    pack_main(args + ["--output-folder", str(tmp_path / "h5")])
    pack_main(args + ["--output-folder", str(tmp_path / "wds"), "--output-format", "webdataset", "--shard-size", "4"])
    assert_same_as_pack(tmp_path / "h5", tmp_path / "wds", "train", "train-{000000..000001}.tar")
    assert (tmp_path / "wds" / "word_map.json").read_text() == (tmp_path / "h5" / "word_map.json").read_text()


def test_word_map_pass_equals_the_packs_word_map(shapes_pair, tmp_path, capsys):
    h5, wds = shapes_pair
    pack_main(["--dataset", "webdataset", "--shards", str(wds / TRAIN_SHARDS), "--image-size", "48",
               "--output-folder", str(tmp_path / "wm")])
    assert json.loads((tmp_path / "wm" / "word_map.json").read_text()) == json.loads((h5 / "word_map.json").read_text())
    marker = json.loads((tmp_path / "wm" / "dataset.json").read_text())
    assert marker["num_samples"] == 36 and marker["bad_samples"] == 0 and marker["num_shards"] == 4
    assert marker["shard_files"] == [f"train-{i:06d}.tar" for i in range(4)]
    assert not list((tmp_path / "wm").glob("*.h5"))  # no image written
    assert "36 samples" in capsys.readouterr().out


def train_loader(folder: Path, rank: int, world_size: int, num_workers: int, steps: int, batch_size: int = 3,
                 shuffle_buffer: int = 10, resampled: bool = False) -> ShardLoader:
    info, word_map = read_stream_info(str(folder))
    stream = ShardStream(expand_shards(str(folder / TRAIN_SHARDS)), info, word_map, train=True, seed=5,
                         shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size, resampled=resampled)
    return ShardLoader(stream, batch_size, steps, num_workers)


def epoch_keys(loader: ShardLoader, epoch: int, limit: int | None = None) -> list[str]:
    loader.set_epoch(epoch)
    keys = []
    for step, batch in enumerate(loader):
        assert batch["image"].shape == (loader.batch_size, 3, 48, 48) and batch["captions"].shape[:2] == (3, 5)
        keys += batch["keys"]
        if limit is not None and step + 1 == limit:
            break
    return keys


def test_two_ranks_with_two_workers_each_see_every_sample_once_per_epoch(shapes_pair):
    """36 samples in 4 shards of 9, 2 ranks x 2 workers, batches of 3: 6 steps per rank make the epoch."""
    _, wds = shapes_pair
    epochs = []
    for epoch in (0, 1):
        per_rank = [epoch_keys(train_loader(wds, rank, 2, num_workers=2, steps=6), epoch) for rank in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == 18
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(stream_items(wds, TRAIN_SHARDS))
        epochs.append(per_rank[0])
    assert epochs[0] != epochs[1]  # another shard order and shuffle each epoch


def test_resampled_shards_give_each_rank_its_own_draw_of_the_declared_size(shapes_pair, monkeypatch):
    """shard_resampled: every worker of every rank draws from all 4 shards (no fixed membership), each its own
    draws; an epoch is still steps x batch samples."""
    from satkit.data import shards

    _, wds = shapes_pair
    per_rank = [epoch_keys(train_loader(wds, rank, 2, num_workers=2, steps=8, resampled=True), 0) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 24 and per_rank[0] != per_rank[1]
    shard_of = {key: i for i in range(4) for key in stream_items(wds, f"train-{i:06d}.tar")}
    draws = []
    for rank, worker in ((0, 0), (0, 1), (1, 0), (1, 1)):  # each worker as the DataLoader runs it
        monkeypatch.setattr(shards, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=2))
        stream = train_loader(wds, rank, 2, num_workers=2, steps=8, resampled=True).stream
        keys = []
        for stream.pass_ in range(5):  # a pass draws 4 shards with replacement
            keys += [item["key"] for item in itertools.islice(stream, 36)]
        assert {shard_of[key] for key in keys} == {0, 1, 2, 3}, (rank, worker)
        draws.append(keys)
    assert len({tuple(keys) for keys in draws}) == 4


def test_a_resumed_epoch_trains_exactly_the_samples_it_had_not(shapes_pair):
    _, wds = shapes_pair
    whole = epoch_keys(train_loader(wds, 0, 1, num_workers=2, steps=12), epoch=1)
    interrupted = train_loader(wds, 0, 1, num_workers=2, steps=12)
    first = epoch_keys(interrupted, epoch=1, limit=5)
    assert first == whole[:15]
    saved = json.loads(json.dumps(interrupted.position(distributed=False)))  # as last.pt stores it
    resumed = train_loader(wds, 0, 1, num_workers=2, steps=12)
    resumed.set_epoch(1)
    resumed.skip = 5 * 3  # what train.py sets from state.epoch_step
    resumed.resume(saved, rank=0, world_size=1)
    assert len(resumed) == 7
    rest = [key for batch in resumed for key in batch["keys"]]
    assert sorted(first + rest) == sorted(whole) and len(set(first + rest)) == 36


def write_tar(path: Path, samples: list[dict]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def img2dataset_sample(key: str, seed: int, caption: str = "a red square on grass") -> dict:
    """What img2dataset writes: KEY.jpg, KEY.txt and KEY.json with the caption field."""
    return {"__key__": key, "jpg": jpeg(seed), "txt": caption.encode(),
            "json": json.dumps({"caption": caption, "key": key}).encode()}


def test_bad_samples_are_counted_not_fatal(tmp_path):
    """A corrupt JPEG, an empty caption, a sample without image and a truncated shard: skipped and counted,
    each once (the shard is cut inside the header of 000000005.txt: 000000005, left with its image alone, is
    the truncation's sample, not a second bad one)."""
    good = [img2dataset_sample(f"{i:09d}", i) for i in range(6)]
    corrupt = {**img2dataset_sample("000000100", 100), "jpg": jpeg(100)[:200]}
    empty = img2dataset_sample("000000101", 101, caption="")
    no_image = {k: v for k, v in img2dataset_sample("000000102", 102).items() if k != "jpg"}
    write_tar(tmp_path / "s-0.tar", good[:3] + [corrupt, empty, no_image])
    whole = write_tar(tmp_path / "s-1.tar", good[3:]).read_bytes()
    (tmp_path / "s-1.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut mid-member
    info = StreamInfo(image_size=32, captions_per_image=2, max_caption_words=10, tokenizer="ascii")
    word_map = {"<pad>": 0, "a": 1, "red": 2, "<unk>": 3, "<start>": 4, "<end>": 5}
    stream = ShardStream(expand_shards(str(tmp_path / "s-{0..1}.tar")), info, word_map, train=False)
    items = list(stream)
    assert [item["key"] for item in items][:3] == ["000000000", "000000001", "000000002"]
    assert len(items) == 5 and stream.bad == 4  # 3 bad samples + the truncated shard
    assert items[0]["captions"].shape == (2, 12) and items[0]["references"] == ["a red square on grass"]
    pack_main(["--dataset", "webdataset", "--shards", str(tmp_path / "s-{0..1}.tar"), "--min-word-freq", "1",
               "--output-folder", str(tmp_path / "wm")])
    marker = json.loads((tmp_path / "wm" / "dataset.json").read_text())
    # captions only: the corrupt JPEG passes; the empty caption, the sample without image and the truncation
    assert (marker["bad_samples"], marker["num_samples"]) == (3, 6)


def test_a_shard_that_cannot_be_opened_is_named(tmp_path, capsys):
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(UserError, match="missing.tar: cannot open shard"):
        check_shards([str(tmp_path / "missing.tar")])
    with pytest.raises(UserError, match="empty.tar: not a tar file"):
        check_shards([str(tmp_path / "empty.tar")])
    assert create_input_files.main(["--dataset", "webdataset", "--shards", str(tmp_path / "x-{0..1}.tar"),
                                    "--output-folder", str(tmp_path / "wm")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x-0.tar: cannot open shard" in err
    assert not (tmp_path / "wm" / "dataset.json").exists()


def test_shards_convert_back_to_an_hdf5_pack(shapes_pair, tmp_path):
    h5, wds = shapes_pair
    pack_main(["--dataset", "webdataset", "--shards", str(wds / TRAIN_SHARDS), "--val-shards",
               str(wds / "val-000000.tar"), "--test-shards", str(wds / "test-000000.tar"), "--image-size", "48",
               "--output-format", "hdf5", "--output-folder", str(tmp_path / "back")])
    original, back = CaptionDataset(str(h5), "val"), CaptionDataset(str(tmp_path / "back"), "val")
    assert len(back) == len(original) == 6
    for i in range(6):
        assert torch.equal(back[i]["image"], original[i]["image"])
        assert back[i]["references"] == original[i]["references"]
    assert json.loads((tmp_path / "back" / "word_map.json").read_text()) == json.loads((h5 / "word_map.json").read_text())


TINY = ["encoder_stages=2", "enc_size=4", "attention_dim=32", "embed_dim=16", "decoder_dim=32", "max_len=12",
        "log_every=1", "early_stop_patience=0", "device=cpu"]


# train.py under torchrun, each rank writing the keys of the batches it trained to keys-RANK-EPOCH.txt
KEY_RECORDER = r"""
import os, sys
from satkit.data import shards
import train
original_iter = shards.ShardLoader.__iter__
def recording_iter(self):
    with open(os.path.join(os.environ["KEYS_DIR"], f"keys-{os.environ['RANK']}-{self.stream.epoch}.txt"), "a") as f:
        for batch in original_iter(self):
            f.write("\n".join(batch["keys"]) + "\n")
            yield batch
shards.ShardLoader.__iter__ = recording_iter
if __name__ == "__main__":  # the workers' forkserver imports this file again
    sys.exit(train.main(sys.argv[1:]))
"""


def torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "record_keys.py").write_text(KEY_RECORDER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
           "KEYS_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "record_keys.py"), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_torchrun_ranks_train_disjoint_samples_for_the_declared_count_and_resume(shapes_pair, tmp_path):
    """2 gloo processes x 2 workers over 4 shards of 9: each epoch of 36 samples trains every sample once,
    on one rank; then a resume trains a third epoch."""
    _, wds = shapes_pair
    out = tmp_path / "run"
    common = ["data_format=webdataset", f"data_folder={wds}", f"train_shards={wds / TRAIN_SHARDS}",
              f"val_shards={wds / 'val-000000.tar'}", "train_num_samples=36", "batch_size=3", "num_workers=2"]
    result = torchrun(tmp_path, "--config", "configs/shapes.yaml", *common, *TINY, f"out_dir={out}", "epochs=2")
    assert "epoch 2: 0 bad samples skipped" in result.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["train_state"]["step"] == 12  # 36 samples / (2 ranks x 3) = 6 steps per epoch
    everything = sorted(stream_items(wds, TRAIN_SHARDS))
    for epoch in (0, 1):
        ranks = [(tmp_path / f"keys-{rank}-{epoch}.txt").read_text().split() for rank in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 18 and not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == everything
    torchrun(tmp_path, f"resume={out / 'last.pt'}", "epochs=3")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"] and rows[-1]["train_bad_samples"] == "0"
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


@pytest.mark.slow
def test_sigterm_mid_epoch_over_shards_resumes_to_the_same_weights(shapes_pair, tmp_path):
    """train.py over shards with 2 workers: SIGTERM at step 8 (epoch 2, worker 1's turn next), then resume=:
    the rest of the epoch trains exactly the batches the straight run trained, in its order."""
    from test_faults import run_driver, train_args

    _, wds = shapes_pair
    shards = ["data_format=webdataset", f"train_shards={wds / TRAIN_SHARDS}", f"val_shards={wds / 'val-000000.tar'}",
              "train_num_samples=36", "num_workers=2", "batch_size=6", "epochs=2"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_driver(train_args(wds, straight, *shards)).returncode == 0
    result = run_driver(train_args(wds, interrupted, *shards), signal="15", step="9")  # 6 steps an epoch
    assert result.returncode == 143, result.stderr[-2000:]
    stream = torch.load(interrupted / "last.pt", weights_only=True)["train_state"]["stream"]
    assert len(stream["positions"]) == 1 and len(stream["positions"][0]) == 2 and stream["bad"] == 0
    resumed = run_driver([f"resume={interrupted / 'last.pt'}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (torch.load(run / "last.pt", weights_only=True) for run in (straight, interrupted))
    assert a["train_state"]["step"] == b["train_state"]["step"] == 12
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


# 5 shards of 9 img2dataset samples (u-0.tar .. u-4.tar), for epochs over shards that do not divide evenly
SMALL_INFO = StreamInfo(image_size=32, captions_per_image=1, max_caption_words=10, tokenizer="ascii")
SMALL_WORDS = {"<pad>": 0, "a": 1, "red": 2, "<unk>": 3, "<start>": 4, "<end>": 5}


@pytest.fixture(scope="module")
def nine_a_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nine")
    for s in range(5):
        write_tar(root / f"u-{s}.tar", [img2dataset_sample(f"{s}{i:08d}", 9 * s + i) for i in range(9)])
    return root


def uneven_epoch(folder: Path, shards: int, world_size: int, num_workers: int, batch_size: int,
                 num_samples: int, epoch: int = 0) -> list[list[str]]:
    """Each simulated rank's trained keys over one epoch, as trainer.make_shard_loaders builds the loaders."""
    steps = num_samples // (batch_size * world_size)
    ranks = []
    for rank in range(world_size):
        stream = ShardStream(expand_shards(str(folder / f"u-{{0..{shards - 1}}}.tar")), SMALL_INFO, SMALL_WORDS,
                             train=True, seed=5, shuffle_buffer=10, rank=rank, world_size=world_size)
        loader = ShardLoader(stream, batch_size, steps, num_workers)
        loader.set_epoch(epoch)
        batches = [batch["keys"] for batch in loader]
        assert len(batches) == steps and all(0 < len(b) <= batch_size for b in batches)  # DDP: same steps on every rank
        ranks.append([key for b in batches for key in b])
    return ranks


# (shards of 9, ranks, workers, batch size) -> samples trained per rank in an epoch of all 9 x shards samples
UNEVEN = {"3-shards-over-2-ranks": (3, 2, 0, 3, [12, 12]),
          "5-shards-over-2-ranks-x-2-workers": (5, 2, 2, 3, [21, 21]),
          "a-batch-that-does-not-divide-a-workers-share": (4, 1, 2, 4, [34])}


@pytest.mark.parametrize("case", sorted(UNEVEN))
def test_an_epoch_over_uneven_shards_trains_no_sample_twice(case, nine_a_shard):
    """Shards that do not divide by ranks x workers, or a worker's share that does not divide by the batch:
    every rank runs the same steps, no sample comes twice (a rank's share is read once before any repeats),
    and what the epoch leaves out is the tail of each rank's pass (docs/distributed.md)."""
    shards, world_size, num_workers, batch_size, trained = UNEVEN[case]
    for epoch in (0, 1):
        ranks = uneven_epoch(nine_a_shard, shards, world_size, num_workers, batch_size, 9 * shards, epoch)
        keys = [key for rank in ranks for key in rank]
        assert len(set(keys)) == len(keys), f"{len(keys) - len(set(keys))} of {len(keys)} samples trained twice"
        assert [len(rank) for rank in ranks] == trained


def test_an_epoch_longer_than_the_shards_repeats_only_after_every_sample(nine_a_shard):
    """train_num_samples above what a rank's shards hold: a second pass starts once the first has given every
    sample, reshuffled."""
    (keys,) = uneven_epoch(nine_a_shard, 3, 1, 2, 4, 60)  # 15 steps: a pass of 27 is 8 batches (2 short)
    assert sorted(keys[:27]) == sorted(f"{s}{i:08d}" for s in range(3) for i in range(9))
    second = keys[27:]
    assert len(second) == 25 and len(set(second)) == 25 and second != keys[:25]


def test_each_epochs_bad_samples_are_its_own_without_workers(tmp_path):
    """num_workers=0: one stream object serves every epoch; each epoch counts only its own bad samples."""
    good = [img2dataset_sample(f"{i:09d}", i) for i in range(5)]
    corrupt = {**img2dataset_sample("000000100", 100), "jpg": jpeg(100)[:200]}
    write_tar(tmp_path / "b-0.tar", good[:2] + [corrupt] + good[2:])
    stream = ShardStream([str(tmp_path / "b-0.tar")], SMALL_INFO, SMALL_WORDS, train=True, shuffle_buffer=1)
    loader, counts = ShardLoader(stream, batch_size=5, steps=1), []
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert [len(batch["keys"]) for batch in loader] == [5]
        counts.append(loader.bad_samples(distributed=False))
    assert counts == [1, 1, 1]


def member_offsets(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {member.name: member for member in tar.getmembers()}


def test_a_cut_member_after_one_good_sample_is_no_shard_without_samples(tmp_path):
    """A read error of the tar is not a sample: one good sample, then a member cut short, trains. The cut
    member is one bad sample a pass (webdataset reports it for the member and again for the shard), and the
    epoch's count carries every pass's: 1, 2, 3 after the three passes of one sample each."""
    path = write_tar(tmp_path / "c-0.tar", [img2dataset_sample(f"{i:09d}", i) for i in range(2)])
    jpg = member_offsets(path)["000000001.jpg"]
    path.write_bytes(path.read_bytes()[: jpg.offset_data + jpg.size // 2])
    errors: list[Exception] = []
    assert [s["__key__"] for s in shard_samples([str(path)], lambda e: errors.append(e) or True)] == ["000000000"]
    assert len(errors) == 1
    loader = ShardLoader(ShardStream([str(path)], SMALL_INFO, SMALL_WORDS, train=True), batch_size=1, steps=3)
    loader.set_epoch(0)
    keys, counts = [], []
    for batch in loader:
        keys += batch["keys"]
        counts.append(loader.bad_samples(distributed=False))
    assert keys == ["000000000"] * 3 and counts == [1, 2, 3]


@pytest.mark.parametrize("where", [0, 200], ids=["at-a-header", "inside-a-header"])
def test_a_shard_cut_at_a_member_header_is_counted_not_complete(where, tmp_path):
    """tarfile ends an archive quietly at a missing or truncated header past the first: a shard cut there
    (a partial copy) lacks the two zero blocks that end a tar, and is counted as a truncated shard."""
    write_tar(tmp_path / "t-0.tar", [img2dataset_sample(f"0{i:08d}", i) for i in range(12)])
    cut = write_tar(tmp_path / "t-1.tar", [img2dataset_sample(f"1{i:08d}", 20 + i) for i in range(12)])
    cut.write_bytes(cut.read_bytes()[: member_offsets(cut)["100000006.jpg"].offset + where])
    errors: list[Exception] = []
    samples = list(shard_samples([str(tmp_path / "t-0.tar"), str(cut)], lambda e: errors.append(e) or True))
    assert len(samples) == 18 and len(errors) == 1 and f"{cut}: truncated" in str(errors[0])
    stream = ShardStream(expand_shards(str(tmp_path / "t-{0..1}.tar")), SMALL_INFO, SMALL_WORDS, train=True)
    loader = ShardLoader(stream, batch_size=6, steps=3)
    loader.set_epoch(0)
    assert sorted(key for batch in loader for key in batch["keys"]) == sorted(s["__key__"] for s in samples)
    assert loader.bad_samples(distributed=False) == 1
    pack_main(["--dataset", "webdataset", "--shards", str(tmp_path / "t-{0..1}.tar"), "--min-word-freq", "1",
               "--output-folder", str(tmp_path / "wm")])
    marker = json.loads((tmp_path / "wm" / "dataset.json").read_text())
    assert (marker["num_samples"], marker["bad_samples"]) == (18, 1)


@pytest.mark.parametrize("stop", [6, 9], ids=["a-worker-done", "in-the-second-pass"])
def test_a_resumed_epoch_over_uneven_shares_trains_the_batches_the_straight_one_did(stop, nine_a_shard):
    """Workers of unequal shares (18 and 9 samples, batches of 4) over two passes: interrupted after a worker's
    share is done, or in the second pass, the resumed epoch trains the rest in the straight run's order."""
    def loader() -> ShardLoader:
        stream = ShardStream(expand_shards(str(nine_a_shard / "u-{0..2}.tar")), SMALL_INFO, SMALL_WORDS,
                             train=True, seed=5, shuffle_buffer=10)
        return ShardLoader(stream, 4, 12, num_workers=2)

    straight, interrupted, resumed = loader(), loader(), loader()
    straight.set_epoch(2)
    whole = [batch["keys"] for batch in straight]
    interrupted.set_epoch(2)
    first = [batch["keys"] for batch in itertools.islice(interrupted, stop)]
    saved = json.loads(json.dumps(interrupted.position(distributed=False)))  # as last.pt stores it
    resumed.resume(saved, rank=0, world_size=1)  # train.py's order: resume, set_epoch, skip
    resumed.set_epoch(2)
    resumed.skip = stop * 4
    assert first + [batch["keys"] for batch in resumed] == whole
    assert [len(keys) for keys in whole[:8]] == [4, 4, 4, 4, 4, 1, 4, 2]  # a pass of 27: w1's 9, then w0's 18
