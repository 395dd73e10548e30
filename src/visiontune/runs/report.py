"""The end of a run: summary.json and the training curves as a picture."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from visiontune.config.schema import Config
from visiontune.runs.bootstrap import DEFAULT_RESAMPLES
from visiontune.runs.eval_noise import best_against_first, eval_intervals
from visiontune.runs.rundir import LOGGER, RunDir, read_jsonl

if TYPE_CHECKING:
    from visiontune.engine.loop import TrainState

log = logging.getLogger(LOGGER)


def write_summary(
    run: RunDir, cfg: Config, state: TrainState, model: nn.Module | None, wall_time_s: float
) -> dict[str, Any]:
    """The end of the story; `model` is None when the run stopped or failed before it had one."""
    params = list(model.parameters()) if model is not None else []
    steps = read_jsonl(run.metrics)
    speeds = [r["samples_per_s"] for r in steps[1:]] or [r["samples_per_s"] for r in steps]
    verdicts = state.acceptance
    summary = {
        "run_dir": str(run.root.resolve()),
        "status": state.stop_reason,
        "steps": state.step,
        "updates_applied": state.updates_applied,
        "epochs": steps[-1]["epoch"] if steps else 0.0,
        "samples_seen": state.samples_seen,
        "skipped_samples": state.skipped_samples,
        "best": {"metric": cfg.eval.metric, "value": state.best_metric, "step": state.best_step},
        "last_eval": state.last_eval,
        "acceptance": verdicts,
        "accepted": all(v["passed"] for v in verdicts.values()) if verdicts else None,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "mean_samples_per_s": sum(speeds) / len(speeds) if speeds else None,
        "peak_memory_mb": max((r["peak_memory_mb"] for r in steps), default=None),
        "wall_time_s": round(wall_time_s, 2),
        "state": asdict(state),
    }
    resamples = cfg.tracking.bootstrap_samples
    noise = best_against_first(run, cfg.eval.metric, state.best_step, resamples)
    if noise is not None:
        summary["best_against_first"] = noise
    if (run.root / "plan.json").is_file():
        summary["plan"] = plan_against_run(run.root / "plan.json", steps, cfg)
    run.write_json(run.summary, summary)
    for name, verdict in verdicts.items():
        mark = "PASS" if verdict["passed"] else "FAIL"
        criterion, value = verdict["criterion"], verdict["value"]
        log.info("acceptance %s: %s %s (value %s)", mark, name, criterion, value)
    if noise is not None:
        log.info(
            "best evaluation (step %d) against the first (step %d): %s",
            noise["best_step"], noise["first_step"], noise["verdict"],
        )  # fmt: skip
    return summary


def plan_against_run(plan_file: Path, steps: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """train.plan's prediction next to what the run measured: peak memory (the highest per-step
    peak) and step time (the median after the first step, as the plan measures it), with the
    threads and loader settings of both sides: a step time is comparable only where they agree."""
    from visiontune.engine.plan.probe import run_settings, steady_step_s

    plan = json.loads(plan_file.read_text())
    measured_peak = max((r["peak_memory_mb"] for r in steps), default=None)
    measured_step = steady_step_s([r["step_time_s"] for r in steps])
    predicted_peak, predicted_step = plan["predicted_peak_memory_mb"], plan["predicted_step_time_s"]
    return {
        "predicted_peak_memory_mb": predicted_peak,
        "measured_peak_memory_mb": measured_peak,
        "peak_memory_ratio": ratio(measured_peak, predicted_peak),
        "predicted_step_time_s": predicted_step,
        "measured_step_time_s": measured_step,
        "step_time_ratio": ratio(measured_step, predicted_step),
        "plan_error": plan["measurement"].get("error"),
        "plan_settings": plan.get("settings", {}),
        "run_settings": run_settings(cfg),
    }


def ratio(measured: float | None, predicted: float) -> float | None:
    """None where either side is missing: a plan that failed to measure predicts nothing."""
    return measured / predicted if measured and predicted else None


def plot_training(
    run: RunDir, max_grad_norm: float | None, resamples: int = DEFAULT_RESAMPLES
) -> Path | None:
    """Loss (raw and smoothed), learning rate, gradient norm and eval metrics over steps,
    each eval metric with its bootstrap 95% interval band where per-sample predictions were
    saved."""
    steps = read_jsonl(run.metrics)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = read_jsonl(run.evals)
    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot(x, [r["loss"] for r in steps], alpha=0.3, label="loss per step")
    ax.plot(x, smooth([r["loss"] for r in steps]), label="smoothed (EMA)")
    eval_losses = [(e["step"], e["loss"]) for e in evals if "loss" in e]
    if eval_losses:
        ax.plot(*zip(*eval_losses, strict=True), "ko-", label="eval loss")
    plot_loss_terms(ax, x, steps)
    ax.set(title="loss", xlabel="optimizer step")
    many = len(ax.get_lines()) > 5  # loss terms: two columns keep the curves visible
    ax.legend(fontsize=6 if many else 7, ncol=2 if many else 1, framealpha=0.6)
    axes[0][1].plot(x, [r["lr"] for r in steps])
    axes[0][1].set(title="learning rate", xlabel="optimizer step")
    ax = axes[1][0]
    ax.plot(x, [r["grad_norm"] for r in steps], label="pre-clip gradient norm")
    clipped = [r["step"] for r in steps if r["clipped"]]
    if clipped:
        rate = len(clipped) / len(steps)
        values = [r["grad_norm"] for r in steps if r["clipped"]]
        ax.plot(clipped, values, "r.", label=f"clipped ({rate:.0%} of steps)")
    if max_grad_norm is not None:
        ax.axhline(max_grad_norm, color="gray", linestyle="--", label="clip threshold")
    ax.set(title="gradient norm", xlabel="optimizer step", yscale="log")
    ax.legend()
    ax = axes[1][1]
    if evals:
        bands = eval_intervals(run, resamples)
        for key in [k for k in evals[-1] if k not in {"step", "loss"} and "." not in k][:5]:
            (line,) = ax.plot(
                [e["step"] for e in evals], [e.get(key) for e in evals], "o-", label=key
            )
            band = [(s, b[key]) for s, b in bands.items() if key in b]
            if band:
                ax.fill_between(
                    [s for s, _ in band],
                    [i.low for _, i in band],
                    [i.high for _, i in band],
                    color=line.get_color(),
                    alpha=0.15,
                )
        ax.legend(title="shaded: bootstrap 95% interval" if bands else None)
    ax.set(title="evaluation", xlabel="optimizer step")
    fig.tight_layout()
    run.figures.mkdir(exist_ok=True)
    path = run.figures / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_terms(ax: Any, x: list[int], steps: list[dict[str, Any]]) -> None:
    """Each named loss term (`loss.<term>` in metrics.jsonl), smoothed: weighted (dashed, what
    it adds to the total) and raw (dotted, same colour) where the task logs both."""
    terms = [k for k in steps[-1] if k.startswith("loss.") and not k.endswith(".weighted")]
    for key in terms:
        weighted = f"{key}.weighted"
        name = key.removeprefix("loss.")
        if weighted in steps[-1]:
            (line,) = ax.plot(x, smooth([r.get(weighted, 0.0) for r in steps]), "--",
                              label=f"{name} (weighted)")  # fmt: skip
            ax.plot(x, smooth([r.get(key, 0.0) for r in steps]), ":", color=line.get_color(),
                    label=f"{name} (raw)")  # fmt: skip
        else:
            ax.plot(x, smooth([r.get(key, 0.0) for r in steps]), "--", label=name)
    if any(k.endswith(".weighted") for k in steps[-1]):
        ax.set_yscale("log")


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out
