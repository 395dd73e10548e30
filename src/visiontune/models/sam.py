"""SAM (transformers `SamModel`) with LoRA per component, behind the adapter's one forward.

`SamModel.forward` takes points, boxes or masks but no ready-made prompt embeddings, and a
text-prompted model must hand the mask decoder its own [SEG] embedding. So the adapter
calls SAM's parts directly: the image encoder (through `get_image_embeddings` when frozen),
`get_image_wide_positional_embeddings`, the prompt encoder, and the mask decoder.

LoRA goes on the components listed in `task.sam.lora_on` (the image encoder's fused `qkv`
attention, as SAMed does, and/or the mask decoder's attention); `task.sam.train_fully`
components train without LoRA (PEFT `modules_to_save`, so they travel in the adapter files).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, SamModel

from visiontune.config.schema import Config, LoraConfig
from visiontune.config.tasks import SamOptions
from visiontune.data.cache import FrozenFeatureCache, trunk_fingerprint
from visiontune.errors import ConfigError
from visiontune.models.load import enable_checkpointing, load_model
from visiontune.models.lora import keep_trainable_fp32, merged, resolve_targets, unwrap, wrap_lora
from visiontune.task import ModelAdapter, Outputs, TrainableRow

log = logging.getLogger(__name__)

COMPONENTS = {
    "image_encoder": "vision_encoder",
    "mask_decoder": "mask_decoder",
    "prompt_encoder": "prompt_encoder",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_sam(cfg: Config) -> SamModel:
    """SAM from a hub id, a local directory or an inline `model_type: sam` config."""
    sam = load_model(AutoModel, cfg.model)
    if not isinstance(sam, SamModel):
        raise ConfigError([f"model: expected a SAM model, got {type(sam).__name__}"])
    return sam


def apply_sam_lora(sam: SamModel, lora: LoraConfig, options: SamOptions) -> nn.Module:
    """Freeze SAM, then add LoRA to `lora_on` and fully train `train_fully` components.

    With `lora.enabled: false` the `lora_on` components are fully trained instead, which is
    the full fine-tuning baseline a LoRA run is compared against.
    """
    overlap = set(options.lora_on) & set(options.train_fully)
    if overlap:
        raise ConfigError(
            [f"task.sam: {sorted(overlap)} listed in both lora_on and train_fully; pick one"]
        )
    sam.requires_grad_(False)
    full = [COMPONENTS[c] for c in options.train_fully]
    if not lora.enabled:
        full += [COMPONENTS[c] for c in options.lora_on]
    if not lora.enabled or not options.lora_on:
        for name in full:
            getattr(sam, name).requires_grad_(True)
        return keep_trainable_fp32(sam)
    targets = [
        name
        for component in options.lora_on
        for name in resolve_targets(sam, lora.targets, within=COMPONENTS[component] + ".")
    ]
    to_save = full if lora.modules_to_save == "auto" else full + list(lora.modules_to_save)
    return wrap_lora(sam, lora, targets, to_save)


class SamAdapter(ModelAdapter):
    """SAM with LoRA as configured; `forward` returns full-frame mask logits per prompt.

    `forward(pixel_values, mask_image, boxes=None, points=None, cache_keys=None)`: one mask
    per prompt (box, points, or none), `mask_image[m]` naming the image of mask m. With the
    image encoder frozen and `cache_keys` given (unaugmented inputs), its embeddings come from
    the frozen-feature cache.
    """

    def __init__(self, cfg: Config, options: SamOptions, cache: str, cache_dir: Path | None):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)  # an inline random init is the same every build
            sam = load_sam(cfg)
        self.model = apply_sam_lora(sam, cfg.lora, options)
        if cfg.model.gradient_checkpointing:
            enable_checkpointing(self.sam)
        self.base_model_id = cfg.model.name_or_path
        self.frame = int(self.sam.config.vision_config.image_size)
        self.cache = self._cache(cache, cache_dir)

    def _cache(self, mode: str, directory: Path | None) -> FrozenFeatureCache | None:
        """Cache SAM image embeddings when the encoder is frozen (see data/cache.py)."""
        if mode == "off":
            return None
        if self.encoder_trainable:
            if mode != "auto":
                raise ConfigError(
                    [f"task.cache: {mode} needs a frozen SAM image encoder (lora_on has it)"]
                )
            return None
        fingerprint = trunk_fingerprint(self.sam.vision_encoder) if mode == "disk" else ""
        log.info("SAM image encoder frozen: caching its embeddings (%s)", mode)
        return FrozenFeatureCache(directory if mode == "disk" else None, fingerprint)

    @property
    def sam(self) -> SamModel:
        """The SamModel inside the PEFT wrapper (LoRA layers stay injected in its parts)."""
        return unwrap(self.model)

    @property
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.sam.vision_encoder.parameters())

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_image: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        cache_keys: list[str] | None = None,
    ) -> Outputs:
        embeddings = self.image_embeddings(pixel_values, cache_keys)[mask_image]
        sparse, dense = self.prompt_embeddings(embeddings.shape[0], boxes, points)
        return {"mask_logits": self.upscale(self.decode(embeddings, sparse, dense))}

    def image_embeddings(
        self, pixel_values: torch.Tensor, cache_keys: list[str] | None = None
    ) -> torch.Tensor:
        """Image encoder output (B, C, h, w), from the cache when it serves these inputs.

        `get_image_embeddings` runs under no_grad, which is right (and cheaper) for a frozen
        encoder; with LoRA in the encoder the gradient must flow, so the encoder is called as is.
        """
        if self.cache is not None and cache_keys is not None:
            return self.cache.lookup(
                cache_keys, lambda rows: self._encode(pixel_values[rows]), pixel_values.device
            )
        return self._encode(pixel_values)

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.sam.vision_encoder.parameters()).dtype)
        if self.encoder_trainable:
            return self.sam.vision_encoder(pixel_values).last_hidden_state
        return self.sam.get_image_embeddings(pixel_values)

    def prompt_embeddings(
        self, count: int, boxes: torch.Tensor | None = None, points: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Sparse (count, 1, n, C) and dense (count, C, h, w) prompts for `count` masks.

        Boxes (count, 4) and points (count, P, 2) are in frame pixels; without either the
        sparse prompt is None and the decoder sees only its own output tokens. PEFT's
        `modules_to_save` wrapper sits where the original module was, so the attribute is the
        copy that trains.
        """
        labels = None
        if points is not None:
            points = points[:, None]
            labels = torch.ones(points.shape[:3], dtype=torch.long, device=points.device)
        sparse, dense = self.sam.prompt_encoder(
            input_points=points,
            input_labels=labels,
            input_boxes=boxes[:, None] if boxes is not None else None,
            input_masks=None,
        )
        if boxes is None and points is None:
            dense = dense.expand(count, -1, -1, -1)
        return sparse, dense

    def no_mask_dense(self, count: int) -> torch.Tensor:
        """The dense prompt "no mask given" (LISA's dense prompt), for `count` masks."""
        encoder = self.sam.prompt_encoder
        side = encoder.image_embedding_size
        return encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(count, -1, *side)

    def decode(
        self, embeddings: torch.Tensor, sparse: torch.Tensor | None, dense: torch.Tensor
    ) -> torch.Tensor:
        """Low-resolution mask logits (M, 4h, 4w), one per prompt (multimask off, as LISA)."""
        decoder = self.sam.mask_decoder
        positional = self.sam.get_image_wide_positional_embeddings()
        positional = positional.repeat(embeddings.shape[0], 1, 1, 1)
        dtype = decoder.iou_token.weight.dtype
        masks, _ = decoder(
            image_embeddings=embeddings.to(dtype),
            image_positional_embeddings=positional.to(dtype),
            sparse_prompt_embeddings=sparse.to(dtype) if sparse is not None else None,
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=False,
        )
        return masks[:, 0, 0]

    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 mask logits at the full frame, bilinear like SAM's post-processing."""
        size = (self.frame, self.frame)
        return F.interpolate(logits[:, None].float(), size=size, mode="bilinear")[:, 0]

    def trainable_rows(self, prefix: str = "sam") -> list[TrainableRow]:
        """Trainable vs total parameters of SAM's image encoder, prompt encoder, mask decoder."""
        rows = []
        for label, name in COMPONENTS.items():
            params = [
                p
                for n, p in getattr(self.sam, name).named_parameters()
                if "original_module" not in n
            ]
            trainable = sum(p.numel() for p in params if p.requires_grad)
            rows.append(
                TrainableRow(f"{prefix}.{label}", trainable, sum(p.numel() for p in params))
            )
        return rows

    def export_merged(self, out_dir: Path) -> None:
        merged(self.model).save_pretrained(str(out_dir))
