"""Text-prompted ("reasoning") segmentation in the style of LISA.

A text model reads the query (optionally after CLIP image features brought to its width by a
projector) followed by an answer that contains a `[SEG]` token. The last-layer hidden state at
the position that predicts `[SEG]` (a causal LM) or at `[SEG]` itself (a bidirectional encoder
such as MiniLM) goes through an MLP to SAM's prompt width and becomes the mask decoder's
sparse prompt; the dense prompt is SAM's "no mask" embedding.

The offset of `[SEG]` in the model's input is its position in the text plus the number of
visual tokens actually inserted before it, read from the projected features' shape: LISA's
hard-coded 255 is only right for its own 256-token image placeholder.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from visiontune.config.base import LoraConfig, ModelConfig
from visiontune.config.schema import Config
from visiontune.config.tasks import TextModelConfig, VisionTowerConfig
from visiontune.data.images import ImageSpec
from visiontune.errors import ConfigError
from visiontune.models.load import DTYPES, build_config, load_model
from visiontune.models.lora import keep_trainable_fp32, resolve_targets, unwrap
from visiontune.models.queries import SEG_TOKEN, QueryEncoder
from visiontune.models.sam import SamAdapter
from visiontune.task import ModelAdapter, Outputs, TrainableRow

log = logging.getLogger(__name__)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _renamed(err: ConfigError, key: str) -> ConfigError:
    """A loader error about `model.*` re-addressed to the component's own config key."""
    return ConfigError([p.replace("model.", f"{key}.", 1) for p in err.problems])


def component_config(mcfg: ModelConfig, key: str) -> Any:
    """The transformers config of a component, from its inline dict or its hub id/dir."""
    try:
        if mcfg.config is not None:
            return build_config(mcfg.config)
        return AutoConfig.from_pretrained(
            mcfg.name_or_path, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code
        )
    except ConfigError as err:
        raise _renamed(err, key) from None
    except (OSError, ValueError) as err:
        raise ConfigError(
            [f"{key}.name_or_path: cannot load {mcfg.name_or_path!r}: {err}"]
        ) from None


def text_kind(tcfg: TextModelConfig, config: Any) -> str:
    """causal_lm or encoder: the config's architectures, else its model type's head mappings."""
    if tcfg.kind != "auto":
        return tcfg.kind
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return "causal_lm" if any(a.endswith("ForCausalLM") for a in architectures) else "encoder"
    model_type = config.model_type
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return (
        "causal_lm" if causal and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "encoder"
    )


def load_tokenizer(tcfg: TextModelConfig) -> Any:
    """The text model's tokenizer with `[SEG]` added as a special token."""
    source = tcfg.tokenizer or tcfg.name_or_path
    if source is None:
        raise ConfigError(["task.text_model.tokenizer: required when the text model is inline"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=tcfg.revision, trust_remote_code=tcfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ConfigError([f"task.text_model.tokenizer: cannot load {source!r}: {err}"]) from None
    tokenizer.add_special_tokens({"additional_special_tokens": [SEG_TOKEN]})
    return tokenizer


def load_text_model(tcfg: TextModelConfig, tokenizer: Any) -> tuple[nn.Module, str]:
    """The text model (room made for `[SEG]` in its vocabulary) and its kind."""
    kind = text_kind(tcfg, component_config(tcfg, "task.text_model"))
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    try:
        model = load_model(auto, tcfg)
    except ConfigError as err:
        raise _renamed(err, "task.text_model") from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model, kind


def load_vision_tower(vcfg: VisionTowerConfig) -> nn.Module:
    """A CLIP-style image encoder; from a two-tower checkpoint only its vision half is built."""
    config = component_config(vcfg, "task.vision_tower")
    vision = getattr(config, "vision_config", None)
    dtype = DTYPES[vcfg.dtype]
    if vcfg.config is not None:
        return AutoModel.from_config(vision or config, dtype=dtype)
    if vision is None:
        return load_model(AutoModel, vcfg)
    return AutoModel.from_pretrained(
        vcfg.name_or_path,
        config=vision,
        revision=vcfg.revision,
        trust_remote_code=vcfg.trust_remote_code,
        dtype=dtype,
    )


def apply_component_lora(
    model: nn.Module, mode: str, lora: LoraConfig, key: str, token_ids: list[int] | None = None
) -> nn.Module:
    """frozen, full, or LoRA (plus trainable rows for new tokens such as `[SEG]`)."""
    if mode == "frozen":
        return model.requires_grad_(False)
    if mode == "full":
        return keep_trainable_fp32(model.requires_grad_(True))
    if not lora.enabled:
        raise ConfigError(
            [f"{key}.lora.enabled: false conflicts with train: lora; use train: full"]
        )
    try:
        targets = resolve_targets(model, lora.targets)
    except ConfigError as err:
        raise ConfigError([p.replace("lora.", f"{key}.lora.", 1) for p in err.problems]) from None
    peft_cfg = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=None if lora.modules_to_save == "auto" else lora.modules_to_save,
        trainable_token_indices=_token_rows(model, token_ids),
    )
    return keep_trainable_fp32(get_peft_model(model, peft_cfg, autocast_adapter_dtype=True))


def _token_rows(model: nn.Module, token_ids: list[int] | None) -> dict[str, list[int]] | None:
    """Trainable rows for new tokens in the input embedding and, when untied, the LM head.

    Training the new rows only (not the whole 128k x 2048 matrix LISA trains) keeps Llama-3.2-1B
    within 8 GB; an untied LM head needs its own `[SEG]` row or the answer loss cannot learn it.
    """
    if not token_ids:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    embedding = model.get_input_embeddings()
    rows = {names[id(embedding)]: list(token_ids)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is not embedding.weight:
        rows[names[id(head)]] = list(token_ids)
    return rows


def mlp(in_dim: int, hidden: int, out_dim: int, activation: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), activation(), nn.Linear(hidden, out_dim))


class TextSegAdapter(ModelAdapter):
    """SAM + a text model (+ an optional vision tower + projector); `forward` runs the chain.

    `forward(input_ids, attention_mask, seg_index, pixel_values, labels=None,
    clip_pixel_values=None, cache_keys=None) -> {"mask_logits": fp32 (B, S, S) full-frame,
    "lm_loss": (B,) mean answer-token cross-entropy or absent}`, one query per image.
    """

    def __init__(self, cfg: Config, queries: QueryEncoder) -> None:
        super().__init__()
        options = cfg.task
        tcfg, vcfg = options.text_model, options.vision_tower
        assert tcfg is not None
        self.sam = SamAdapter(cfg, options.sam, options.cache, options.cache_dir)
        self.base_model_id = cfg.model.name_or_path
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            text_model, kind = load_text_model(tcfg, queries.tokenizer)
            self.text_model = apply_component_lora(
                text_model, tcfg.train, tcfg.lora, "task.text_model", [queries.seg_id]
            )
            self.vision_tower = None
            if vcfg is not None:
                tower = load_vision_tower(vcfg)
                self.vision_tower = apply_component_lora(
                    tower, vcfg.train, vcfg.lora, "task.vision_tower"
                )
            self.is_causal = kind == "causal_lm"
            self.visual_insert_at = len(queries.prefix)
            width = unwrap(self.text_model).config.hidden_size
            prompt_dim = self.sam.sam.config.prompt_encoder_config.hidden_size
            hidden = options.seg_projector_dim or width
            self.seg_projector = mlp(width, hidden, prompt_dim, nn.ReLU)
            self.vision_projector = None
            if self.vision_tower is not None:
                vision_width = unwrap(self.vision_tower).config.hidden_size
                self.vision_projector = mlp(vision_width, width, width, nn.GELU)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        seg_index: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        clip_pixel_values: torch.Tensor | None = None,
        cache_keys: list[str] | None = None,
    ) -> Outputs:
        image_embeddings = self.sam.image_embeddings(pixel_values, cache_keys)
        hidden, labels, attention_mask, visual = self._text_states(
            input_ids, attention_mask, labels, clip_pixel_values
        )
        position = seg_index + visual - (1 if self.is_causal else 0)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        seg_hidden = hidden[rows, position]
        prompt = self.seg_projector(seg_hidden.to(self.seg_projector[0].weight.dtype))
        count = image_embeddings.shape[0]
        masks = self.sam.decode(
            image_embeddings, prompt[:, None, None, :], self.sam.no_mask_dense(count)
        )
        outputs: Outputs = {"mask_logits": self.sam.upscale(masks), "visual_tokens": visual}
        if self.is_causal and labels is not None:
            outputs["lm_loss"] = self._answer_loss(hidden, labels)
        return outputs

    def _text_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        clip_pixel_values: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """Last-layer hidden states with the visual tokens spliced in after the prefix."""
        base = unwrap(self.text_model)
        embeds = base.get_input_embeddings()(input_ids)
        visual = 0
        if self.vision_tower is not None and self.vision_projector is not None:
            assert clip_pixel_values is not None, "the vision tower needs clip_pixel_values"
            tokens = self._visual_tokens(clip_pixel_values).to(embeds.dtype)
            visual = tokens.shape[1]
            at = self.visual_insert_at
            embeds = torch.cat([embeds[:, :at], tokens, embeds[:, at:]], dim=1)
            ones = attention_mask.new_ones(attention_mask.shape[0], visual)
            attention_mask = torch.cat([attention_mask[:, :at], ones, attention_mask[:, at:]], 1)
            if labels is not None:
                ignore = labels.new_full((labels.shape[0], visual), -100)
                labels = torch.cat([labels[:, :at], ignore, labels[:, at:]], dim=1)
        trunk = base.get_decoder() if self.is_causal else self.text_model
        out = trunk(inputs_embeds=embeds, attention_mask=attention_mask)
        return out.last_hidden_state, labels, attention_mask, visual

    def _visual_tokens(self, clip_pixel_values: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer patch features (LLaVA's choice), CLS dropped when present."""
        assert self.vision_tower is not None and self.vision_projector is not None
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype
        out = tower(pixel_values=clip_pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[-2]
        config = unwrap(tower).config
        patches = (config.image_size // config.patch_size) ** 2
        if features.shape[1] == patches + 1:
            features = features[:, 1:]
        return self.vision_projector(features.to(self.vision_projector[0].weight.dtype))

    def _answer_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over each query's answer tokens, in fp32.

        Only the answer positions go through the LM head: with a 128k vocabulary, logits for
        every position (visual tokens included) would cost more memory than the model.
        """
        head = unwrap(self.text_model).get_output_embeddings()
        targets = labels[:, 1:]
        chosen = targets != -100
        logits = head(hidden[:, :-1][chosen]).float()
        per_token = F.cross_entropy(logits, targets[chosen], reduction="none")
        owner = torch.nonzero(chosen, as_tuple=True)[0]
        sums = torch.zeros(labels.shape[0], device=hidden.device).index_add(0, owner, per_token)
        counts = chosen.sum(1).clamp(min=1)
        return sums / counts

    def trainable_rows(self) -> list[TrainableRow]:
        """SAM split into its three parts, then the text side component by component."""
        rows = self.sam.trainable_rows()
        parts: dict[str, nn.Module | None] = {
            "text_model": self.text_model,
            "vision_tower": self.vision_tower,
            "vision_projector": self.vision_projector,
            "seg_projector": self.seg_projector,
        }
        for name, module in parts.items():
            if module is not None:
                params = list(module.parameters())
                trainable = sum(p.numel() for p in params if p.requires_grad)
                rows.append(TrainableRow(name, trainable, sum(p.numel() for p in params)))
        return rows


def vision_image_spec(vcfg: VisionTowerConfig) -> ImageSpec:
    """The vision tower's preprocessing: its processor's statistics, else CLIP's."""
    config = component_config(vcfg, "task.vision_tower")
    vision = getattr(config, "vision_config", None) or config
    mean, std = CLIP_MEAN, CLIP_STD
    if vcfg.name_or_path is not None:
        try:
            processor = AutoImageProcessor.from_pretrained(vcfg.name_or_path)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError):
            log.warning("no image processor for %s: CLIP statistics used", vcfg.name_or_path)
    return ImageSpec(int(vision.image_size), mean, std, pad_to_square=True)  # type: ignore[arg-type]


def expected_visual_tokens(vcfg: VisionTowerConfig | None) -> int:
    """Visual tokens the tower will add, for the query length budget only: the model's [SEG]
    offset uses the count the tower actually produces."""
    if vcfg is None:
        return 0
    config = component_config(vcfg, "task.vision_tower")
    vision = getattr(config, "vision_config", None) or config
    return (vision.image_size // vision.patch_size) ** 2
