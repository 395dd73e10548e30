"""SAM 3 (transformers `Sam3Model`): a text concept in, every matching instance out.

LoRA goes on the components named in `task.sam3.lora_on`, each with its own targets resolved
from `named_modules()` (`task.sam3.targets`, default `lora.targets`); the text encoder stays
frozen unless listed. With the vision encoder frozen and unaugmented inputs, the ViT trunk's
output is cached per image (`task.cache`) and only the cheap FPN neck runs again: at 1008 px
the trunk is 32 ViT layers, the neck four convolutions, and caching the trunk's output
(72 x 72 x 1024 values) is a fifth of the memory the four FPN levels would take.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer

from visiontune.config.schema import Config, LoraConfig, ModelConfig
from visiontune.config.tasks import SAM3_COMPONENTS, Sam3Options
from visiontune.data.cache import FrozenFeatureCache, trunk_fingerprint
from visiontune.errors import ConfigError
from visiontune.models.load import (
    access_problem,
    enable_checkpointing,
    load_model,
    read_model_config,
)
from visiontune.models.lora import keep_trainable_fp32, merged, resolve_targets, unwrap
from visiontune.models.roi_align import install_roi_align
from visiontune.models.sam3_layers import DecoderLayerOutputs
from visiontune.task import ModelAdapter, Outputs, TrainableRow

log = logging.getLogger(__name__)

SAM3_TYPES = ("sam3", "sam3_video")
REPORTED = SAM3_COMPONENTS


def model_type_of(model_cfg: ModelConfig) -> str:
    """`model_type` of the configured model."""
    if model_cfg.config is not None:
        return str(model_cfg.config["model_type"])
    return str(read_model_config(model_cfg).model_type)


def is_sam3(model_cfg: ModelConfig) -> bool:
    """model.family, else the model's own model_type."""
    if model_cfg.family != "auto":
        return model_cfg.family == "sam3"
    return model_type_of(model_cfg) in SAM3_TYPES


def load_sam3(cfg: Config) -> nn.Module:
    """Sam3Model from a hub id, a local directory, or an inline `model_type: sam3` config."""
    try:
        model = load_model(AutoModel, cfg.model)
    except ConfigError as err:
        source = cfg.model.name_or_path
        problems = [
            access_problem(source, Exception(p)) if "gated repo" in p else p for p in err.problems
        ]
        raise ConfigError(problems) from None
    if type(model).__name__ != "Sam3Model":
        raise ConfigError(
            [f"model: model.family sam3 needs a Sam3Model, got {type(model).__name__}"]
        )
    return model


def load_sam3_tokenizer(cfg: Config) -> Any:
    """SAM 3's CLIP tokenizer (from the checkpoint), or `task.sam3.tokenizer`."""
    options = cfg.task.sam3  # type: ignore[union-attr]
    source = options.tokenizer or cfg.model.name_or_path
    if source is None:
        raise ConfigError(["task.sam3.tokenizer: required when model.config is inline"])
    try:
        return AutoTokenizer.from_pretrained(source, revision=cfg.model.revision)
    except (OSError, ValueError) as err:
        raise ConfigError(
            [access_problem(source, err).replace("model.name_or_path", "task.sam3.tokenizer")]
        ) from None


def lora_targets(model: nn.Module, lora: LoraConfig, options: Sam3Options) -> list[str]:
    """Full names of the Linear layers that get LoRA, component by component."""
    targets: list[str] = []
    for component in options.lora_on:
        module = getattr(model, component)
        if isinstance(module, nn.Linear):
            targets.append(component)
            continue
        spec = options.targets.get(component, lora.targets)
        try:
            targets += resolve_targets(model, spec, within=component + ".")
        except ConfigError as err:
            raise ConfigError(
                [p.replace("lora.targets", f"task.sam3.targets.{component}") for p in err.problems]
            ) from None
    return targets


def apply_sam3_lora(model: nn.Module, lora: LoraConfig, options: Sam3Options) -> nn.Module:
    """Freeze SAM 3, then LoRA on `lora_on` and full training of `train_fully`.

    PEFT matches a list of names by suffix, so `text_projection` would also catch
    `text_encoder.text_projection`: LoRA targets go to PEFT as one anchored regex, and a fully
    trained component whose name ends another module's name is unfrozen in place instead of
    through `modules_to_save` (it is then saved in trainable.safetensors, not in the PEFT
    adapter files).
    """
    overlap = set(options.lora_on) & set(options.train_fully)
    if overlap:
        raise ConfigError([f"task.sam3: {sorted(overlap)} in both lora_on and train_fully"])
    model.requires_grad_(False)
    full = list(options.train_fully)
    if not lora.enabled or not options.lora_on:
        for name in full + ([] if lora.enabled else list(options.lora_on)):
            getattr(model, name).requires_grad_(True)
        return keep_trainable_fp32(model)
    names = [n for n, _ in model.named_modules()]
    in_place = [c for c in full if any(n.endswith("." + c) for n in names)]
    extra = [] if lora.modules_to_save == "auto" else list(lora.modules_to_save)
    targets = lora_targets(model, lora, options)
    peft_cfg = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$",
        modules_to_save=[c for c in full if c not in in_place] + extra or None,
    )
    wrapped = get_peft_model(model, peft_cfg, autocast_adapter_dtype=True)
    for name in in_place:
        getattr(model, name).requires_grad_(True)
    return keep_trainable_fp32(wrapped)


PADDING_LABEL = -10  # what Sam3Model reads as "no box here" (Sam3Processor pads with it)


def box_prompts(
    boxes: list[torch.Tensor], labels: list[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Per-row exemplar boxes (x1, y1, x2, y2 in [0, 1], any count per row) as Sam3Model's
    `input_boxes` (cx, cy, w, h, padded to the longest row) and `input_boxes_labels` (1 =
    positive, 0 = negative, -10 = padding), as Sam3Processor builds them; {} when no row has
    a box, so a text-only batch runs exactly as without exemplars."""
    width = max((len(b) for b in boxes), default=0)
    if width == 0:
        return {}
    rows = len(boxes)
    packed = torch.zeros(rows, width, 4)
    kinds = torch.full((rows, width), PADDING_LABEL, dtype=torch.long)
    for row, xyxy in enumerate(boxes):
        count = len(xyxy)
        if count:
            x1, y1, x2, y2 = xyxy.float().unbind(-1)
            packed[row, :count] = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)
            kinds[row, :count] = 1 if labels is None else labels[row].long()
    return {"input_boxes": packed, "input_boxes_labels": kinds}


class Sam3Adapter(ModelAdapter):
    """SAM 3 with LoRA; `forward` returns every query's mask, box, score and the presence.

    `forward(pixel_values, input_ids, attention_mask, input_boxes=None,
    input_boxes_labels=None, cache_keys=None)`: one row per (image, prompt); box exemplars
    as `box_prompts` makes them. Outputs in fp32:
    `pred_masks` [B, Q, h, w] logits, `pred_boxes` [B, Q, 4] (x1, y1, x2, y2 in [0, 1]),
    `pred_logits` [B, Q], `presence_logits` [B], `semantic_seg` [B, h, w] logits; with
    `task.sam3.loss.aux` also `aux_logits` [L-1, B, Q] and `aux_boxes` [L-1, B, Q, 4] of the
    decoder layers before the last.
    """

    def __init__(self, cfg: Config, cache: str, cache_dir: Path | None) -> None:
        super().__init__()
        options = cfg.task.sam3  # type: ignore[union-attr]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)  # an inline random init is the same every build
            model = load_sam3(cfg)
        self.model = apply_sam3_lora(model, cfg.lora, options)
        if cfg.model.gradient_checkpointing:
            enable_checkpointing(self.sam3)
        self.base_model_id = cfg.model.name_or_path
        self.num_queries = int(self.sam3.config.detr_decoder_config.num_queries)
        self.cache = self._cache(cache, cache_dir)
        self.decoder_layers = DecoderLayerOutputs(self.sam3) if options.loss.aux else None
        if install_roi_align():
            log.info("torchvision not importable: box exemplars pool with visiontune's RoIAlign")

    @property
    def sam3(self) -> nn.Module:
        """The Sam3Model inside the PEFT wrapper (LoRA layers stay injected in its parts)."""
        return unwrap(self.model)

    @property
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.sam3.vision_encoder.parameters())

    def _cache(self, mode: str, directory: Path | None) -> FrozenFeatureCache | None:
        if mode == "off":
            return None
        if self.encoder_trainable:
            if mode != "auto":
                raise ConfigError(
                    [f"task.cache: {mode} needs a frozen vision encoder (sam3.lora_on has it)"]
                )
            return None
        backbone = self.sam3.vision_encoder.backbone
        fingerprint = trunk_fingerprint(backbone) if mode == "disk" else ""
        log.info("SAM 3 vision encoder frozen: caching its ViT output (%s)", mode)
        return FrozenFeatureCache(directory if mode == "disk" else None, fingerprint)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        input_boxes: torch.Tensor | None = None,
        input_boxes_labels: torch.Tensor | None = None,
        cache_keys: list[str] | None = None,
    ) -> Outputs:
        vision = self.vision_embeds(pixel_values, cache_keys)
        out = self.sam3(
            vision_embeds=vision,
            input_ids=input_ids,
            attention_mask=attention_mask,
            input_boxes=input_boxes,
            input_boxes_labels=input_boxes_labels,
        )
        semantic = out.semantic_seg
        outputs = {
            "pred_masks": out.pred_masks.float(),
            "pred_boxes": out.pred_boxes.float(),
            "pred_logits": out.pred_logits.float(),
            "presence_logits": out.presence_logits.float().reshape(-1),
            "semantic_seg": semantic[:, 0].float() if semantic is not None else None,
        }
        if self.decoder_layers is not None:
            logits, boxes = self.decoder_layers.layers()
            outputs["aux_logits"], outputs["aux_boxes"] = logits[:-1].float(), boxes[:-1].float()
        return outputs

    def vision_embeds(self, pixel_values: torch.Tensor, cache_keys: list[str] | None = None) -> Any:
        """The vision encoder's output; the frozen trunk's part from the cache when it serves."""
        encoder = self.sam3.vision_encoder
        pixel_values = pixel_values.to(next(encoder.parameters()).dtype)
        if self.encoder_trainable:
            return encoder(pixel_values)
        if self.cache is not None and cache_keys is not None:
            hidden = self.cache.lookup(
                cache_keys, lambda rows: self._trunk(pixel_values[rows]), pixel_values.device
            )
        else:
            hidden = self._trunk(pixel_values)
        return self._neck(hidden, pixel_values.shape[-2:])

    def _trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sam3.vision_encoder.backbone(pixel_values).last_hidden_state

    def _neck(self, hidden: torch.Tensor, size: torch.Size) -> Any:
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        encoder = self.sam3.vision_encoder
        patch = encoder.config.backbone_config.patch_size
        height, width = size[0] // patch, size[1] // patch
        spatial = hidden.view(hidden.shape[0], height, width, -1).permute(0, 3, 1, 2)
        with torch.no_grad():
            levels, positions = encoder.neck(spatial)
        return Sam3VisionEncoderOutput(
            last_hidden_state=hidden, fpn_hidden_states=levels, fpn_position_encoding=positions
        )

    def trainable_rows(self) -> list[TrainableRow]:
        """Trainable vs total parameters of each SAM 3 component."""
        rows = []
        for name in REPORTED:
            params = [
                p
                for n, p in getattr(self.sam3, name).named_parameters()
                if "original_module" not in n
            ]
            trainable = sum(p.numel() for p in params if p.requires_grad)
            rows.append(TrainableRow(f"sam3.{name}", trainable, sum(p.numel() for p in params)))
        return rows

    def export_merged(self, out_dir: Path) -> None:
        merged(self.model).save_pretrained(str(out_dir))
