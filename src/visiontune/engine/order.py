"""Data order as a pure function of (seed, epoch), so a resumed run sees the same batches.

The position inside an epoch is a count of consumed micro-batches; resuming skips that many
index lists without decoding a single image, and no global RNG is consumed for shuffling.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from visiontune.errors import TrainingError


class DataOrder:
    """Micro-batches of sample indices for each epoch."""

    def __init__(
        self,
        indices: list[int],
        micro_batch_size: int,
        seed: int,
        limit_batches: int = 0,
        lengths: list[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.indices = indices
        self.lengths = lengths
        self.num_samples = len(indices)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.limit_batches = limit_batches
        self.rank, self.world_size = rank, world_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch, on every rank alike (one global batch each)."""
        full = math.ceil(self.num_samples / (self.micro_batch_size * self.world_size))
        return min(full, self.limit_batches) if self.limit_batches else full

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches of micro_batch_size x world_size indices, the same on every rank
        and, for world size 1, the micro-batches themselves. One may be short (the last, or
        with length grouping one of the last span's).

        With `limit_batches` (overfit mode) every epoch repeats the same first batches, which
        is the point of overfitting: the model must be able to drive their loss to zero.
        """
        order_epoch = 0 if self.limit_batches else epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + order_epoch)
        perm = [self.indices[i] for i in torch.randperm(self.num_samples, generator=generator)]
        size = self.micro_batch_size * self.world_size
        if self.lengths is None:
            batches = [perm[b : b + size] for b in range(0, len(perm), size)]
        else:
            batches = group_by_length(perm, self.lengths, size, generator)
        return batches[: self.batches_per_epoch]

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's index lists of `epoch` from micro-batch `start` on: its slice of each
        global batch, so the ranks together see what one process at micro_batch_size x
        world_size sees. A rank whose slice of a short batch is empty gets the batch's first
        index as padding (see `padded_batches`), so every rank runs every micro-batch."""
        size = self.micro_batch_size
        for batch in self.global_batches(epoch)[start:]:
            own = batch[self.rank * size : (self.rank + 1) * size]
            yield own or batch[:1]

    def padded_batches(self, epoch: int) -> set[int]:
        """Positions in `epoch` where this rank's micro-batch is padding (zero weight)."""
        begin = self.rank * self.micro_batch_size
        return {k for k, batch in enumerate(self.global_batches(epoch)) if len(batch) <= begin}

    def on(self, rank: int, world_size: int) -> DataOrder:
        """The same order sharded over another world (resume on a different world size)."""
        return DataOrder(
            self.indices, self.micro_batch_size, self.seed, self.limit_batches, self.lengths,
            rank, world_size,
        )  # fmt: skip


def group_by_length(
    perm: list[int],
    lengths: list[int],
    micro_batch_size: int,
    generator: torch.Generator,
    window: int = 50,
) -> list[list[int]]:
    """Micro-batches of similar lengths, in random order, the longest one first.

    Sorting inside spans of `window` micro-batches puts similar lengths together (less
    padding) while the spans keep the shuffle's randomness. The batches of a span are then
    shuffled, because handing them out longest-first would make every span a long-to-short
    curriculum. Only the batch holding the epoch's longest sample is moved to the front, so
    an out-of-memory error shows up at the first step instead of hours in (as Hugging Face's
    LengthGroupedSampler does). `generator` must be seeded from (seed, epoch) so that a
    resumed run gets the same batches. At most one batch (that of the last span) is short.
    """
    span = micro_batch_size * window
    batches: list[list[int]] = []
    for begin in range(0, len(perm), span):
        ordered = sorted(perm[begin : begin + span], key=lambda i: -lengths[i])
        grouped = [
            ordered[b : b + micro_batch_size] for b in range(0, len(ordered), micro_batch_size)
        ]
        batches += [grouped[k] for k in torch.randperm(len(grouped), generator=generator)]
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def train_indices(num_samples: int, max_samples: int | None, seed: int) -> list[int]:
    """All indices, or a seeded random subset of `max_samples` of them."""
    if not max_samples or max_samples >= num_samples:
        return list(range(num_samples))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_samples, generator=generator)[:max_samples].tolist())


def sample_lengths(dataset: Dataset) -> list[int]:
    lengths = getattr(dataset, "lengths", None)
    if lengths is None:
        raise TrainingError(
            "train.group_by_length: this task's training data has no sample lengths"
        )
    return list(lengths)
