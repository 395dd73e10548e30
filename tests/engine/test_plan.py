"""`visiontune plan` and `train.plan`: measured predictions against a real run, exact memory
parts, the time arithmetic, and bad input."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.conftest import TINY_VIT as TINY_VIT_CFG
from tests.conftest import tiny_config
from visiontune import api
from visiontune.cli import app
from visiontune.engine.loader import resolve_num_workers
from visiontune.engine.loop import Loop
from visiontune.engine.plan import parse_size
from visiontune.engine.plan.forecast import TimeBudget, TrainForecast, counts
from visiontune.engine.plan.probe import MB, parameter_parts
from visiontune.engine.plan.search import compare
from visiontune.engine.runner import Runner
from visiontune.engine.stop import StopRequest
from visiontune.runs.rundir import LOGGER, RunDir

WIDER_VIT = {
    "model_type": "vit",
    "image_size": 32,
    "patch_size": 4,
    "hidden_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 192,
}


def write_config(image_data: Path, tmp_path: Path, **sections) -> Path:
    cfg = tiny_config(image_data, tmp_path / "runs", **sections)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_train_plan_predicts_the_real_runs_peak_memory_and_step_time(
    image_data: Path, tmp_path: Path
) -> None:
    """The issue's memory target: peak within +-15% of the real run, which trains in its own
    fresh process as `visiontune train` does. The step-time target (+-20%) is a timing, so it
    is printed by bench/plan_accuracy.py, not asserted here; what a step time depends on
    besides the model is: the probe and the run used the same threads and loader settings, and
    summary.json compares them with the same statistic (the median after the first step)."""
    path = write_config(
        image_data,
        tmp_path,
        model={"config": WIDER_VIT},
        data={
            "preprocess": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
            "num_workers": "auto",  # the default: the probe pays its worker's start-up too
        },
        train={"micro_batch_size": 16, "max_steps": 16, "seed": 0, "log_every": 4},
    )
    done = subprocess.run(
        [sys.executable, "-m", "visiontune.cli", "train", str(path), "train.plan=true"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run = tmp_path / "runs/tiny"
    plan = json.loads((run / "plan.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured_peak = max(r["peak_memory_mb"] for r in steps)
    measured_step = statistics.median(sorted(r["step_time_s"] for r in steps[1:]))
    predicted_peak = plan["predicted_peak_memory_mb"]
    predicted_step = plan["predicted_step_time_s"]
    assert abs(measured_peak / predicted_peak - 1) <= 0.15, (measured_peak, predicted_peak)
    summary = json.loads((run / "summary.json").read_text())["plan"]
    assert summary["predicted_peak_memory_mb"] == predicted_peak
    assert summary["measured_peak_memory_mb"] == measured_peak
    assert summary["step_time_ratio"] == pytest.approx(measured_step / predicted_step, rel=1e-9)
    assert summary["plan_settings"] == summary["run_settings"] == plan["settings"]
    assert plan["settings"]["torch_threads"] == torch.get_num_threads()  # a fresh process's
    assert plan["settings"]["num_workers"] == resolve_num_workers("auto")  # the default
    assert "forecast from 3 measured steps" in done.stdout
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ledger.jsonl", "tiny"]


def test_memory_parts_match_the_optimizer_state_the_loop_really_keeps(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(image_data, tmp_path / "runs")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    task = api.make_task(cfg)
    adapter = api.build_adapter(task, cfg, run)
    loop = Loop(cfg, task, Runner(cfg, adapter), task.datasets(), run, StopRequest(None))
    loop.optimizer_step()
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in loop.optimizer.state.values()
        for t in s.values()
        if t.dim() > 0
    )
    parts = parameter_parts(adapter)
    assert parts["optimizer_mb"] * MB == state_bytes
    frozen = sum(p.numel() * 4 for p in adapter.parameters() if not p.requires_grad)
    assert parts["frozen_mb"] * MB == frozen


def test_compare_measures_what_each_lora_rank_costs(image_data: Path, tmp_path: Path) -> None:
    """all-linear LoRA on the tiny ViT: per layer q, k, v and the attention output (32 -> 32),
    the MLP (32 -> 64, 64 -> 32): 4*64 + 96 + 96 = 448 parameters per rank, 2 layers. The
    measuring processes train with this process's thread count, not torch's default."""
    cfg = tiny_config(image_data, tmp_path / "runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        low, high = compare(cfg, 2, "lora.rank", ["2", "8"], None, print)
    finally:
        torch.set_num_threads(threads)
    assert low.settings["torch_threads"] == high.settings["torch_threads"] == 1
    assert low.overrides == ["lora.rank=2"] and high.error is None
    assert (high.trainable_mb - low.trainable_mb) * MB == pytest.approx((8 - 2) * 2 * 448 * 4)
    assert high.optimizer_mb == pytest.approx(2 * high.trainable_mb)


def test_plan_under_a_memory_budget_that_nothing_meets_measures_the_savers(
    image_data: Path, tmp_path: Path
) -> None:
    path = write_config(
        image_data,
        tmp_path,
        model={"config": {**TINY_VIT_CFG, "image_size": 16}, "gradient_checkpointing": True},
        train={"micro_batch_size": 1, "max_steps": 6},
    )  # checkpointing already on: bf16 is the one saver left to measure
    result = CliRunner().invoke(app, ["plan", str(path), "--memory", "1MiB", "--steps", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "the cap cannot be enforced on the CPU" in out
    assert "micro-batch 1 does not fit" in out
    saver = "precision=bf16 model.dtype=bf16"
    assert saver in out and "does NOT fit" in out.split(saver)[1].splitlines()[0]
    assert "4-bit base: not measured" in out


def test_plan_on_missing_data_prints_the_config_checks_errors(
    image_data: Path, tmp_path: Path
) -> None:
    path = write_config(image_data, tmp_path)
    result = CliRunner().invoke(app, ["plan", str(path), f"data.train={tmp_path}/nope"])
    assert result.exit_code == 2
    assert "data.train: path does not exist" in result.output
    assert "Traceback" not in result.output
    bad = CliRunner().invoke(app, ["plan", str(path), "--memory", "8 apples"])
    assert bad.exit_code == 2 and "not a memory size" in bad.output


def test_time_arithmetic_by_hand() -> None:
    assert parse_size("8GiB") == 8192 and parse_size("512MiB") == 512
    cfg = tiny_config(
        Path("/d"), Path("/o"), eval={"every_steps": 40}, checkpoint={"every_steps": 30}
    )
    assert counts(cfg, 100, has_eval=True) == (3, 4)  # evals 40, 80, 100; saves 30, 60, 90, 100
    assert counts(cfg, 120, has_eval=False) == (0, 4)
    budget = TimeBudget(startup_s=60, steps=1000, step_s=10, evals=2, eval_s=100, saves=4, save_s=5)
    assert budget.total_s == 60 + 10_000 + 200 + 20
    assert budget.jobs(20_000) == 1
    # each 3600 s job: 60 start-up, 2*10 + 5 + 100 margin -> 3415 s of work; 10220 s to do
    assert budget.jobs(3600) == 3
    assert budget.jobs(150) == 0


def test_train_forecast_announces_once_and_warns_before_an_unprotected_time_limit(
    image_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(
        image_data, Path("/o"), train={"max_steps": 100, "time_limit": "50s"},
        checkpoint={"every_steps": 500},
    )  # fmt: skip
    forecast = TrainForecast(cfg, 100, StopRequest(50, started=time.monotonic()))
    logger = logging.getLogger(LOGGER)
    propagate, logger.propagate = logger.propagate, False  # one capture, however set up
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    try:
        for step, seconds in enumerate([5.0, 1.0, 1.0, 1.0, 9.0], start=1):
            forecast.observe(step, seconds, has_eval=True)
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate
    text = caplog.text
    forecasts = [r for r in caplog.records if r.getMessage().startswith("forecast from")]
    assert len(forecasts) == 1
    assert "forecast from 3 measured steps: 1.0s per step, 96 steps left" in text
    assert "ends this job at about step" in text
    assert "no periodic checkpoint comes before the time limit" in text
