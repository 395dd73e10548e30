"""The command line as a user drives it: config check/show, train, eval, predict, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_config
from visiontune.cli import app

runner = CliRunner()


def write_config(image_data: Path, tmp_path: Path, **sections) -> Path:
    cfg = tiny_config(image_data, tmp_path / "runs", **sections)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_help_does_not_import_torch() -> None:
    code = "import sys, visiontune.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_check_ok_and_show_applies_overrides(image_data: Path, tmp_path: Path) -> None:
    path = write_config(image_data, tmp_path)
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert "train: 23 samples" in result.output and "val: 12 samples" in result.output
    shown = runner.invoke(app, ["config", "show", str(path), "optim.lr=0.5"])
    assert yaml.safe_load(shown.output)["optim"]["lr"] == 0.5


def test_config_check_reports_typo_and_missing_data_with_exit_2(
    image_data: Path, tmp_path: Path
) -> None:
    path = write_config(image_data, tmp_path)
    typo = runner.invoke(app, ["config", "check", str(path), "optim.learning_rate=1"])
    assert typo.exit_code == 2
    assert "optim.learning_rate: unknown key; did you mean `optim.lr`?" in typo.output
    assert "Traceback" not in typo.output
    missing = runner.invoke(app, ["config", "check", str(path), f"data.train={tmp_path}/nope"])
    assert missing.exit_code == 2
    assert "data.train" in missing.output and "nope" in missing.output


def test_train_eval_predict_round_trip(image_data: Path, tmp_path: Path) -> None:
    path = write_config(image_data, tmp_path, train={"max_steps": 4})
    trained = runner.invoke(app, ["train", str(path)])
    assert trained.exit_code == 0, trained.output
    assert "status: completed after 4 steps" in trained.output
    run = tmp_path / "runs/tiny"
    assert (run / "best/adapter_model.safetensors").is_file()
    assert (run / "figures/training_curves.png").is_file()
    assert (run / "figures/confusion_matrix.png").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["classes"] == ["a", "b", "c"]

    again = runner.invoke(app, ["train", str(path)])
    assert again.exit_code == 1 and "already exists" in again.output

    evaluated = runner.invoke(app, ["eval", str(run)])
    assert evaluated.exit_code == 0, evaluated.output
    saved = json.loads((run / "eval-val-best/metrics.json").read_text())
    last = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()][-1]
    assert saved["accuracy"] == pytest.approx(last["accuracy"])

    out = tmp_path / "preds"
    predicted = runner.invoke(
        app, ["predict", str(run), str(image_data / "val/a"), "--out", str(out), "--format", "csv"]
    )
    assert predicted.exit_code == 0, predicted.output
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 4 and {"image", "label", "p_a", "p_b", "p_c"} <= set(rows[0])
    assert all(r["label"] in {"a", "b", "c"} for r in rows)


def test_predict_on_missing_input_is_one_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path / "nope.png")])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output
