"""DataLoaders that keep an accelerator fed: worker processes, pinned memory, persistent workers.

The training loader is built once and its workers live for the whole run (starting them every
epoch costs seconds, and would throw away whatever they hold). Two things make that compatible
with exact resume and per-epoch augmentation:

- the data order stays a pure function of (seed, epoch): `EpochBatches` hands the DataLoader
  the index lists of `DataOrder` from a given position, set by the loop before each epoch;
- every index a worker receives carries its epoch (`(epoch, index)`), and `EpochIndexed` hands
  both to the dataset's `training_sample` where it has one, or calls its `set_epoch` before
  reading the sample. Workers hold their own copy of the dataset, so calling `set_epoch` in
  the main process would never reach them.

Augmentation draws from a generator seeded per (seed, epoch, index), never from a worker's RNG,
so a sample is the same whichever worker reads it and however many workers there are.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from visiontune.config.schema import DataConfig
from visiontune.engine.order import DataOrder
from visiontune.task import Batch

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 8


def resolve_num_workers(setting: int | str) -> int:
    """`auto`: the cores this process may use minus one (one stays with the training step),
    at most MAX_AUTO_WORKERS; 0 inside a daemon process, which may not start children."""
    if setting != "auto":
        return int(setting)
    if multiprocessing.current_process().daemon:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min((cores or 1) - 1, MAX_AUTO_WORKERS))


def loader_options(data: DataConfig, device: torch.device, persistent: bool) -> dict[str, Any]:
    """The DataLoader keywords for `data` on `device` (pinning only pays off for CUDA)."""
    workers = resolve_num_workers(data.num_workers)
    options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": data.pin_memory and device.type == "cuda",
    }
    if workers:
        options["prefetch_factor"] = data.prefetch_factor
        options["persistent_workers"] = persistent and data.persistent_workers
    return options


class PinnableBatch(Batch):
    """A Batch the DataLoader's pinning thread can pin (it pins only types that say how)."""

    @classmethod
    def of(cls, batch: Batch) -> PinnableBatch:
        return cls(**{f.name: getattr(batch, f.name) for f in fields(Batch)})

    def pin_memory(self) -> PinnableBatch:
        def pin(values: dict[str, Any]) -> dict[str, Any]:
            return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in values.items()}

        return PinnableBatch(
            pin(self.inputs), self.ids, pin(self.targets), self.skipped, self.extras
        )


class PinnableCollate:
    """The task's collate, returning batches the pinning thread understands (picklable)."""

    def __init__(self, collate: Callable[[list[Any]], Batch]) -> None:
        self.collate = collate

    def __call__(self, samples: list[Any]) -> Batch:
        return PinnableBatch.of(self.collate(samples))


class EpochIndexed(Dataset):
    """Reads `(epoch, index)` keys: the dataset's `training_sample(epoch, index)` (a train
    sample may be unfinished, for the task's `augment` hook), else its epoch set, then the
    sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        training_sample = getattr(self.dataset, "training_sample", None)
        if training_sample is not None:
            return training_sample(epoch, index)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        return self.dataset[index]


class EpochBatches:
    """Batch sampler over `DataOrder`: the loop picks the epoch and start before iterating."""

    def __init__(self, order: DataOrder) -> None:
        self.order = order
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.order.epoch_batches(self.epoch, self.start):
            yield [(self.epoch, index) for index in batch]

    def __len__(self) -> int:
        return max(0, self.order.batches_per_epoch - self.start)


class TrainLoader:
    """One DataLoader for the whole run; `epoch(e, start)` iterates epoch e from micro-batch
    `start` (a resumed position) with the same workers."""

    def __init__(
        self,
        dataset: Dataset,
        order: DataOrder,
        collate: Callable[[list[Any]], Batch],
        data: DataConfig,
        device: torch.device,
    ) -> None:
        self.sampler = EpochBatches(order)
        options = loader_options(data, device, persistent=True)
        self.loader = DataLoader(
            EpochIndexed(dataset),
            batch_sampler=self.sampler,
            collate_fn=PinnableCollate(collate) if options["pin_memory"] else collate,
            generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
            **options,
        )
        if options["num_workers"]:
            log.info(
                "data: %d worker processes (%s), prefetch %d batches each%s",
                options["num_workers"],
                "kept across epochs" if options["persistent_workers"] else "restarted per epoch",
                options["prefetch_factor"],
                ", pinned memory" if options["pin_memory"] else "",
            )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        self.sampler.epoch, self.sampler.start = epoch, start
        return iter(self.loader)


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    collate: Callable[[list[Any]], Batch],
    data: DataConfig,
    device: torch.device,
) -> DataLoader:
    """A loader for one pass over an evaluation split; its workers end with the pass."""
    options = loader_options(data, device, persistent=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=PinnableCollate(collate) if options["pin_memory"] else collate,
        generator=torch.Generator(),
        **options,
    )
