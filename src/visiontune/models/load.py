"""Load a Hugging Face model from a hub id, a local directory, or an inline random config.

The inline config is how the demo and the tests run without network; the hub-id path is the
real one users take, and it is the same `from_pretrained` call for a local directory.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from visiontune.config.schema import ModelConfig
from visiontune.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(auto_class: Any, model_cfg: ModelConfig, **kwargs: Any) -> torch.nn.Module:
    """Instantiate `auto_class` (e.g. AutoModelForImageClassification) as the config says.

    Extra kwargs (num_labels, id2label...) override the pretrained config, so a 1000-class
    ImageNet head is replaced by one sized for the user's classes.
    """
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.config is not None:
        config = build_config(model_cfg.config, **kwargs)
        return auto_class.from_config(config, dtype=dtype)
    source = model_cfg.name_or_path
    assert source is not None
    try:
        return auto_class.from_pretrained(
            source,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            dtype=dtype,
            ignore_mismatched_sizes=bool(kwargs),
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            [f"model.name_or_path: cannot load {source!r}: {_first_line(err)}"]
        ) from None


def build_config(inline: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
    values = dict(inline)
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError([f"model.config: {_first_line(err)}"]) from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def enable_checkpointing(model: torch.nn.Module, key: str = "model.gradient_checkpointing") -> None:
    """Non-reentrant activation checkpointing, without transformers' input-grad hooks.

    transformers enables `enable_input_require_grads()` with checkpointing, which hooks the
    input embedding of *every* sub-model: the frozen vision tower of a VLM then records autograd
    and is recomputed and back-propagated for nothing. Non-reentrant checkpointing reaches
    LoRA inside checkpointed blocks without any input requiring grad, so the hooks go. Call it
    after PEFT wrapping: PEFT adds the same hooks when it wraps a checkpointing model.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError([f"{key}: {type(model).__name__} does not support it"])
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.disable_input_require_grads()
