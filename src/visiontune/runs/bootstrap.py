"""How much of a metric is noise: bootstrap 95% intervals from per-sample predictions.

A validation set of a few hundred images moves accuracy by a point or two between two draws
of the same model; a "decline" from 79.5% to 79.4% is no decline. Every classification metric
here is a function of the confusion matrix, so one resample is one `bincount`, and B resamples
are vectorised. A metric that is a plain proportion (accuracy, a sensitivity) also gets the
Wilson score interval, and the wider of the two is reported: a bootstrap of 4 hits out of 4
cannot vary and would claim certainty. Resampling is stratified by true class: a class's sensitivity is then always
defined (its support stays fixed), and the interval is that of the model's behaviour on these
class sizes. Two runs scored on the same samples are compared *paired* (the same resamples for
both), which removes the noise both share: which images happen to be hard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Samples:
    """Per-sample predictions of one evaluation: ids, true and predicted class indices."""

    ids: list[str]
    targets: np.ndarray
    preds: np.ndarray
    classes: list[str]

    @classmethod
    def from_table(cls, table: dict[str, Any], classes: list[str]) -> Samples:
        probs = np.asarray(table["probs"], dtype=np.float64)
        targets = np.asarray(table["targets"], dtype=np.int64)
        return cls(list(map(str, table["ids"])), targets, probs.argmax(axis=1), list(classes))

    def aligned_to(self, other: Samples) -> Samples:
        """These predictions in `other`'s sample order (a paired comparison needs one order)."""
        if sorted(self.ids) != sorted(other.ids):
            raise ValueError("the two evaluations scored different samples: no paired comparison")
        where = {sample: i for i, sample in enumerate(self.ids)}
        order = np.array([where[sample] for sample in other.ids])
        return Samples(other.ids, self.targets[order], self.preds[order], self.classes)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


def resample_indices(targets: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(B, N) indices, each row drawn with replacement within every true class."""
    rng = np.random.default_rng(seed)
    columns = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        columns.append(members[rng.integers(0, len(members), size=(resamples, len(members)))])
    return np.concatenate(columns, axis=1)


def confusions(samples: Samples, indices: np.ndarray) -> np.ndarray:
    """(B, K, K) confusion matrices (rows true, columns predicted), one per resample."""
    k = len(samples.classes)
    codes = samples.targets[indices] * k + samples.preds[indices]
    codes = codes + (np.arange(len(indices)) * k * k)[:, None]
    return np.bincount(codes.ravel(), minlength=len(indices) * k * k).reshape(-1, k, k)


def metrics_from_confusions(matrices: np.ndarray, classes: list[str]) -> dict[str, np.ndarray]:
    """Every metric of `metrics.classification` that the confusion matrix determines, per
    matrix: accuracy, balanced accuracy, quadratic kappa, per-class sensitivity/specificity.
    A metric undefined on these samples (a class with no sample) is left out, as there."""
    c = matrices.astype(np.float64)
    total = c.sum(axis=(1, 2))
    rows, cols = c.sum(axis=2), c.sum(axis=1)
    diag = np.diagonal(c, axis1=1, axis2=2)
    present = rows[0] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = diag / rows
        spec = (total[:, None] - rows - cols + diag) / (total[:, None] - rows)
        k = len(classes)
        weights = (np.subtract.outer(np.arange(k), np.arange(k)) ** 2) / max((k - 1) ** 2, 1)
        expected = rows[:, :, None] * cols[:, None, :] / total[:, None, None]
        kappa = 1 - (weights * c).sum(axis=(1, 2)) / (weights * expected).sum(axis=(1, 2))
    out = {"accuracy": diag.sum(axis=1) / total, "balanced_accuracy": sens[:, present].mean(axis=1)}
    if np.isfinite(kappa).all():
        out["quadratic_kappa"] = kappa
    for i, name in enumerate(classes):
        if present[i]:
            out[f"sensitivity.{name}"] = sens[:, i]
        if (total - rows[:, i] > 0).all():
            out[f"specificity.{name}"] = spec[:, i]
    return out


def intervals(
    samples: Samples, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> dict[str, Interval]:
    """Point estimate and percentile 95% interval of every confusion-matrix metric."""
    point = metrics_from_confusions(
        confusions(samples, np.arange(len(samples.targets))[None]), samples.classes
    )
    draws = metrics_from_confusions(
        confusions(samples, resample_indices(samples.targets, resamples, seed)), samples.classes
    )
    found = {
        name: Interval(float(point[name][0]), *_percentiles(draws[name]))
        for name in point
        if name in draws
    }
    whole = confusions(samples, np.arange(len(samples.targets))[None])[0]
    for name, (hits, total) in proportions(whole, samples.classes).items():
        if name in found:
            low, high = wilson(hits, total)
            ci = found[name]
            found[name] = Interval(ci.value, min(ci.low, low), max(ci.high, high))
    return found


def proportions(matrix: np.ndarray, classes: list[str]) -> dict[str, tuple[int, int]]:
    """(successes, trials) of each metric that is a plain proportion."""
    total, rows, cols = int(matrix.sum()), matrix.sum(axis=1), matrix.sum(axis=0)
    out = {"accuracy": (int(np.trace(matrix)), total)}
    for i, name in enumerate(classes):
        out[f"sensitivity.{name}"] = (int(matrix[i, i]), int(rows[i]))
        negatives = total - int(rows[i])
        out[f"specificity.{name}"] = (negatives - int(cols[i] - matrix[i, i]), negatives)
    return out


def wilson(hits: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion.

    A percentile bootstrap of 4 correct out of 4 is [1, 1]: every resample is perfect. The
    Wilson interval is [0.51, 1], which is what 4 samples can prove; `intervals` reports the
    wider of the two for every metric that is a proportion.
    """
    if trials == 0:
        return 0.0, 1.0
    p = hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def paired_difference(
    before: Samples,
    after: Samples,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Interval]:
    """`after - before` per metric with the 95% interval of the difference, both runs scored
    on the same resampled samples."""
    after = after.aligned_to(before)
    whole = np.arange(len(before.targets))[None]
    indices = resample_indices(before.targets, resamples, seed)
    points = [metrics_from_confusions(confusions(s, whole), s.classes) for s in (before, after)]
    draws = [metrics_from_confusions(confusions(s, indices), s.classes) for s in (before, after)]
    common = set(points[0]) & set(points[1]) & set(draws[0]) & set(draws[1])
    return {
        name: Interval(
            float(points[1][name][0] - points[0][name][0]),
            *_percentiles(draws[1][name] - draws[0][name]),
        )
        for name in sorted(common)
    }


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values[np.isfinite(values)], [2.5, 97.5])
    return float(low), float(high)


def verdict(name: str, before: float, after: float, difference: Interval) -> str:
    """`accuracy 79.5% -> 79.4%: -0.1 points, 95% CI of the difference [-1.9, +1.7]: not a
    change`; a change only when the interval of the difference excludes zero."""
    changed = difference.low > 0 or difference.high < 0
    return (
        f"{name} {100 * before:.1f}% -> {100 * after:.1f}%: {100 * difference.value:+.1f} points, "
        f"95% CI of the difference [{100 * difference.low:+.1f}, {100 * difference.high:+.1f}]: "
        + ("a change" if changed else "not a change")
    )
