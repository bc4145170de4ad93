"""WebDataset shards as a data source: img2dataset's tar layout (`KEY.jpg`, `KEY.txt`, `KEY.json`) streamed
shard by shard, split across torchrun ranks and DataLoader workers, with an epoch defined by a sample count.

Why shards: at CC3M scale random access into one HDF5 file on a shared filesystem is what stalls
training; reading whole tar files front to back is what every filesystem and object store does fastest.
Why the `webdataset` library (its tar reader, brace patterns and shuffle buffer) and not
mosaicml-streaming: it reads img2dataset's output as it is, where streaming first converts everything
to its own MDS format. Its indexed `wids` mode is not needed for resume: a stream's position is
counted here (`ShardLoader.position`), and a resumed epoch skips that many raw samples without
decoding them (docs/data.md, "Shards").

What a sample must have: an image member (jpg, jpeg, png or webp) and a caption, taken from the
`.json`'s `captions` list (what `write_shards` stores: every reference, with `tokens`), else the `.txt`,
else the `.json`'s `caption` field. Images go through dataset.load_image_bytes, the packer's own
preprocessing (EXIF, RGB, resize). A sample without them, an image PIL cannot decode, an unreadable
tar member or a truncated shard (also one cut at a member's header, which tarfile reads as a shorter
whole tar: a local tar must end with its two zero blocks) is skipped and counted (`bad`), never fatal; a
local shard that cannot be opened at all is named before training starts (`check_shards`), and shards
without one usable sample (a foreign tar) are named once a whole pass over them has found none (val:
before training).
"""
from __future__ import annotations

import itertools
import json
import os
import random
import sys
import tarfile
import zlib
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from satkit.data.dataset import collate_captions, load_image_bytes, normalize_image
from satkit.infra.progress import progress_bar
from satkit.data.records import choose_captions, encode_caption
from satkit.infra.runtime import UserError, one_line
from satkit.data.text import load_word_map, tokenize

__all__ = ["IMAGE_EXTENSIONS", "ShardLoader", "ShardStream", "StreamInfo", "check_shards", "expand_shards",
           "read_stream_info", "sample_captions", "scan_captions", "shard_samples"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MARKER = "dataset.json"  # written last by the word-map pass, as by packing: a finished folder has it


class BadSample(Exception):
    """A sample that cannot be trained on; counted and skipped."""


# What reading a tar stream raises (tarfile, gzip, a pipe): after one, the rest of that shard is unreadable.
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
DAMAGED = "__damaged__"  # a raw sample's flag: read after its shard's read error, which was counted (shard_samples)


class TruncatedShard(Exception):
    """A local tar without the end-of-archive blocks every tar writer puts last: a copy cut short."""


def expand_shards(pattern: str, what: str = "train_shards") -> list[str]:
    """A brace pattern (`cc3m/{00000..00331}.tar`, several joined by `::`) -> the shard list, as webdataset
    expands it."""
    from webdataset.shardlists import expand_urls

    try:
        urls = [u for u in expand_urls(pattern) if u.strip()] if pattern else []  # "a::" has an empty one
    except ValueError as e:  # braceexpand's UnbalancedBracesError
        raise UserError(f"{what}={pattern!r}: not a shard pattern ({one_line(e)})") from None
    if not urls:
        raise UserError(f"{what}={pattern!r} names no shards")
    return urls


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_shards(urls: Sequence[str]) -> None:
    """Name the first local shard that cannot be opened as a tar file, before any worker starts (a remote
    or `pipe:` URL is checked by reading it, and counted as bad if that fails)."""
    for url in urls:
        if not _is_local(url):
            continue
        try:  # the first member's header, as the stream reads it (a .tar.gz too)
            with tarfile.open(url, mode="r|*") as tar:
                tar.next()
        except tarfile.ReadError as e:
            raise UserError(f"{url}: not a tar file ({e}): not a shard, or damaged") from None
        except (OSError, EOFError, tarfile.TarError) as e:
            raise UserError(f"{url}: cannot open shard ({getattr(e, 'strerror', None) or one_line(e)})") from None


def shard_samples(urls: Iterable[str], on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "jpg": bytes, "txt": bytes, ...}) of `urls` in order; `on_error` gets
    each unreadable member or shard, and each local tar read without error that lacks its end (tarfile ends
    an archive quietly at a missing or cut header: a copy cut there would pass as whole); return True to go on.

    A damaged member is one error: webdataset reports its read error twice, for the member and again for
    the shard, whose stream cannot be read past it (tarfile's stream mode does not resync), so a shard's
    read errors after its first are not passed on. Other errors (a duplicate member name) are each passed on.
    The sample a damage cut into (the one read after its shard's read error, or a truncated shard's last; a
    whole one when the cut fell between samples) is marked `DAMAGED`, so that a reader that finds it
    unusable does not count that damage twice."""
    import webdataset as wds

    errors = 0
    read_failed: bool | None = None  # this shard's first read error's verdict (go on?); None: none yet

    def counted(error: Exception) -> bool:
        nonlocal errors, read_failed
        if isinstance(error, READ_ERRORS):
            if read_failed is not None:  # the same damage, reported again
                return read_failed
            read_failed = on_error(error)
            errors += 1
            return read_failed
        errors += 1
        return on_error(error)

    for url in urls:
        before, read_failed, last = errors, None, None
        for sample in wds.tarfile_to_samples(handler=counted)([{"url": url}]):
            if last is not None:
                yield last
            if read_failed is not None:
                sample[DAMAGED] = True
            last = sample  # held back: whether the shard was cut after it is known at its end
        if errors == before and not _tar_ends(url):
            error = TruncatedShard(f"{url}: truncated (no end-of-archive blocks): a partial copy?")
            if not on_error(error):
                raise error
            if last is not None:
                last[DAMAGED] = True
        if last is not None:
            yield last


def _tar_ends(url: str) -> bool:
    """Whether a local uncompressed tar ends as every writer ends one: two zero blocks, padded to whole blocks.
    True for what is not checked here: remote shards, and compressed ones (gzip checks its own end)."""
    if not _is_local(url):
        return True
    try:
        with open(url, "rb") as f:
            if f.read(512)[257:262] != b"ustar":  # not a plain POSIX or GNU tar (compressed)
                return True
            size = f.seek(0, os.SEEK_END)
            if size % 512 or size < 1536:  # a header, then the two end blocks
                return False
            f.seek(size - 1024)
            return not any(f.read(1024))
    except OSError:  # the reader has reported it
        return True


def sample_captions(sample: dict[str, Any], tokenizer: str) -> tuple[list[str], list[list[str]], str]:
    """(references, tokens, name) of a raw sample; name is the source file name the .json keeps (which
    seeds the choice of stored captions, as in packing), else the sample's key. `write_shards` stores every reference and its tokens in the
    .json; img2dataset stores one caption in .txt and in the .json's `caption`. Empty captions are dropped."""
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            raise BadSample("unreadable .json") from None
        meta = meta if isinstance(meta, dict) else {}
    texts, stored_tokens = meta.get("captions"), meta.get("tokens")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        stored_tokens = None
        if "txt" in sample:
            texts = [sample["txt"].decode("utf-8", errors="replace")]
        else:
            texts = [meta["caption"]] if isinstance(meta.get("caption"), str) else []
    # The Karpathy JSON's own tokens, as the packer uses them with the ascii tokenizer
    use_stored = tokenizer == "ascii" and isinstance(stored_tokens, list) and len(stored_tokens) == len(texts)
    references, tokens = [], []
    for i, text in enumerate(texts):
        words = [str(w).lower() for w in stored_tokens[i]] if use_stored else tokenize(text, tokenizer)
        if words:
            references.append(text.strip())
            tokens.append(words)
    if not tokens:
        raise BadSample("no caption")
    name = meta.get("filename")
    return references, tokens, name if isinstance(name, str) else sample["__key__"]


def sample_image(sample: dict[str, Any], image_size: int) -> np.ndarray:
    """The sample's image as the packer prepares files: (3, S, S) uint8 RGB."""
    data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if data is None:
        raise BadSample("no image member")
    try:
        return load_image_bytes(data, image_size, sample["__key__"])  # the packer's decoder, bomb limit included
    except UserError as e:
        raise BadSample(str(e)) from None


def caption_rows(tokens: list[list[str]], key: str, word_map: dict[str, int], captions_per_image: int,
                 max_words: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """captions (C, max_words + 2) and caplens (C,) of one sample, chosen and encoded as packing does."""

    rows = [encode_caption(tokens[c][:max_words], word_map, max_words)
            for c in choose_captions(len(tokens), captions_per_image, seed, key)]
    return (torch.tensor([ids for ids, _ in rows], dtype=torch.int64),
            torch.tensor([length for _, length in rows], dtype=torch.int64))


@dataclass
class StreamInfo:
    """What the word-map pass recorded (dataset.json beside word_map.json): how to encode the stream."""

    image_size: int
    captions_per_image: int
    max_caption_words: int
    tokenizer: str
    seed: int = 0  # seeds which captions_per_image of a sample's captions are used, as packing does
    num_samples: int = 0


def read_stream_info(data_folder: str) -> tuple[StreamInfo, dict[str, int]]:
    """The folder of a word-map pass (or of a pack): its marker and word map; UserError naming what is missing."""
    marker = os.path.join(data_folder, MARKER)
    try:
        with open(marker, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{marker} not found: run create_input_files.py --dataset webdataset --shards PATTERN "
                        f"--output-folder {data_folder} first") from None
    except (ValueError, OSError) as e:
        raise UserError(f"{marker}: not readable JSON ({one_line(e)})") from None
    if not isinstance(values, dict):
        raise UserError(f"{marker}: not the marker of a word-map pass (a JSON object); re-run create_input_files.py")
    try:
        info = StreamInfo(int(values["image_size"]), int(values["captions_per_image"]),
                          int(values["max_caption_words"]), str(values.get("tokenizer", "ascii")),
                          int(values.get("seed", 0)))
    except KeyError as e:
        raise UserError(f"{marker}: lacks {one_line(e)}; re-run create_input_files.py") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{marker}: a bad value ({one_line(e)}); re-run create_input_files.py") from None
    return info, load_word_map(os.path.join(data_folder, "word_map.json"))


class ShardStream(IterableDataset):
    """Training or validation samples streamed from shards, items shaped like CaptionDataset's.

    Training (`train=True`): each epoch the shard list is shuffled with (seed, epoch); rank r of W takes
    every W-th shard from r, but for the last M mod W shards, which every rank reads keeping every W-th
    sample (so that ranks' shares differ by one sample, not by a shard). Its DataLoader worker w of K takes
    every K-th of the rank's whole shards, and the worker after the last one the shared samples. An
    iteration is one pass (`pass_`) over the worker's share, shuffled by a seeded buffer across shards;
    ShardLoader starts passes until the epoch's steps are done. With `resampled`, each worker instead draws
    as many shards at random with replacement each pass. Validation: every shard in order, once, in one
    process (rank 0 validates alone). Items also carry `stream`: (worker, raw position, bad samples of the
    pass so far, whether it is the pass's last), from which ShardLoader knows where each worker stands.
    """

    def __init__(self, urls: Sequence[str], info: StreamInfo, word_map: dict[str, int], *, train: bool,
                 seed: int = 0, shuffle_buffer: int = 1000, resampled: bool = False, rank: int = 0,
                 world_size: int = 1, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 split: str = "train") -> None:
        self.urls, self.info, self.word_map, self.train = list(urls), info, word_map, train
        self.seed, self.shuffle_buffer, self.resampled = seed, shuffle_buffer, resampled
        self.rank, self.world_size, self.transform, self.split = rank, world_size, transform, split
        self.path = self.urls[0] if len(self.urls) == 1 else f"{self.urls[0]} .. {self.urls[-1]}"  # for messages
        self.image_size, self.captions_per_image = info.image_size, info.captions_per_image
        self.tokenizer, self.num_images = info.tokenizer, info.num_samples
        self.epoch = self.pass_ = 0
        self.skip: list[int] = []  # raw samples each worker skips first (a resumed pass; -1: all); [] none
        # DataLoader worker i plays worker (i + worker_offset) % K: a resumed pass's first batch must come
        # from the worker whose turn it was (the loader takes batches from its workers in turn, from 0).
        self.worker_offset = 0
        self.features_path: str | None = None  # never: shards train the encoder's input (no feature cache)
        self.caption_id_map: torch.Tensor | None = None  # set by train.py when fine-tuning (as CaptionDataset)
        self.max_items = 0  # validation: stop after this many samples (val_max_images); 0 = all
        self.bad = 0  # this pass's bad samples and tar read errors

    def __len__(self) -> int:
        return self.info.num_samples

    def _epoch_order(self) -> list[str]:
        return [self.urls[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))]

    def worker_shards(self, worker: int, num_workers: int) -> list[str]:
        """This rank's and worker's whole shards for the epoch (train), or all of them (val, and resampled
        training, which draws from them all)."""
        if not self.train or self.resampled:
            return self.urls
        order = self._epoch_order()
        whole = order[: len(order) - len(order) % self.world_size]
        mine = whole[self.rank::self.world_size][worker::num_workers]
        if not mine:
            raise UserError(f"{len(self.urls)} shards cannot feed {self.world_size} process(es) x {num_workers} "
                            "DataLoader worker(s): write more, smaller shards (--shard-size) or lower num_workers")
        return mine

    def shared_shards(self, worker: int, num_workers: int) -> list[str]:
        """The epoch's last M mod W shards, of which this rank keeps every W-th sample, for the worker that
        comes after the rank's last whole shard; [] for the others."""
        if not self.train or self.resampled:
            return []
        order, rest = self._epoch_order(), len(self.urls) % self.world_size
        carrier = (len(order) // self.world_size) % num_workers
        return order[len(order) - rest:] if rest and worker == carrier else []

    def _samples(self, shards: list[str], shared: list[str], rng: random.Random) -> Iterator[dict[str, Any]]:
        """Raw samples of one pass: val reads its shards once, in order; a training worker its share, shuffled
        across shards, so that no sample comes twice before every sample of the share has come once."""
        import webdataset as wds

        if not self.train:
            return shard_samples(shards, self._count_error)
        samples = shard_samples([rng.choice(shards) for _ in shards] if self.resampled else shards, self._count_error)
        if shared:  # every rank reads them, keeping its own samples; rank 0 alone counts their read errors
            errors = self._count_error if self.rank == 0 else lambda error: True
            mine = itertools.islice(shard_samples(shared, errors), self.rank, None, self.world_size)
            samples = itertools.chain(samples, mine)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(samples)
        return samples

    def _no_sample(self, urls: Sequence[str]) -> None:
        where = urls[0] if len(set(urls)) == 1 else f"{self.path} ({len(set(urls))} of its shards)"
        raise UserError(f"{where}: no sample with an image and a caption ({self.bad} bad: not img2dataset's "
                        "layout, or every sample damaged)")

    def _count_error(self, error: Exception) -> bool:
        self.bad += 1
        return True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        w, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        w = (w + self.worker_offset) % num_workers
        skip = self.skip[w] if w < len(self.skip) else 0
        self.bad = 0  # without workers one stream object serves every pass of every epoch
        if skip < 0:  # this worker's share was done when the epoch was interrupted
            return
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{w}" + (f"-{self.pass_}" if self.pass_ else ""))
        shards, shared = self.worker_shards(w, num_workers), self.shared_shards(w, num_workers)
        last = None
        for item in self._items(self._samples(shards, shared, rng), w, skip):
            if last is not None:
                yield last
            last = item  # held back until the next is decoded: the pass's last item says so
        if last is None:
            if not skip:  # a whole pass without one usable sample (not a resumed pass's empty rest)
                self._no_sample(shards + shared)
            return
        last["stream"] = (w, last["stream"][1], self.bad, True)
        yield last

    def _items(self, samples: Iterable[dict[str, Any]], worker: int, skip: int) -> Iterator[dict[str, Any]]:
        """Decoded items past the first `skip` raw samples (read, not decoded); bad ones counted."""
        index = -1
        for position, sample in enumerate(samples, start=1):
            if position <= skip:
                continue
            try:
                item = self.decode(sample)
            except BadSample:
                self.bad += not sample.get(DAMAGED)  # a damaged one's read error is counted
                continue
            index += 1
            item.update(index=index, stream=(worker, position, self.bad, False))
            yield item
            if index + 1 == self.max_items:
                return

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        references, tokens, name = sample_captions(sample, self.tokenizer)
        image = torch.from_numpy(sample_image(sample, self.image_size))
        if self.transform is not None:
            image = self.transform(image)
        captions, caplens = caption_rows(tokens, name, self.word_map, self.captions_per_image,
                                         self.info.max_caption_words, self.info.seed)
        if self.caption_id_map is not None:
            captions = self.caption_id_map[captions]
        item = {"image": normalize_image(image), "captions": captions, "caplens": caplens, "key": sample["__key__"]}
        if not self.train:
            item["references"] = references
        return item


def collate_stream(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """collate_captions plus the batch's stream position (one worker made the whole batch)."""
    out = collate_captions(batch)
    out["keys"] = [item["key"] for item in batch]
    workers = {item["stream"][0] for item in batch}
    assert len(workers) == 1, "a batch mixes DataLoader workers"
    out["stream"] = max(item["stream"] for item in batch)  # (worker, raw position, bad so far, pass's end)
    return out


@dataclass
class ShardLoader:
    """The training loader over a ShardStream: `steps` batches per epoch on every rank (DDP needs the same
    count), in passes: a pass reads each worker's share once, a worker's last batch possibly short, and
    another pass starts (its workers anew, reshuffled) until the epoch's steps are done.

    It also stands where train.py expects the sampler (`set_epoch`, `skip`), and knows each worker's raw
    position and bad-sample count, which `position` gathers from every rank for a mid-epoch last.pt.
    """

    stream: ShardStream
    batch_size: int
    steps: int
    num_workers: int = 0
    pin_memory: bool = False
    worker_init_fn: Callable[[int], None] | None = None
    done_steps: int = 0  # steps of the epoch already trained (a resumed epoch)
    positions: dict[int, int] = field(default_factory=dict)  # this pass's, per worker; -1: its share is done
    bad: dict[int, int] = field(default_factory=dict)  # this pass's, per worker
    resume_bad: int = 0  # bad samples counted before the interruption, in this epoch
    past_bad: int = 0  # bad samples of the epoch's finished passes
    pass_: int = 0  # the epoch's pass in progress
    turn: int | None = 0  # the worker whose batch comes next; None: as before passes, done_steps % K

    @property
    def dataset(self) -> ShardStream:
        return self.stream

    @property
    def skip(self) -> int:
        return self.done_steps * self.batch_size

    @skip.setter
    def skip(self, samples: int) -> None:  # what train.py sets from state.epoch_step (0 after the epoch)
        self.done_steps = samples // self.batch_size
        if not samples:
            self.stream.skip, self.resume_bad, self.pass_, self.turn = [], 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch
        self.positions, self.bad, self.past_bad = {}, {}, 0

    def __len__(self) -> int:
        return self.steps - self.done_steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.turn is None:
            self.turn = self.done_steps % max(self.num_workers, 1)
        remaining = len(self)
        while remaining:
            with closing(self._pass()) as batches:
                for batch in itertools.islice(batches, remaining):
                    remaining -= 1
                    yield batch
            if remaining:
                if not self.positions and not self.stream.skip:  # the workers name a share without samples
                    raise RuntimeError("a pass over the shards gave no batch")
                self.past_bad += sum(self.bad.values())
                self.positions, self.bad, self.stream.skip = {}, {}, []
                self.pass_, self.turn = self.pass_ + 1, 0
        self.stream.skip, self.pass_, self.turn = [], 0, 0  # the epoch is done: the next starts afresh

    def _pass(self) -> Iterator[dict[str, Any]]:
        """One pass's batches, taken from the workers in turn from `turn` on, passing over a worker whose
        share is done."""
        self.stream.pass_, self.stream.worker_offset = self.pass_, self.turn
        # Workers start afresh each pass. Under torchrun they come from a forkserver, not a fork of this
        # process: its gloo threads made a forked worker hang in os.fork() (2026-12-01, a 2-rank test run;
        # pytorch/pytorch#75147). One process keeps fork, which tests may monkeypatch through.
        context = "forkserver" if self.num_workers and self.stream.world_size > 1 else None
        # The workers' torch seeds (hflip draws): their own per epoch, pass and rank (rank 0: as in one process)
        seed = self.stream.seed * 1000 + self.stream.epoch + 1_000_003 * self.pass_ + 7_919 * self.stream.rank
        loader = DataLoader(self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate_stream, pin_memory=self.pin_memory, multiprocessing_context=context,
                            worker_init_fn=self.worker_init_fn if self.num_workers else None,
                            generator=torch.Generator().manual_seed(seed))
        iterator = iter(loader)
        try:
            for batch in iterator:
                worker, position, bad, last = batch.pop("stream")
                self.positions[worker], self.bad[worker] = -1 if last else position, bad
                self.turn = (worker + 1) % max(self.num_workers, 1)
                yield batch
        finally:  # end the workers now, not at garbage collection: an error's traceback still holds the
            # iterator, and at exit multiprocessing would wait forever on workers that ignore its SIGTERM
            if hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            del iterator

    def resume(self, stream_state: dict[str, Any], rank: int, world_size: int) -> None:
        """Resume, in the interrupted epoch, its pass where each worker stood (`position`'s record)."""
        positions = stream_state.get("positions") or []
        if len(positions) != world_size or any(len(p) != max(self.num_workers, 1) for p in positions):
            print(f"warning: resuming with {world_size} process(es) x {max(self.num_workers, 1)} worker(s), "
                  "not as interrupted: the rest of the epoch streams its shards from the start (samples may repeat)",
                  file=sys.stderr)
            return
        self.stream.skip = list(positions[rank])
        self.pass_ = int(stream_state.get("passes", [0] * world_size)[rank])
        self.turn = int(stream_state["turns"][rank]) if "turns" in stream_state else None  # a last.pt before passes
        self.resume_bad = int(stream_state.get("bad", 0))

    def position(self, distributed: bool) -> dict[str, Any]:
        """Every rank's pass, next worker and workers' raw positions, and the epoch's bad samples so far (a
        collective in DDP)."""
        workers = max(self.num_workers, 1)
        mine = [[self.positions.get(w, self.stream.skip[w] if w < len(self.stream.skip) else 0)
                 for w in range(workers)], self.pass_, self.turn]
        gathered = [mine]
        if distributed:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        return {"positions": [g[0] for g in gathered], "passes": [g[1] for g in gathered],
                "turns": [g[2] for g in gathered], "bad": self.bad_samples(distributed)}

    def bad_samples(self, distributed: bool) -> int:
        """Bad samples of this epoch so far, over every rank and worker (a collective in DDP)."""
        total = torch.tensor(float(self.past_bad + sum(self.bad.values())))
        if distributed:
            dist.all_reduce(total)
        return self.resume_bad + int(total.item())


def scan_captions(urls: Sequence[str], tokenizer: str, max_words: int, desc: str | None = "word map"
                  ) -> tuple[Counter[str], int, int]:
    """One streaming pass over the shards' captions (no image is decoded): word counts, good and bad
    samples. Memory holds the word counts only, whatever the number of shards."""
    counts: Counter[str] = Counter()
    good = bad = 0

    def count_error(error: Exception) -> bool:
        nonlocal bad
        bad += 1
        return True

    with progress_bar(total=len(urls), desc=desc or "", unit="shard", disable=desc is None) as bar:
        url = None
        for sample in shard_samples(urls, count_error):
            if sample.get("__url__") != url:
                url = sample.get("__url__")
                bar.update()
            try:
                _, tokens, _ = sample_captions(sample, tokenizer)
                if not any(ext in sample for ext in IMAGE_EXTENSIONS):
                    raise BadSample("no image member")
            except BadSample:
                bad += not sample.get(DAMAGED)  # its read error is counted
                continue
            good += 1
            counts.update(w for t in tokens for w in t[:max_words])
    return counts, good, bad
