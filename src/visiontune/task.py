"""The one contract between tasks and the engine.

A task is split along the lines a distributed wrapper and a precision policy need:

- a *model adapter* (`ModelAdapter`, one per model family) owns the model: construction, PEFT
  wrapping, gradient checkpointing and dtype rules. Its `forward(**batch.inputs)` is the only
  call training and evaluation make, so a DDP/FSDP wrapper around it sees every trainable
  parameter; generation goes through `generate` on the unwrapped adapter.
- the *task* turns samples into batches, outputs into a loss *sum* plus the number of items it
  covers, outputs into metrics (through a `Meter`) and outputs into predictions and pictures.
  It never calls a submodule of the model, never checks for PEFT and never casts dtypes.

The engine imports only this module from the task world, and a task imports only this module
from the engine world. Returning a sum (not a mean) lets the engine normalise over a whole
accumulation window, where micro-batches may hold different numbers of items (a short last
batch, answers of different token lengths).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from visiontune.config.schema import Config

Outputs = dict[str, Any]
"""What an adapter's forward returns: named tensors in fp32 (logits, masks, answer logits)."""


@dataclass
class Skipped:
    """A sample that could not be loaded (corrupt image, bad record): counted, never trained on."""

    sample_id: str
    reason: str


def _move(values: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in values.items()
    }


@dataclass
class Batch:
    """A collated micro-batch.

    `inputs` are the keyword arguments of the adapter's forward; `targets` what the loss and
    the metrics compare against; both go to the device. `ids` name the samples so that a NaN
    loss or a failure can be reported with the samples that caused it; `skipped` carries
    samples the dataset refused; `extras` stay on the host (paths, texts, original masks).
    """

    inputs: dict[str, Any]
    ids: list[str]
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            _move(self.inputs, device),
            self.ids,
            _move(self.targets, device),
            self.skipped,
            self.extras,
        )

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class LossOut:
    """Loss summed over the items of a micro-batch, and how many items it covers.

    `count` may stay a device tensor (answer tokens): the engine reads it once per optimizer
    step, not once per micro-batch. `parts` are named sums over the same items (mask loss,
    dice), logged beside the total.
    """

    loss_sum: torch.Tensor
    count: int | torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Metrics:
    """Scalar metrics (flat names such as `accuracy` or `sensitivity.severe`) plus any tables."""

    scalars: dict[str, float]
    tables: dict[str, Any] = field(default_factory=dict)


@dataclass
class Splits:
    """Datasets per split; `val`/`test` may be absent.

    A train dataset exposes `keys` (one string per sample: its id and label), from which the
    engine fingerprints the data a checkpoint's position refers to.
    """

    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None

    def get(self, name: str) -> Dataset | None:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


@dataclass
class TrainableRow:
    """One line of the trainable-parameter report."""

    component: str
    trainable: int
    total: int


class ModelAdapter(nn.Module):
    """A model family's whole model behind one `forward`.

    Subclasses build the model in `__init__` (hub id, local directory or inline config), apply
    LoRA, set up gradient checkpointing and keep the dtype rules (trainable parameters fp32,
    inputs cast to the frozen base's dtype, outputs returned in fp32) so that neither the task
    nor the engine ever casts by hand.
    """

    base_model_id: str | None = None
    """The hub id written into PEFT adapter configs (never a local cache path)."""

    def forward(self, **inputs: Any) -> Outputs:
        raise NotImplementedError

    def generate(self, **inputs: Any) -> torch.Tensor:
        """New token ids per row (generative families only); called on the unwrapped adapter."""
        raise TypeError(f"{type(self).__name__} does not generate")

    def trainable_rows(self) -> list[TrainableRow]:
        """Trainable vs total parameters per component, for the report at start-up."""
        raise NotImplementedError

    def export_merged(self, out_dir: Path) -> None:
        """Fold LoRA into the base weights and write a plain transformers checkpoint."""
        raise TypeError(f"{type(self).__name__} cannot be exported as one merged model")


class Meter(Protocol):
    """Accumulates what a metric needs over a split, then computes it once."""

    def update(self, outputs: Outputs, batch: Batch) -> None: ...

    def compute(self) -> Metrics: ...


class Task(Protocol):
    """What every task (classify, segment, ground) implements.

    A task is constructed with the resolved Config (`TaskClass(cfg)`) and reads its own
    sections from it; it never sees an optimizer, a scaler or a checkpoint.

    Optional hooks, looked up by name: `resolved_config() -> Config` (the config to store
    with the run, with what the data revealed pinned), `generation_inputs(batch)` (adapter
    `generate` arguments for evaluation, generative tasks), `export_files(out_dir)`
    (processor files a merged export needs to stand on its own) and `augment(batch) -> Batch`
    (random augmentation of a *train* batch already on the training device, one batched call
    instead of one per sample in the workers; evaluation batches never pass through it).
    """

    name: str

    def datasets(self) -> Splits:
        """Build validated datasets; raise DataError/ConfigError naming the file or key."""

    def adapter(self) -> ModelAdapter:
        """The model adapter, with LoRA applied as configured; trainable parameters in fp32."""

    def collate(self, samples: list[Any]) -> Batch: ...

    def loss(self, outputs: Outputs, batch: Batch) -> LossOut: ...

    def meter(self) -> Meter:
        """A fresh accumulator for one evaluation pass."""

    def prediction_batches(self, inputs: list[dict[str, Any]]) -> Iterator[Batch]:
        """User inputs (`{"image": path, "text": ...}`) as batches, in input order."""

    def predictions(self, outputs: Outputs, batch: Batch, out_dir: Path) -> list[dict[str, Any]]:
        """One JSON-able record per input of the batch; pictures written to out_dir."""

    def save_figures(self, metrics: Metrics, out_dir: Path) -> list[Path]:
        """Write pictures of an evaluation (confusion matrix, masks); return their paths."""


def augmented(task: Task, batch: Batch) -> Batch:
    """A train batch after the task's optional `augment` hook (the batch itself without one)."""
    hook = getattr(task, "augment", None)
    return hook(batch) if callable(hook) else batch


def resolved_config(task: Task, cfg: Config) -> Config:
    """The config to store with a run: a task may pin what it discovered in the data (the
    class order) through an optional `resolved_config()` method."""
    hook = getattr(task, "resolved_config", None)
    return hook() if callable(hook) else cfg
