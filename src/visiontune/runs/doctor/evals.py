"""Rules on the evaluations: train/val gap, early stopping inside the evaluation's noise, and
patience too short for that noise. The noise of a proportion metric (accuracy, per-class
sensitivity) on n samples is binomial: sd = sqrt(p (1 - p) / n)."""

from __future__ import annotations

import math

import numpy as np

from visiontune.runs.doctor.curves import finite_losses
from visiontune.runs.doctor.evidence import Evidence, Finding

OVERFIT_RISE = 0.10  # eval loss above its lowest value, relative


def eval_noise(evidence: Evidence, metric: str, value: float) -> tuple[float, int] | None:
    """(sd of the metric from sampling the eval split, n) for a proportion metric."""
    n = evidence.eval_samples(metric)
    if not n:
        return None
    p = min(max(value, 0.5 / n), 1 - 0.5 / n)  # never a zero sd at 0 or 1 hits
    return math.sqrt(p * (1 - p) / n), n


def train_val_gap(evidence: Evidence) -> list[Finding]:
    rule = "train/val gap"
    evals = [e for e in evidence.evals if isinstance(e.get("loss"), int | float)]
    steps, losses = finite_losses(evidence)
    if len(evals) < 3 or len(losses) == 0:
        return [Finding(rule, "not checked", f"needs 3 evaluations with a loss, has {len(evals)}")]
    best = min(evals, key=lambda e: e["loss"])
    last = evals[-1]

    def train_at(step: int) -> float:
        near = losses[
            max(0, int(np.searchsorted(steps, step)) - 5) : np.searchsorted(steps, step) + 1
        ]
        return float(np.mean(near))

    gap = last["loss"] - train_at(last["step"])
    text = (
        f"eval loss lowest {best['loss']:.4g} at step {best['step']}, last {last['loss']:.4g} at "
        f"step {last['step']}; train loss there {train_at(best['step']):.4g} -> "
        f"{train_at(last['step']):.4g}; gap now {gap:.4g}"
    )
    rising = last["loss"] > (1 + OVERFIT_RISE) * best["loss"]
    if rising and train_at(last["step"]) < train_at(best["step"]):
        return [Finding(
            rule, "warn",
            f"overfitting: eval loss rose {last['loss'] / best['loss'] - 1:+.0%} since step "
            f"{best['step']} while the train loss kept falling; best/ is from the best "
            "evaluation; more data or augmentation, fewer steps, or early stopping", text,
        )]  # fmt: skip
    return [Finding(rule, "ok", f"no overfitting (train/val loss gap {gap:.4g})", text)]


def early_stop_noise(evidence: Evidence) -> list[Finding]:
    rule = "early stopping"
    if evidence.summary.get("status") != "early_stopped":
        status = evidence.summary.get("status", "unknown")
        return [Finding(rule, "not checked", f"the run did not stop early (status {status})")]
    cfg = evidence.cfg
    best = evidence.summary.get("best") or {}
    if cfg is None or best.get("value") is None:
        return [Finding(rule, "not checked", "needs config.yaml and the best metric")]
    metric, value = cfg.eval.metric, float(best["value"])
    noise = eval_noise(evidence, metric, value)
    if noise is None:
        return [
            Finding(
                rule,
                "not checked",
                f"the noise of {metric} is known only for "
                "proportion metrics (accuracy, sensitivity.<class>) with the data",
            )
        ]
    sd, n = noise
    after = [e[metric] for e in evidence.evals if e["step"] > best["step"] and metric in e]
    if not after:
        return [Finding(rule, "not checked", "no evaluation after the best one")]
    worst = max(abs(v - value) for v in after)
    text = (
        f"best {metric} {value:.4f} at step {best['step']}; the {len(after)} evaluation(s) after "
        f"it differ by at most {worst:.4f}; eval noise +-{2 * sd:.4f} (2 sd, {n} samples)"
    )
    if worst < 2 * sd:
        return [Finding(
            rule, "warn",
            "early stopping fired on changes inside the evaluation noise: the run may still "
            f"have been improving; raise eval.patience, set eval.min_delta ~{2 * sd:.3f}, or "
            "evaluate on more samples", text,
        )]  # fmt: skip
    return [Finding(rule, "ok", "early stopping fired on a decline larger than the eval noise",
                    text)]  # fmt: skip


def patience_vs_noise(evidence: Evidence) -> list[Finding]:
    """At the observed improvement per evaluation, how many evaluations a real improvement
    needs to rise above the noise; a shorter patience stops runs that are still improving."""
    rule = "patience"
    cfg = evidence.cfg
    if cfg is None or cfg.eval.patience is None:
        return [Finding(rule, "not checked", "eval.patience is not set")]
    metric = cfg.eval.metric
    values = [e[metric] for e in evidence.evals if isinstance(e.get(metric), int | float)]
    if len(values) < 3:
        return [Finding(rule, "not checked", f"needs 3 evaluations of {metric}, has {len(values)}")]
    sign = 1 if cfg.eval.mode == "max" else -1
    best_index = int(np.argmax([sign * v for v in values]))
    noise = eval_noise(evidence, metric, values[best_index])
    if noise is None or best_index == 0:
        return [Finding(rule, "not checked", f"needs a proportion metric that improved ({metric})")]
    sd, n = noise
    rate = sign * (values[best_index] - values[0]) / best_index
    needed = math.ceil(2 * sd / rate)
    text = (
        f"{metric} improved {rate:.4f} per evaluation up to its best; eval noise +-{2 * sd:.4f} "
        f"(2 sd, {n} samples): a real improvement shows after ~{needed} evaluation(s)"
    )
    if cfg.eval.patience < needed:
        return [Finding(
            rule, "warn",
            f"eval.patience {cfg.eval.patience} is shorter than the {needed} evaluations the "
            f"noise needs: set eval.patience >= {needed} or evaluate on more samples", text,
        )]  # fmt: skip
    return [Finding(rule, "ok", f"eval.patience {cfg.eval.patience} >= {needed} evaluations",
                    text)]  # fmt: skip
