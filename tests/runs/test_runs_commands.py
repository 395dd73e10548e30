"""`visiontune runs list|show|diff|best|log` over a real runs root of tiny trainings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import tiny_config
from visiontune import api
from visiontune.cli import app


@pytest.fixture(scope="module")
def root(image_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 2-step runs differing in lr; two evaluated (per-sample predictions saved)."""
    out = tmp_path_factory.mktemp("ledger") / "runs"
    for lr in (0.01, 0.05, 0.2):
        cfg = tiny_config(
            image_data,
            out,
            name=f"lr-{lr}",
            optim={"lr": lr},
            train={"max_steps": 2, "seed": 0, "micro_batch_size": 4},
            acceptance={"accuracy": ">=0.30", "sensitivity.c": ">=0.5"},
        )
        api.train(cfg)
    for name in ("lr-0.01", "lr-0.05"):
        api.evaluate(out / name)
    return out


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _eval(root: Path, name: str) -> dict[str, float]:
    return json.loads((root / name / "eval-val-best" / "metrics.json").read_text())


def test_list_sorts_by_any_metric_and_shows_only_differing_settings(root: Path) -> None:
    best = {
        name: json.loads((root / name / "run.json").read_text())["best"]["value"]
        for name in ("lr-0.01", "lr-0.05", "lr-0.2")
    }
    text = _invoke("runs", "list", "--root", str(root), "--sort", "accuracy")
    order = [name for name in re.findall(r"lr-0\.\d+", text) if name in best]
    ranked = sorted(best, key=lambda n: -best[n])
    assert order[:3] == ranked or [best[n] for n in order[:3]] == [best[n] for n in ranked]
    assert "optim." in text and "train." not in text  # only lr differs


def test_an_unknown_metric_lists_the_known_ones(root: Path) -> None:
    result = CliRunner().invoke(app, ["runs", "list", "--root", str(root), "--sort", "acuracy"])
    assert result.exit_code == 1
    assert "unknown metric 'acuracy'; known:" in result.output and "accuracy," in result.output


def test_diff_says_whether_the_change_exceeds_the_noise(root: Path) -> None:
    text = _invoke("runs", "diff", "lr-0.01", "lr-0.05", "--root", str(root))
    assert "optim.lr: 0.01 -> 0.05" in text
    a, b = _eval(root, "lr-0.01")["accuracy"], _eval(root, "lr-0.05")["accuracy"]
    line = next(x for x in text.splitlines() if x.strip().startswith("accuracy "))
    assert f"{100 * a:.1f}% -> {100 * b:.1f}%: {100 * (b - a):+.1f} points" in line
    assert line.endswith(("not a change", "a change"))


def test_show_best_and_log(root: Path) -> None:
    shown = _invoke("runs", "show", "lr-0.01", "--root", str(root))
    assert "completed" in shown and "config_hash" in shown
    record = json.loads((root / "lr-0.01" / "run.json").read_text())
    assert record["dataset"]["hash"] in shown
    best = _invoke("runs", "best", "--root", str(root))
    records = [json.loads(p.read_text()) for p in root.glob("*/run.json")]
    top = max(r["best"]["value"] for r in records)
    assert f"accuracy {top:.4f}" in best
    _invoke("runs", "log", "--root", str(root))
    log = (root / "ATTEMPTS.md").read_text()
    assert "## Best: " in log and "### lr-0.2: completed" in log
    assert "differs from the best: `optim.lr`" in log
    assert "total spend 0.00" in log
    for verdict in re.findall(r"- \[[x ]\] accuracy >=0.30: (PASS|FAIL)", log):
        assert verdict in {"PASS", "FAIL"}


def test_acceptance_reports_the_lower_bound_and_not_yet_proven(root: Path) -> None:
    from visiontune.runs import attempts

    record = attempts.find_run(root, "lr-0.01")
    lines = attempts.criteria_lines(record)
    accuracy = _eval(root, "lr-0.01")["accuracy"]
    (line,) = [x for x in lines if x.startswith(("- [x] accuracy", "- [ ] accuracy"))]
    assert f"({accuracy:.4f}, 95% CI [" in line
    low = float(re.search(r"CI \[([0-9.]+),", line).group(1))  # type: ignore[union-attr]
    if accuracy >= 0.30 and low < 0.30:
        assert line.endswith("not yet proven)") and "PASS" in line


def test_a_corrupt_record_is_listed_and_the_rest_still_show(root: Path, tmp_path: Path) -> None:
    broken = root / "half-written"
    broken.mkdir(exist_ok=True)
    (broken / "run.json").write_text('{"name": "half')
    text = _invoke("runs", "list", "--root", str(root))
    assert "lr-0.05" in text and f"unreadable run record {broken / 'run.json'}" in text
    (broken / "run.json").unlink()
    broken.rmdir()


def test_runs_without_a_subcommand_lists(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root.parent)
    assert "lr-0.2" in _invoke("runs")
