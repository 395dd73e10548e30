"""Segmentation: SAM with LoRA, prompted by nothing, ground-truth boxes/points, or text.

The task reads labelme/ReasonSeg, COCO or mask-folder data into SAM's frame, picks the model
adapter (SAM, or SAM plus a text model for text prompts: visiontune.models.sam and .text_seg)
and turns its full-frame mask logits into a per-mask loss sum. Losses are computed at the
full frame, metrics at each image's original resolution (logits cropped to the unpadded part
and resized back, as SAM's post-processing does). It never sees an optimizer, a checkpoint or
a submodule of the model (see visiontune.task).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from visiontune.config.schema import Config, SegmentTaskConfig
from visiontune.data.cache import image_key
from visiontune.data.images import ImageSpec, decode_image, normalise, to_unit_tensor
from visiontune.data.segment_splits import build_splits
from visiontune.data.segmentation import IGNORE, TARGET, Frame
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.losses import mask_bce, mask_dice, mask_focal
from visiontune.metrics.segmentation import SegmentationMeter
from visiontune.models import text_seg
from visiontune.models.queries import QueryEncoder
from visiontune.models.sam import IMAGENET_MEAN, IMAGENET_STD, SamAdapter
from visiontune.models.text_seg import TextSegAdapter
from visiontune.task import Batch, LossOut, Metrics, ModelAdapter, Outputs, Skipped, Splits
from visiontune.tasks.segment_pictures import Example, examples_figure, overlay, save_mask

log = logging.getLogger(__name__)

FORMATS = ("labelme", "reasonseg", "coco", "mask_folder")


class SegmentTask:
    """Implements visiontune.task.Task for SAM-based (and text-prompted) segmentation."""

    name = "segment"

    def __init__(self, cfg: Config) -> None:
        if not isinstance(cfg.task, SegmentTaskConfig):
            raise ConfigError(["task.type: SegmentTask needs task.type: segment"])
        if cfg.data.format not in FORMATS:
            raise ConfigError(
                [f"data.format: segment reads {list(FORMATS)}, not {cfg.data.format}"]
            )
        self.cfg = cfg
        self.opts = cfg.task
        self.frame = self._frame()
        self.signature = f"{self.frame.size}|{self.frame.mean}|{self.frame.std}|bilinear"
        self._splits: Splits | None = None
        self._queries: QueryEncoder | None = None
        self.examples: list[Example] = []
        self._clip: ImageSpec | None = None

    # --- data -------------------------------------------------------------------------------

    def _frame(self) -> Frame:
        config = text_seg.component_config(self.cfg.model, "model")
        if config.model_type != "sam":
            raise ConfigError([f"model: segment needs a SAM model, got {config.model_type!r}"])
        size = int(config.vision_config.image_size)
        pre = self.cfg.data.preprocess
        if pre.size is not None and pre.size != size:
            raise ConfigError(
                [f"data.preprocess.size: SAM's position embedding fixes its input at {size}px"]
            )
        return Frame(size, pre.mean or IMAGENET_MEAN, pre.std or IMAGENET_STD)

    def datasets(self) -> Splits:
        if self._splits is None:
            self._splits = build_splits(self.cfg, self.frame, self._clip_spec())
        return self._splits

    def _clip_spec(self) -> ImageSpec | None:
        """The vision tower's preprocessing: its processor's statistics, else CLIP's."""
        if self._clip is None and self.opts.vision_tower is not None:
            self._clip = text_seg.vision_image_spec(self.opts.vision_tower)
        return self._clip

    @property
    def queries(self) -> QueryEncoder:
        """Tokenizer with [SEG] plus the query layout, shared by collate and the model."""
        if self._queries is None:
            tcfg = self.opts.text_model
            assert tcfg is not None
            config = text_seg.component_config(tcfg, "task.text_model")
            limit = tcfg.max_length
            positions = getattr(config, "max_position_embeddings", None)
            if positions:
                limit = min(
                    limit, positions - text_seg.expected_visual_tokens(self.opts.vision_tower)
                )
            tokenizer = text_seg.load_tokenizer(tcfg)
            kind = text_seg.text_kind(tcfg, config)
            self._queries = QueryEncoder(tokenizer, kind, tcfg.answer, limit)
        return self._queries

    def collate(self, samples: list[dict[str, Any] | Skipped]) -> Batch:
        good = [s for s in samples if not isinstance(s, Skipped)]
        skipped = [s for s in samples if isinstance(s, Skipped)]
        if not good:
            return Batch({}, [], skipped=skipped)
        owners = [b for b, s in enumerate(good) for _ in range(len(s["masks"]))]
        paths = [s["image_path"] for s in good]
        augmented = any(s["augmented"] for s in good)
        inputs: dict[str, Any] = {
            "pixel_values": torch.stack([s["pixel_values"] for s in good]),
            "cache_keys": None if augmented else [image_key(p, self.signature) for p in paths],
        }
        if self.opts.prompt == "text":
            texts = [s.get("text", "") for s in good]
            inputs.update(self.queries.encode(texts, [s["id"] for s in good]))
        else:
            inputs["mask_image"] = torch.tensor(owners, dtype=torch.long)
        for name in ("boxes", "points"):
            if name in good[0]:
                inputs[name] = torch.cat([s[name] for s in good])
        if "clip_pixel_values" in good[0]:
            inputs["clip_pixel_values"] = torch.stack([s["clip_pixel_values"] for s in good])
        targets = {
            "masks": torch.cat([s["masks"] for s in good]),
            "mask_image": torch.tensor(owners, dtype=torch.long),
            "valid_hw": torch.tensor([list(s["valid_hw"]) for s in good], dtype=torch.long),
        }
        per_instance = self.opts.instances == "per_instance"
        extras = {
            "eval_masks": [m for s in good for m in s["eval_masks"]],
            "mask_ids": [
                f"{s['id']}#{k}" if per_instance else s["id"]
                for s in good
                for k in range(len(s["masks"]))
            ],
            "texts": [s.get("text", "") for s in good for _ in range(len(s["masks"]))],
            "image_paths": paths,
        }
        return Batch(inputs, [s["id"] for s in good], targets, skipped, extras)

    # --- model and loss ---------------------------------------------------------------------

    def adapter(self) -> ModelAdapter:
        """SAM (+ text side) with LoRA as configured."""
        opts = self.opts
        if opts.prompt == "text":
            return TextSegAdapter(self.cfg, self.queries)
        return SamAdapter(self.cfg, opts.sam, opts.cache, opts.cache_dir)

    def loss(self, outputs: Outputs, batch: Batch) -> LossOut:
        """Sum over masks of mask_weight * BCE|focal + dice_weight * Dice (+ lm_weight * CE)."""
        logits = outputs["mask_logits"]
        target = batch.targets["masks"]
        valid = self._valid(batch)
        if self.opts.loss.ignore_in_loss == "exclude":
            valid = valid & (target != IGNORE)
        truth = target == TARGET
        spec = self.opts.loss
        if spec.mask_loss == "focal":
            mask_term = mask_focal(logits, truth, valid, spec.focal_gamma, spec.focal_alpha)
        else:
            mask_term = mask_bce(logits, truth, valid)
        dice = mask_dice(logits, truth, valid)
        per_mask = spec.mask_weight * mask_term + spec.dice_weight * dice
        parts = {"mask_loss": mask_term.detach().sum(), "dice_loss": dice.detach().sum()}
        lm_loss = outputs.get("lm_loss")
        if lm_loss is not None:
            per_mask = per_mask + spec.lm_weight * lm_loss
            parts["lm_loss"] = lm_loss.detach().sum()
        return LossOut(per_mask.sum(), int(per_mask.shape[0]), parts)

    def _valid(self, batch: Batch) -> torch.Tensor:
        """(M, S, S): the unpadded part of each mask's image."""
        hw = batch.targets["valid_hw"][batch.targets["mask_image"]]
        line = torch.arange(self.frame.size, device=hw.device)
        rows = line[None, :, None] < hw[:, 0, None, None]
        cols = line[None, None, :] < hw[:, 1, None, None]
        return rows & cols

    # --- evaluation and prediction ----------------------------------------------------------

    def meter(self) -> SegmentMeter:
        self.examples = []
        return SegmentMeter(self)

    def to_original(
        self, logits: torch.Tensor, batch: Batch, sizes: list[tuple[int, int]]
    ) -> Iterator[torch.Tensor]:
        """Binary masks at each target's size: crop the unpadded frame, resize, threshold."""
        hw = batch.targets["valid_hw"].tolist()
        owners = batch.targets["mask_image"].tolist()
        for m, logit in enumerate(logits):
            h, w = hw[owners[m]]
            crop = logit[None, None, :h, :w]
            full = F.interpolate(crop, size=sizes[m], mode="bilinear", align_corners=False)
            yield (full[0, 0] > self.opts.mask_threshold).cpu()

    def save_figures(self, metrics: Metrics, out_dir: Path) -> list[Path]:
        if not self.examples:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        return [examples_figure(self.examples, out_dir / "segment_examples.png")]

    def prediction_batches(self, inputs: list[dict[str, Any]]) -> Iterator[Batch]:
        """One batch per input image, prompted as configured (see `_predict_batch`)."""
        for index, item in enumerate(inputs):
            yield self._predict_batch(index, item)

    def predictions(self, outputs: Outputs, batch: Batch, out_dir: Path) -> list[dict[str, Any]]:
        """Per input a mask PNG (255 = object) and an overlay PNG."""
        item, image = batch.extras["item"], batch.extras["image"]
        sizes = [(image.height, image.width)]
        mask = next(self.to_original(outputs["mask_logits"], batch, sizes)).numpy()
        stem = f"{batch.extras['index']:03d}_{Path(item['image']).stem}"
        mask_path = save_mask(mask, out_dir / f"{stem}_mask.png")
        overlay_path = out_dir / f"{stem}_overlay.png"
        overlay(image, mask).save(overlay_path)
        return [
            {
                "image": str(item["image"]),
                "text": item.get("text"),
                "mask": str(mask_path),
                "overlay": str(overlay_path),
                "foreground_pixels": int(mask.sum()),
                "foreground_fraction": float(mask.mean()),
            }
        ]

    def _predict_batch(self, index: int, item: dict[str, Any]) -> Batch:
        """`text` for text prompts, `box` [x1, y1, x2, y2] or `points` [[x, y], ...] in image
        pixels for box/point prompts."""
        path = Path(item["image"])
        image = decode_image(path)
        unit = self.frame.unit_image(image)
        scale = unit.shape[-1] / image.width
        pixels = self.frame.pad(self.frame.normalise(unit))[None]
        tensors: dict[str, Any] = {"pixel_values": pixels}
        if self.opts.prompt != "text":
            tensors["mask_image"] = torch.zeros(1, dtype=torch.long)
        targets = {
            "mask_image": torch.zeros(1, dtype=torch.long),
            "valid_hw": torch.tensor([list(unit.shape[-2:])]),
        }
        prompt = self.opts.prompt
        if prompt in ("box", "points"):
            key = "box" if prompt == "box" else "points"
            if item.get(key) is None:
                raise VisiontuneError(
                    f"{path}: task.prompt is {prompt}: each input needs `{key}` in image pixels "
                    "([x1, y1, x2, y2] for a box, [[x, y], ...] for points)"
                )
            value = torch.tensor(item[key], dtype=torch.float32) * scale
            if prompt == "box" and value.numel() != 4:
                raise VisiontuneError(f"{path}: a box is [x1, y1, x2, y2], got {item[key]}")
            if prompt == "box":
                tensors["boxes"] = value.reshape(1, 4)
            else:
                tensors["points"] = value.reshape(1, -1, 2)
        if prompt == "text":
            if not str(item.get("text") or "").strip():
                raise VisiontuneError(f"{path}: text-prompted segmentation needs --text")
            tensors.update(self.queries.encode([str(item["text"])], [str(path)]))
        spec = self._clip_spec()
        if spec is not None:
            tensors["clip_pixel_values"] = normalise(to_unit_tensor(image, spec), spec)[None]
        extras = {"item": item, "image": image, "index": index}
        return Batch(tensors, [str(path)], targets, extras=extras)


class SegmentMeter:
    """gIoU/cIoU over the split at each mask's original resolution, plus example pictures."""

    gathered = ("scores", "skipped")
    """What evaluation gathers across ranks before computing (engine/distributed.py)."""

    def __init__(self, task: SegmentTask) -> None:
        self.task = task
        self.scores = SegmentationMeter(task.opts.boundary_tolerance)
        self.skipped = 0

    def update(self, outputs: Outputs, batch: Batch) -> None:
        for refused in batch.skipped:
            log.warning("eval: skipped sample %s: %s", refused.sample_id, refused.reason)
        self.skipped += len(batch.skipped)
        if not len(batch):
            return
        task, extras = self.task, batch.extras
        sizes = [tuple(m.shape) for m in extras["eval_masks"]]
        owners = batch.targets["mask_image"].tolist()
        for m, pred in enumerate(task.to_original(outputs["mask_logits"], batch, sizes)):
            truth = extras["eval_masks"][m]
            score = self.scores.update(pred, truth, extras["mask_ids"][m])
            if len(task.examples) < task.opts.figures:
                image = extras["image_paths"][owners[m]]
                example = Example(image, extras["texts"][m], pred.numpy(), truth.numpy(), score.iou)
                task.examples.append(example)

    def compute(self) -> Metrics:
        scalars = self.scores.compute()
        scalars["skipped"] = float(self.skipped)
        return Metrics(scalars, {"per_mask": self.scores.per_mask()})
