"""figures/doctor.png: each curve beside what the config and the sampling noise predict."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from visiontune.runs.doctor.curves import expected_lr, finite_losses
from visiontune.runs.doctor.evals import eval_noise
from visiontune.runs.doctor.evidence import Evidence, Report

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def plot_doctor(evidence: Evidence, report: Report) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _loss(axes[0][0], evidence)
    _lr(axes[0][1], evidence)
    _grad_norm(axes[1][0], evidence)
    _evals(axes[1][1], evidence)
    warned = report.of("warn")
    title = f"{evidence.run.root.name}: {len(warned)} warning(s)"
    if warned:
        title += " - " + "; ".join(f.rule for f in warned)
    fig.suptitle(title)
    fig.tight_layout()
    evidence.run.figures.mkdir(exist_ok=True)
    path = evidence.run.figures / "doctor.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _loss(ax: Axes, evidence: Evidence) -> None:
    steps, losses = finite_losses(evidence)
    ax.plot(steps, losses, lw=0.8, label="loss per step")
    noisy = [r for r in evidence.steps if len(r.get("micro_losses") or []) >= 2]
    if len(noisy) >= 5:
        x = np.array([r["step"] for r in noisy])
        sd = np.array([math.sqrt(np.var(r["micro_losses"], ddof=1) / len(r["micro_losses"]))
                       for r in noisy])  # fmt: skip
        width = max(3, len(noisy) // 20)
        centre = np.convolve([r["loss"] for r in noisy], np.ones(width) / width, mode="same")
        band = 2 * np.convolve(sd, np.ones(width) / width, mode="same")
        ax.fill_between(x, centre - band, centre + band, alpha=0.3, color="tab:green",
                        label="rolling mean +- 2 sd of sampling alone")  # fmt: skip
    ax.set(title="loss against sampling noise", xlabel="optimizer step")
    ax.legend(fontsize=8)


def _lr(ax: Axes, evidence: Evidence) -> None:
    x = [r["step"] for r in evidence.steps]
    ax.plot(x, [r.get("lr") for r in evidence.steps], lw=2, label="logged")
    expected = expected_lr(evidence)
    if expected is not None:
        ax.plot(x, expected, "k--", lw=1, label="schedule from the config")
    ax.set(title="learning rate", xlabel="optimizer step")
    ax.legend(fontsize=8)


def _grad_norm(ax: Axes, evidence: Evidence) -> None:
    records = [r for r in evidence.steps if isinstance(r.get("grad_norm"), int | float)]
    if not records:
        return
    ax.plot([r["step"] for r in records], [r["grad_norm"] for r in records], lw=0.8,
            label="pre-clip gradient norm")  # fmt: skip
    clipped = [r for r in records if r.get("clipped")]
    if clipped:
        ax.plot([r["step"] for r in clipped], [r["grad_norm"] for r in clipped], "r.",
                label=f"clipped ({len(clipped)} of {len(records)})")  # fmt: skip
    limit = evidence.cfg.train.max_grad_norm if evidence.cfg else None
    if limit:
        ax.axhline(limit, color="gray", ls="--", label="max_grad_norm")
    ax.set(title="gradient norm", xlabel="optimizer step", yscale="log")
    ax.legend(fontsize=8)


def _evals(ax: Axes, evidence: Evidence) -> None:
    metric = evidence.cfg.eval.metric if evidence.cfg else None
    points = [(e["step"], e[metric]) for e in evidence.evals
              if metric and isinstance(e.get(metric), int | float)]  # fmt: skip
    if not points:
        ax.set(title="evaluation (none logged)")
        return
    assert metric is not None
    x, y = zip(*points, strict=True)
    noise = [eval_noise(evidence, metric, v) for v in y]
    # a proportion's interval stops at 0 and 1
    errors = [
        [min(2 * n[0], v) if n else 0.0 for n, v in zip(noise, y, strict=True)],
        [min(2 * n[0], 1 - v) if n else 0.0 for n, v in zip(noise, y, strict=True)],
    ]
    ax.errorbar(x, y, yerr=errors, fmt="o-", capsize=3, label=f"{metric} +- 2 sd eval noise")
    best = evidence.summary.get("best") or {}
    if best.get("step") is not None:
        ax.axvline(best["step"], color="tab:green", ls=":", label="best")
    ax.set(title=f"evaluation ({evidence.summary.get('status', 'running')})",
           xlabel="optimizer step")  # fmt: skip
    ax.legend(fontsize=8)
