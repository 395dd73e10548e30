"""YAML file + dotted overrides -> a validated Config, with every problem reported at once."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from visiontune.config.schema import Config
from visiontune.errors import ConfigError

ALIASES = {
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "r": "rank",
    "lora_r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "warmup": "warmup_steps",
}
"""Names users bring from Hugging Face Trainer and PEFT, too far from ours for difflib."""


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read `path`, apply `key.sub=value` overrides, validate; raise ConfigError listing all."""
    path = Path(path)
    raw = read_yaml(path)
    problems: list[str] = []
    for item in overrides or []:
        problem = apply_override(raw, item)
        if problem:
            problems.append(problem)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        problems.extend(describe_errors(err))
        raise ConfigError(problems, source=str(path)) from None
    if problems:
        raise ConfigError(problems, source=str(path))
    return cfg


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], source=str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], source=str(path)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of sections"], source=str(path))
    return raw


def apply_override(raw: dict[str, Any], item: str) -> str | None:
    """Set `a.b.c=value` in the raw mapping; the value is parsed as YAML (`1e-4`, `[1, 2]`)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        return f"override {item!r} is not of the form key.sub=value"
    keys = key.strip().split(".")
    node = raw
    for part in keys[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return f"override {item!r}: {part} is not a section"
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(text)
    except yaml.YAMLError:
        node[keys[-1]] = text
    return None


def describe_errors(err: ValidationError) -> list[str]:
    """One line per pydantic error, with the dotted path and a did-you-mean for typos."""
    lines = []
    for e in err.errors():
        loc, known = _resolve([str(p) for p in e["loc"]])
        dotted = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            alias = ALIASES.get(loc[-1])
            close = [alias] if alias in known else []
            close = close or difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
            hint = f"; did you mean `{'.'.join([*loc[:-1], close[0]])}`?" if close else ""
            lines.append(f"{dotted}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"{dotted}: required")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{dotted}: {msg} (got {e.get('input')!r})")
    return lines


def _resolve(raw: list[str]) -> tuple[list[str], list[str]]:
    """The user's dotted path (pydantic's union tags such as `segment` removed) and the
    option names of the section that holds its last key, walking the schema alongside."""
    model: type[BaseModel] | None = Config
    shown: list[str] = []
    known: list[str] = []
    i = 0
    while i < len(raw):
        part = raw[i]
        shown.append(part)
        known = list(model.model_fields) if model else []
        field = model.model_fields.get(part) if model else None
        members = _models_in(field.annotation) if field else []
        i += 1
        if field is not None and get_origin(field.annotation) is dict and i < len(raw):
            shown.append(raw[i])  # a user-chosen key, e.g. data.augment.train
            i += 1
        by_tag = {m.model_fields["type"].default: m for m in members if "type" in m.model_fields}
        if len(members) > 1 and i < len(raw) and raw[i] in by_tag:
            model = by_tag[raw[i]]
            i += 1
        else:
            model = members[0] if members else None
    return shown, known


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The section classes an annotation can hold (through Optional, unions, dict values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def config_hash(cfg: Config) -> str:
    """Hash of the resolved config, stored in checkpoints to notice a changed config on resume."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flat_settings(cfg: Config) -> dict[str, Any]:
    """Every option as a dotted key (lists kept whole): how runs and checkpoints compare."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(cfg.model_dump(mode="json"), "")
    return flat


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
