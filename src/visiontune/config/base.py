"""Building blocks shared by every section: strict sections, a model source, LoRA settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from visiontune.user_code import check_dotted


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizationConfig(Section):
    """Frozen base weights in 4 or 8 bits through bitsandbytes (QLoRA); adapters stay fp32."""

    bits: Literal[4, 8] = 4
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(
        default=True, description="Quantize the 4-bit scales too (about 0.4 bit per weight)."
    )
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="dtype 4-bit weights are dequantized to for each matmul."
    )

    @model_validator(mode="after")
    def _four_bit_options(self) -> QuantizationConfig:
        if self.bits == 8 and "type" in self.model_fields_set:
            raise ValueError("model.quantization.type (nf4/fp4) applies to bits: 4 only")
        return self


class ModelConfig(Section):
    """Where the backbone comes from: a hub id, a local directory, an inline config, or the
    user's own builder."""

    name_or_path: str | None = None
    builder: str | None = Field(
        default=None,
        description="Your own model: `package.module:function` returning an nn.Module, called "
        "with model.builder_args (imported only because the config names it, as explicit as "
        "trust_remote_code).",
    )
    builder_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of model.builder."
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="Inline transformers config (with `model_type`) for a randomly initialised "
        "model: no download, used by the demo and the tests.",
    )
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="dtype the frozen base weights are loaded in."
    )
    gradient_checkpointing: bool = False
    family: Literal["auto", "sam", "sam3"] = Field(
        default="auto",
        description="segment: which adapter; auto reads `model_type` from the model's config.",
    )
    quantization: QuantizationConfig | None = Field(
        default=None,
        description="Load the frozen base in 4 or 8 bits (bitsandbytes, `pip install "
        "visiontune[quant]`); ground task only.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = [self.name_or_path, self.config, self.builder]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("set exactly one of model.name_or_path, model.config or model.builder")
        if self.builder is not None:
            check_dotted(self.builder)
        elif self.builder_args:
            raise ValueError("model.builder_args needs model.builder")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a `model_type` (e.g. vit, siglip_vision_model)")
        if self.config is not None and self.quantization is not None:
            raise ValueError(
                "model.quantization quantizes saved weights: use model.name_or_path (an inline "
                "model.config has none; save it with save_pretrained first)"
            )
        return self


class LoraConfig(Section):
    enabled: bool = True
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    targets: str | list[str] = Field(
        default="attention",
        description="A preset (attention, qv, attention+mlp, all-linear), a list of module "
        "names, or a regex prefixed with `re:`; resolved against the model's named_modules().",
    )
    modules_to_save: list[str] | Literal["auto"] = Field(
        default="auto", description="Fully trained modules; `auto` picks the task head."
    )
