"""A model and loss terms that exist only in the tests: what a user brings (`model.builder`,
`task.losses[].fn`). Imported by dotted path (`user_code_for_tests:tiny_translator`), so the
conftest puts this folder on sys.path."""

from __future__ import annotations

import torch
from torch import nn


class CrossAttn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        weights = (self.q(x) @ k.transpose(1, 2) / x.shape[-1] ** 0.5).softmax(dim=-1)
        return self.proj(weights @ v)


class TinyTranslator(nn.Module):
    """Per-pixel tokens: a 1x1 conv embeds the source, each pixel's token attends to the
    source's 8x8-pooled tokens, a 1x1 conv head writes the target bands."""

    def __init__(self, in_bands: int, out_bands: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_bands, dim, 1)
        self.cross_attn = CrossAttn(dim)
        self.head = nn.Conv2d(dim, out_bands, 1)
        self.checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.checkpointing = enable

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        n, _, h, w = source.shape
        features = self.embed(source)
        tokens = features.flatten(2).transpose(1, 2)
        context = nn.functional.avg_pool2d(features, 8).flatten(2).transpose(1, 2)
        if self.checkpointing and self.training:
            mixed = torch.utils.checkpoint.checkpoint(
                self.cross_attn, tokens, context, use_reentrant=False
            )
        else:
            mixed = self.cross_attn(tokens, context)
        x = (tokens + mixed).transpose(1, 2).reshape(n, -1, h, w)
        return self.head(x)


def tiny_translator(in_bands: int = 2, out_bands: int = 3, dim: int = 8) -> TinyTranslator:
    return TinyTranslator(in_bands, out_bands, dim)


def not_a_module() -> str:
    return "a model"


def plain_l1(outputs: dict, batch, scale: float = 1.0) -> torch.Tensor:
    """Mean absolute error per item over valid pixels, written out by hand."""
    valid = batch.targets["valid"].float()
    error = (outputs["prediction"] - batch.targets["target"]).abs() * valid
    bands = outputs["prediction"].shape[1]
    return scale * error.sum(dim=(1, 2, 3)) / (valid.sum(dim=(1, 2, 3)) * bands).clamp(min=1)


def scalar_loss(outputs: dict, batch) -> torch.Tensor:
    """Wrong: a mean over the batch instead of one value per item."""
    return outputs["prediction"].abs().mean()


def nan_loss(outputs: dict, batch) -> torch.Tensor:
    """A term that goes NaN (log of a negative number), to be named by the engine."""
    return torch.log(outputs["prediction"].mean(dim=(1, 2, 3)) * 0 - 1)


def sqrt_at_zero(outputs: dict, batch) -> torch.Tensor:
    """Finite forward (0), NaN backward: sqrt's infinite slope at 0 times pow's zero slope."""
    return (outputs["prediction"] * 0).pow(2).sum(dim=(1, 2, 3)).sqrt()


class ConvTranslator(nn.Module):
    """Three 3x3 convolutions: enough capacity to fit one batch of crops closely."""

    def __init__(self, in_bands: int, out_bands: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_bands, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, out_bands, 1),
        )

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.layers(source)


def conv_translator(in_bands: int = 2, out_bands: int = 3, width: int = 32) -> ConvTranslator:
    return ConvTranslator(in_bands, out_bands, width)
