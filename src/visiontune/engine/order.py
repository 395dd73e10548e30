"""Data order as a pure function of (seed, epoch), so a resumed run sees the same batches.

The position inside an epoch is a count of consumed micro-batches; resuming skips that many
index lists without decoding a single image, and no global RNG is consumed for shuffling.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class DataOrder:
    """Micro-batches of sample indices for each epoch."""

    def __init__(
        self,
        indices: list[int],
        micro_batch_size: int,
        seed: int,
        limit_batches: int = 0,
        lengths: list[int] | None = None,
    ) -> None:
        self.indices = indices
        self.lengths = lengths
        self.num_samples = len(indices)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.limit_batches = limit_batches

    @property
    def batches_per_epoch(self) -> int:
        full = math.ceil(self.num_samples / self.micro_batch_size)
        return min(full, self.limit_batches) if self.limit_batches else full

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """Index lists of `epoch` from micro-batch `start` on; the last one may be short.

        With `limit_batches` (overfit mode) every epoch repeats the same first batches, which
        is the point of overfitting: the model must be able to drive their loss to zero.
        """
        order_epoch = 0 if self.limit_batches else epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + order_epoch)
        perm = [self.indices[i] for i in torch.randperm(self.num_samples, generator=generator)]
        size = self.micro_batch_size
        if self.lengths is not None:
            perm = group_by_length(perm, self.lengths, size)
        for b in range(start, self.batches_per_epoch):
            yield perm[b * size : (b + 1) * size]


def group_by_length(
    perm: list[int], lengths: list[int], micro_batch_size: int, window: int = 50
) -> list[int]:
    """Sort longest-first inside spans of `window` micro-batches.

    Micro-batches then hold similar lengths (less padding), the spans keep the shuffle's
    randomness, and the first micro-batch of a span is its longest, so an out-of-memory
    error shows up early instead of hours in.
    """
    span = micro_batch_size * window
    return [
        i
        for start in range(0, len(perm), span)
        for i in sorted(perm[start : start + span], key=lambda i: -lengths[i])
    ]
