"""A runs root with a budget: a run stops at a step boundary with a checkpoint once the next
step would exceed what is left, and a spent budget refuses the next run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from visiontune import api
from visiontune.errors import VisiontuneError
from visiontune.runs.budget import spent_in_root

PER_SECOND = {"cost_per_gpu_hour": 3600.0}  # one unit of money per device-second


def test_a_run_stops_by_budget_with_a_checkpoint_and_a_spent_budget_refuses(
    image_data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "runs"
    first = tiny_config(image_data, root, name="first", tracking=PER_SECOND, train={"max_steps": 2})
    api.train(first)
    spent_first = json.loads((root / "first" / "run.json").read_text())["cost"]
    assert spent_first == pytest.approx(
        json.loads((root / "first" / "run.json").read_text())["seconds"], abs=1e-2
    )
    budget = spent_first + 4.0  # four device-seconds left for the second run
    second = tiny_config(
        image_data,
        root,
        name="second",
        optim={"lr": 0.02},
        tracking={**PER_SECOND, "budget": budget},
        train={"max_steps": 100000, "micro_batch_size": 1},
    )
    result = api.train(second)
    record = json.loads((root / "second" / "run.json").read_text())
    assert record["status"] == "stopped-by-budget" and result.exit_code == 0
    assert 0 < record["steps"] < 100000
    checkpoint = root / "second" / "checkpoints" / f"step-{record['steps']:08d}"
    assert (checkpoint / "manifest.json").is_file()
    # the stop came with a margin of about two steps and a save; the final evaluation after
    # it is what may cross the budget
    spent = spent_in_root(root)
    assert spent == pytest.approx(spent_first + record["cost"])
    third = tiny_config(
        image_data, root, name="third", optim={"lr": 0.03}, tracking={**PER_SECOND, "budget": spent}
    )
    with pytest.raises(VisiontuneError, match=r"tracking.budget: .* already spent"):
        api.train(third)
    assert not (root / "third").exists()
