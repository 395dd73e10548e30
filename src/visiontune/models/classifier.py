"""Image classifiers (`AutoModelForImageClassification`: SigLIP/MedSigLIP, CLIP, ViT, DINOv2,
ResNet) behind one forward: LoRA on the encoder, the freshly sized head fully trained."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForImageClassification

from visiontune.config.schema import Config
from visiontune.errors import ConfigError
from visiontune.models.load import DTYPES, enable_checkpointing, load_model
from visiontune.models.lora import apply_lora, merged, trainable_report, unwrap
from visiontune.task import ModelAdapter, Outputs, TrainableRow

_HEAD_NAMES = ("classifier", "head", "fc", "score")


class ClassifierAdapter(ModelAdapter):
    """`forward(pixel_values) -> {"logits": fp32 (B, classes)}`."""

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        super().__init__()
        model = load_model(
            AutoModelForImageClassification,
            cfg.model,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={name: i for i, name in enumerate(classes)},
        )
        lora = cfg.lora
        heads = head_modules(model, required=lora.enabled and lora.modules_to_save == "auto")
        self.model = apply_lora(model, lora, heads)
        if cfg.model.gradient_checkpointing:
            enable_checkpointing(unwrap(self.model))
        self.base_model_id = cfg.model.name_or_path
        self.input_dtype = DTYPES[cfg.model.dtype]

    def forward(self, pixel_values: torch.Tensor) -> Outputs:
        logits = self.model(pixel_values=pixel_values.to(self.input_dtype)).logits
        return {"logits": logits.float()}

    def trainable_rows(self) -> list[TrainableRow]:
        return trainable_report(self.model)

    def export_merged(self, out_dir: Path) -> None:
        merged(self.model).save_pretrained(str(out_dir))


def head_modules(model: nn.Module, required: bool = True) -> list[str]:
    """Names of the classification head(s) among the model's direct children.

    They are trained fully (PEFT `modules_to_save`): a freshly sized head has nothing to adapt.
    """
    heads = [
        name
        for name, _ in model.named_children()
        if any(name == h or name.startswith(h) for h in _HEAD_NAMES)
    ]
    if required and not heads:
        children = [name for name, _ in model.named_children()]
        raise ConfigError(
            [
                f"lora.modules_to_save: no classification head found among {children}; "
                "name the head module(s) explicitly"
            ]
        )
    return heads
