"""Per-sample predictions of every evaluation during training, and what they say about noise.

Each evaluation that returns per-sample predictions (classification does) leaves
`evals/step-XXXXXXXX.json` in the run directory, so every point of the eval curve has a
bootstrap 95% interval without running `visiontune eval`, and the end of the run can say
whether the best evaluation differs from the first by more than the validation set's noise.
The first and the best evaluation scored the same samples, so their difference is a paired
bootstrap (the same resamples for both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.runs.bootstrap import (
    Interval,
    Samples,
    confusions,
    intervals,
    metrics_from_confusions,
    paired_difference,
    verdict,
)
from visiontune.runs.rundir import RunDir, read_jsonl

EVALS_DIR = "evals"


def samples_path(run: RunDir, step: int) -> Path:
    return run.root / EVALS_DIR / f"step-{step:08d}.json"


def save_eval_samples(run: RunDir, step: int, tables: dict[str, Any]) -> Path | None:
    """Write the evaluation's per-sample table (atomically); None when the task has none."""
    if "samples" not in tables or "classes" not in tables:
        return None
    path = samples_path(run, step)
    path.parent.mkdir(exist_ok=True)
    run.write_json(path, {"step": step, "classes": tables["classes"], "samples": tables["samples"]})
    return path


def load_eval_samples(run: RunDir) -> dict[int, Samples]:
    """Per-sample predictions by step, for the evaluations eval.jsonl still lists (a resumed
    run drops the records after its checkpoint; their files are stale until overwritten)."""
    steps = {record["step"] for record in read_jsonl(run.evals)}
    found: dict[int, Samples] = {}
    for step in sorted(steps):
        path = samples_path(run, step)
        if path.is_file():
            saved = json.loads(path.read_text())
            found[step] = Samples.from_table(saved["samples"], saved["classes"])
    return found


def eval_intervals(run: RunDir, resamples: int) -> dict[int, dict[str, Interval]]:
    """Bootstrap 95% interval of every confusion-matrix metric at every evaluation."""
    return {step: intervals(s, resamples) for step, s in load_eval_samples(run).items()}


def best_against_first(
    run: RunDir, metric: str, best_step: int | None, resamples: int
) -> dict[str, Any] | None:
    """Whether the best evaluation's `metric` differs from the first's beyond the noise.

    None when there are no two evaluations with samples, or the metric is not one the
    bootstrap covers (it is a function of the confusion matrix, not e.g. AUC or loss).
    """
    saved = load_eval_samples(run)
    if best_step not in saved or len(saved) < 2:
        return None
    first_step = min(saved)
    if first_step == best_step:
        return None
    first, best = saved[first_step], saved[best_step]
    differences = paired_difference(first, best, resamples)
    if metric not in differences:
        return None
    before, after = point(first, metric), point(best, metric)
    difference = differences[metric]
    return {
        "metric": metric,
        "first_step": first_step,
        "best_step": best_step,
        "first": before,
        "best": after,
        "difference": difference.value,
        "difference_ci95": [difference.low, difference.high],
        "exceeds_noise": difference.low > 0 or difference.high < 0,
        "resamples": resamples,
        "verdict": verdict(metric, before, after, difference),
    }


def point(samples: Samples, metric: str) -> float:
    """The metric on all the samples, no resampling."""
    whole = confusions(samples, np.arange(len(samples.targets))[None])
    return float(metrics_from_confusions(whole, samples.classes)[metric][0])
