"""AdamW with decoupled weight decay (none on biases and norms) and step-counted schedules.

`adamw_8bit` is bitsandbytes' AdamW with block-wise 8-bit moments (its 0.50 release runs it on
CPU as well as CUDA); moments of tensors under 4,096 elements stay 32-bit, as bitsandbytes
decides.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from visiontune.config.schema import OptimConfig, ScheduleConfig
from visiontune.errors import ConfigError


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Biases, norm weights and other 1-d parameters are not decayed: decaying a LayerNorm
    gain toward zero fights the normalisation instead of regularising."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "norm" in name.lower():
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "decay": False},
    ]
    params = [g for g in groups if g["params"]]
    if cfg.name == "adamw_8bit":
        return _adamw_8bit(params, cfg)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _adamw_8bit(params: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError:
        raise ConfigError(
            ["optim.name: adamw_8bit needs bitsandbytes: pip install 'visiontune[quant]'"]
        ) from None
    return AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return cfg.warmup_steps


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int, base_lr: float) -> float:
    """Multiplier of the base lr for the update that follows `step` optimizer steps.

    Warmup ramps linearly from lr/warmup to lr (never a zero-lr first step); decay then goes
    from lr to `min_lr` at `total_steps`.
    """
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.type == "constant":
        return 1.0
    floor = min(cfg.min_lr / base_lr, 1.0)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.type == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> LambdaLR:
    base_lr = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps, base_lr))
