"""Which examples each process reads, in which order: reproducible, shardable and resumable.

Every order is a pure function of ``(seed, epoch)``; a process's position in it is two integers.
Saving those integers and restoring them continues the exact sequence of examples, which is what
makes resumed runs produce the same losses as uninterrupted ones.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of `size` items in `epoch` (same on every process)."""
    return np.random.default_rng([seed, epoch]).permutation(size)


class StridedOrder:
    """An endless shuffled pass over `size` items, epoch after epoch; process `rank` takes every `world_size`-th."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        if size < world_size:
            raise ValueError(f"the training data holds {size} examples, fewer than the {world_size} processes")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._share = self._epoch_share()

    def _epoch_share(self) -> np.ndarray:
        order = epoch_permutation(self.size, self.seed, self.epoch)
        return order[self.rank :: self.world_size][: self.size // self.world_size]

    def next(self) -> tuple[int, int]:
        """``(epoch, item)`` of the next example."""
        if self.cursor == len(self._share):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._share = self._epoch_share()
        item = int(self._share[self.cursor])
        self.cursor += 1
        return self.epoch, item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._share = self._epoch_share()


class GroupedBatchOrder:
    """Global batches drawn from one group (data set) at a time, as LLM2Vec's supervised recipe.

    Per epoch: each group is shuffled and cut into batches of ``world_size * batch_size`` items (an
    incomplete last batch is dropped), then the batches of all groups are shuffled together.
    Process `rank` takes slice `rank` of every global batch, so the in-batch negatives gathered
    across processes all come from the same data set.
    """

    def __init__(self, group_sizes: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.group_offsets = np.concatenate(([0], np.cumsum(group_sizes))).astype(np.int64)
        self.global_batch = batch_size * world_size
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        if all(size < self.global_batch for size in group_sizes):
            raise ValueError(
                f"no data set holds a full global batch of {self.global_batch} examples "
                f"({batch_size} per process x {world_size} processes); data set sizes: {list(group_sizes)}"
            )
        self.epoch, self.cursor = 0, 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for start, end in zip(self.group_offsets[:-1], self.group_offsets[1:]):
            items = rng.permutation(np.arange(start, end))
            usable = len(items) // self.global_batch * self.global_batch
            batches.append(items[:usable].reshape(-1, self.global_batch))
        stacked = np.concatenate(batches)
        return stacked[rng.permutation(len(stacked))]

    def group_of(self, item: int) -> int:
        return int(np.searchsorted(self.group_offsets, item, side="right") - 1)

    def next(self) -> tuple[int, np.ndarray]:
        """``(epoch, items)``: this process's slice of the next global batch."""
        if self.cursor == len(self._batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        batch = self._batches[self.cursor]
        self.cursor += 1
        return self.epoch, batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._batches = self._epoch_batches()
