"""The one contract between tasks and the engine.

The engine imports only this module from the task world, and a task imports only this module
from the engine world. A task turns samples into batches and batches into a loss *sum* plus the
number of items that sum covers; the engine owns optimisers, precision, checkpoints and
signals. Returning a sum (not a mean) lets the engine normalise over a whole accumulation
window, where micro-batches may hold different numbers of items (a short last batch, answers
of different token lengths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from visiontune.config.schema import Config


@dataclass
class Skipped:
    """A sample that could not be loaded (corrupt image, bad record): counted, never trained on."""

    sample_id: str
    reason: str


@dataclass
class Batch:
    """A collated micro-batch.

    `tensors` go to the device; `ids` name the samples so that a NaN loss or a failure can be
    reported with the samples that caused it; `skipped` carries samples the dataset refused.
    """

    tensors: dict[str, torch.Tensor]
    ids: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}
        return Batch(moved, self.ids, self.skipped, self.extras)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class LossOut:
    """Loss summed over the items of a micro-batch, and how many items it covers."""

    loss_sum: torch.Tensor
    count: int | torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class Metrics:
    """Scalar metrics (flat names such as `accuracy` or `sensitivity.severe`) plus any tables."""

    scalars: dict[str, float]
    tables: dict[str, Any] = field(default_factory=dict)


@dataclass
class Splits:
    """Datasets per split; `val`/`test` may be absent."""

    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None

    def get(self, name: str) -> Dataset | None:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


class Task(Protocol):
    """What every task (classify, segment, ground) implements.

    A task is constructed with the resolved Config (`TaskClass(cfg)`) and reads its own
    sections from it; it never sees an optimizer, a scaler or a checkpoint.

    Optional hooks, looked up by name: `resolved_config() -> Config` (the config to store
    with the run, with what the data revealed pinned) and `export_files(out_dir)` (processor
    files a merged export needs to stand on its own).
    """

    name: str

    def datasets(self) -> Splits:
        """Build validated datasets; raise DataError/ConfigError naming the file or key."""

    def build_model(self) -> nn.Module:
        """Load the model and apply LoRA as configured; trainable parameters in fp32."""

    def collate(self, samples: list[Any]) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> LossOut: ...

    def evaluate(self, model: nn.Module, loader: DataLoader) -> Metrics: ...

    def predict(
        self, model: nn.Module, inputs: list[dict[str, Any]], out_dir: Path
    ) -> list[dict[str, Any]]:
        """Predict for user inputs (`{"image": path, "text": ...}`); write any pictures to
        out_dir; return one JSON-able record per input."""

    def save_figures(self, metrics: Metrics, out_dir: Path) -> list[Path]:
        """Write pictures of an evaluation (confusion matrix, masks); return their paths."""


def resolved_config(task: Task, cfg: Config) -> Config:
    """The config to store with a run: a task may pin what it discovered in the data (the
    class order) through an optional `resolved_config()` method."""
    hook = getattr(task, "resolved_config", None)
    return hook() if callable(hook) else cfg
