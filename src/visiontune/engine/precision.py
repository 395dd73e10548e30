"""Device and precision: autocast, the fp16 GradScaler, and the fp32-trainables rule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from visiontune.errors import TrainingError

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is cuda but no CUDA device is visible")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device, model_dtype: str = "fp32") -> str:
    """`auto` is bf16 where the device supports it (no scaler needed); else the dtype of a
    half-precision base (its fp32 LoRA and head meet half-precision activations only under
    autocast); else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return model_dtype


class Precision:
    """Autocast context plus, for fp16 only, a GradScaler whose state is checkpointed."""

    def __init__(self, name: str, device: torch.device, model_dtype: str = "fp32") -> None:
        self.name = resolve_precision(name, device, model_dtype)
        self.device = device
        enabled = self.name == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled) if enabled else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.name == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=_AMP[self.name]):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the update; False when fp16 overflow made the scaler skip it."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale_before

    def check_trainables(self, model: nn.Module) -> None:
        """Refuse to start (rather than crash at step 1) when a trainable tensor is not fp32."""
        wrong = [
            n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32
        ]
        if wrong:
            raise TrainingError(
                f"{len(wrong)} trainable parameter(s) are not fp32 (first: {wrong[0]}); with "
                f"{self.name} they must be fp32 master weights (models.lora.keep_trainable_fp32)"
            )
