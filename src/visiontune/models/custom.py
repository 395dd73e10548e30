"""Your own model (`model.builder: package.module:function`) with everything the built-in
families get: LoRA on modules picked by name or `re:` regex, `modules_to_save`, the trainable
report, the dtype rules, gradient checkpointing where the module offers it, and checkpoints,
resume and `init_from` through the same trainable-tensor files.

The contract with the user's module is small on purpose: `forward(**inputs)` takes the task's
input tensors by name (the translate task passes `source`) and returns a tensor, or a dict
of tensors, which the adapter hands back in fp32.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from visiontune.config.schema import Config
from visiontune.errors import ConfigError
from visiontune.models.load import DTYPES
from visiontune.models.lora import (
    keep_trainable_fp32,
    merged,
    resolve_targets,
    trainable_report,
    wrap_lora,
)
from visiontune.task import ModelAdapter, Outputs, TrainableRow
from visiontune.user_code import import_callable

log = logging.getLogger(__name__)

_CHECKPOINTING_HOOKS = ("gradient_checkpointing_enable", "set_grad_checkpointing")
"""Method names that switch activation checkpointing on: transformers' and timm/terratorch's."""


def build_user_model(cfg: Config) -> nn.Module:
    """Call model.builder with model.builder_args; refuse anything that is not an nn.Module."""
    assert cfg.model.builder is not None
    builder = import_callable(cfg.model.builder, "model.builder")
    try:
        model = builder(**cfg.model.builder_args)
    except TypeError as err:
        raise ConfigError([f"model.builder_args: {cfg.model.builder}: {err}"]) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            [
                f"model.builder: {cfg.model.builder} returned a {type(model).__name__}, "
                "not a torch.nn.Module"
            ]
        )
    return model


class CustomAdapter(ModelAdapter):
    """A user-built module behind one forward; `outputs["prediction"]` when it returns a tensor."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.input_dtype = DTYPES[cfg.model.dtype]
        self.builder, self.builder_args = cfg.model.builder, dict(cfg.model.builder_args)
        model = build_user_model(cfg).to(self.input_dtype)
        for param in model.parameters():
            param.requires_grad_(not cfg.lora.enabled)
        self.model = self._with_lora(model, cfg) if cfg.lora.enabled else keep_trainable_fp32(model)
        if cfg.model.gradient_checkpointing:
            enable_user_checkpointing(model, cfg.model.builder or "")

    @staticmethod
    def _with_lora(model: nn.Module, cfg: Config) -> nn.Module:
        lora = cfg.lora
        to_save = [] if lora.modules_to_save == "auto" else list(lora.modules_to_save)
        names = [name for name, _ in model.named_modules()]
        unknown = [m for m in to_save if not any(n == m or n.endswith("." + m) for n in names)]
        if unknown:
            tops = [name for name, _ in model.named_children()]
            raise ConfigError(
                [
                    f"lora.modules_to_save: {unknown} not modules of this model; its top-level "
                    f"modules are {tops}"
                ]
            )
        targets = resolve_targets(model, lora.targets, exclude=tuple(to_save))
        log.info("LoRA on %d module(s): %s", len(targets), ", ".join(targets[:6]))
        return wrap_lora(model, lora, targets, to_save)

    def forward(self, **inputs: torch.Tensor) -> Outputs:
        cast = {
            k: v.to(self.input_dtype) if torch.is_floating_point(v) else v
            for k, v in inputs.items()
        }
        out: Any = self.model(**cast)
        if isinstance(out, torch.Tensor):
            return {"prediction": out.float()}
        if isinstance(out, dict):
            return {
                k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in out.items()
            }
        raise TypeError(
            f"the model's forward returned a {type(out).__name__}; return a tensor or a dict "
            "of tensors"
        )

    def trainable_rows(self) -> list[TrainableRow]:
        return trainable_report(self.model)

    def export_merged(self, out_dir: Path) -> None:
        """The user's module with LoRA folded in: its state dict as model.safetensors, and
        builder.json (builder and arguments) to build the module that loads it."""
        out_dir.mkdir(parents=True, exist_ok=True)
        module = merged(self.model)
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(out_dir / "model.safetensors"))
        recipe = {"builder": self.builder, "builder_args": self.builder_args}
        (out_dir / "builder.json").write_text(json.dumps(recipe, indent=2))


def enable_user_checkpointing(model: nn.Module, builder: str) -> None:
    """Switch on the module's own activation checkpointing, or say that it has none."""
    for hook in _CHECKPOINTING_HOOKS:
        method = getattr(model, hook, None)
        if callable(method):
            method()
            return
    raise ConfigError(
        [
            f"model.gradient_checkpointing: the model {builder} builds ({type(model).__name__}) "
            f"has no {' or '.join(_CHECKPOINTING_HOOKS)} method"
        ]
    )
