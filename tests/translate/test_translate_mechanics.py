"""The user's mechanics, checked on the translate task: min_steps before early stopping,
cosine warm-up down to min_lr, overfitting one batch, config check/show on the example.
Expected learning rates are computed here by hand from the schedule's formula."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.translate.tiles import translate_config
from visiontune import api
from visiontune.cli import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sar_to_optical"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_min_steps_hold_off_early_stopping_under_a_cosine_warmup_to_min_lr(tiles: Path) -> None:
    # min_delta 100 dB: only the first evaluation "improves", so patience 1 would stop at
    # step 2; min_steps 4 holds it off until step 4 of 8.
    cfg = translate_config(
        tiles, tiles / "runs",
        task={"crop_size": 64, "tile_overlap": 0, "figures": 0},
        train={"max_steps": 8, "min_steps": 4},
        eval={"every_steps": 1, "patience": 1, "min_delta": 100.0},
        optim={"lr": 0.01},
        schedule={"type": "cosine", "warmup_steps": 2, "min_lr": 1e-4},
    )  # fmt: skip
    result = api.train(cfg)
    assert result.summary["status"] == "early_stopped" and result.state.step == 4
    lrs = [r["lr"] for r in records(result.run_dir / "metrics.jsonl")]
    floor = 1e-4 / 0.01
    cosine = 0.5 * (1 + math.cos(math.pi * 1 / 6))  # step 4: 1 of 6 decay steps done
    expected = [0.005, 0.01, 0.01, 0.01 * (floor + (1 - floor) * cosine)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_overfitting_one_batch_drives_the_loss_towards_zero(tiles: Path) -> None:
    cfg = translate_config(
        tiles, tiles / "runs",
        model={"builder": "user_code_for_tests:conv_translator", "builder_args": {}},
        lora={"enabled": False},
        data={"val": None},
        train={"max_steps": 60, "overfit_batches": 1, "micro_batch_size": 2, "log_every": 20},
        optim={"lr": 0.01, "weight_decay": 0.0},
        schedule={"type": "constant"},
    )  # fmt: skip
    result = api.train(cfg)
    losses = [r["loss"] for r in records(result.run_dir / "metrics.jsonl")]
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_config_check_and_show_on_the_example(tiles: Path) -> None:
    config = str(EXAMPLE / "s1_to_rgb.yaml")
    paths = [f"data.train={tiles / 'train'}", f"data.val={tiles / 'val'}"]
    shown = CliRunner().invoke(app, ["config", "show", config, *paths])
    assert shown.exit_code == 0, shown.output
    assert "builder: sar_model:build" in shown.output
    assert "re:.*cross_attn\\.(q|kv|proj)$" in shown.output
    assert "fn: sar_losses:sar_edge_loss" in shown.output
    checked = CliRunner().invoke(app, ["config", "check", config, *paths])
    assert checked.exit_code == 0, checked.output
    assert "OK (train: 128 samples, val: 25 samples" in checked.output
