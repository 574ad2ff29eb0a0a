"""A distributed sampler that can start part-way through an epoch, for exact resume."""

from __future__ import annotations

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (shuffled by seed and epoch, sharded by rank) that skips the first batches.

    Resuming at batch k of an epoch must see the same samples in the same order as a run that never
    stopped, so the permutation is the parent's and only its head is dropped.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self._skip = 0

    def skip_first(self, num_samples: int) -> None:
        """Skip `num_samples` of this rank's samples in the next iteration only."""
        self._skip = num_samples

    def __iter__(self):
        indices = list(super().__iter__())[self._skip :]
        self._skip = 0
        return iter(indices)

    # __len__ stays the whole epoch's: the loop counts batches from the epoch's start, skipped ones too.
