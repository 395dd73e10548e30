"""Image classification: any `AutoModelForImageClassification` backbone, LoRA on its encoder,
its head fully trained, losses from `task.loss`, metrics a clinician asks for.

The task turns the config into datasets, a model, batches, a loss sum and metrics; it never
sees an optimizer or a checkpoint (see visiontune.task).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForImageClassification

from visiontune.config.schema import Config
from visiontune.data.imagefolder import build_splits
from visiontune.data.images import ImageSpec, load_pixels, resolve_image_spec
from visiontune.errors import ConfigError, DataError
from visiontune.losses import class_weights, classification_loss
from visiontune.metrics.classification import classification_metrics
from visiontune.models.load import load_model
from visiontune.models.lora import apply_lora, unwrap
from visiontune.task import Batch, LossOut, Metrics, Skipped, Splits

log = logging.getLogger(__name__)

_HEAD_NAMES = ("classifier", "head", "fc", "score")


class ClassifyTask:
    """Implements visiontune.task.Task for single-label image classification."""

    name = "classify"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._spec: ImageSpec | None = None
        self._built: tuple[list[str], Splits] | None = None
        self._weight: torch.Tensor | None = None
        self._weight_ready = False

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
        if good:
            pixels = torch.stack([s["pixel_values"] for s in good])
        else:
            pixels = torch.empty(0, 3, self.spec.size, self.spec.size)
        labels = torch.tensor([s["label"] for s in good], dtype=torch.long)
        return Batch({"pixel_values": pixels, "labels": labels}, [s["id"] for s in good], skipped)

    # --- model ------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """The backbone with a head for our classes, LoRA on the encoder, head fully trained."""
        classes = self.classes
        model = load_model(
            AutoModelForImageClassification,
            self.cfg.model,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={name: i for i, name in enumerate(classes)},
        )
        if self.cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        lora = self.cfg.lora
        heads = head_modules(model, required=lora.enabled and lora.modules_to_save == "auto")
        return apply_lora(model, lora, heads)

    # --- loss and evaluation ----------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch) -> LossOut:
        labels = batch.tensors["labels"]
        if len(labels) == 0:
            device = next(model.parameters()).device
            return LossOut(torch.zeros((), device=device, requires_grad=True), 0)
        logits = model(pixel_values=batch.tensors["pixel_values"]).logits
        per_item = classification_loss(self.cfg.task.loss, logits, labels, self._class_weight())
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

    def evaluate(self, model: nn.Module, loader: DataLoader) -> Metrics:
        """Metrics over the whole loader, plus the mean loss; skipped samples are listed."""
        device = next(model.parameters()).device
        probs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        skipped: list[Skipped] = []
        loss_sum = 0.0
        for batch in loader:
            skipped.extend(batch.skipped)
            if len(batch) == 0:
                continue
            batch = batch.to(device)
            logits = model(pixel_values=batch.tensors["pixel_values"]).logits.float()
            labels = batch.tensors["labels"]
            loss = classification_loss(self.cfg.task.loss, logits, labels, self._class_weight())
            loss_sum += float(loss.sum())
            probs.append(logits.softmax(dim=-1).cpu())
            targets.append(labels.cpu())
        if not probs:
            raise DataError(f"evaluation found no decodable image ({len(skipped)} skipped)")
        classes = self.classes
        metrics = classification_metrics(
            torch.cat(probs), torch.cat(targets), classes, self._referable_index(classes)
        )
        metrics.scalars["loss"] = loss_sum / sum(len(t) for t in targets)
        metrics.tables["skipped"] = [{"id": s.sample_id, "reason": s.reason} for s in skipped]
        return metrics

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

    def predict(
        self, model: nn.Module, inputs: list[dict[str, Any]], out_dir: Path
    ) -> list[dict[str, Any]]:
        """One record per input image: predicted label, its probability, all probabilities.

        Class names come from the model's own id2label, i.e. the classes it was trained with.
        An image that cannot be decoded gets a record with an `error` instead of a guess.
        """
        id2label = unwrap(model).config.id2label
        names = [id2label[i] for i in range(len(id2label))]
        device = next(model.parameters()).device
        step = self.cfg.eval.batch_size or self.cfg.train.micro_batch_size
        records: list[dict[str, Any]] = []
        for start in range(0, len(inputs), step):
            records.extend(self._predict_chunk(model, inputs[start : start + step], names, device))
        return records

    def _predict_chunk(
        self, model: nn.Module, chunk: list[dict[str, Any]], names: list[str], device: torch.device
    ) -> list[dict[str, Any]]:
        pixels: dict[int, torch.Tensor] = {}
        results: list[dict[str, Any]] = []
        for i, item in enumerate(chunk):
            image = str(item["image"])
            results.append({"image": image, "label": None, "score": None, "probabilities": {}})
            try:
                pixels[i] = load_pixels(Path(image), self.spec)
            except DataError as err:
                log.warning("predict: %s", err)
                results[i]["error"] = str(err)
        if pixels:
            stacked = torch.stack(list(pixels.values())).to(device)
            probs = model(pixel_values=stacked).logits.float().softmax(dim=-1).cpu()
            for i, row in zip(pixels, probs, strict=True):
                best = int(row.argmax())
                results[i].update(
                    label=names[best],
                    score=float(row[best]),
                    probabilities={n: float(p) for n, p in zip(names, row.tolist(), strict=True)},
                )
        return results


def head_modules(model: nn.Module, required: bool = True) -> list[str]:
    """Names of the classification head(s) among the model's direct children.

    They are trained fully (PEFT `modules_to_save`): a freshly sized head has nothing to adapt.
    """
    heads = [
        name
        for name, _ in model.named_children()
        if any(name == h or name.startswith(h) for h in _HEAD_NAMES)
    ]
    if required and not heads:
        children = [name for name, _ in model.named_children()]
        raise ConfigError(
            [
                f"lora.modules_to_save: no classification head found among {children}; "
                "name the head module(s) explicitly"
            ]
        )
    return heads


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (`model.gradient_checkpointing`).

    Non-reentrant checkpointing back-propagates into checkpointed blocks even when their
    inputs do not require grad; the input-embedding hook additionally makes the frozen patch
    embedding's output require grad, which LoRA under a frozen base needs with reentrant
    checkpointing (what some remote-code models still force).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            [f"model.gradient_checkpointing: {type(model).__name__} does not support it"]
        )
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()


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
