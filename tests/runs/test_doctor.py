"""Each doctor rule on a synthetic run that shows its problem, and silent on a clean one."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.runs.doctor_runs import (
    PEAK_LR,
    clean_steps,
    hand_lr,
    make_data,
    run_doctor,
    warnings,
    write_run,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Balanced train (3 x 20), val 3 x 4 = 12 images."""
    return make_data(tmp_path_factory.mktemp("doctor-data"), {"a": 20, "b": 20, "c": 20},
                     {"a": 4, "b": 4, "c": 4})  # fmt: skip


def finding(report: object, rule: str, level: str) -> str:
    found = [f for f in report.of(level) if f.rule == rule]  # type: ignore[attr-defined]
    assert found, (rule, level, report.text())  # type: ignore[attr-defined]
    return f"{found[0].title} | {found[0].evidence}"


def test_clean_synthetic_run_has_no_warnings(data: Path, tmp_path: Path) -> None:
    evals = [{"step": s, "loss": 2.0 - s / 200, "accuracy": 0.5 + s / 1000}
             for s in (50, 100, 150, 200)]  # fmt: skip
    report = run_doctor(write_run(tmp_path / "clean", data, clean_steps(200), evals))
    assert warnings(report) == []
    # sampling noise only: the variance ratio is 1 up to its chi-square spread (~0.2 here)
    text = finding(report, "loss noise", "ok")
    ratio = float(text.split("(")[1].split("x")[0])
    assert 0.6 < ratio < 1.5, text
    assert "warm-up works" in finding(report, "learning rate", "ok")


def test_loss_noisier_than_sampling(data: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    steps = clean_steps(200)
    for record in steps:  # a shared offset per window: weights jumping between steps
        shift = 0.3 * rng.standard_normal()
        record["micro_losses"] = [x + shift for x in record["micro_losses"]]
        record["loss"] = float(np.mean(record["micro_losses"]))
    report = run_doctor(write_run(tmp_path / "noisy", data, steps))
    # expected variance ratio: (0.3^2 + 0.05^2/4) / (0.05^2/4) = 145
    text = warnings(report, "loss noise")[0]
    assert "noisier than sampling explains" in text
    assert 80 < float(text.split("(")[1].split("x")[0]) < 250


def test_loss_noise_needs_accumulation_and_says_so(data: Path, tmp_path: Path) -> None:
    steps = clean_steps(100, accumulation=1)
    report = run_doctor(write_run(tmp_path / "ga1", data, steps,
                                  train={"grad_accum_steps": 1}))  # fmt: skip
    assert "grad_accum_steps >= 2" in finding(report, "loss noise", "not checked")


@pytest.mark.parametrize(
    ("logged", "first", "hint"),
    [
        # warm-up counted in micro-batches (10 steps x 4 micro-batches)
        (lambda s: PEAK_LR * min(1.0, s / 40), 1, "at step 40 instead of at step 10"),
        # a resume at step 60 that restarted the warm-up
        (lambda s: hand_lr(s if s < 60 else s - 59, 10), 60, "fell back at step 60"),
    ],
)
def test_lr_off_the_configured_schedule(
    data: Path, tmp_path: Path, logged: object, first: int, hint: str
) -> None:
    steps = clean_steps(100)
    for record in steps:
        record["lr"] = logged(record["step"])  # type: ignore[operator]
    text = warnings(run_doctor(write_run(tmp_path / "lr", data, steps)), "learning rate")[0]
    assert f"first at step {first}:" in text and hint in text, text


def test_lr_cosine_with_min_lr_by_hand(data: Path, tmp_path: Path) -> None:
    steps = clean_steps(50)
    for record in steps:  # 5 warm-up steps, then cosine from 1e-3 to 1e-4 at step 50
        s = record["step"]
        done = (s - 1 - 5) / 45
        record["lr"] = PEAK_LR * s / 5 if s <= 5 else 1e-4 + 0.9e-3 * (1 + math.cos(math.pi * done)) / 2
    run = write_run(tmp_path / "cos", data, steps,
                    schedule={"type": "cosine", "warmup_steps": 5, "min_lr": 1e-4})  # fmt: skip
    assert warnings(run_doctor(run), "learning rate") == []
    steps[30]["lr"] *= 1.01
    shutil.rmtree(run)
    run = write_run(tmp_path / "cos", data, steps,
                    schedule={"type": "cosine", "warmup_steps": 5, "min_lr": 1e-4})  # fmt: skip
    assert "1 of 50 steps, first at step 31" in warnings(run_doctor(run), "learning rate")[0]


def test_clipping_most_steps_and_a_spike_with_its_samples(data: Path, tmp_path: Path) -> None:
    steps = clean_steps(100)
    for record in steps:
        record["grad_norm"], record["clipped"] = 3.0, True
    steps[41]["grad_norm"] = 90.0
    report = run_doctor(write_run(tmp_path / "clip", data, steps))
    assert "100% of steps were clipped" in warnings(report, "clipping")[0]
    spike = warnings(report, "gradient spikes")[0]
    assert "step 42 norm 90" in spike
    # the window of step 42 holds grad_accum 4 x micro-batch 4 = 16 train images: 8 shown
    named = spike.split("samples [")[1].split("]")[0]
    assert named.count(".png") == 8 and "8 more" in named, spike


def test_divergence_and_non_finite_loss(data: Path, tmp_path: Path) -> None:
    steps = clean_steps(100)
    for record in steps[70:]:
        record["loss"] *= 3
    assert "diverging" in warnings(run_doctor(write_run(tmp_path / "d", data, steps)),
                                   "divergence")[0]  # fmt: skip
    steps = clean_steps(100)
    steps[50]["loss"] = None
    text = warnings(run_doctor(write_run(tmp_path / "nan", data, steps)), "divergence")[0]
    assert "not finite at step 51" in text


def test_plateau_at_a_high_lr(data: Path, tmp_path: Path) -> None:
    steps = clean_steps(200)
    for record in steps[80:]:
        record["micro_losses"] = [1.2 + x - np.mean(record["micro_losses"])
                                  for x in record["micro_losses"]]  # fmt: skip
        record["loss"] = float(np.mean(record["micro_losses"]))
    assert warnings(run_doctor(write_run(tmp_path / "p", data, steps)), "plateau")


def test_overfitting_from_the_train_val_gap(data: Path, tmp_path: Path) -> None:
    evals = [{"step": s, "loss": v} for s, v in ((50, 1.5), (100, 1.0), (150, 1.3), (200, 1.6))]
    text = warnings(run_doctor(write_run(tmp_path / "o", data, clean_steps(200), evals)),
                    "train/val gap")[0]  # fmt: skip
    assert "rose +60% since step 100" in text


@pytest.mark.parametrize(("after", "warns"), [([0.75, 0.7], True), ([0.25, 0.2], False)])
def test_early_stop_inside_eval_noise(
    data: Path, tmp_path: Path, after: list[float], warns: bool
) -> None:
    evals = [{"step": 50, "accuracy": 0.5}, {"step": 100, "accuracy": 0.75}]
    evals += [{"step": 100 + 50 * (i + 1), "accuracy": v} for i, v in enumerate(after)]
    summary = {"status": "early_stopped", "best": {"value": 0.75, "step": 100}}
    run = write_run(tmp_path / "es", data, clean_steps(200), evals, summary,
                    eval={"every_steps": 50, "patience": 2})  # fmt: skip
    report = run_doctor(run)
    # 12 val samples at 0.75: 2 sd = 2 sqrt(0.75 * 0.25 / 12) = 0.25
    assert ("+-0.2500" in finding(report, "early stopping", "warn" if warns else "ok")) is True


def test_patience_shorter_than_the_noise_allows(data: Path, tmp_path: Path) -> None:
    values = [0.40, 0.42, 0.44, 0.46]
    evals = [{"step": 50 * (i + 1), "accuracy": v} for i, v in enumerate(values)]
    # rate 0.02 per evaluation; 2 sd at 0.46 on 12 samples = 0.2877 -> 15 evaluations
    for patience, level in ((3, "warn"), (15, "ok")):
        run = write_run(tmp_path / f"pat{patience}", data, clean_steps(200), evals,
                        eval={"every_steps": 50, "patience": patience})  # fmt: skip
        assert "15 evaluation" in finding(run_doctor(run), "patience", level)


def test_class_imbalance_against_the_loss_weights(tmp_path: Path) -> None:
    skewed = make_data(tmp_path / "skewed", {"a": 40, "b": 4}, {"a": 2, "b": 2})
    report = run_doctor(write_run(tmp_path / "imb", skewed, clean_steps(50)))
    assert "10.0:1 imbalanced" in warnings(report, "class imbalance")[0]
    balanced = write_run(tmp_path / "bal", skewed, clean_steps(50),
                         task={"type": "classify", "loss": {"class_weights": "balanced"}})  # fmt: skip
    assert "10.0:1, 1.0:1 after the loss weights" in finding(run_doctor(balanced),
                                                             "class imbalance", "ok")  # fmt: skip


def test_validation_too_small_for_the_acceptance_criterion(data: Path, tmp_path: Path) -> None:
    run = write_run(tmp_path / "small", data, clean_steps(50), acceptance={"accuracy": ">=0.9"})
    text = warnings(run_doctor(run), "validation size")[0]
    # 1.96 sqrt(0.9 * 0.1 / 12) = 0.1697; +-0.02 needs 1.96^2 * 0.09 / 0.0004 = 865 samples
    assert "+-0.170" in text and "865 samples" in text
    big = make_data(tmp_path / "big", {"a": 5, "b": 5}, {"a": 70, "b": 70})
    run = write_run(tmp_path / "large", big, clean_steps(50), acceptance={"accuracy": ">=0.9"})
    assert "+-0.050 on 140 samples" in finding(run_doctor(run), "validation size", "ok")


def test_skipped_samples_named_from_the_log(data: Path, tmp_path: Path) -> None:
    log = "2026 WARNING skipped sample a_3.png: cannot decode image\n"
    run = write_run(tmp_path / "skip", data, clean_steps(50), summary={"skipped_samples": 1},
                    log=log)  # fmt: skip
    assert "a_3.png: cannot decode" in warnings(run_doctor(run), "skipped samples")[0]


def test_identical_images_across_train_and_val(tmp_path: Path) -> None:
    leaky = make_data(tmp_path / "leaky", {"a": 5, "b": 5}, {"a": 3, "b": 3})
    shutil.copy(leaky / "train/a/a_2.png", leaky / "val/b/copied.png")
    text = warnings(run_doctor(write_run(tmp_path / "dup", leaky, clean_steps(50))),
                    "train/val duplicates")[0]  # fmt: skip
    assert text.startswith("train/val duplicates: 1 val image") and "copied.png" in text


def test_config_smells(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub base's processor is never needed here
    data = tmp_path / "gone"  # settings are judged without the data
    run = write_run(
        tmp_path / "smelly", data, clean_steps(50),
        lora={"rank": 4, "alpha": 64, "dropout": 0.0, "targets": "all-linear"},
        model={"name_or_path": "google/vit-base-patch16-224", "config": None}, optim={"lr": 0.05},
        schedule={"type": "constant", "warmup_steps": 80},
    )  # fmt: skip
    report = run_doctor(run)
    assert "alpha/rank = 16" in warnings(report, "LoRA alpha/rank")[0]
    assert "optim.lr 0.05 is unusual" in warnings(report, "LoRA learning rate")[0]
    assert "warm-up is longer than the run" in warnings(report, "warm-up length")[0]
    run = write_run(tmp_path / "fine", data, clean_steps(50),
                    model={"name_or_path": "google/vit-base-patch16-224", "config": None})  # fmt: skip
    report = run_doctor(run)
    assert [f.rule for f in report.of("warn")] == []
    assert "optim.lr 0.001 is in the usual LoRA range" in finding(report, "LoRA learning rate", "ok")
