"""LoRA through PEFT: targets resolved from the model's own module names, dtype rules, report.

Module names differ across transformers versions (5.x ViT has `q_proj`/`v_proj` where 4.x had
`query`/`value`), so presets are matched against `named_modules()` at run time, never copied
from a tutorial.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from visiontune.config.schema import LoraConfig
from visiontune.errors import ConfigError
from visiontune.task import TrainableRow

log = logging.getLogger(__name__)

_QV = {"q_proj", "v_proj", "query", "value", "q", "v"}
_ATTENTION = _QV | {"k_proj", "o_proj", "out_proj", "key", "k", "o", "qkv", "proj"}
_MLP = {"fc1", "fc2", "up_proj", "down_proj", "gate_proj", "lin1", "lin2", "dense", "wi", "wo"}
PRESETS: dict[str, set[str] | None] = {
    "qv": _QV,
    "attention": _ATTENTION,
    "attention+mlp": _ATTENTION | _MLP,
    "all-linear": None,
}


def resolve_targets(
    model: nn.Module, spec: str | list[str], within: str = "", exclude: tuple[str, ...] = ()
) -> list[str]:
    """Full names of the Linear layers that `spec` selects, below the module prefix `within`."""
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith(within)
        and not any(name == ex or name.startswith(ex + ".") for ex in exclude)
    ]
    if isinstance(spec, list):
        chosen = [n for n in linears if n in spec or n.rsplit(".", 1)[-1] in spec]
    elif spec.startswith("re:"):
        pattern = re.compile(spec[3:])
        chosen = [n for n in linears if pattern.search(n)]
    elif spec in PRESETS:
        leaves = PRESETS[spec]
        chosen = [n for n in linears if leaves is None or n.rsplit(".", 1)[-1] in leaves]
    else:
        raise ConfigError(
            [
                f"lora.targets: unknown preset {spec!r}; use one of {sorted(PRESETS)}, a list of "
                "module names, or 're:<regex>'"
            ]
        )
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            [
                f"lora.targets: {spec!r} matches no Linear layer of this model"
                f"{' under ' + within if within else ''}; its Linear layers are named {leaves}"
            ]
        )
    return chosen


def apply_lora(
    model: nn.Module,
    cfg: LoraConfig,
    heads: list[str],
    within: str = "",
) -> nn.Module:
    """Wrap `model` in PEFT LoRA with `heads` fully trained, or unfreeze all when disabled."""
    if not cfg.enabled:
        for param in model.parameters():
            param.requires_grad_(True)
        return keep_trainable_fp32(model)
    to_save = heads if cfg.modules_to_save == "auto" else cfg.modules_to_save
    targets = resolve_targets(model, cfg.targets, within=within, exclude=tuple(to_save))
    return wrap_lora(model, cfg, targets, to_save)


def wrap_lora(
    model: nn.Module, cfg: LoraConfig, targets: list[str], to_save: list[str]
) -> nn.Module:
    """PEFT LoRA on exactly `targets` (full module names), `to_save` trained fully."""
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
    )
    return keep_trainable_fp32(get_peft_model(model, peft_cfg, autocast_adapter_dtype=True))


def keep_trainable_fp32(model: nn.Module) -> nn.Module:
    """Cast every trainable parameter to fp32 while the frozen base keeps its load dtype.

    A gradient has its parameter's dtype; GradScaler refuses fp16 gradients ("Attempting to
    unscale FP16 gradients"), and bf16 master weights lose small updates. PEFT's
    autocast_adapter_dtype covers the adapters but not `modules_to_save` copies of the head.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def trainable_report(model: nn.Module, prefix: str = "") -> list[TrainableRow]:
    """Trainable vs total parameters per top-level module (PEFT wrapper prefixes removed).

    The frozen original PEFT keeps beside a fully trained copy (`modules_to_save`) is not the
    model's, so it is left out: a retrained head shows as 100% trainable, not 50%.
    """
    trainable: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        top = _strip_wrappers(name).split(".", 1)[0]
        total[top] += param.numel()
        if param.requires_grad:
            trainable[top] += param.numel()
    return [TrainableRow(prefix + k, trainable[k], total[k]) for k in total]


def check_trainable_share(
    rows: list[TrainableRow], lora_enabled: bool, min_params: int = 10_000_000
) -> str | None:
    """A warning when the trainable share is implausible for the chosen method.

    Models under `min_params` are exempt from the share rule: in the tiny in-process models of
    the demos a mask decoder or a projector is naturally half the model, and what the warning
    guards against (a fully trained module eating the memory LoRA was meant to save) cannot
    happen at that size.
    """
    trainable = sum(r.trainable for r in rows)
    total = sum(r.total for r in rows) or 1
    share = trainable / total
    if trainable == 0:
        return "no parameter is trainable: check lora.targets and lora.modules_to_save"
    if lora_enabled and share > 0.5 and total >= min_params:
        return (
            f"{share:.0%} of parameters are trainable, implausible for LoRA: a fully trained "
            "module (modules_to_save) may be larger than intended"
        )
    return None


def _strip_wrappers(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        name = name.removeprefix(prefix)
    return name.replace(".modules_to_save.default", "").replace(".original_module", "")


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PeftModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def merged(model: nn.Module) -> nn.Module:
    """The base model with every LoRA update added into its weights (no PEFT layers left);
    a model trained without LoRA is returned unchanged."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model
