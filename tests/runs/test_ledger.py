"""The ledger remembers every run and shows which settings differ between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tests.conftest import tiny_config
from visiontune import api
from visiontune.cli import app
from visiontune.errors import VisiontuneError
from visiontune.runs import ledger
from visiontune.runs.record import config_hash


def test_runs_are_recorded_repeats_are_recognised_and_the_table_shows_differences(
    image_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    first = tiny_config(image_data, out, name="lr-a", train={"max_steps": 1}, optim={"lr": 0.01})
    second = tiny_config(image_data, out, name="lr-b", train={"max_steps": 1}, optim={"lr": 0.02})
    api.train(first)
    api.train(second)
    assert ledger.earlier_runs(first.model_copy(update={"name": "lr-c"}))[0]["name"] == "lr-a"
    assert config_hash(first) != config_hash(second)

    again = first.model_copy(update={"name": "lr-a-again"})
    with pytest.raises(VisiontuneError, match="already ran as .*lr-a .*completed, best accuracy"):
        api.train(again)
    assert not again.run_dir.exists()  # refused before anything was written
    assert api.train(again, allow_duplicate=True).summary["status"] == "completed"

    (table,) = ledger.tables(ledger.read(out))
    assert table.task == "classify" and table.left_out == []
    assert table.header == ["run", "status", "steps", "best", "optim.lr"]
    assert [(r[0], r[-1]) for r in table.rows] == [
        ("lr-a", "0.01"),
        ("lr-b", "0.02"),
        ("lr-a-again", "0.01"),
    ]
    shown = CliRunner().invoke(app, ["runs", "list", "--root", str(out)])
    assert shown.exit_code == 0 and "lr-b" in shown.output
    assert "task: classify" in shown.output and "optim." in shown.output  # header breaks at dots


def _entry(name: str, task: str, best: float | None, **settings: Any) -> dict[str, Any]:
    """A ledger line as `record` writes it, with the settings that matter here."""
    return {
        "name": name,
        "run_dir": f"runs/{name}",
        "experiment": name,
        "status": "completed",
        "steps": 100,
        "best": {"metric": "accuracy", "value": best, "step": 100},
        "accepted": None,
        "settings": {"task.type": task, "train.seed": 0, **settings},
    }


# Three tasks whose settings mostly do not exist in each other (as in a real ledger, where a
# union over all tasks gave 170 columns). Names are long on purpose: they must never be cut.
CLASSIFY = [
    _entry("classify-aptos-siglip-lr1e-4-focal-gamma2", "classify", 0.81, **{"optim.lr": 1e-4}),
    _entry("classify-aptos-siglip-lr3e-4-focal-gamma2", "classify", 0.84, **{"optim.lr": 3e-4}),
]
SEGMENT = [
    _entry("segment-cracks-sam-dice-only", "segment", 0.6, **{"task.loss": "dice"}),
    _entry("segment-cracks-sam-dice-plus-focal", "segment", 0.7, **{"task.loss": "dice+focal"}),
]
# ground: task.lora_r is swept over all three runs (two depart from the usual value); ten
# other settings each differ in one run only, so the cap of 8 keeps lora_r first and the first
# 7 of those by name, and leaves 3 out
SINGLE = [f"task.k{i:02d}" for i in range(10)]
GROUND = [
    _entry(
        "ground-qwen2vl-r8-baseline",
        "ground",
        None,
        **{"task.lora_r": 8, **dict.fromkeys(SINGLE, 0)},
    ),
    _entry(
        "ground-qwen2vl-r16-maxpix-1003520-every-knob-changed",
        "ground",
        0.4,
        **{"task.lora_r": 16, **dict.fromkeys(SINGLE, 1)},
    ),
    _entry(
        "ground-qwen2vl-r32-same-knobs",
        "ground",
        0.5,
        **{"task.lora_r": 32, **dict.fromkeys(SINGLE, 0)},
    ),
]
ENTRIES = [GROUND[0], CLASSIFY[0], SEGMENT[0], GROUND[1], CLASSIFY[1], SEGMENT[1], GROUND[2]]


def test_one_table_per_task_with_only_that_tasks_differences() -> None:
    by_task = {t.task: t for t in ledger.tables(ENTRIES)}
    assert list(by_task) == ["ground", "classify", "segment"]  # first appearance
    assert by_task["classify"].header == ["run", "status", "steps", "best", "optim.lr"]
    assert by_task["segment"].header == ["run", "status", "steps", "best", "task.loss"]
    assert [r[0] for r in by_task["segment"].rows] == [e["name"] for e in SEGMENT]
    assert by_task["classify"].left_out == [] and by_task["segment"].left_out == []
    ground = by_task["ground"]
    assert ground.header == ["run", "status", "steps", "best", "task.lora_r", *SINGLE[:7]]
    assert ground.left_out == SINGLE[7:]
    assert [r[3] for r in ground.rows] == ["-", "accuracy 0.4000", "accuracy 0.5000"]


def test_a_120_column_terminal_shows_every_run_name_whole() -> None:
    """Columns by hand: a rich column takes its content plus 3 (padding, border), the table 1
    more. Ground's fixed part is 1 + (51 + 3) + (9 + 3) + (5 + 3) + (15 + 3) = 93; headers break
    at dots, so task.lora_r takes 6 + 3 and task.k00, task.k01 5 + 3 each: 118 <= 120, and the
    other 5 of the 8 chosen settings wait in the caption with the 3 beyond the cap."""
    console = Console(width=120, record=True)
    for table in ledger.tables(ENTRIES):
        console.print(table.to_rich(120))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 120
    for entry in ENTRIES:
        assert entry["name"] in text
    assert "task: ground" in text and "task: classify" in text and "task: segment" in text
    assert (
        "8 more differing setting(s) not shown: task.k02, task.k03, task.k04, task.k05, ..." in text
    )
    ground_header = text[: text.index("ground-qwen2vl-r8-baseline")]
    assert "lora_r" in ground_header and "k01" in ground_header and "k02" not in ground_header
    assert "optim.lr" not in ground_header.replace("\n", "") and "loss" not in ground_header
