"""Segmentation with SAM 3: a text concept per category, every instance of it, a set loss.

`task.type: segment` picks this task when the model is SAM 3 (`model.family: sam3`, or a
checkpoint whose config says `model_type: sam3`). One sample is one (image, category) pair;
its prompt is `task.prompts[category]` (default: the category name). Losses come from
visiontune.tasks.set_loss, metrics from visiontune.metrics.instances (COCOeval mask AP per
category, union-mask IoU/Dice/boundary F1, instance-count error) at each image's original
resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visiontune.config.schema import Config, SegmentTaskConfig
from visiontune.data.cache import image_key
from visiontune.data.images import decode_image
from visiontune.data.instances import (
    InstanceDataset,
    InstanceOptions,
    read_instances,
    too_many_instances,
)
from visiontune.data.pixel_cache import PixelCache
from visiontune.data.segmentation import holdout, raise_problems
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.metrics.instances import (
    category_instance_metrics,
    count_error,
    semantic_counts,
    semantic_metrics,
)
from visiontune.models.load import read_model_config
from visiontune.models.sam3 import Sam3Adapter, box_prompts, load_sam3_tokenizer
from visiontune.task import Batch, LossOut, Metrics, ModelAdapter, Outputs, Skipped, Splits
from visiontune.tasks.sam3_pictures import instance_overlay
from visiontune.tasks.segment_pictures import save_mask
from visiontune.tasks.set_loss import InstanceTargets, set_loss

log = logging.getLogger(__name__)

FORMATS = ("labelme", "reasonseg", "coco", "mask_folder")
MEAN = STD = (0.5, 0.5, 0.5)  # Sam3ImageProcessor's image_mean / image_std
KEEP = 100  # predictions per prompt kept for AP (COCOeval's maxDets)


class Sam3SegmentTask:
    """Implements visiontune.task.Task for SAM 3 multi-instance segmentation."""

    name = "segment"

    def __init__(self, cfg: Config) -> None:
        if not isinstance(cfg.task, SegmentTaskConfig):
            raise ConfigError(["task.type: SAM 3 segmentation needs task.type: segment"])
        self.cfg, self.opts = cfg, cfg.task
        if cfg.data.format not in FORMATS:
            raise ConfigError(
                [f"data.format: segment reads {list(FORMATS)}, not {cfg.data.format}"]
            )
        if self.opts.prompt != "none":
            raise ConfigError(
                ["task.prompt: SAM 3 is prompted by category text (task.prompts); leave it none"]
            )
        if any(a is not None for a in cfg.data.augment.values()):
            raise ConfigError(["data.augment: not supported with SAM 3 yet; remove it"])
        config = read_model_config(cfg.model)
        self.size = int(config.vision_config.image_size)
        self.queries = int(config.detr_decoder_config.num_queries)
        self.signature = f"sam3|{self.size}|{MEAN}|{STD}|squash-bilinear"
        self._splits: Splits | None = None
        self._tokenizer: Any = None
        self.categories: list[str] = list(self.opts.prompts)
        self.examples: list[dict[str, Any]] = []

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_sam3_tokenizer(self.cfg)
        return self._tokenizer

    # --- data -------------------------------------------------------------------------------

    def datasets(self) -> Splits:
        if self._splits is not None:
            return self._splits
        data, problems, records = self.cfg.data, [], {}
        for split in ("train", "val", "test"):
            path = getattr(data, split)
            if path is not None:
                records[split] = read_instances(
                    data.format, f"data.{split}", Path(path), self.opts, problems
                )
        if self.opts.sam3.too_many_instances == "error":
            for split_records in records.values():
                problems += too_many_instances(split_records, self.queries)
        raise_problems(problems, "data")
        if "val" not in records and data.val_fraction > 0:
            records["train"], records["val"] = holdout(
                records["train"], data.val_fraction, self.cfg.train.seed
            )
        if not self.categories:
            self.categories = sorted({r.category for rs in records.values() for r in rs})
        options = InstanceOptions(
            self.size,
            MEAN,
            STD,
            self.queries,
            self.opts.sam3.too_many_instances == "truncate",
            dict(self.opts.prompts),
        )
        shown = replace(options, exemplars=self.opts.sam3.exemplars, seed=self.cfg.train.seed)
        cache = PixelCache.from_config(data, self.signature)
        made = {
            s: InstanceDataset(r, shown if s == "train" else options, cache)
            for s, r in records.items()
        }
        self._splits = Splits(made["train"], made.get("val"), made.get("test"))
        return self._splits

    def resolved_config(self) -> Config:
        """The config with the categories found in the data pinned as prompts, so predict
        knows them without re-reading the training data."""
        self.datasets()
        prompts = {c: self._prompt(c) for c in self.categories}
        return self.cfg.model_copy(
            update={"task": self.opts.model_copy(update={"prompts": prompts})}
        )

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.opts.sam3.max_text_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def collate(self, samples: list[dict[str, Any] | Skipped]) -> Batch:
        good = [s for s in samples if not isinstance(s, Skipped)]
        skipped = [s for s in samples if isinstance(s, Skipped)]
        if not good:
            return Batch({}, [], skipped=skipped)
        paths = [s["image_path"] for s in good]
        inputs: dict[str, Any] = {
            "pixel_values": torch.stack([s["pixel_values"] for s in good]),
            **self._tokens([s["text"] for s in good]),
            **box_prompts([s["exemplar_boxes"] for s in good]),
            "cache_keys": [image_key(p, self.signature) for p in paths],
        }
        owner = [b for b, s in enumerate(good) for _ in range(len(s["masks"]))]
        targets = {
            "masks": torch.cat([s["masks"] for s in good]),
            "boxes": torch.cat([s["boxes"] for s in good]),
            "owner": torch.tensor(owner, dtype=torch.long),
            "ignore": torch.stack([s["ignore"] for s in good]),
        }
        extras = {
            "eval_masks": [s["eval_masks"] for s in good],
            "eval_ignore": [s["eval_ignore"] for s in good],
            "categories": [s["category"] for s in good],
            "image_paths": paths,
        }
        return Batch(inputs, [s["id"] for s in good], targets, skipped, extras)

    # --- model and loss ---------------------------------------------------------------------

    def adapter(self) -> ModelAdapter:
        return Sam3Adapter(self.cfg, self.opts.cache, self.opts.cache_dir)

    def loss(self, outputs: Outputs, batch: Batch) -> LossOut:
        t = batch.targets
        return set_loss(
            outputs,
            InstanceTargets(t["masks"], t["boxes"], t["owner"], t["ignore"]),
            self.opts.sam3.loss,
        )

    # --- evaluation and prediction ----------------------------------------------------------

    def instances(
        self,
        outputs: Outputs,
        row: int,
        size: tuple[int, int],
        keep: int = KEEP,
        mask_threshold: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The `keep` best-scoring instances of a row: masks bool [N, H, W] at `size`,
        scores (sigmoid(logit) * sigmoid(presence), as SAM 3 scores) and boxes in pixels."""
        scores = outputs["pred_logits"][row].sigmoid() * outputs["presence_logits"][row].sigmoid()
        order = scores.argsort(descending=True)[:keep]
        logits = outputs["pred_masks"][row, order][:, None]
        full = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        cut = self.opts.mask_threshold if mask_threshold is None else mask_threshold
        masks = (full[:, 0] > cut).cpu()
        height, width = size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = outputs["pred_boxes"][row, order].float().cpu() * scale
        return masks, scores[order].float().cpu(), boxes

    def meter(self) -> Sam3Meter:
        self.examples = []
        return Sam3Meter(self)

    def save_figures(self, metrics: Metrics, out_dir: Path) -> list[Path]:
        """One overlay per kept example: every instance above the score threshold."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, example in enumerate(self.examples):
            image = decode_image(Path(example["image"]))
            picture = instance_overlay(image, example["masks"], example["scores"], example["boxes"])
            path = out_dir / f"sam3_example_{k}.png"
            picture.save(path)
            paths.append(path)
        return paths

    def prediction_batches(self, inputs: list[dict[str, Any]]) -> Iterator[Batch]:
        """One batch per input image, one row per prompt (`text`, else every category)."""
        for index, item in enumerate(inputs):
            path = Path(item["image"])
            image = decode_image(path)
            texts = (
                [item["text"]] if item.get("text") else [self._prompt(c) for c in self.categories]
            )
            if not texts:
                raise VisiontuneError(f"{path}: give --text (the run's config names no prompts)")
            square = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
            array = np.asarray(square, dtype=np.float32) / 255.0
            unit = torch.from_numpy(array).permute(2, 0, 1)
            pixels = ((unit - MEAN[0]) / STD[0])[None].expand(len(texts), -1, -1, -1)
            inputs_ = {
                "pixel_values": pixels.contiguous(),
                **self._tokens(texts),
                **given_boxes(item, image.width, image.height, len(texts)),
            }
            extras = {"item": item, "image": image, "index": index, "texts": texts}
            yield Batch(inputs_, [str(path)] * len(texts), extras=extras)

    def _prompt(self, category: str) -> str:
        return self.opts.prompts.get(category, category)

    def predictions(self, outputs: Outputs, batch: Batch, out_dir: Path) -> list[dict[str, Any]]:
        """Per prompt: every instance above the score threshold (mask PNG, score, box in
        pixels) and one overlay PNG with each instance in its own colour."""
        item, image = batch.extras["item"], batch.extras["image"]
        score_cut = item.get("score_threshold", self.opts.sam3.score_threshold)
        mask_cut = item.get("mask_threshold")
        stem = f"{batch.extras['index']:03d}_{Path(item['image']).stem}"
        records = []
        for row, text in enumerate(batch.extras["texts"]):
            size = (image.height, image.width)
            masks, scores, boxes = self.instances(outputs, row, size, mask_threshold=mask_cut)
            keep = scores >= score_cut
            masks, scores, boxes = masks[keep], scores[keep], boxes[keep]
            tag = f"{stem}_{text.replace(' ', '_').replace('/', '_')}"
            found = []
            for k in range(len(scores)):
                path = save_mask(masks[k].numpy(), out_dir / f"{tag}_instance{k:03d}.png")
                box = [round(float(v), 1) for v in boxes[k]]
                found.append({"mask": str(path), "score": float(scores[k]), "box": box})
            overlay_path = out_dir / f"{tag}_overlay.png"
            instance_overlay(image, masks.numpy(), scores.tolist(), boxes.tolist()).save(
                overlay_path
            )
            records.append(
                {
                    "image": str(item["image"]),
                    "text": text,
                    "instances": found,
                    "count": len(found),
                    "overlay": str(overlay_path),
                }
            )
        return records


class Sam3Meter:
    """Mask AP per category (COCOeval), union-mask IoU/Dice/boundary F1, count error."""

    def __init__(self, task: Sam3SegmentTask) -> None:
        self.task = task
        self.predictions: list[dict[str, torch.Tensor]] = []
        self.targets: list[dict[str, torch.Tensor]] = []
        self.semantic = torch.zeros(8, dtype=torch.int64)
        self.counts: tuple[list[int], list[int]] = ([], [])
        self.skipped = 0

    def update(self, outputs: Outputs, batch: Batch) -> None:
        self.skipped += len(batch.skipped)
        if not len(batch):
            return
        task = self.task
        cut = task.opts.sam3.score_threshold
        for row, truth in enumerate(batch.extras["eval_masks"]):
            size = (int(truth.shape[-2]), int(truth.shape[-1]))
            masks, scores, boxes = task.instances(outputs, row, size)
            label = task.categories.index(batch.extras["categories"][row])
            self.predictions.append(
                {"masks": masks, "scores": scores, "labels": torch.full((len(scores),), label)}
            )
            self.targets.append({"masks": truth.bool(), "labels": torch.full((len(truth),), label)})
            kept = scores >= cut
            union = masks[kept].any(0)
            self.semantic += semantic_counts(
                union,
                truth.any(0),
                task.opts.boundary_tolerance,
                batch.extras["eval_ignore"][row],
            )
            self.counts[0].append(int(kept.sum()))
            self.counts[1].append(len(truth))
            if len(task.examples) < task.opts.figures:
                task.examples.append(
                    {
                        "image": batch.extras["image_paths"][row],
                        "masks": masks[kept].numpy(),
                        "scores": scores[kept].tolist(),
                        "boxes": boxes[kept].tolist(),
                    }
                )

    def compute(self) -> Metrics:
        scalars: dict[str, float] = {"skipped": float(self.skipped)}
        if self.predictions:
            scalars.update(
                category_instance_metrics(self.predictions, self.targets, self.task.categories)
            )
            scalars.update(semantic_metrics(self.semantic))
            scalars["count_error"] = count_error(*self.counts)
        return Metrics(scalars)


def given_boxes(item: dict[str, Any], width: int, height: int, rows: int) -> dict[str, Any]:
    """A predict item's exemplar boxes (`boxes`: [[x1, y1, x2, y2], ...] in the image's
    pixels, as Sam3Processor takes them; `box_labels`: 1 positive, 0 negative, default all
    positive) for each of its `rows` prompts."""
    boxes = item.get("boxes") or []
    labels = item.get("box_labels") or [1] * len(boxes)
    where = f"{item['image']}: boxes"
    if len(labels) != len(boxes) or any(label not in (0, 1) for label in labels):
        raise VisiontuneError(f"{where}: one label per box, each 1 (positive) or 0 (negative)")
    for box in boxes:
        if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
            raise VisiontuneError(f"{where}: {box} is not x1, y1, x2, y2 with x1 < x2, y1 < y2")
    if not boxes:
        return {}
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    unit = (torch.tensor(boxes, dtype=torch.float32) / scale).clamp(0, 1)
    return box_prompts([unit] * rows, [torch.tensor(labels)] * rows)
