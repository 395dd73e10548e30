"""Bootstrap intervals checked against independent computations: scipy's bootstrap, the exact
binomial law of a stratified sensitivity, and sklearn-free confusion-matrix arithmetic."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from visiontune.metrics.classification import classification_metrics
from visiontune.runs.bootstrap import (
    Interval,
    Samples,
    intervals,
    paired_difference,
    resample_indices,
    verdict,
)

CLASSES = ["none", "mild", "severe"]


def _samples(seed: int, n: int = 300, skill: float = 0.7) -> Samples:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    preds = np.where(rng.random(n) < skill, targets, rng.integers(0, 3, n))
    return Samples([f"s{i}" for i in range(n)], targets, preds, CLASSES)


def test_point_estimates_equal_torchmetrics_on_the_same_predictions() -> None:
    samples = _samples(0)
    probs = torch.nn.functional.one_hot(torch.as_tensor(samples.preds), 3).float()
    reference = classification_metrics(probs, torch.as_tensor(samples.targets), CLASSES).scalars
    ours = intervals(samples, resamples=50)
    assert set(ours) == set(reference) - {"macro_f1"}
    for name, interval in ours.items():
        assert abs(interval.value - reference[name]) < 1e-6, name
        assert interval.low <= interval.value <= interval.high


def test_accuracy_interval_matches_scipy_bootstrap_within_monte_carlo_error() -> None:
    """Unstratified by scipy vs stratified by us: stratification only removes the class-size
    part of the variance, which with three balanced-ish classes is small; both are percentile
    intervals of the same mean, so they agree to about a point."""
    samples = _samples(1)
    correct = (samples.preds == samples.targets).astype(float)
    scipy_ci = stats.bootstrap(
        (correct,), np.mean, n_resamples=4000, method="percentile", random_state=0
    ).confidence_interval
    ours = intervals(samples, resamples=4000)["accuracy"]
    assert abs(ours.low - scipy_ci.low) < 0.015 and abs(ours.high - scipy_ci.high) < 0.015
    assert 0.05 < ours.high - ours.low < 0.15  # n=300, p~0.8: 4 sigma ~ 0.09


def test_stratified_sensitivity_follows_the_binomial_law_exactly() -> None:
    """With the class's support fixed at n, a resampled sensitivity is Binomial(n, p)/n."""
    samples = _samples(2)
    severe = samples.targets == 2
    n, p = int(severe.sum()), float((samples.preds[severe] == 2).mean())
    low, high = stats.binom.ppf([0.025, 0.975], n, p) / n
    ours = intervals(samples, resamples=20000, seed=3)["sensitivity.severe"]
    assert abs(ours.low - low) <= 1.5 / n and abs(ours.high - high) <= 1.5 / n


def test_a_perfect_score_on_four_samples_is_not_certain() -> None:
    """4 of 4 severe cases found: the bootstrap cannot vary; Wilson's interval (by hand:
    centre (1 + z^2/8) / (1 + z^2/4), half-width z sqrt(z^2/64) / (1 + z^2/4)) is [0.510, 1]."""
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])
    ours = intervals(Samples([str(i) for i in range(12)], targets, preds, CLASSES))
    z = 1.959964
    low = ((1 + z * z / 8) - z * np.sqrt(z * z / 64)) / (1 + z * z / 4)
    assert ours["sensitivity.severe"].value == 1.0
    assert abs(ours["sensitivity.severe"].low - low) < 1e-9 and abs(low - 0.5101) < 1e-3
    assert ours["sensitivity.severe"].high == 1.0
    reference = stats.binomtest(11, 12).proportion_ci(method="wilson")
    assert ours["accuracy"].low <= reference.low + 1e-9


def test_resampling_keeps_every_class_size() -> None:
    samples = _samples(4)
    rows = resample_indices(samples.targets, 10, seed=0)
    for row in rows:
        assert np.array_equal(
            np.bincount(samples.targets[row], minlength=3),
            np.bincount(samples.targets, minlength=3),
        )


def test_paired_difference_matches_scipy_paired_bootstrap() -> None:
    before = _samples(5, skill=0.7)
    rng = np.random.default_rng(6)
    flip = rng.random(len(before.targets)) < 0.05  # the second run changes 5% of answers
    after = Samples(
        before.ids, before.targets, np.where(flip, before.targets, before.preds), CLASSES
    )
    correct_b = (before.preds == before.targets).astype(float)
    correct_a = (after.preds == after.targets).astype(float)
    scipy_ci = stats.bootstrap(
        (correct_a, correct_b),
        lambda a, b: np.mean(a) - np.mean(b),
        paired=True,
        n_resamples=4000,
        method="percentile",
        random_state=0,
    ).confidence_interval
    ours = paired_difference(before, after, resamples=4000)["accuracy"]
    assert abs(ours.value - (correct_a.mean() - correct_b.mean())) < 1e-12
    assert abs(ours.low - scipy_ci.low) < 0.01 and abs(ours.high - scipy_ci.high) < 0.01
    # paired is far tighter than the two separate intervals would suggest
    separate = intervals(before)["accuracy"]
    assert ours.high - ours.low < 0.5 * (separate.high - separate.low)


def test_the_paired_comparison_aligns_samples_by_id() -> None:
    before = _samples(7)
    order = np.random.default_rng(8).permutation(len(before.ids))
    shuffled = Samples(
        [before.ids[i] for i in order], before.targets[order], before.preds[order], CLASSES
    )
    same = paired_difference(before, shuffled, resamples=200)
    assert all(v.value == 0 and v.low == 0 and v.high == 0 for v in same.values())


def test_the_verdict_calls_noise_noise() -> None:
    text = verdict("accuracy", 0.795, 0.794, Interval(-0.001, -0.019, 0.017))
    assert text == (
        "accuracy 79.5% -> 79.4%: -0.1 points, 95% CI of the difference [-1.9, +1.7]: not a change"
    )
    assert verdict("accuracy", 0.70, 0.80, Interval(0.1, 0.04, 0.16)).endswith(": a change")
