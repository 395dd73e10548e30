"""What one rank runs in each slot of an accumulation window under DDP.

Every rank must run every micro-batch of a window: the gradient all-reduce happens in the
backward of its last one, and a rank that skips a forward leaves the others waiting. Two
slots would otherwise be empty on one rank and not on another: a rank's slice of the epoch's
short last batch (the data order pads it with a real sample, run at weight 0), and a
micro-batch whose samples were all corrupt (this rank's previous micro-batch is run again at
weight 0). Weight 0 keeps both out of the loss, the item count and the gradients.
"""

from __future__ import annotations

from visiontune.engine.order import DataOrder
from visiontune.errors import TrainingError
from visiontune.task import Batch


class RankWindow:
    def __init__(self, order: DataOrder) -> None:
        self.order = order
        self._padded: tuple[int, set[int]] = (-1, set())
        self._last: Batch | None = None

    def weight(self, epoch: int, position: int) -> float:
        """0 where this rank's micro-batch at `position` of `epoch` is padding, else 1."""
        if self.order.world_size == 1:
            return 1.0
        if self._padded[0] != epoch:
            self._padded = (epoch, self.order.padded_batches(epoch))
        return 0.0 if position in self._padded[1] else 1.0

    def keep(self, batch: Batch) -> Batch:
        """`batch` (on the device, augmented), remembered for a replay."""
        self._last = batch
        return batch

    def replay(self) -> Batch:
        if self._last is None:
            raise TrainingError(
                f"rank {self.order.rank}: every sample of its first micro-batch is corrupt, so "
                "it has nothing to run while the other ranks step; fix or remove those files "
                "(named above)"
            )
        return self._last
