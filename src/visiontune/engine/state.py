"""What a checkpoint holds, and whether a run can resume from one.

Checkpoint contents are an explicit list: the trainable parameters plus the persistent
buffers of the modules that own them (the running statistics of a fully trained head). Never
"everything that is not a named parameter": a tied LM head is missing from
`named_parameters()` yet present in `state_dict()`, and would be written (the whole
vocabulary matrix) into every checkpoint.

Resume compatibility is a fingerprint of what must match, not a hand-kept key list: the
train samples (ids and labels) in the order the first epoch visits them, which covers the
data, the class list, the seed, the micro-batch size and every sampling option; and the names
and shapes of the checkpoint tensors, which cover the model and adapter structure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from visiontune.config.load import flat_settings
from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.order import DataOrder
from visiontune.errors import TrainingError, VisiontuneError
from visiontune.runs.rundir import LOGGER, RunDir

log = logging.getLogger(LOGGER)

WEIGHTS = "trainable.safetensors"
FINGERPRINT = "fingerprint.json"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    updates_applied: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    skipped_samples: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stop_reason: str | None = None
    world_size: int = 1
    last_eval: dict[str, float] = field(default_factory=dict)
    acceptance: dict[str, Any] = field(default_factory=dict)


# ---- checkpoint contents --------------------------------------------------------------------


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus the persistent buffers of modules with trainable parameters."""
    state = {
        name: param.detach().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    for module_name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                state[f"{module_name}.{name}"] = buffer.detach().contiguous()
    return state


def write_weights(
    model: nn.Module,
    directory: Path,
    base_model_id: str | None,
    model_card: bool,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """trainable.safetensors (exact, for resume and eval) and, for each PEFT part, the
    standard adapter files so `PeftModel.from_pretrained(base, directory)` works outside
    visiontune. PEFT's model card costs a third of a save: only `best/` and exports get it.

    `tensors`: the checkpoint tensors gathered whole from a sharded model (engine/fsdp.py),
    whose own parameters hold only this rank's shard."""
    full = checkpoint_tensors(model) if tensors is None else tensors
    save_file(full, str(directory / WEIGHTS))
    for name, module in model.named_modules():
        if not isinstance(module, PeftModel):
            continue
        target = directory if name in ("", "model") else directory / name
        target.mkdir(parents=True, exist_ok=True)
        prefix = f"{name}." if name else ""
        own = None if tensors is None else {
            k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)
        }  # fmt: skip
        if model_card:
            module.save_pretrained(str(target), state_dict=own)
        else:
            adapter_tensors = get_peft_model_state_dict(module, state_dict=own)
            save_file(adapter_tensors, str(target / "adapter_model.safetensors"), {"format": "pt"})
            module.peft_config["default"].save_pretrained(str(target))
        if base_model_id and name in ("", "model"):
            config_path = target / "adapter_config.json"
            config = json.loads(config_path.read_text())
            config["base_model_name_or_path"] = base_model_id
            config_path.write_text(json.dumps(config, indent=2))


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load trainable.safetensors, refusing silently partial loads."""
    path = directory / WEIGHTS
    if not path.is_file():
        raise VisiontuneError(f"{directory} holds no {WEIGHTS}: not a visiontune checkpoint")
    state = load_file(str(path))
    expected = checkpoint_tensors(model)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    reshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if unexpected or missing or reshaped:
        example = (unexpected or missing or reshaped)[:3]
        raise VisiontuneError(
            f"{path} does not match this model ({len(unexpected)} unexpected, {len(missing)} "
            f"missing, {len(reshaped)} differently shaped tensors, e.g. {example}): was it "
            "trained with another config?"
        )
    model.load_state_dict(state, strict=False)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """A checkpoint's manifest (its step and files), or None when it has none readable."""
    try:
        return json.loads((directory / ckpt.MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def copy_weights(source: Path, final: Path, meta: dict[str, Any]) -> None:
    """Weights, adapter files and config of a checkpoint, atomically, into `final` (best/)."""
    training_only = {ckpt.MANIFEST, FINGERPRINT, "train_state.json"}

    def fill(directory: Path) -> None:
        for path in source.rglob("*"):
            relative = path.relative_to(source)
            if path.is_file() and path.suffix != ".pt" and str(relative) not in training_only:
                (directory / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, directory / relative)

    ckpt.write_atomically(final, fill, meta)


def reconcile_best(run: RunDir, state: TrainState) -> None:
    """A `best/` saved after the checkpoint belongs to a trajectory the crash lost: keep it
    aside (never delete), and rebuild best/ from the kept checkpoint of the best step."""
    best = run.best
    if not best.is_dir():
        return
    manifest = read_manifest(best)
    best_step = manifest.get("step") if manifest else None
    if best_step is None or best_step <= state.step:
        return
    aside = best.with_name(f"best.lost-step-{best_step}")
    best.rename(aside)
    log.warning(
        "best/ came from step %d, after the checkpoint at step %d (a lost trajectory): moved "
        "it to %s",
        best_step, state.step, aside,
    )  # fmt: skip
    if state.best_step is None:
        return
    source = run.checkpoints / f"{ckpt.STEP_PREFIX}{state.best_step:08d}"
    if ckpt.is_complete(source):
        copy_weights(source, best, {"step": state.best_step})
        log.warning("best/ rebuilt from %s", source)


# ---- resume compatibility -------------------------------------------------------------------


def fingerprint(
    model: nn.Module, order: DataOrder, keys: list[str], classes: list[str] | None
) -> dict[str, Any]:
    """Hashes of the first epoch's train order (as sample keys, with the class list that gives
    the labels their meaning) and of the checkpoint's tensor layout."""
    batches = [classes, [[keys[i] for i in batch] for batch in order.global_batches(0)]]
    layout = sorted((n, list(t.shape)) for n, t in checkpoint_tensors(model).items())
    return {"data": _sha(batches), "samples": len(order.indices), "model": _sha(layout)}


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def check_resumable(directory: Path, now: dict[str, Any], before: Config, after: Config) -> None:
    """Refuse a resume whose data position or tensors would mean something else now."""
    saved_path = directory / FINGERPRINT
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    if saved is None:
        return
    changed = config_changes(before, after)
    if saved["data"] != now["data"]:
        keys = [changed[k] for k in sorted(changed) if k.startswith(("data.", "train."))]
        raise TrainingError(
            f"cannot resume {directory} exactly: the train samples or their order differ from "
            f"the checkpoint's ({saved['samples']} samples then, {now['samples']} now; changed: "
            f"{', '.join(keys) or 'the files on disk'}); the saved data position would point "
            "at other samples. Start a new run from these weights with init_from instead"
        )
    if saved["model"] != now["model"]:
        keys = [changed[k] for k in sorted(changed) if k.startswith(("model.", "lora.", "task."))]
        raise TrainingError(
            f"cannot resume {directory}: the model or adapter structure differs from the "
            f"checkpoint's (changed: {', '.join(keys) or 'the model files'})"
        )


def config_changes(before: Config, after: Config) -> dict[str, str]:
    """Dotted key -> "key (old -> new)" for every leaf setting that differs."""
    old, new = flat_settings(before), flat_settings(after)
    return {
        key: f"{key} ({old.get(key)!r} -> {new.get(key)!r})"
        for key in old.keys() | new.keys()
        if old.get(key) != new.get(key)
    }


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: Any, cfg: Config, changed: dict[str, str]
) -> None:
    """Write the config's lr, betas, eps and weight decay over what the checkpoint restored.

    `load_state_dict` brings back the saved param groups and the scheduler's base lrs, so a
    lowered `optim.lr` after a divergence would otherwise be ignored while the log said it
    changed. Weight decay stays 0 for the no-decay group (biases, norms).
    """
    optim = cfg.optim
    for group in optimizer.param_groups:
        decay = optim.weight_decay if group.get("decay", True) else 0.0
        group.update(betas=optim.betas, eps=optim.eps, initial_lr=optim.lr, weight_decay=decay)
    scheduler.base_lrs = [optim.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, _factors(scheduler), strict=True):
        group["lr"] = optim.lr * factor
    for key in sorted(changed):
        if key.startswith("optim."):
            log.warning("resuming with a changed setting, applied: %s", changed[key])
        elif key in ("train.max_steps", "train.epochs", "schedule.type") or key.startswith(
            "schedule."
        ):
            log.warning(
                "resuming with a changed setting, applied: %s (the schedule is reshaped from "
                "the current step on)",
                changed[key],
            )
        else:
            log.warning("resuming with a changed setting: %s", changed[key])


def _factors(scheduler: Any) -> list[float]:
    return [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
