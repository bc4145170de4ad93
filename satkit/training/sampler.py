"""The training split's sampler: a DistributedSampler whose interrupted epoch resumes part-way."""
from __future__ import annotations

import itertools
from typing import Iterator

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """A DistributedSampler whose epoch can start part-way, after `skip` samples: an epoch interrupted
    mid-way continues with the very batches it had not trained, in the same order."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip
