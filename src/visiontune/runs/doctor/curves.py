"""Rules on the per-step records: loss noise, learning rate, clipping, divergence, plateau."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from visiontune.runs.doctor.evidence import Evidence, Finding
from visiontune.runs.doctor.windows import window_samples

NOISE_RATIO = 2.5  # observed step-to-step variance over what sampling alone gives
LR_TOLERANCE = 1e-3  # relative; the logged lr is the optimizer's float, not a rounding
CLIPPED_MOST = 0.5
CLIP_SHRINK = 2.0  # median pre-clip norm over max_grad_norm: most updates cut to under half
SPIKE_FACTOR = 10.0  # pre-clip norm over the run's median
MIN_STEPS = 10


def finite_losses(evidence: Evidence) -> tuple[np.ndarray, np.ndarray]:
    steps = [r for r in evidence.steps if _finite(r.get("loss"))]
    return np.array([r["step"] for r in steps]), np.array([r["loss"] for r in steps], float)


def loss_noise(evidence: Evidence) -> list[Finding]:
    """Step-to-step spread of the loss against the spread sampling alone gives at this
    effective batch: micro-batches of one window share the weights, so their spread is pure
    sampling, and a window's mean of k of them varies by that variance / k."""
    rule = "loss noise"
    recent = evidence.steps[len(evidence.steps) // 2 :]  # past the first fast fall
    windows = [r for r in recent if len(r.get("micro_losses") or []) >= 2 and _finite(r["loss"])]
    if len(windows) < MIN_STEPS:
        why = (
            "metrics.jsonl has no micro_losses (a run of an older visiontune)"
            if recent and not any("micro_losses" in r for r in recent)
            else f"needs {MIN_STEPS} steps of >= 2 micro-batches in the last half of the run "
            f"(train.grad_accum_steps >= 2); this run has {len(windows)}"
        )
        return [Finding(rule, "not checked", f"sampling noise not estimated: {why}")]
    sampling = float(np.mean([np.var(r["micro_losses"], ddof=1) / len(r["micro_losses"])
                              for r in windows]))  # fmt: skip
    losses = np.array([r["loss"] for r in windows])
    consecutive = np.diff([r["step"] for r in windows]) == 1
    changes = np.diff(losses)[consecutive]
    observed = float(np.var(changes, ddof=1) / 2) if len(changes) > 2 else math.nan
    ratio = observed / sampling if sampling > 0 else math.inf
    trend = trend_per_100(np.array([r["step"] for r in windows]), losses)[0]
    evidence_text = (
        f"steps {windows[0]['step']}-{windows[-1]['step']}: step-to-step sd "
        f"{math.sqrt(observed):.4g}, sampling alone sd {math.sqrt(sampling):.4g} (from the "
        f"spread of {len(windows[0]['micro_losses'])} micro-batch losses per window)"
    )
    if ratio > NOISE_RATIO:
        return [Finding(
            rule, "warn",
            f"noisier than sampling explains ({ratio:.1f}x the variance): look at the "
            "learning rate, the clipping and spike findings, and the samples of the spikes",
            evidence_text,
        )]  # fmt: skip
    return [Finding(
        rule, "ok",
        f"sampling noise ({ratio:.2f}x the variance), trend {trend:+.1f}% per 100 steps",
        evidence_text,
    )]  # fmt: skip


def trend_per_100(steps: np.ndarray, losses: np.ndarray) -> tuple[float, float]:
    """Least-squares slope as % of the mean loss per 100 steps, and its standard error."""
    if len(steps) < 3 or np.ptp(steps) == 0:
        return 0.0, math.inf
    slope, intercept = np.polyfit(steps, losses, 1)
    residual = losses - (slope * steps + intercept)
    se = math.sqrt(np.sum(residual**2) / (len(steps) - 2) / np.sum((steps - steps.mean()) ** 2))
    scale = 100 * 100 / abs(float(np.mean(losses)) or 1.0)
    return float(slope) * scale, se * scale


def expected_lr(evidence: Evidence) -> list[float] | None:
    """The lr each logged step should have used, recomputed by hand from the config.

    Warm-up rises linearly over `warmup_steps` (or `warmup_ratio` of the run) optimizer
    steps from lr/warmup to lr, then the decay goes to `min_lr` at the last step. An update
    skipped for fp16 overflow does not advance the schedule.
    """
    cfg, total = evidence.cfg, evidence.total_steps
    if cfg is None or total is None:
        return None
    schedule, peak = cfg.schedule, cfg.optim.lr
    warmup = (
        math.ceil(schedule.warmup_ratio * total)
        if schedule.warmup_ratio is not None
        else schedule.warmup_steps
    )
    floor = min(schedule.min_lr, peak)
    expected, applied = [], 0
    for record in evidence.steps:
        if applied < warmup:
            lr = peak * (applied + 1) / warmup
        elif schedule.type == "constant":
            lr = peak
        else:
            done = min(1.0, (applied - warmup) / max(1, total - warmup))
            shape = 1 - done if schedule.type == "linear" else (1 + math.cos(math.pi * done)) / 2
            lr = floor + (peak - floor) * shape
        expected.append(lr)
        applied += record.get("update_applied", True) is not False
    return expected


def learning_rate(evidence: Evidence) -> list[Finding]:
    rule = "learning rate"
    logged = [r.get("lr") for r in evidence.steps]
    expected = expected_lr(evidence)
    if not evidence.steps or expected is None or not all(_finite(x) for x in logged):
        return [Finding(rule, "not checked", "needs config.yaml and the logged lr of every step")]
    cfg = evidence.cfg
    assert cfg is not None
    off = [
        (r["step"], got, want)
        for r, got, want in zip(evidence.steps, logged, expected, strict=True)
        if abs(got - want) > LR_TOLERANCE * max(want, 1e-12)
    ]
    schedule = cfg.schedule
    warmup_text = (
        f"warm-up {schedule.warmup_steps} optimizer steps"
        if schedule.warmup_ratio is None
        else f"warm-up {schedule.warmup_ratio:.0%} of {evidence.total_steps} steps"
    )
    asked = (
        f"config: {warmup_text} to peak {cfg.optim.lr:g}, then {schedule.type} to min_lr "
        f"{schedule.min_lr:g} at step {evidence.total_steps}"
    )
    if off:
        step, got, want = off[0]
        return [Finding(
            rule, "warn",
            f"the logged lr leaves the configured schedule at {len(off)} of {len(logged)} steps, "
            f"first at step {step}: {got:.4g} instead of {want:.4g}",
            f"{asked}; {_schedule_hint(evidence.steps, expected)}",
        )]  # fmt: skip
    peak_step = int(np.argmax(logged))
    return [Finding(
        rule, "ok",
        f"logged lr matches the schedule at all {len(logged)} steps (peak {max(logged):.4g} at "
        f"step {evidence.steps[peak_step]['step']}): warm-up works as configured",
        asked,
    )]  # fmt: skip


def _schedule_hint(steps: list[dict[str, Any]], expected: list[float]) -> str:
    """Name the usual culprits: a warm-up restarted by a resume, or counted in micro-batches."""
    logged = [r["lr"] for r in steps]
    for i in range(1, len(logged)):
        if logged[i] < 0.5 * logged[i - 1] and expected[i] > 0.9 * expected[i - 1]:
            step = steps[i]["step"]
            return f"the lr fell back at step {step}: a resume that restarted the schedule?"
    peak = max(expected)
    reached = [r["step"] for r, got in zip(steps, logged, strict=True) if got >= 0.99 * peak]
    due = next(r["step"] for r, want in zip(steps, expected, strict=True) if want >= 0.99 * peak)
    if not reached or reached[0] > due:
        when = f"at step {reached[0]}" if reached else "never"
        return (
            f"the logged lr reaches the peak {when} instead of at step {due}: warm-up counted "
            "in micro-batches or samples?"
        )
    return "compare the two lr curves in the figure"


def clipping(evidence: Evidence) -> list[Finding]:
    rule = "clipping"
    records = [r for r in evidence.steps if _finite(r.get("grad_norm"))]
    if len(records) < MIN_STEPS or any("clipped" not in r for r in records):
        return [Finding(rule, "not checked", f"needs {MIN_STEPS} steps with grad_norm and clipped")]
    norms = np.array([r["grad_norm"] for r in records])
    fraction = float(np.mean([bool(r["clipped"]) for r in records]))
    p10, p50, p90 = np.percentile(norms, [10, 50, 90])
    limit = evidence.cfg.train.max_grad_norm if evidence.cfg else None
    spread = f"pre-clip norm p10 {p10:.3g}, median {p50:.3g}, p90 {p90:.3g}, max {norms.max():.3g}"
    spread += f"; max_grad_norm {limit}" if limit else "; no clipping configured"
    findings = []
    if fraction > CLIPPED_MOST and limit and p50 > CLIP_SHRINK * limit:
        findings.append(Finding(
            rule, "warn",
            f"{fraction:.0%} of steps were clipped, the median to 1/{p50 / limit:.1f} of its "
            "size: clipping, not optim.lr, sets the update size; "
            "lower optim.lr or raise train.max_grad_norm", spread,
        ))  # fmt: skip
    else:
        findings.append(Finding(rule, "ok", f"{fraction:.0%} of steps clipped", spread))
    spikes = [r for r in records if r["grad_norm"] > SPIKE_FACTOR * p50]
    if spikes:
        shown = []
        for r in spikes[:3]:
            samples = window_samples(evidence, r["step"])
            where = f" samples {samples}" if samples else ""
            shown.append(f"step {r['step']} norm {r['grad_norm']:.3g} loss {r['loss']:.4g}{where}")
        findings.append(Finding(
            "gradient spikes", "warn",
            f"{len(spikes)} step(s) with a pre-clip norm over {SPIKE_FACTOR:g}x the median "
            f"{p50:.3g}: look at these windows' samples (labels, corrupt images)",
            "; ".join(shown),
        ))  # fmt: skip
    return findings


def divergence(evidence: Evidence) -> list[Finding]:
    rule = "divergence"
    nonfinite = [r["step"] for r in evidence.steps if not _finite(r.get("loss"))]
    if nonfinite:
        return [Finding(rule, "warn", f"the loss was not finite at step {nonfinite[0]}",
                        f"{len(nonfinite)} step(s) with NaN/inf loss")]  # fmt: skip
    steps, losses = finite_losses(evidence)
    if len(losses) < MIN_STEPS:
        return [Finding(rule, "not checked", f"needs {MIN_STEPS} logged steps, has {len(losses)}")]
    width = max(2, len(losses) // 10)
    means = np.convolve(losses, np.ones(width) / width, mode="valid")
    low, end = float(means.min()), float(means[-1])
    low_step = int(steps[int(means.argmin()) + width - 1])
    text = f"mean loss over {width} steps: lowest {low:.4g} (to step {low_step}), last {end:.4g}"
    if end > 1.5 * low:
        return [Finding(
            rule, "warn",
            f"the loss rose {end / low - 1:+.0%} from its low: the run is diverging; lower "
            "optim.lr, check warm-up and clipping", text,
        )]  # fmt: skip
    return [Finding(rule, "ok", f"no divergence (last {end / low - 1:+.0%} from the low)", text)]


def plateau(evidence: Evidence) -> list[Finding]:
    """A flat last half while the lr is still high: more steps of this will not help."""
    rule = "plateau"
    steps, losses = finite_losses(evidence)
    if len(losses) < 4 * MIN_STEPS:
        return [Finding(rule, "not checked", f"needs {4 * MIN_STEPS} steps, has {len(losses)}")]
    half = len(losses) // 2
    trend, se = trend_per_100(steps[half:], losses[half:])
    lrs = [r.get("lr") or 0.0 for r in evidence.steps]
    lr_share = float(np.mean(lrs[half:])) / max(max(lrs), 1e-30)
    text = (
        f"steps {steps[half]}-{steps[-1]}: trend {trend:+.2f}% +- {2 * se:.2f}% per 100 "
        f"steps (95%), mean lr {lr_share:.0%} of the peak"
    )
    if trend > -2 * se and lr_share > 0.3:
        return [Finding(
            rule, "warn",
            "the loss stopped falling in the last half while the lr is still high: raise "
            "the lr or the LoRA rank/targets, or stop earlier", text,
        )]  # fmt: skip
    return [Finding(rule, "ok", f"still falling or annealing ({trend:+.2f}% per 100 steps)", text)]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
