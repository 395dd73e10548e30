"""Generative vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) behind one forward and
one generate: LoRA on the language model, vision tower and merger frozen by default, the frozen
base optionally in 4 or 8 bits (QLoRA)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForImageTextToText

from visiontune.config.schema import Config, GroundTaskConfig
from visiontune.models.load import (
    check_quantization,
    enable_checkpointing,
    is_quantized,
    load_model,
    quantization_device,
)
from visiontune.models.lora import apply_lora, merged, resolve_targets, trainable_report, unwrap
from visiontune.models.qwen_vl import IGNORE_INDEX, submodule_name
from visiontune.task import ModelAdapter, Outputs, TrainableRow

log = logging.getLogger(__name__)
# Qwen3-VL feeds vision features into early language layers through extra mergers
# ("DeepStack"); they belong to the projector as much as `merger` does.
PROJECTOR_PARTS = ("merger", "deepstack_merger_list")


class VisionLanguageAdapter(ModelAdapter):
    """`forward(input_ids, attention_mask, mm_token_type_ids, labels, pixel_values=None,
    image_grid_thw=None) -> {"answer_logits": fp32 (N, vocab), "answer_targets": (N,)}` at
    the N positions that predict a label; `generate(...)` -> new token ids per row."""

    def __init__(self, cfg: Config, options: GroundTaskConfig) -> None:
        super().__init__()
        device = quantization_device(cfg.train.device)
        check_quantization(cfg.model, device, cfg.lora.enabled)
        # bitsandbytes matches these by name; a part the model lacks matches nothing
        keep = PROJECTOR_PARTS if options.train_projector else ()
        model = load_model(
            AutoModelForImageTextToText, cfg.model, quantized_on=device, keep_unquantized=keep
        )
        self.base_model_id = cfg.model.name_or_path
        self.model = self._with_lora(model, cfg, options)
        if cfg.model.gradient_checkpointing:
            enable_checkpointing(unwrap(self.model))

    @staticmethod
    def _with_lora(model: nn.Module, cfg: Config, options: GroundTaskConfig) -> nn.Module:
        language = submodule_name(model, "language_model")
        vision = submodule_name(model, "visual")
        projector = _projector(model, vision)
        heads = projector if options.train_projector else []
        lora = cfg.lora
        if lora.enabled:
            targets = resolve_targets(model, lora.targets, within=language)
            if not options.freeze_vision:
                targets += resolve_targets(
                    model, lora.targets, within=vision + ".", exclude=tuple(projector)
                )
            return apply_lora(model, lora.model_copy(update={"targets": targets}), heads)
        model = apply_lora(model, lora, heads)
        for name, param in model.named_parameters():
            if any(name.startswith(p + ".") for p in projector):
                param.requires_grad_(options.train_projector)
            elif name.startswith(vision + "."):
                param.requires_grad_(not options.freeze_vision)
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> Outputs:
        """Logits only at positions that predict a label (`logits_to_keep` with a boolean
        mask): a full-vocabulary logit tensor for a 1,500-token screenshot conversation would
        cost more memory than the LoRA itself."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = keep
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            logits_to_keep=predicts,
        ).logits
        return {"answer_logits": logits.float(), "answer_targets": targets[keep]}

    def generate(
        self,
        max_new_tokens: int,
        stop_token_ids: list[int],
        pad_token_id: int,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Greedy continuation of left-padded prompts: the new tokens only, with the first stop
        token of each row and everything after it replaced by `pad_token_id`."""
        stops = [*stop_token_ids, *self.eos_token_ids()]
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad_token_id,
            # sharded (train.strategy: fsdp): each forward all-gathers with the other ranks, so
            # a rank whose rows all stopped keeps stepping until every rank's have
            synced_gpus=isinstance(self, FSDPModule),
        )
        new = output[:, inputs["input_ids"].shape[1] :]
        stopped = torch.isin(new, torch.tensor(stops, device=new.device)).cumsum(dim=1) > 0
        return new.masked_fill(stopped, pad_token_id)

    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from the model's generation config (Qwen: <|endoftext|> too)."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def trainable_rows(self) -> list[TrainableRow]:
        return trainable_report(self.model)

    def export_merged(self, out_dir: Path) -> None:
        """The merged model in the base's dtype. A 4/8-bit base is dequantized *before* the
        LoRA update is added: merging into the quantized weights (PEFT's default for bnb layers)
        would re-quantize the sum and round most of a small update away."""
        model = self.model
        if is_quantized(unwrap(model)):
            log.info(
                "the base was trained quantized (model.quantization): dequantizing it to %s "
                "before merging the adapter",
                unwrap(model).dtype,
            )
            model = dequantized(model)
        merged(model).save_pretrained(str(out_dir))


def _projector(model: nn.Module, vision: str) -> list[str]:
    """Names of the projector modules under the vision tower `vision`; a ModuleList (Qwen3-VL's
    DeepStack mergers) by its members, since PEFT trains whole modules, not lists."""
    modules = dict(model.named_modules())
    names = []
    for part in PROJECTOR_PARTS:
        module = modules.get(f"{vision}.{part}")
        if isinstance(module, nn.ModuleList):
            names += [f"{vision}.{part}.{index}" for index in range(len(module))]
        elif module is not None:
            names.append(f"{vision}.{part}")
    return names


def dequantized(model: nn.Module) -> nn.Module:
    """A PeftModel over a bitsandbytes base -> the same adapters over the dequantized base."""
    assert isinstance(model, PeftModel)
    adapter_config = model.peft_config["default"]
    state = get_peft_model_state_dict(model)
    base = model.unload()
    base.dequantize(dtype=base.dtype)
    plain = get_peft_model(base, adapter_config)
    set_peft_model_state_dict(plain, state)
    return plain
