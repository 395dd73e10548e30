"""The single source of truth for every option.

Every section forbids unknown keys so that a typo (`optim.learning_rate`) is an error with a
suggestion rather than a silently ignored setting. Defaults are the choices we would make for
a user who has not thought about the option yet.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from visiontune.config.base import LoraConfig, ModelConfig, Section
from visiontune.config.tasks import (
    ClassifyTaskConfig,
    GroundTaskConfig,
    LossConfig,
    SegmentTaskConfig,
    TaskConfig,
    TranslateTaskConfig,
    names_sam3,
)

__all__ = [
    "ClassifyTaskConfig",
    "TranslateTaskConfig",
    "Config",
    "GroundTaskConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "SegmentTaskConfig",
    "TaskConfig",
]


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
        "paired",
    ] = Field(
        default="imagefolder",
        description="imagefolder/csv: classification; labelme (= reasonseg), coco, mask_folder: "
        "segmentation; conversations (LLaMA-Factory multimodal JSON/JSONL), grounding (image, "
        "instruction, bbox or point, type): ground; paired (source/target folders, same file "
        "names): translate.",
    )
    train: Path
    val: Path | None = None
    test: Path | None = None
    val_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="Held out from train when `val` is not given."
    )
    group_pattern: str | None = Field(
        default=None,
        description="Regex whose first group (or whole match) in a sample id names the "
        "patient, e.g. '^(\\d+)_' for EyePACS ids like 10_left: the val_fraction hold-out then "
        "keeps a patient's images (both eyes) on one side, so validation never sees a patient "
        "it trained on.",
    )

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from None
        return value

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
    augment_on: Literal["device", "workers"] = Field(
        default="device",
        description="Where train augmentation runs: device (after collate, one batched kornia "
        "call on the training device, on the cached uint8 pixels), workers (per sample, in the "
        "data workers). Both draw the same random parameters per (seed, epoch, sample).",
    )
    num_workers: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        default="auto",
        description="Processes that decode images while the model trains; auto: the cores "
        "this process may use minus one (at most 8), 0 where workers cannot start.",
    )
    pin_memory: bool = Field(
        default=True, description="On CUDA: page-locked batches, copied without blocking."
    )
    prefetch_factor: int = Field(default=2, ge=1, description="Batches queued per worker.")
    persistent_workers: bool = Field(
        default=True, description="Keep the workers (and their caches) from epoch to epoch."
    )
    cache: Literal["disk", "memory", "none"] = Field(
        default="none",
        description="Keep each decoded, resized image (uint8, before augmentation) so later "
        "epochs skip decoding: disk (data.cache_dir, shared by runs), memory (RAM for this "
        "run, shared by its workers), none.",
    )
    cache_dir: Path | None = Field(
        default=None, description="Where data.cache: disk writes; default ~/.cache/visiontune."
    )
    max_bad_samples: int = Field(
        default=10,
        ge=0,
        description="Corrupt samples skipped (and named in the log) before "
        "the run stops with an error.",
    )


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
    global_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Held fixed when the world size changes: grad_accum_steps is derived as "
        "global_batch_size / (micro_batch_size x world size). Unset: grad_accum_steps is held "
        "fixed and the global batch grows with the world size.",
    )
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
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="Under torchrun/--nproc: ddp replicates the model on every rank; fsdp "
        "shards every transformer block over the ranks (FSDP2), for a frozen base that does "
        "not fit one GPU.",
    )
    plan: bool = Field(
        default=False,
        description="Measure a few real steps in a separate process before training (as "
        "`visiontune plan` does), write plan.json, and record predicted against measured "
        "peak memory and step time in summary.json.",
    )

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

    @model_validator(mode="before")
    @classmethod
    def _accumulation(cls, data: Any) -> Any:
        """With a global batch, the accumulation of one process; engine/distributed.py
        divides it by the world size of a torchrun launch."""
        if not isinstance(data, dict) or not isinstance(data.get("global_batch_size"), int):
            return data
        total = data["global_batch_size"]
        micro = data.get("micro_batch_size", cls.model_fields["micro_batch_size"].default)
        if isinstance(micro, int) and micro > 0 and total > 0:
            if total % micro:
                raise ValueError(
                    f"train.global_batch_size {total} is not divisible by "
                    f"train.micro_batch_size {micro}"
                )
            data = {**data, "grad_accum_steps": total // micro}
        return data


class OptimConfig(Section):
    name: Literal["adamw", "adamw_8bit"] = Field(
        default="adamw",
        description="adamw_8bit: bitsandbytes' AdamW with 8-bit moments (`visiontune[quant]`).",
    )
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
    every_steps: int | None = Field(
        default=500,
        ge=1,
        description="Optimizer steps between checkpoints (null: only at the end and on a stop "
        "signal, so a crash loses the whole run).",
    )
    keep_last: int = Field(default=2, ge=1)
    keep_best: bool = True
    remote_dir: str | None = Field(
        default=None,
        description="fsspec URL (gs://bucket/runs, s3://..., file://...) the run directory is "
        "mirrored to, as <remote_dir>/<name>/; --resume pulls the newest complete checkpoint "
        "from it (gs:// needs visiontune[gcs], s3:// visiontune[s3]).",
    )

    @field_validator("remote_dir")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(
                f"checkpoint.remote_dir {value!r} is not a URL: use e.g. gs://bucket/runs, "
                "s3://bucket/runs or file:///shared/runs"
            )
        return value


class EvalConfig(Section):
    every_steps: int | None = Field(default=None, ge=1)
    split: Literal["val", "test"] = "val"
    metric: str = "accuracy"
    mode: Literal["max", "min"] = Field(
        default="max", description="Inferred as min for loss and distance metrics unless set."
    )
    patience: int | None = Field(
        default=None, ge=1, description="Evaluations without improvement before stopping."
    )
    min_delta: float = Field(default=0.0, ge=0)
    batch_size: int | None = Field(default=None, ge=1)


class MlflowConfig(Section):
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow store, e.g. sqlite:///mlflow.db; default: a SQLite file "
        "mlflow.db in output_dir (artifacts beside it in mlartifacts/).",
    )
    experiment: str = "visiontune"


class WandbConfig(Section):
    project: str = "visiontune"
    mode: Literal["offline", "online"] = Field(
        default="offline",
        description="offline writes the run under the run directory's wandb/ "
        "(upload later with `wandb sync`).",
    )


class TrackingConfig(Section):
    tensorboard: bool = False
    mlflow: MlflowConfig | None = Field(
        default=None, description="Mirror params, metrics and artifacts to MLflow."
    )
    wandb: WandbConfig | None = Field(
        default=None, description="Mirror params and metrics to Weights & Biases."
    )
    bootstrap_samples: int = Field(
        default=2000,
        ge=100,
        description="Resamples of the bootstrap 95% intervals around evaluation metrics.",
    )
    cost_per_gpu_hour: float = Field(
        default=0.0, ge=0, description="Price of one device-hour; runs record their cost."
    )
    budget: float | None = Field(
        default=None,
        gt=0,
        description="Total spend allowed over the runs root (output_dir): a run that would "
        "exceed it stops at a step boundary with a checkpoint (status stopped-by-budget).",
    )


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
        default="auto",
        description="Autocast dtype; `auto` picks bf16 where the GPU supports it, else the "
        "dtype of a half-precision base (model.dtype), else fp32.",
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
        if isinstance(self.task, SegmentTaskConfig) and names_sam3(self.model):
            default = "map_50"
        if default is not None and "metric" not in self.eval.model_fields_set:
            self.eval.metric = default
        return self

    @model_validator(mode="after")
    def _eval_mode(self) -> Config:
        """Lower is better for a loss or a distance: select on min unless the user said."""
        if "mode" not in self.eval.model_fields_set:
            lower_is_better = self.eval.metric.split(".")[-1].startswith(("loss", "distance"))
            self.eval.mode = "min" if lower_is_better else "max"
        return self

    @model_validator(mode="after")
    def _precision_fits_base(self) -> Config:
        """An fp32 LoRA and head meet half-precision activations of the base only under
        autocast: without it the first matmul fails on mixed dtypes."""
        if self.precision == "fp32" and self.model.dtype != "fp32":
            raise ValueError(
                f"precision: fp32 cannot run a model.dtype: {self.model.dtype} base (the fp32 "
                f"adapters would meet {self.model.dtype} activations); use precision: auto or "
                f"{self.model.dtype}, or model.dtype: fp32"
            )
        return self

    @model_validator(mode="after")
    def _patience_needs_evaluations(self) -> Config:
        if self.eval.patience is not None and self.eval.every_steps is None:
            raise ValueError(
                "eval.patience counts periodic evaluations: set eval.every_steps as well"
            )
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
