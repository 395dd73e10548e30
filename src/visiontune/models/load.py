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


def load_model(
    auto_class: Any,
    model_cfg: ModelConfig,
    quantized_on: torch.device | None = None,
    keep_unquantized: tuple[str, ...] = (),
    **kwargs: Any,
) -> torch.nn.Module:
    """Instantiate `auto_class` (e.g. AutoModelForImageClassification) as the config says.

    Extra kwargs (num_labels, id2label...) override the pretrained config, so a 1000-class
    ImageNet head is replaced by one sized for the user's classes. `quantized_on` is the device
    a task that supports model.quantization runs on (bitsandbytes quantizes weights where they
    are placed); a task that passes none refuses the setting before any weight is read.
    `keep_unquantized` names modules that are trained fully and so must stay real Linears.
    """
    dtype = DTYPES[model_cfg.dtype]
    loading: dict[str, Any] = {}
    if model_cfg.quantization is not None:
        if quantized_on is None:
            raise ConfigError(["model.quantization: only the ground task supports it"])
        loading = {
            "quantization_config": quantization_config(model_cfg, keep_unquantized),
            "device_map": {"": str(quantized_on)},
        }
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
            **loading,
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            [f"model.name_or_path: cannot load {source!r}: {_first_line(err)}"]
        ) from None


def check_quantization(model_cfg: ModelConfig, device: torch.device, lora_enabled: bool) -> None:
    """Refuse a quantization setting that cannot work, before a weight is read.

    bitsandbytes runs on CUDA and (0.50+, slowly) on CPU, not on Apple's MPS; quantized weights
    cannot be trained, so LoRA must be on.
    """
    if model_cfg.quantization is None:
        return
    key = "model.quantization"
    if not lora_enabled:
        raise ConfigError([f"{key}: quantized base weights cannot be trained; enable lora"])
    if device.type not in ("cuda", "cpu"):
        raise ConfigError([f"{key}: bitsandbytes runs on cuda or cpu, not on {device.type}"])
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError([f"{key}: needs bitsandbytes: pip install 'visiontune[quant]'"]) from None


def quantization_device(train_device: str) -> torch.device:
    """The device the runner will choose for `train.device` (bitsandbytes must quantize the
    weights there: it is decided at load time, before the runner exists)."""
    if train_device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train_device)


def quantization_config(model_cfg: ModelConfig, keep_unquantized: tuple[str, ...]) -> Any:
    """transformers' BitsAndBytesConfig for model.quantization."""
    from transformers import BitsAndBytesConfig

    quant = model_cfg.quantization
    assert quant is not None
    skip = ["lm_head", *keep_unquantized]
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        llm_int8_skip_modules=skip,
    )


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether a transformers model was loaded with bitsandbytes weights."""
    return getattr(model, "hf_quantizer", None) is not None


def build_config(inline: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
    values = dict(inline)
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError([f"model.config: {_first_line(err)}"]) from None


def read_model_config(model_cfg: ModelConfig) -> PretrainedConfig:
    """The model's transformers config, without its weights (family, sizes): inline, or read
    from its config.json; a repository that cannot be read is named, a gated one with how to
    get in."""
    if model_cfg.config is not None:
        return build_config(model_cfg.config)
    try:
        return AutoConfig.from_pretrained(
            model_cfg.name_or_path,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise ConfigError([access_problem(model_cfg.name_or_path, err)]) from None


def access_problem(repo: str | None, err: Exception) -> str:
    """One line saying why `repo` could not be read; for a gated repo, how to get in."""
    text = str(err)
    if "gated repo" in text or "401" in text or "403" in text:
        return (
            f"model.name_or_path: {repo!r} is a gated repository and this machine has no "
            f"access: accept its terms at https://huggingface.co/{repo} and log in "
            "(`hf auth login`) or set HF_TOKEN in the environment"
        )
    return f"model.name_or_path: cannot load {repo!r}: {_first_line(err)}"


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
