"""The ledger remembers every run and shows which settings differ between them."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tests.conftest import tiny_config
from visiontune import api
from visiontune.cli import app
from visiontune.runs import ledger


def test_runs_are_recorded_repeats_are_recognised_and_the_table_shows_differences(
    image_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    first = tiny_config(image_data, out, name="lr-a", train={"max_steps": 1}, optim={"lr": 0.01})
    second = tiny_config(image_data, out, name="lr-b", train={"max_steps": 1}, optim={"lr": 0.02})
    api.train(first)
    api.train(second)
    assert ledger.earlier_runs(first.model_copy(update={"name": "lr-c"}))[0]["name"] == "lr-a"
    assert ledger.experiment_id(first) != ledger.experiment_id(second)

    again = first.model_copy(update={"name": "lr-a-again"})
    api.train(again)
    assert "these exact settings already ran as" in (out / "lr-a-again/train.log").read_text()

    header, rows = ledger.table(ledger.read(out))
    assert header == ["run", "status", "steps", "best", "optim.lr"]
    assert [(r[0], r[-1]) for r in rows] == [
        ("lr-a", "0.01"),
        ("lr-b", "0.02"),
        ("lr-a-again", "0.01"),
    ]
    shown = CliRunner().invoke(app, ["runs", str(out)])
    assert shown.exit_code == 0 and "lr-b" in shown.output and "optim.lr" in shown.output
