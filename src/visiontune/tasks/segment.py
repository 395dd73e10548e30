"""Segmentation: SAM with LoRA, prompted by nothing, ground-truth boxes/points, or text.

The task reads labelme/ReasonSeg, COCO or mask-folder data into SAM's frame, builds SAM (plus
a text model and optional vision tower for text prompts), and turns batches into a per-mask
loss sum. Losses are computed at the full frame, metrics at each image's original resolution
(logits cropped to the unpadded part and resized back, as SAM's post-processing does).
It never sees an optimizer or a checkpoint (see visiontune.task).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from visiontune.config.schema import Config, SegmentTaskConfig
from visiontune.data.cache import FrozenFeatureCache, image_key, trunk_fingerprint
from visiontune.data.images import ImageSpec, decode_image, normalise, to_unit_tensor
from visiontune.data.segment_splits import build_splits
from visiontune.data.segmentation import IGNORE, TARGET, Frame
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.losses import mask_bce, mask_dice, mask_focal
from visiontune.metrics.segmentation import SegmentationMeter
from visiontune.models import sam as sam_parts
from visiontune.models import text_seg
from visiontune.models.queries import QueryEncoder
from visiontune.task import Batch, LossOut, Metrics, Skipped, Splits
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
        self.cache: FrozenFeatureCache | None = None
        self._splits: Splits | None = None
        self._queries: QueryEncoder | None = None
        self._examples: list[Example] = []
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
        return Frame(size, pre.mean or sam_parts.IMAGENET_MEAN, pre.std or sam_parts.IMAGENET_STD)

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
            return Batch({}, [], skipped)
        owners = [b for b, s in enumerate(good) for _ in range(len(s["masks"]))]
        tensors = {
            "pixel_values": torch.stack([s["pixel_values"] for s in good]),
            "masks": torch.cat([s["masks"] for s in good]),
            "mask_image": torch.tensor(owners, dtype=torch.long),
            "valid_hw": torch.tensor([list(s["valid_hw"]) for s in good], dtype=torch.long),
        }
        for name in ("boxes", "points"):
            if name in good[0]:
                tensors[name] = torch.cat([s[name] for s in good])
        if "clip_pixel_values" in good[0]:
            tensors["clip_pixel_values"] = torch.stack([s["clip_pixel_values"] for s in good])
        ids = [s["id"] for s in good]
        texts = [s.get("text", "") for s in good]
        if self.opts.prompt == "text":
            tensors.update(self.queries.encode(texts, ids))
        per_instance = self.opts.instances == "per_instance"
        extras = {
            "eval_masks": [m for s in good for m in s["eval_masks"]],
            "mask_ids": [
                f"{s['id']}#{k}" if per_instance else s["id"]
                for s in good
                for k in range(len(s["masks"]))
            ],
            "texts": [texts[b] for b in owners],
            "image_paths": [s["image_path"] for s in good],
            "augmented": any(s["augmented"] for s in good),
        }
        return Batch(tensors, ids, skipped, extras)

    # --- model ------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """SAM (+ text side) with LoRA as configured; random inits seeded by train.seed so
        that eval and predict rebuild exactly the frozen weights training saw."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            sam = sam_parts.load_sam(self.cfg)
            if self.cfg.model.gradient_checkpointing:
                sam.gradient_checkpointing_enable()
            sam = sam_parts.apply_sam_lora(sam, self.cfg.lora, self.opts.sam)
            model = self._text_segmenter(sam) if self.opts.prompt == "text" else sam
        self._setup_cache(sam)
        rows = (
            text_seg.component_rows(model)
            if isinstance(model, text_seg.TextPromptedSegmenter)
            else sam_parts.component_rows(model)
        )
        for name, trainable, total in rows:
            log.info("  %-24s %12d / %12d trainable", name, trainable, total)
        return model

    def _text_segmenter(self, sam: nn.Module) -> text_seg.TextPromptedSegmenter:
        tcfg, vcfg, queries = self.opts.text_model, self.opts.vision_tower, self.queries
        assert tcfg is not None
        text_model, kind = text_seg.load_text_model(tcfg, queries.tokenizer)
        text_model = text_seg.apply_component_lora(
            text_model, tcfg.train, tcfg.lora, "task.text_model", [queries.seg_id]
        )
        tower = None
        if vcfg is not None:
            tower = text_seg.apply_component_lora(
                text_seg.load_vision_tower(vcfg), vcfg.train, vcfg.lora, "task.vision_tower"
            )
        return text_seg.TextPromptedSegmenter(
            sam, text_model, kind, len(queries.prefix), tower, self.opts.seg_projector_dim
        )

    def _setup_cache(self, sam: nn.Module) -> None:
        """Cache SAM image embeddings when the encoder is frozen (see data/cache.py)."""
        mode = self.opts.cache
        if mode == "off":
            return
        if sam_parts.encoder_trainable(sam):
            if mode != "auto":
                raise ConfigError(
                    [f"task.cache: {mode} needs a frozen SAM image encoder (lora_on has it)"]
                )
            return
        directory = None
        fingerprint = ""
        if mode == "disk":
            directory = self.opts.cache_dir
            encoder = sam_parts.core(sam).vision_encoder
            signature = hashlib.sha256(self.signature.encode()).hexdigest()[:8]
            fingerprint = f"{trunk_fingerprint(encoder)}-{signature}"
        self.cache = FrozenFeatureCache(directory, fingerprint)
        log.info("SAM image encoder frozen: caching its embeddings (%s)", mode)

    # --- loss -------------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch) -> LossOut:
        """Sum over masks of mask_weight * BCE|focal + dice_weight * Dice (+ lm_weight * CE)."""
        if not batch.ids:
            device = next(model.parameters()).device
            return LossOut(torch.zeros((), device=device, requires_grad=True), 0)
        logits, lm_loss = self._forward(model, batch)
        target = batch.tensors["masks"]
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
        parts = {
            "mask_loss": float(mask_term.detach().mean()),
            "dice_loss": float(dice.detach().mean()),
        }
        if lm_loss is not None:
            per_mask = per_mask + spec.lm_weight * lm_loss
            parts["lm_loss"] = float(lm_loss.detach().mean())
        return LossOut(per_mask.sum(), int(per_mask.shape[0]), parts)

    def _valid(self, batch: Batch) -> torch.Tensor:
        """(M, S, S): the unpadded part of each mask's image."""
        hw = batch.tensors["valid_hw"][batch.tensors["mask_image"]]
        line = torch.arange(self.frame.size, device=hw.device)
        rows = line[None, :, None] < hw[:, 0, None, None]
        cols = line[None, None, :] < hw[:, 1, None, None]
        return rows & cols

    def _forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full-frame mask logits (M, S, S) and the per-query answer loss (text prompts)."""
        t = batch.tensors
        if isinstance(model, text_seg.TextPromptedSegmenter):
            cached = self._cached_embeddings(model.sam, batch)
            out = model(
                input_ids=t["input_ids"],
                attention_mask=t["attention_mask"],
                seg_index=t["seg_index"],
                labels=t.get("labels"),
                clip_pixel_values=t.get("clip_pixel_values"),
                pixel_values=t["pixel_values"] if cached is None else None,
                image_embeddings=cached,
            )
            return sam_parts.upscale(out.mask_logits, self.frame.size), out.lm_loss
        embeddings = self._cached_embeddings(model, batch)
        if embeddings is None:
            embeddings = sam_parts.image_embeddings(model, t["pixel_values"])
        embeddings = embeddings[t["mask_image"]]
        sparse, dense = sam_parts.prompt_embeddings(
            model, embeddings.shape[0], t.get("boxes"), t.get("points")
        )
        low = sam_parts.decode_masks(model, embeddings, sparse, dense)
        return sam_parts.upscale(low, self.frame.size), None

    def _cached_embeddings(self, sam: nn.Module, batch: Batch) -> torch.Tensor | None:
        if self.cache is None or batch.extras.get("augmented", False):
            return None
        pixels = batch.tensors["pixel_values"]
        keys = [image_key(p, self.signature) for p in batch.extras["image_paths"]]
        return self.cache.lookup(
            keys, lambda rows: sam_parts.image_embeddings(sam, pixels[rows]), pixels.device
        )

    # --- evaluation and prediction ----------------------------------------------------------

    def evaluate(self, model: nn.Module, loader: DataLoader) -> Metrics:
        meter = SegmentationMeter(self.opts.boundary_tolerance)
        device = next(model.parameters()).device
        self._examples, skipped = [], 0
        for batch in loader:
            for refused in batch.skipped:
                log.warning("eval: skipped sample %s: %s", refused.sample_id, refused.reason)
            skipped += len(batch.skipped)
            if not batch.ids:
                continue
            logits, _ = self._forward(model, batch.to(device))
            sizes = [tuple(m.shape) for m in batch.extras["eval_masks"]]
            for m, pred in enumerate(self._to_original(logits, batch, sizes)):
                truth = batch.extras["eval_masks"][m]
                score = meter.update(pred, truth, batch.extras["mask_ids"][m])
                if len(self._examples) < self.opts.figures:
                    image = batch.extras["image_paths"][int(batch.tensors["mask_image"][m])]
                    text = batch.extras["texts"][m]
                    self._examples.append(
                        Example(image, text, pred.numpy(), truth.numpy(), score.iou)
                    )
        scalars = meter.compute()
        scalars["skipped"] = float(skipped)
        return Metrics(scalars, {"per_mask": meter.per_mask()})

    def _to_original(
        self, logits: torch.Tensor, batch: Batch, sizes: list[tuple[int, int]]
    ) -> Iterator[torch.Tensor]:
        """Binary masks at each target's size: crop the unpadded frame, resize, threshold."""
        hw = batch.tensors["valid_hw"].tolist()
        owners = batch.tensors["mask_image"].tolist()
        for m, logit in enumerate(logits):
            h, w = hw[owners[m]]
            crop = logit[None, None, :h, :w].float()
            full = F.interpolate(crop, size=sizes[m], mode="bilinear", align_corners=False)
            yield (full[0, 0] > self.opts.mask_threshold).cpu()

    def save_figures(self, metrics: Metrics, out_dir: Path) -> list[Path]:
        if not self._examples:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        return [examples_figure(self._examples, out_dir / "segment_examples.png")]

    def predict(
        self, model: nn.Module, inputs: list[dict[str, Any]], out_dir: Path
    ) -> list[dict[str, Any]]:
        """Per input a mask PNG (255 = object) and an overlay PNG; prompts as configured:
        `text` for text prompts, `box` [x1, y1, x2, y2] or `points` [[x, y], ...] in image
        pixels for box/point prompts."""
        device = next(model.parameters()).device
        out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for index, item in enumerate(inputs):
            batch, image = self._predict_batch(item)
            logits, _ = self._forward(model, batch.to(device))
            mask = next(self._to_original(logits, batch, [(image.height, image.width)])).numpy()
            stem = f"{index:03d}_{Path(item['image']).stem}"
            mask_path = save_mask(mask, out_dir / f"{stem}_mask.png")
            overlay_path = out_dir / f"{stem}_overlay.png"
            overlay(image, mask).save(overlay_path)
            records.append(
                {
                    "image": str(item["image"]),
                    "text": item.get("text"),
                    "mask": str(mask_path),
                    "overlay": str(overlay_path),
                    "foreground_pixels": int(mask.sum()),
                    "foreground_fraction": float(mask.mean()),
                }
            )
        return records

    def _predict_batch(self, item: dict[str, Any]) -> tuple[Batch, Any]:
        path = Path(item["image"])
        image = decode_image(path)
        unit = self.frame.unit_image(image)
        scale = unit.shape[-1] / image.width
        tensors = {
            "pixel_values": self.frame.pad(self.frame.normalise(unit))[None],
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
        extras = {"image_paths": [str(path)], "augmented": False}
        return Batch(tensors, [str(path)], [], extras), image
