"""Synthetic run directories for the doctor's tests: curves with a known noise, a known
schedule and known evaluations, written in the run layout, beside a real tiny image folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import make_imagefolder, tiny_config
from visiontune.config.load import dump_yaml
from visiontune.runs.doctor import Report, diagnose

PEAK_LR = 1e-3
SAMPLING_SD = 0.05  # sd of one micro-batch's mean loss


def make_data(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    make_imagefolder(root / "train", train, seed=0)
    make_imagefolder(root / "val", val, seed=1)
    return root


def hand_lr(step: int, warmup: int) -> float:
    """Constant schedule with linear warm-up: step 1 of W gets peak/W, step W the peak."""
    return PEAK_LR * min(1.0, step / warmup) if warmup else PEAK_LR


def clean_steps(
    n: int, accumulation: int = 4, warmup: int = 10, seed: int = 0
) -> list[dict[str, Any]]:
    """A falling loss whose step-to-step noise is exactly the sampling noise."""
    rng = np.random.default_rng(seed)
    steps = []
    for step in range(1, n + 1):
        mean = 0.5 + 2.0 * math.exp(-step / 100)
        micro = (mean + SAMPLING_SD * rng.standard_normal(accumulation)).tolist()
        steps.append({
            "step": step, "epoch": round(step / 5, 4), "loss": float(np.mean(micro)),
            "micro_losses": micro, "lr": hand_lr(step, warmup), "grad_norm": 0.5,
            "clipped": False, "update_applied": True,
        })  # fmt: skip
    return steps


def write_run(
    root: Path,
    data: Path,
    steps: list[dict[str, Any]],
    evals: list[dict[str, Any]] | None = None,
    summary: dict[str, Any] | None = None,
    log: str = "",
    **sections: Any,
) -> Path:
    """A run directory as training leaves it; `sections` override the tiny config's."""
    defaults: dict[str, Any] = {
        "train": {"micro_batch_size": 4, "grad_accum_steps": 4, "max_steps": len(steps) or 100},
        "optim": {"lr": PEAK_LR},
        "schedule": {"type": "constant", "warmup_steps": 10},
    }
    for key, value in sections.items():
        defaults[key] = {**defaults.get(key, {}), **value} if isinstance(value, dict) else value
    cfg = tiny_config(data, root.parent, name=root.name, **defaults)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(dump_yaml(cfg))
    (root / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (root / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals or []))
    state = {"status": "completed", "skipped_samples": 0, "best": {}, **(summary or {})}
    (root / "summary.json").write_text(json.dumps(state))
    (root / "train.log").write_text(log or "INFO training\n")
    return root


def warnings(report: Report, rule: str | None = None) -> list[str]:
    return [f"{f.rule}: {f.title} | {f.evidence}" for f in report.of("warn")
            if rule is None or f.rule == rule]  # fmt: skip


def run_doctor(path: Path) -> Report:
    return diagnose(path, figure=False)
