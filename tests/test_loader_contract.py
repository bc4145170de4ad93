"""What the shard loader and the trainer rely on in torch's DataLoader that torch does not document, pinned
here (docs/distributed.md, "What resume rests on"): a torch upgrade that changes it fails these tests by name,
rather than making a mid-epoch resume train other batches or a run's exit hang on its workers."""
from __future__ import annotations

import multiprocessing

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from satkit.data.shards import ShardStream
from satkit.training.trainer import stop_workers
from test_shards import SMALL_INFO, SMALL_WORDS, img2dataset_sample, write_tar

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers, 2 cores


def test_the_shuffle_buffer_is_webdatasets_public_one(tmp_path, monkeypatch):
    """ShardStream shuffles through `webdataset.shuffle`, not the private `filters._shuffle` it wraps (gone
    here, as a webdataset release may drop it): a seeded pass is the same either way."""
    import webdataset

    write_tar(tmp_path / "s-0.tar", [img2dataset_sample(f"{i:09d}", i) for i in range(12)])
    stream = ShardStream([str(tmp_path / "s-0.tar")], SMALL_INFO, SMALL_WORDS, train=True, seed=3, shuffle_buffer=5)
    before = [item["key"] for item in stream]
    monkeypatch.delattr(webdataset.filters, "_shuffle")
    assert [item["key"] for item in stream] == before and before != sorted(before)


class TaggedShares(IterableDataset):
    """Worker w yields shares[w] items, each tagged (w, i): batches say which worker made them."""

    def __init__(self, shares: list[int]) -> None:
        self.shares = shares

    def __iter__(self):
        worker = get_worker_info()
        w = worker.id if worker is not None else 0
        return iter([(w, i) for i in range(self.shares[w])])


def batch_workers(shares: list[int], batch_size: int) -> list[int]:
    loader = DataLoader(TaggedShares(shares), batch_size=batch_size, num_workers=len(shares),
                        generator=torch.Generator().manual_seed(0))
    workers = []
    for ids, _ in loader:
        assert len(set(ids.tolist())) == 1, "a batch mixes workers"
        workers.append(int(ids[0]))
    return workers


def test_the_loader_takes_batches_from_its_workers_in_turn_passing_over_a_finished_one():
    """ShardLoader's `turn` and ShardStream's `worker_offset` (a resumed pass starts at the worker whose batch
    was next) assume this order: worker 0, 1, ..., K-1, 0, ..., skipping a worker once its share is done,
    whatever the prefetching. Shares of 3, 1 and 2 batches (the last ones short)."""
    assert batch_workers([6, 2, 3], batch_size=2) == [0, 1, 2, 0, 2, 0]


def alive(processes: list[multiprocessing.Process]) -> list[multiprocessing.Process]:
    return [p for p in processes if p.is_alive()]


def test_a_loader_iterator_shuts_its_workers_down_at_once():
    """ShardLoader._pass and trainer.stop_workers end workers through the iterator's `_shutdown_workers` (no public
    call does it): at an error its traceback keeps the iterator alive, and workers that ignore SIGTERM would
    make the interpreter's exit wait forever. Persistent workers are reached through DataLoader's `_iterator`."""
    before = set(multiprocessing.active_children())
    iterator = iter(DataLoader(TaggedShares([4, 4]), batch_size=2, num_workers=2))
    next(iterator)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2 and hasattr(iterator, "_shutdown_workers")
    iterator._shutdown_workers()
    assert not alive(workers)

    persistent = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    next(iter(persistent))
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2 and getattr(persistent, "_iterator", None) is not None
    stop_workers(persistent)
    assert not alive(workers)
