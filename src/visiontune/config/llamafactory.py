"""A visiontune config from a LLaMA-Factory training YAML (and its `dataset_info.json`).

Users arrive with a working LLaMA-Factory setup for a Qwen-VL model; this maps what has a
visiontune equivalent onto the ground task and names every key it did not map, with the
reason, so nothing is dropped silently. Keys whose value equals what visiontune does anyway are
reported too ("no equivalent needed"), because a user checking the list should find each of
their keys in one of the two places.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from visiontune.config.schema import Config
from visiontune.errors import ConfigError

# LLaMA-Factory's templates for the Qwen-VL families the ground task serves.
TEMPLATES = ("qwen2_vl", "qwen3_vl", "qwen3_vl_nothink")
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant"}

# Keys with nothing to carry over, and why (checked after the mapped keys).
NOT_NEEDED = {
    "do_train": "visiontune train always trains",
    "stage": "sft is what the ground task does",
    "overwrite_cache": "visiontune keeps no tokenised dataset cache",
    "preprocessing_num_workers": "conversations are rendered once in-process",
    "plot_loss": "every run logs its loss per step to metrics.jsonl",
    "overwrite_output_dir": "visiontune never overwrites a run: pass `train --overwrite`",
    "save_only_model": "checkpoints always hold the full state needed for exact resume",
    "resume_from_checkpoint": "resume with `visiontune train CONFIG --resume`",
    "report_to": "tracking is configured in visiontune's `tracking` section",
    "video_max_pixels": "the ground task reads screenshots, not videos",
    "video_min_pixels": "the ground task reads screenshots, not videos",
    "dataset_dir": "used to find dataset_info.json; paths are written resolved",
}


@dataclass
class Imported:
    """The visiontune config (as a dict, validated) and the keys that were not mapped."""

    config: dict[str, Any]
    unmapped: dict[str, str] = field(default_factory=dict)

    def to_yaml(self, source: Path) -> str:
        """The config as YAML, headed by the list of unmapped keys and their reasons."""
        lines = [f"# Imported from the LLaMA-Factory config {source}"]
        if self.unmapped:
            lines.append("# Not mapped:")
            lines += [f"#   {key}: {reason}" for key, reason in self.unmapped.items()]
        return "\n".join(lines) + "\n" + yaml.safe_dump(self.config, sort_keys=False)


def import_llamafactory(path: Path, dataset_info: Path | None = None) -> Imported:
    """Map LLaMA-Factory YAML `path` onto a ground-task config; raise ConfigError naming the
    template or dataset that cannot be used."""
    raw = _read_yaml(path)
    info_path = dataset_info or Path(str(raw.get("dataset_dir", "data"))) / "dataset_info.json"
    mapper = _Mapper(raw, path)
    mapper.model()
    mapper.method()
    mapper.data(_read_info(info_path, dataset_info is not None), info_path.parent)
    mapper.training()
    mapper.finish()
    if mapper.problems:
        raise ConfigError(mapper.problems, source=str(path))
    try:
        Config.model_validate(mapper.out)
    except ValidationError as err:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError(problems, source=f"{path} (imported)") from None
    return Imported(mapper.out, mapper.unmapped)


class _Mapper:
    """Consumes keys of the LLaMA-Factory config section by section into `out`."""

    def __init__(self, raw: dict[str, Any], path: Path) -> None:
        self.raw, self.path = raw, path
        self.left = dict(raw)
        self.problems: list[str] = []
        self.unmapped: dict[str, str] = {}
        self.out: dict[str, Any] = {
            "name": "run",
            "model": {},
            "lora": {},
            "data": {"format": "conversations"},
            "task": {"type": "ground"},
            "train": {},
            "optim": {"weight_decay": 0.0},
            "schedule": {},
            "eval": {"metric": "loss"},
            "checkpoint": {},
        }

    def take(self, key: str, default: Any = None) -> Any:
        return self.left.pop(key, default)

    def put(self, section: str, key: str, value: Any) -> None:
        if value is not None:
            self.out[section][key] = value

    def model(self) -> None:
        name = self.take("model_name_or_path")
        if name is None:
            self.problems.append("model_name_or_path: missing")
        self.put("model", "name_or_path", name)
        self.put("model", "trust_remote_code", self.take("trust_remote_code"))
        template = self.take("template")
        if template not in TEMPLATES:
            self.problems.append(
                f"template: {template!r} is not a Qwen-VL template the ground task serves; "
                f"known: {', '.join(TEMPLATES)}"
            )
        self.put("task", "max_pixels", self.take("image_max_pixels"))
        self.put("task", "min_pixels", self.take("image_min_pixels"))
        self.put("task", "max_length", self.take("cutoff_len"))
        self.put("task", "freeze_vision", self.take("freeze_vision_tower"))
        frozen_projector = self.take("freeze_multi_modal_projector")
        if frozen_projector is not None:
            self.put("task", "train_projector", not frozen_projector)
        bits = self.take("quantization_bit")
        if bits is not None:
            quant: dict[str, Any] = {"bits": int(bits)}
            if int(bits) == 4:
                quant["type"] = self.take("quantization_type", "nf4")
                quant["double_quant"] = bool(self.take("double_quantization", True))
            self.put("model", "quantization", quant)
        # LLaMA-Factory checkpoints by default; `disable_gradient_checkpointing` turns it off
        self.put("model", "gradient_checkpointing", not self.take("disable_gradient_checkpointing"))

    def method(self) -> None:
        stage = self.left.get("stage", "sft")
        if stage != "sft":
            self.problems.append(f"stage: {stage!r}; the ground task does supervised fine-tuning")
        kind = self.take("finetuning_type", "lora")
        if kind not in ("lora", "full"):
            self.problems.append(f"finetuning_type: {kind!r}; visiontune maps lora and full")
        self.put("lora", "enabled", kind == "lora")
        rank = self.take("lora_rank", 8)
        self.put("lora", "rank", rank)
        # LLaMA-Factory's default alpha is twice the rank
        self.put("lora", "alpha", self.take("lora_alpha") or 2 * rank)
        self.put("lora", "dropout", self.take("lora_dropout"))
        target = self.take("lora_target", "all")
        if target == "all":
            self.put("lora", "targets", "all-linear")
        else:
            self.put("lora", "targets", [t.strip() for t in str(target).split(",")])

    def data(self, info: dict[str, Any], root: Path) -> None:
        train = self._datasets("dataset", info, root)
        if train:
            self.put("data", "train", train)
        elif not any(p.startswith("dataset") for p in self.problems):
            self.problems.append("dataset: no dataset with images to train the ground task on")
        val = self._datasets("eval_dataset", info, root)
        if val:
            self.put("data", "val", val)
        self.put("data", "val_fraction", self.take("val_size"))
        self.put("data", "num_workers", self.take("dataloader_num_workers"))
        self.put("train", "max_samples", self.take("max_samples"))

    def _datasets(self, key: str, info: dict[str, Any], root: Path) -> str | None:
        """The first image dataset named in `key`; the others are reported as unmapped."""
        names = [n.strip() for n in str(self.take(key) or "").split(",") if n.strip()]
        chosen = None
        for name in names:
            entry = info.get(name)
            if entry is None:
                self.problems.append(
                    f"{key}: {name!r} is not in dataset_info.json ({len(info)} datasets listed)"
                )
                continue
            problem = _entry_problem(entry)
            if problem:
                self.unmapped[f"{key}: {name}"] = problem
            elif chosen is not None:
                self.unmapped[f"{key}: {name}"] = "visiontune trains on one file per split"
            else:
                chosen = str(root / entry["file_name"])
        return chosen

    def training(self) -> None:
        self.put("train", "micro_batch_size", self.take("per_device_train_batch_size"))
        self.put("train", "grad_accum_steps", self.take("gradient_accumulation_steps"))
        self.put("train", "epochs", self.take("num_train_epochs"))
        self.put("train", "max_steps", self.take("max_steps"))
        if "epochs" not in self.out["train"] and "max_steps" not in self.out["train"]:
            self.put("train", "epochs", 3.0)  # LLaMA-Factory's default
        self.put("train", "log_every", self.take("logging_steps"))
        self.put("train", "seed", self.take("seed"))
        self.put("train", "max_grad_norm", self.take("max_grad_norm"))
        self.put("optim", "lr", self.take("learning_rate"))
        self.put("optim", "weight_decay", self.take("weight_decay"))
        scheduler = self.take("lr_scheduler_type", "linear")
        if scheduler in SCHEDULES:
            self.put("schedule", "type", SCHEDULES[scheduler])
        else:
            self.unmapped["lr_scheduler_type"] = (
                f"{scheduler!r} has no visiontune equivalent (cosine, linear, constant); "
                "visiontune's default cosine is used"
            )
        self.put("schedule", "warmup_ratio", self.take("warmup_ratio"))
        self.put("schedule", "warmup_steps", self.take("warmup_steps"))
        for flag in ("bf16", "fp16"):
            if self.take(flag):
                self.out["precision"] = flag
                self.put("model", "dtype", flag)
        self.put("checkpoint", "every_steps", self.take("save_steps"))
        self.put("checkpoint", "keep_last", self.take("save_total_limit"))
        self.put("eval", "every_steps", self.take("eval_steps"))
        self.put("eval", "batch_size", self.take("per_device_eval_batch_size"))
        self.take("eval_strategy")
        output = self.take("output_dir")
        if output:
            out_path = Path(str(output))
            self.out["name"] = out_path.name
            self.out["output_dir"] = str(out_path.parent)

    def finish(self) -> None:
        """Every key left over goes to `unmapped`, with the reason when we know it."""
        for key, value in self.left.items():
            self.unmapped[key] = NOT_NEEDED.get(key, f"no visiontune equivalent (value {value!r})")
        self.out = {k: v for k, v in self.out.items() if v != {}}


def _entry_problem(entry: dict[str, Any]) -> str | None:
    """Why a dataset_info.json entry cannot feed the ground task; None when it can."""
    if "file_name" not in entry:
        return "a hub dataset (no local file_name); download it and list the file"
    if entry.get("formatting", "alpaca") != "sharegpt":
        return "alpaca-formatted text data: the ground task reads sharegpt conversations"
    columns = entry.get("columns", {})
    if columns.get("images") != "images":
        return "no `images` column: the ground task trains on screenshots"
    if columns.get("messages", "conversations") not in ("messages", "conversations"):
        return f"messages column {columns['messages']!r}: visiontune reads `messages`"
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError([f"{path}: {err.strerror}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML ({err})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of LLaMA-Factory keys"])
    return raw


def _read_info(path: Path, given: bool) -> dict[str, Any]:
    if not path.is_file():
        hint = "" if given else " (pass --dataset-info data/dataset_info.json)"
        raise ConfigError([f"dataset_info: {path} not found{hint}"])
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError([f"{path}:{err.lineno}: not valid JSON ({err.msg})"]) from None
    if not isinstance(info, dict):
        raise ConfigError([f"{path}: expected a mapping of dataset names"])
    return info
