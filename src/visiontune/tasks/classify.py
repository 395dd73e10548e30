"""Image classification: any `AutoModelForImageClassification` backbone (see
visiontune.models.classifier), losses from `task.loss`, metrics a clinician asks for.

The task turns the config into datasets, batches, a loss sum and metrics; it never sees an
optimizer, a checkpoint or a submodule of the model (see visiontune.task).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from visiontune.config.schema import Augment, Config
from visiontune.data.augment import AugmentJob, BatchAugmenter
from visiontune.data.imagefolder import build_splits
from visiontune.data.images import ImageSpec, load_pixels, normalise, resolve_image_spec
from visiontune.errors import ConfigError, DataError
from visiontune.losses import class_weights, classification_loss
from visiontune.metrics.classification import classification_metrics
from visiontune.models.classifier import ClassifierAdapter
from visiontune.task import Batch, LossOut, Metrics, Outputs, Skipped, Splits

log = logging.getLogger(__name__)


class ClassifyTask:
    """Implements visiontune.task.Task for single-label image classification."""

    name = "classify"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._spec: ImageSpec | None = None
        self._built: tuple[list[str], Splits] | None = None
        self._weight: torch.Tensor | None = None
        self._weight_ready = False
        self._augmenter: BatchAugmenter | None = None

    # --- data -------------------------------------------------------------------------------

    @property
    def spec(self) -> ImageSpec:
        """Image size and normalisation, resolved once (it may read the model's processor)."""
        if self._spec is None:
            self._spec = resolve_image_spec(self.cfg)
        return self._spec

    @property
    def classes(self) -> list[str]:
        """`data.classes`, or the names found in the train data (which it then reads)."""
        if self.cfg.data.classes is not None:
            return list(self.cfg.data.classes)
        return self._splits()[0]

    def datasets(self) -> Splits:
        return self._splits()[1]

    def resolved_config(self) -> Config:
        """The config with the discovered class order pinned, so that eval and predict of the
        run never depend on re-reading (possibly moved) training data."""
        data = self.cfg.data.model_copy(update={"classes": self.classes})
        return self.cfg.model_copy(update={"data": data})

    def _splits(self) -> tuple[list[str], Splits]:
        if self._built is None:
            classes, splits = build_splits(self.cfg, self.spec)
            self._referable_index(classes)
            self._built = classes, splits
        return self._built

    def _referable_index(self, classes: list[str]) -> int | None:
        name = self.cfg.task.referable_from
        if name is None:
            return None
        if name not in classes:
            raise ConfigError(
                [f"task.referable_from: {name!r} is not one of the classes {classes}"]
            )
        return classes.index(name)

    def collate(self, samples: list[dict[str, Any] | Skipped]) -> Batch:
        """Stack decodable samples; carry the refused ones along so the engine can count them."""
        good = [s for s in samples if not isinstance(s, Skipped)]
        skipped = [s for s in samples if isinstance(s, Skipped)]
        if not good:
            return Batch({}, [], skipped=skipped)
        pixels = torch.stack([s["pixel_values"] for s in good])
        labels = torch.tensor([s["label"] for s in good], dtype=torch.long)
        extras: dict[str, Any] = {}
        if "augment" in good[0]:
            epoch = good[0]["augment"][0]
            extras["augment"] = AugmentJob(epoch, tuple(s["augment"][1] for s in good))
        ids = [s["id"] for s in good]
        return Batch({"pixel_values": pixels}, ids, {"labels": labels}, skipped, extras)

    def augment(self, batch: Batch) -> Batch:
        """A train batch of uint8 pixels (`data.augment_on: device`), augmented in one batched
        kornia call where it already is (the training device) and normalised; any other
        batch is returned as it is."""
        job = batch.extras.get("augment")
        if job is None:
            return batch
        if self._augmenter is None:
            cfg = self.cfg.data.augment.get("train", Augment())
            self._augmenter = BatchAugmenter(cfg, self.spec.size, self.cfg.train.seed)
        unit = self._augmenter(batch.inputs["pixel_values"].float() / 255.0, job)
        inputs = {**batch.inputs, "pixel_values": normalise(unit, self.spec)}
        return replace(batch, inputs=inputs)

    # --- model, loss and evaluation ---------------------------------------------------------

    def adapter(self) -> ClassifierAdapter:
        """The backbone with a head for our classes, LoRA on the encoder, head fully trained."""
        return ClassifierAdapter(self.cfg, self.classes)

    def loss(self, outputs: Outputs, batch: Batch) -> LossOut:
        labels = batch.targets["labels"]
        per_item = classification_loss(
            self.cfg.task.loss, outputs["logits"], labels, self._class_weight()
        )
        return LossOut(per_item.sum(), len(labels))

    def _class_weight(self) -> torch.Tensor | None:
        """`task.loss.class_weights`, with "balanced" counted on the train split once."""
        if not self._weight_ready:
            spec = self.cfg.task.loss.class_weights
            labels = self.datasets().train.labels if spec == "balanced" else []
            self._weight = class_weights(spec, labels, len(self.classes))
            self._weight_ready = True
            if self._weight is not None:
                weights = zip(self.classes, self._weight.tolist(), strict=True)
                log.info("class weights: %s", dict(weights))
        return self._weight

    def meter(self) -> ClassifyMeter:
        classes = self.classes
        return ClassifyMeter(self, classes, self._referable_index(classes))

    def save_figures(self, metrics: Metrics, out_dir: Path) -> list[Path]:
        if "confusion_matrix" not in metrics.tables:
            return []
        path = Path(out_dir) / "confusion_matrix.png"
        save_confusion_matrix(metrics.tables["confusion_matrix"], metrics.tables["classes"], path)
        return [path]

    def export_files(self, out_dir: Path) -> None:
        """An image processor with the preprocessing this run trained with (pad-to-square is
        ours, so it is noted in the model card rather than the processor)."""
        from transformers import ViTImageProcessor

        spec = self.spec
        ViTImageProcessor(
            size={"height": spec.size, "width": spec.size},
            image_mean=list(spec.mean),
            image_std=list(spec.std),
        ).save_pretrained(out_dir)

    # --- prediction -------------------------------------------------------------------------

    def prediction_batches(self, inputs: list[dict[str, Any]]) -> Iterator[Batch]:
        """Chunks of eval batch size; an image that cannot be decoded gets a record with an
        `error` instead of a guess."""
        step = self.cfg.eval.batch_size or self.cfg.train.micro_batch_size
        for start in range(0, len(inputs), step):
            records: list[dict[str, Any]] = []
            pixels: list[torch.Tensor] = []
            for item in inputs[start : start + step]:
                image = str(item["image"])
                records.append({"image": image, "label": None, "score": None, "probabilities": {}})
                try:
                    pixels.append(load_pixels(Path(image), self.spec))
                except DataError as err:
                    log.warning("predict: %s", err)
                    records[-1]["error"] = str(err)
            good = [r["image"] for r in records if "error" not in r]
            tensors = {"pixel_values": torch.stack(pixels)} if pixels else {}
            yield Batch(tensors, good, extras={"records": records})

    def predictions(self, outputs: Outputs, batch: Batch, out_dir: Path) -> list[dict[str, Any]]:
        """Predicted label, its probability and all probabilities, per input image."""
        records = batch.extras["records"]
        if not len(batch):
            return records
        names = self.classes
        probs = outputs["logits"].softmax(dim=-1).cpu()
        decoded = [r for r in records if "error" not in r]
        for record, row in zip(decoded, probs, strict=True):
            best = int(row.argmax())
            record.update(
                label=names[best],
                score=float(row[best]),
                probabilities={n: float(p) for n, p in zip(names, row.tolist(), strict=True)},
            )
        return records


class ClassifyMeter:
    """Probabilities and labels of the whole split, so QWK and AUC see every sample at once.

    They are also returned per sample (`tables["samples"]`: id, target, probabilities and
    cross-entropy), which lets the ledger put a bootstrap interval on every metric and compare
    two runs on the same images."""

    gathered = ("probs", "targets", "ids", "skipped", "loss_sum")
    """What evaluation gathers across ranks before computing (engine/distributed.py)."""

    def __init__(self, task: ClassifyTask, classes: list[str], referable: int | None) -> None:
        self.task, self.classes, self.referable = task, classes, referable
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.ids: list[str] = []
        self.skipped: list[Skipped] = []
        self.loss_sum = 0.0

    def update(self, outputs: Outputs, batch: Batch) -> None:
        self.skipped.extend(batch.skipped)
        if not len(batch):
            return
        loss = self.task.loss(outputs, batch)
        self.loss_sum += float(loss.loss_sum)
        self.probs.append(outputs["logits"].float().softmax(dim=-1).cpu())
        self.targets.append(batch.targets["labels"].cpu())
        self.ids.extend(map(str, batch.ids))

    def compute(self) -> Metrics:
        if not self.probs:
            raise DataError(f"evaluation found no decodable image ({len(self.skipped)} skipped)")
        targets = torch.cat(self.targets)
        probs = torch.cat(self.probs)
        metrics = classification_metrics(probs, targets, self.classes, self.referable)
        metrics.scalars["loss"] = self.loss_sum / len(targets)
        metrics.tables["skipped"] = [{"id": s.sample_id, "reason": s.reason} for s in self.skipped]
        picked = probs.gather(1, targets.long()[:, None])[:, 0].clamp(min=1e-12)
        metrics.tables["samples"] = {
            "ids": self.ids,
            "targets": targets.tolist(),
            "probs": [[round(p, 6) for p in row] for row in probs.tolist()],
            "losses": [round(x, 6) for x in (-picked.log()).tolist()],
        }
        return metrics


def save_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path) -> None:
    """Counts beside row-normalised rates: counts show the class sizes, rates the per-class
    sensitivity on the diagonal, which counts hide when the classes are imbalanced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(matrix, dtype=torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    side = max(4.0, 0.6 * len(classes) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side), constrained_layout=True)
    for ax, values, title, fmt in (
        (axes[0], counts, "counts", "{:.0f}"),
        (axes[1], rates, "row-normalised (recall on the diagonal)", "{:.2f}"),
    ):
        image = ax.imshow(values.numpy(), cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set(title=title, xlabel="predicted", ylabel="true")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        threshold = float(values.max()) / 2
        for row, col in itertools.product(range(len(classes)), repeat=2):
            value = float(values[row, col])
            colour = "white" if value > threshold else "black"
            ax.text(col, row, fmt.format(value), ha="center", va="center", color=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
