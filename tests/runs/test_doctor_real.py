"""The doctor on a real tiny training run (no false alarm), on runs it can only partly read,
and from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import tiny_config
from tests.runs.doctor_runs import clean_steps, make_data, write_run
from visiontune import api
from visiontune.cli import app
from visiontune.runs.doctor import diagnose
from visiontune.runs.rundir import read_jsonl


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-like run: tiny ViT + LoRA, accumulation 2, warm-up and cosine to min_lr."""
    root = tmp_path_factory.mktemp("doctor-real")
    data = make_data(root / "data", {"a": 20, "b": 20, "c": 20}, {"a": 10, "b": 10, "c": 10})
    cfg = tiny_config(
        data, root / "runs",
        train={"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 40, "seed": 0},
        optim={"lr": 0.003}, schedule={"type": "cosine", "warmup_steps": 5, "min_lr": 1e-4},
        eval={"every_steps": 10},
    )  # fmt: skip
    return api.train(cfg).run_dir


def test_real_clean_run_raises_no_false_alarm(real_run: Path) -> None:
    report = diagnose(real_run)
    assert report.of("warn") == [], report.text()
    assert {f.rule for f in report.of("ok")} >= {
        "loss noise", "learning rate", "clipping", "divergence", "train/val gap",
        "class imbalance", "skipped samples", "train/val duplicates", "warm-up length",
    }  # fmt: skip
    assert report.figure == real_run / "figures/doctor.png" and report.figure.stat().st_size


def test_micro_losses_average_to_the_logged_loss(real_run: Path) -> None:
    # 60 train images in micro-batches of 4: every micro-batch holds 4, so the window's loss
    # is the plain mean of its micro-batch means; an epoch of 15 micro-batches is 8 windows,
    # the 8th holding one
    for record in read_jsonl(real_run / "metrics.jsonl"):
        assert len(record["micro_losses"]) == (1 if record["step"] % 8 == 0 else 2)
        assert np.mean(record["micro_losses"]) == pytest.approx(record["loss"], rel=1e-5)


def test_run_with_no_metrics_yet(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", {"a": 3, "b": 3}, {"a": 2, "b": 2})
    run = write_run(tmp_path / "new", data, [])
    (run / "metrics.jsonl").unlink()
    (run / "summary.json").unlink()
    report = diagnose(run)
    text = report.text()
    assert "no metrics.jsonl yet: no optimizer step logged" in text
    assert "no summary.json" in text
    assert "loss noise" in {f.rule for f in report.of("not checked")}
    assert "LoRA alpha/rank" in {f.rule for f in report.of("ok")}  # what it could check
    assert report.figure is None


def test_half_written_last_line_is_named_and_the_rest_used(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", {"a": 3, "b": 3}, {"a": 2, "b": 2})
    run = write_run(tmp_path / "torn", data, clean_steps(60))
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 61, "loss": 0.9')
    report = diagnose(run, figure=False)
    assert any("metrics.jsonl:61: skipped a torn last line" in n for n in report.notes)
    assert "all 60 steps" in next(f.title for f in report.of("ok") if f.rule == "learning rate")


def test_damaged_middle_line_and_an_older_run(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", {"a": 3, "b": 3}, {"a": 2, "b": 2})
    steps = clean_steps(60)
    for record in steps:
        del record["micro_losses"]  # written before micro-batch losses were logged
    run = write_run(tmp_path / "old", data, steps)
    report = diagnose(run, figure=False)
    assert "older visiontune" in next(
        f.title for f in report.of("not checked") if f.rule == "loss noise"
    )
    config = (run / "config.yaml").read_text().replace("train:\n", "train:\n  fp16_opt_level: O1\n")
    (run / "config.yaml").write_text(config)
    lines = (run / "eval.jsonl").read_text()
    (run / "eval.jsonl").write_text('{"step": 5, "acc\n{"step": 10}\n' + lines)
    report = diagnose(run, figure=False)
    text = report.text()
    assert "does not load with this visiontune (an older run?)" in text
    assert "fp16_opt_level" in text and "eval.jsonl:1: not valid JSON" in text
    assert "learning rate" in {f.rule for f in report.of("not checked")}
    assert "divergence" in {f.rule for f in report.of("ok")}


def test_cli_prints_the_findings(real_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["doctor", str(real_run)])
    assert result.exit_code == 0, result.output
    assert "[ok  ] learning rate: logged lr matches the schedule at all 40 steps" in result.output
    assert "figure:" in result.output
    result = CliRunner().invoke(app, ["doctor", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "is not a directory" in result.output
    assert json.loads((real_run / "summary.json").read_text())["status"] == "completed"
