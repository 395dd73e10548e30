"""The `task:` section, one class per task, told apart by `type`.

Kept beside schema.py (which imports them into the one Config) so that each file stays
readable; a task's options live here, not in the task's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import Field, field_validator, model_validator

from visiontune.config.base import LoraConfig, ModelConfig, Section
from visiontune.config.translate import TranslateTaskConfig


class LossConfig(Section):
    type: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: float = Field(default=2.0, ge=0)
    focal_alpha: float | None = Field(default=None, gt=0, le=1)
    class_weights: list[float] | Literal["balanced"] | None = None
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)


class ClassifyTaskConfig(Section):
    type: Literal["classify"] = "classify"
    loss: LossConfig = LossConfig()
    referable_from: str | None = Field(
        default=None,
        description="Class from which a sample counts as positive for binary metrics "
        "(DR: grade 2 = referable); adds binary sensitivity/specificity/AUC.",
    )


class SegmentLossConfig(Section):
    """Per-mask losses, averaged over masks; defaults are LISA's weights."""

    mask_loss: Literal["bce", "focal"] = "bce"
    mask_weight: float = Field(default=2.0, ge=0, description="Weight of the BCE/focal term.")
    dice_weight: float = Field(default=0.5, ge=0)
    lm_weight: float = Field(
        default=1.0, ge=0, description="Weight of the answer cross-entropy of a causal LM."
    )
    focal_gamma: float = Field(default=2.0, ge=0)
    focal_alpha: float | None = Field(default=0.25, gt=0, lt=1)
    ignore_in_loss: Literal["background", "exclude"] = Field(
        default="background",
        description="Ignore (255) pixels in training; metrics always drop them.",
    )


class SamOptions(Section):
    lora_on: list[Literal["image_encoder", "mask_decoder"]] = Field(
        default_factory=lambda: ["mask_decoder"],
        description="SAM components that get the top-level `lora` adapters (image_encoder: its "
        "fused qkv attention); with lora.enabled false they are fully trained instead.",
    )
    train_fully: list[Literal["prompt_encoder", "mask_decoder"]] = Field(
        default_factory=list,
        description="SAM components trained without LoRA (LISA: mask_decoder).",
    )


class TextModelConfig(ModelConfig):
    """The text side of text-prompted segmentation: a causal LM or a text encoder."""

    kind: Literal["auto", "causal_lm", "encoder"] = "auto"
    tokenizer: str | None = Field(default=None, description="Default: name_or_path.")
    max_length: int = Field(default=128, ge=8, description="Tokens per query, answer included.")
    answer: str = Field(default="It is [SEG].", description="Must contain [SEG].")
    train: Literal["lora", "full", "frozen"] = "lora"
    lora: LoraConfig = LoraConfig(targets="qv")

    @field_validator("answer")
    @classmethod
    def _has_seg(cls, value: str) -> str:
        if "[SEG]" not in value:
            raise ValueError("the answer must contain the [SEG] token")
        return value


class VisionTowerConfig(ModelConfig):
    """Optional CLIP-style image encoder whose features reach the text model via a projector."""

    train: Literal["frozen", "lora", "full"] = "frozen"
    lora: LoraConfig = LoraConfig()


class LabelmeOptions(Section):
    target_labels: list[str] = Field(default_factory=lambda: ["target"])
    ignore_labels: list[str] = Field(default_factory=lambda: ["ignore"])
    skip_labels: list[str] = Field(default_factory=lambda: ["flag"])


class MaskFolderOptions(Section):
    images: str = "images"
    masks: str = "masks"
    ignore_value: int | None = Field(default=None, ge=0, le=65535)


Sam3Component = Literal[
    "vision_encoder",
    "text_encoder",
    "text_projection",
    "geometry_encoder",
    "detr_encoder",
    "detr_decoder",
    "mask_decoder",
    "dot_product_scoring",
]
SAM3_COMPONENTS: tuple[str, ...] = get_args(Sam3Component)


def names_sam3(model: ModelConfig) -> bool:
    """Whether the config itself says SAM 3 (family, inline model_type, or a hub id like
    facebook/sam3), for defaults decided before any model config is read."""
    if model.family != "auto":
        return model.family == "sam3"
    if model.config is not None:
        return str(model.config.get("model_type")) in ("sam3", "sam3_video")
    return Path(str(model.name_or_path)).name.lower().startswith("sam3")


class Sam3LossConfig(Section):
    """DETR-style set-prediction loss weights (SAM 3 / DETR defaults); every term is logged."""

    class_weight: float = Field(default=2.0, ge=0, description="Sigmoid focal on all queries.")
    box_l1_weight: float = Field(default=5.0, ge=0, description="Matched queries.")
    giou_weight: float = Field(default=2.0, ge=0, description="Matched queries.")
    mask_focal_weight: float = Field(default=5.0, ge=0, description="Matched queries.")
    dice_weight: float = Field(default=5.0, ge=0, description="Matched queries.")
    presence_weight: float = Field(default=1.0, ge=0, description="BCE: any instance at all?")
    semantic_weight: float = Field(default=1.0, ge=0, description="Union mask, BCE + Dice.")
    match_class: float = Field(default=2.0, ge=0, description="Matching cost weights.")
    match_box_l1: float = Field(default=5.0, ge=0)
    match_giou: float = Field(default=2.0, ge=0)
    match_mask: float = Field(default=0.0, ge=0, description="Dice cost; 0 = boxes only.")
    focal_alpha: float = Field(default=0.25, gt=0, lt=1)
    focal_gamma: float = Field(default=2.0, ge=0)
    aux: bool = Field(
        default=False,
        description="Also match and score every earlier DETR decoder layer's boxes and classes "
        "(class, box L1, GIoU at the same weights; logged as loss.aux_*).",
    )


class Sam3Options(Section):
    """SAM 3 (text concept -> every instance): LoRA per component and the set loss."""

    lora_on: list[Sam3Component] = Field(
        default_factory=lambda: ["detr_encoder", "detr_decoder", "mask_decoder", "text_projection"],
        description="Components that get the top-level `lora` adapters; add vision_encoder "
        "for the full setup (its embeddings can then no longer be cached).",
    )
    targets: dict[Sam3Component, str | list[str]] = Field(
        default_factory=dict,
        description="Per-component lora.targets (preset, names or 're:'); default lora.targets.",
    )
    train_fully: list[Sam3Component] = Field(default_factory=list)
    tokenizer: str | None = Field(default=None, description="Default: model.name_or_path.")
    max_text_length: int = Field(default=32, ge=2)
    too_many_instances: Literal["error", "truncate"] = Field(
        default="error",
        description="An image with more instances than the model has queries: an error, or "
        "its smallest instances dropped with a warning naming the image.",
    )
    instances_from: Literal["components", "values"] = Field(
        default="components",
        description="Mask folders: each connected component (8-neighbourhood) of the non-zero "
        "pixels is an instance, or each distinct pixel value.",
    )
    score_threshold: float = Field(default=0.5, ge=0, le=1, description="Predict/eval cut-off.")
    exemplars: int = Field(
        default=0,
        ge=0,
        description="Training only: up to this many of each image's ground-truth boxes, drawn "
        "anew every epoch, go to the model as positive box exemplars beside the text (as SAM 3 "
        "was trained); evaluation stays text-only, predict takes boxes per image.",
    )
    loss: Sam3LossConfig = Sam3LossConfig()


class SegmentTaskConfig(Section):
    type: Literal["segment"] = "segment"
    default_metric: ClassVar[str] = "giou"
    prompt: Literal["none", "box", "points", "text"] = Field(
        default="none", description="box/points are derived from the ground truth."
    )
    num_points: int = Field(default=1, ge=1)
    instances: Literal["merge", "per_instance"] = "merge"
    sam: SamOptions = SamOptions()
    sam3: Sam3Options = Sam3Options()
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="SAM 3: category -> text prompt (default: the category name). Data "
        "categories not listed here are an error once any are listed.",
    )
    text_model: TextModelConfig | None = None
    vision_tower: VisionTowerConfig | None = None
    seg_projector_dim: int | None = Field(
        default=None, ge=1, description="Hidden width of the [SEG] MLP (default: text hidden)."
    )
    loss: SegmentLossConfig = SegmentLossConfig()
    mask_threshold: float = Field(default=0.0, description="On logits: 0.0 = probability 0.5.")
    boundary_tolerance: int = Field(default=2, ge=0, description="Pixels, for boundary_f1.")
    cache: Literal["auto", "off", "memory", "disk"] = Field(
        default="auto",
        description="Cache SAM image embeddings when the image encoder is frozen and inputs "
        "are not augmented; auto = memory.",
    )
    cache_dir: Path | None = Field(default=None, description="For cache: disk.")
    labelme: LabelmeOptions = LabelmeOptions()
    mask_folder: MaskFolderOptions = MaskFolderOptions()
    coco_images: Path | None = Field(default=None, description="Default: the JSON's folder.")
    figures: int = Field(default=6, ge=0, description="Overlay examples saved per evaluation.")

    @model_validator(mode="after")
    def _consistent(self) -> SegmentTaskConfig:
        if self.prompt == "text" and self.text_model is None:
            raise ValueError("prompt: text needs task.text_model")
        if self.prompt != "text" and self.text_model is not None:
            raise ValueError("task.text_model is only used with prompt: text")
        if self.vision_tower is not None and self.text_model is None:
            raise ValueError("task.vision_tower feeds the text model: set task.text_model too")
        if self.instances == "per_instance" and self.prompt in ("none", "text"):
            raise ValueError(
                "instances: per_instance needs box or points prompts to tell them apart"
            )
        if self.cache == "disk" and self.cache_dir is None:
            raise ValueError("cache: disk needs task.cache_dir")
        return self


class GroundTaskConfig(Section):
    """Click grounding with a generative VLM (Qwen2-VL, Qwen2.5-VL): answer a point."""

    type: Literal["ground"] = "ground"
    default_metric: ClassVar[str] = "click_accuracy"
    default_lora_targets: ClassVar[str] = "all-linear"
    processor: str | None = Field(
        default=None,
        description="Hub id or directory of the tokenizer, image processor and chat template; "
        "default: model.name_or_path.",
    )
    min_pixels: int = Field(
        default=56 * 56, ge=28 * 28, description="Smallest resized image area, in pixels."
    )
    max_pixels: int = Field(
        default=28 * 28 * 1280,
        ge=28 * 28,
        description="Largest resized image area (an image token covers 28*28 pixels on "
        "Qwen2/2.5-VL, 32*32 on Qwen3-VL): the main memory knob. Training, evaluation and "
        "prediction all use this value.",
    )
    coordinates: Literal["auto", "norm1000", "resized_pixels"] = Field(
        default="auto",
        description="Answer coordinates: norm1000 (Qwen2-VL: integers in [0, 1000); Qwen3-VL: "
        "0..1000) or resized_pixels (Qwen2.5-VL, pixels of the resized image); auto follows "
        "the model.",
    )
    prompt_template: str = Field(
        default="{instruction}", description="User text around the instruction."
    )
    answer_template: str = Field(
        default="({x},{y})", description="Assistant answer written for a click target."
    )
    system_prompt: str | None = None
    box_format: Literal["xyxy", "xywh"] = Field(
        default="xyxy", description="Order of `bbox` numbers in grounding data (xywh: ScreenSpot)."
    )
    max_length: int | None = Field(
        default=None,
        ge=16,
        description="Longest conversation in tokens after image-token expansion; default: "
        "the model's max_position_embeddings.",
    )
    too_long: Literal["skip", "error"] = Field(
        default="skip", description="A longer conversation is skipped and counted, or an error."
    )
    freeze_vision: bool = Field(
        default=True, description="false: LoRA also on the vision tower's linear layers."
    )
    train_projector: bool = Field(
        default=False, description="Fully train the vision-to-language projector (merger)."
    )
    max_new_tokens: int = Field(default=32, ge=1, description="Answer length at eval/predict.")

    @model_validator(mode="after")
    def _consistent(self) -> GroundTaskConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError("task.min_pixels is larger than task.max_pixels")
        if "{instruction}" not in self.prompt_template:
            raise ValueError("task.prompt_template must contain {instruction}")
        try:
            self.answer_template.format(x=1, y=2)
        except (KeyError, IndexError, ValueError):
            raise ValueError("task.answer_template may only use {x} and {y}") from None
        if "{x}" not in self.answer_template or "{y}" not in self.answer_template:
            raise ValueError("task.answer_template must contain {x} and {y}")
        return self


TaskConfig = Annotated[
    ClassifyTaskConfig | SegmentTaskConfig | GroundTaskConfig | TranslateTaskConfig,
    Field(discriminator="type"),
]
