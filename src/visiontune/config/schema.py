"""The single source of truth for every option.

Every section forbids unknown keys so that a typo (`optim.learning_rate`) is an error with a
suggestion rather than a silently ignored setting. Defaults are the choices we would make for
a user who has not thought about the option yet.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Where the backbone comes from: a hub id, a local directory, or an inline config."""

    name_or_path: str | None = None
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

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("set exactly one of model.name_or_path or model.config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a `model_type` (e.g. vit, siglip_vision_model)")
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


class Augment(Section):
    """Train-time augmentation; all off by default so that eval-time data is untouched."""

    hflip: float = Field(default=0.0, ge=0, le=1, description="probability")
    vflip: float = Field(default=0.0, ge=0, le=1, description="probability")
    rotation: float = Field(default=0.0, ge=0, le=180, description="max degrees")
    resized_crop: tuple[float, float] | None = Field(
        default=None, description="area scale range, e.g. [0.8, 1.0]"
    )
    color_jitter: float = Field(default=0.0, ge=0, le=1, description="brightness/contrast")


class Preprocess(Section):
    """Image preprocessing; unset values come from the model's image processor or config."""

    size: int | None = Field(default=None, gt=0)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    pad_to_square: bool = True


class CsvColumns(Section):
    image_column: str = "id_code"
    label_column: str = "diagnosis"
    image_pattern: str = Field(
        default="{image}",
        description="Path of an image relative to the CSV's folder; `{image}` is the image "
        "column, e.g. `train_images/{image}.png` for APTOS.",
    )


class DataConfig(Section):
    format: Literal[
        "imagefolder",
        "csv",
        "labelme",
        "reasonseg",
        "coco",
        "mask_folder",
        "conversations",
        "grounding",
    ] = Field(
        default="imagefolder",
        description="imagefolder/csv: classification; labelme (= reasonseg), coco, mask_folder: "
        "segmentation; conversations (LLaMA-Factory multimodal JSON/JSONL), grounding (image, "
        "instruction, bbox or point, type): ground.",
    )
    train: Path
    val: Path | None = None
    test: Path | None = None
    val_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="Held out from train when `val` is not given."
    )
    csv: CsvColumns = CsvColumns()
    classes: list[str] | None = Field(
        default=None,
        description="Class names in label order; default: sorted folder names, or the CSV's "
        "label values (numeric order when all are integers). Folder names and CSV labels are "
        "matched by name; a CSV label that is an integer i (APTOS grades 0-4) also means the "
        "i-th name here, so `[none, mild, moderate, severe, proliferative]` names grades 0-4.",
    )
    preprocess: Preprocess = Preprocess()
    augment: dict[Literal["train", "val", "test"], Augment] = Field(default_factory=dict)
    num_workers: int = Field(default=0, ge=0)
    max_bad_samples: int = Field(
        default=10,
        ge=0,
        description="Corrupt samples skipped (and named in the log) before "
        "the run stops with an error.",
    )


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


class SegmentTaskConfig(Section):
    type: Literal["segment"] = "segment"
    default_metric: ClassVar[str] = "giou"
    prompt: Literal["none", "box", "points", "text"] = Field(
        default="none", description="box/points are derived from the ground truth."
    )
    num_points: int = Field(default=1, ge=1)
    instances: Literal["merge", "per_instance"] = "merge"
    sam: SamOptions = SamOptions()
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
        description="Largest resized image area (28*28 pixels per image token): the main "
        "memory knob. Training, evaluation and prediction all use this value.",
    )
    coordinates: Literal["auto", "norm1000", "resized_pixels"] = Field(
        default="auto",
        description="Answer coordinates: norm1000 (Qwen2-VL, integers in [0, 1000)) or "
        "resized_pixels (Qwen2.5-VL, pixels of the resized image); auto follows the model.",
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
    ClassifyTaskConfig | SegmentTaskConfig | GroundTaskConfig, Field(discriminator="type")
]

_DURATION = re.compile(r"^\s*(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?\s*$")


def parse_duration(text: str) -> float:
    """`7h50m`, `90m`, `1d2h`, `45s` -> seconds."""
    match = _DURATION.match(text)
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r} (use e.g. 7h50m, 90m, 3600s)")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


class TrainConfig(Section):
    micro_batch_size: int = Field(default=16, ge=1)
    grad_accum_steps: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps.")
    epochs: float | None = Field(default=None, gt=0, description="May be fractional.")
    min_steps: int = Field(default=0, ge=0, description="No early stop before this step.")
    max_samples: int | None = Field(default=None, ge=1, description="Cap on train samples.")
    seed: int = 0
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    time_limit: str | None = Field(default=None, description="Wall clock, e.g. 7h50m.")
    log_every: int = Field(default=10, ge=1, description="Optimizer steps between log lines.")
    overfit_batches: int = Field(default=0, ge=0, description="Debug: train on N batches only.")
    group_by_length: bool = Field(
        default=False,
        description="Batch samples of similar length (tasks whose data has lengths, e.g. "
        "ground) to cut padding; the order stays a function of seed and epoch.",
    )
    detect_anomaly: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"

    @field_validator("time_limit")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @model_validator(mode="after")
    def _budget(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        return self


class OptimConfig(Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)


class ScheduleConfig(Section):
    type: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0, description="Optimizer steps.")
    warmup_ratio: float | None = Field(
        default=None, ge=0, lt=1, description="Fraction of total optimizer steps."
    )
    min_lr: float = Field(default=0.0, ge=0)


class CheckpointConfig(Section):
    every_steps: int | None = Field(default=None, ge=1)
    keep_last: int = Field(default=2, ge=1)
    keep_best: bool = True


class EvalConfig(Section):
    every_steps: int | None = Field(default=None, ge=1)
    split: Literal["val", "test"] = "val"
    metric: str = "accuracy"
    mode: Literal["max", "min"] = "max"
    patience: int | None = Field(
        default=None, ge=1, description="Evaluations without improvement before stopping."
    )
    min_delta: float = Field(default=0.0, ge=0)
    batch_size: int | None = Field(default=None, ge=1)


class TrackingConfig(Section):
    tensorboard: bool = False


_CRITERION = re.compile(r"^\s*(>=|<=|>|<|==)\s*(-?[0-9.]+(?:e-?\d+)?)\s*$")


def parse_criterion(text: str) -> tuple[str, float]:
    """`">=0.90"` -> (">=", 0.9)."""
    match = _CRITERION.match(str(text))
    if match is None:
        raise ValueError(f"not a criterion: {text!r} (use e.g. '>=0.90')")
    return match.group(1), float(match.group(2))


class Config(Section):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: Path = Path("runs")
    init_from: Path | None = Field(
        default=None, description="Load weights only (fresh optimizer) from a run or checkpoint."
    )
    model: ModelConfig
    lora: LoraConfig = LoraConfig()
    data: DataConfig
    task: TaskConfig = ClassifyTaskConfig()
    train: TrainConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Autocast dtype; `auto` picks bf16 where supported."
    )
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    acceptance: dict[str, str] = Field(
        default_factory=dict, description="metric -> criterion, e.g. accuracy: '>=0.90'"
    )
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_type_defaults_to_classify(cls, raw: Any) -> Any:
        """`task: {loss: ...}` without `type` means the default task, classify."""
        if isinstance(raw, dict) and isinstance(raw.get("task"), dict):
            raw = {**raw, "task": {"type": "classify", **raw["task"]}}
        return raw

    @field_validator("acceptance")
    @classmethod
    def _criteria(cls, value: dict[str, str]) -> dict[str, str]:
        for criterion in value.values():
            parse_criterion(criterion)
        return value

    @model_validator(mode="after")
    def _task_metric(self) -> Config:
        """Unless eval.metric is set, select on the task's own headline metric (segment: giou)."""
        default = getattr(self.task, "default_metric", None)
        if default is not None and "metric" not in self.eval.model_fields_set:
            self.eval.metric = default
        return self

    @model_validator(mode="after")
    def _task_lora_targets(self) -> Config:
        """Unless lora.targets is set, use the task's own default (ground: all-linear)."""
        default = getattr(self.task, "default_lora_targets", None)
        if default is not None and "targets" not in self.lora.model_fields_set:
            self.lora.targets = default
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name
