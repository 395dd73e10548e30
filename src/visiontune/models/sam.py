"""SAM (transformers `SamModel`) with LoRA per component, driven submodule by submodule.

`SamModel.forward` takes points, boxes or masks but no ready-made prompt embeddings, and a
text-prompted model must hand the mask decoder its own [SEG] embedding. So everything here
calls SAM's parts directly: the image encoder (through `get_image_embeddings` when frozen),
`get_image_wide_positional_embeddings`, the prompt encoder, and the mask decoder.

LoRA goes on the components listed in `task.sam.lora_on` (the image encoder's fused `qkv`
attention, as SAMed does, and/or the mask decoder's attention); `task.sam.train_fully`
components train without LoRA (PEFT `modules_to_save`, so they travel in the adapter files).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, SamModel

from visiontune.config.schema import Config, LoraConfig
from visiontune.config.tasks import SamOptions
from visiontune.errors import ConfigError
from visiontune.models.load import load_model
from visiontune.models.lora import keep_trainable_fp32, resolve_targets, unwrap, wrap_lora

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


def core(model: nn.Module) -> SamModel:
    """The SamModel inside a PEFT wrapper (LoRA layers stay injected in its submodules)."""
    sam = unwrap(model)
    assert isinstance(sam, SamModel), type(sam)
    return sam


def active_module(model: nn.Module, name: str) -> nn.Module:
    """A SAM component as PEFT runs it: its trained copy when it is in `modules_to_save`.

    PEFT's ModulesToSaveWrapper forwards to the trained copy, but the wrapper sits where the
    original module was, so fetching the attribute from the wrapped SamModel is enough.
    """
    return getattr(core(model), name)


def encoder_trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for p in core(model).vision_encoder.parameters())


def image_embeddings(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Image encoder output (B, C, h, w).

    `get_image_embeddings` runs under no_grad, which is right (and cheaper) for a frozen
    encoder; with LoRA in the encoder the gradient must flow, so the encoder is called as is.
    """
    sam = core(model)
    pixel_values = pixel_values.to(next(sam.vision_encoder.parameters()).dtype)
    if encoder_trainable(model):
        return sam.vision_encoder(pixel_values).last_hidden_state
    return sam.get_image_embeddings(pixel_values)


def prompt_embeddings(
    model: nn.Module,
    count: int,
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Sparse (count, 1, n, C) and dense (count, C, h, w) prompts for `count` masks.

    Boxes (count, 4) and points (count, P, 2) are in frame pixels; without either the sparse
    prompt is None and the decoder sees only its own output tokens.
    """
    encoder = active_module(model, "prompt_encoder")
    labels = None
    if points is not None:
        points = points[:, None]
        labels = torch.ones(points.shape[:3], dtype=torch.long, device=points.device)
    sparse, dense = encoder(
        input_points=points,
        input_labels=labels,
        input_boxes=boxes[:, None] if boxes is not None else None,
        input_masks=None,
    )
    if boxes is None and points is None:
        dense = dense.expand(count, -1, -1, -1)
    return sparse, dense


def no_mask_dense(model: nn.Module, count: int) -> torch.Tensor:
    """The dense prompt "no mask given" (LISA's dense prompt), for `count` masks."""
    encoder = active_module(model, "prompt_encoder")
    side = encoder.image_embedding_size
    return encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(count, -1, *side)


def decode_masks(
    model: nn.Module,
    embeddings: torch.Tensor,
    sparse: torch.Tensor | None,
    dense: torch.Tensor,
) -> torch.Tensor:
    """Low-resolution mask logits (M, 4h, 4w), one mask per prompt (multimask off, as LISA)."""
    sam = core(model)
    decoder = active_module(model, "mask_decoder")
    positional = sam.get_image_wide_positional_embeddings().repeat(embeddings.shape[0], 1, 1, 1)
    dtype = decoder.iou_token.weight.dtype
    masks, _ = decoder(
        image_embeddings=embeddings.to(dtype),
        image_positional_embeddings=positional.to(dtype),
        sparse_prompt_embeddings=sparse.to(dtype) if sparse is not None else None,
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=False,
    )
    return masks[:, 0, 0]


def upscale(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Mask logits at the full frame (size x size), bilinear like SAM's post-processing."""
    return F.interpolate(logits[:, None].float(), size=(size, size), mode="bilinear")[:, 0]


def component_rows(model: nn.Module, prefix: str = "sam") -> list[tuple[str, int, int]]:
    """(component, trainable, total) for SAM's image encoder, prompt encoder, mask decoder."""
    sam = core(model)
    rows = []
    for label, name in COMPONENTS.items():
        params = list(getattr(sam, name).parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        rows.append((f"{prefix}.{label}", trainable, sum(p.numel() for p in params)))
    return rows
