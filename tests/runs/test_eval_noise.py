"""Per-sample predictions of evaluations during training, their interval bands, and the
end-of-run verdict of the best evaluation against the first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.conftest import tiny_config
from visiontune import api
from visiontune.runs.eval_noise import best_against_first, save_eval_samples
from visiontune.runs.rundir import RunDir, read_jsonl


def test_training_saves_every_evaluations_samples_and_plots_their_bands(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        image_data,
        tmp_path,
        eval={"every_steps": 2, "metric": "accuracy"},
        tracking={"bootstrap_samples": 300},
    )
    result = api.train(cfg)
    evals = read_jsonl(result.run_dir / "eval.jsonl")
    assert [e["step"] for e in evals] == [2, 4, 6]
    for record in evals:
        saved = json.loads((result.run_dir / f"evals/step-{record['step']:08d}.json").read_text())
        probs = np.array(saved["samples"]["probs"])
        targets = np.array(saved["samples"]["targets"])
        assert len(targets) == 12  # the val split: 3 classes of 4
        assert (probs.argmax(axis=1) == targets).mean() == pytest.approx(record["accuracy"])
    assert (result.run_dir / "figures" / "training_curves.png").is_file()
    noise = result.summary.get("best_against_first")
    if result.state.best_step == 2:
        assert noise is None  # the first evaluation was the best: nothing to compare
    else:
        assert noise["resamples"] == 300
        assert noise["best_step"] == result.state.best_step
        assert noise["first_step"] == 2


def _write(run: RunDir, step: int, targets: np.ndarray, preds: np.ndarray) -> None:
    probs = np.eye(3)[preds]
    tables = {
        "classes": ["a", "b", "c"],
        "samples": {
            "ids": [f"s{i}" for i in range(len(targets))],
            "targets": targets.tolist(),
            "probs": probs.tolist(),
        },
    }
    save_eval_samples(run, step, tables)
    run.append_jsonl(run.evals, {"step": step, "accuracy": float((preds == targets).mean())})


@pytest.mark.parametrize(("best_correct", "changed"), [(0.9, True), (0.61, False)])
def test_the_best_against_the_first_matches_scipys_paired_bootstrap(
    tmp_path: Path, best_correct: float, changed: bool
) -> None:
    """60% -> 90% correct on 300 samples is a change; 60% -> 61% is not. The interval of the
    difference agrees with scipy's paired percentile bootstrap of the per-sample difference
    in correctness (scipy does not stratify by class, hence the tolerance)."""
    rng = np.random.default_rng(3)
    targets = np.repeat([0, 1, 2], 100)
    run = RunDir(tmp_path)
    correct = {}
    for step, rate in ((10, 0.6), (20, best_correct)):
        correct[step] = rng.random(300) < rate
        preds = np.where(correct[step], targets, (targets + 1) % 3)
        _write(run, step, targets, preds)
    noise = best_against_first(run, "accuracy", 20, resamples=4000)
    assert noise is not None
    difference = correct[20].astype(float) - correct[10].astype(float)
    assert noise["first"] == pytest.approx(correct[10].mean())
    assert noise["best"] == pytest.approx(correct[20].mean())
    assert noise["difference"] == pytest.approx(difference.mean())
    ours = noise["difference_ci95"]
    theirs = stats.bootstrap(
        (difference,), np.mean, n_resamples=4000, method="percentile", random_state=0
    ).confidence_interval
    assert ours[0] == pytest.approx(theirs.low, abs=0.015)
    assert ours[1] == pytest.approx(theirs.high, abs=0.015)
    assert noise["exceeds_noise"] is changed
    assert ("not a change" in noise["verdict"]) is not changed
