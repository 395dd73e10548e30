"""The MLflow and Weights & Biases mirrors, read back with each tool's own reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_config
from visiontune import api
from visiontune.runs.rundir import read_jsonl


@pytest.fixture(scope="module")
def tracked_run(image_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny training mirrored to every tracker that is installed."""
    tracking: dict[str, Any] = {}
    for module, key, settings in (
        ("mlflow", "mlflow", {"experiment": "tiny-exp"}),
        ("wandb", "wandb", {"project": "tiny", "mode": "offline"}),
    ):
        try:
            __import__(module)
        except ImportError:
            continue
        tracking[key] = settings
    if not tracking:
        pytest.skip("neither mlflow nor wandb is installed")
    out = tmp_path_factory.mktemp("tracked")
    cfg = tiny_config(
        image_data, out, tracking=tracking, eval={"every_steps": 3, "metric": "accuracy"}
    )
    return api.train(cfg).run_dir


def test_mlflow_holds_the_params_every_step_and_the_artifacts(tracked_run: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    store = f"sqlite:///{tracked_run.parent.resolve() / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("tiny-exp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert run.data.params["optim.lr"] == "0.01"
    assert run.data.params["train.max_steps"] == "6"
    steps = read_jsonl(tracked_run / "metrics.jsonl")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in steps]
    evals = read_jsonl(tracked_run / "eval.jsonl")
    accuracy = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(e["step"], e["accuracy"]) for e in evals]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json", "figures"} <= names
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/training_curves.png" in figures  # drawn after the loop, before the close
    local = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tracked_run)))
    assert local.read_text() == (tracked_run / "config.yaml").read_text()


def wandb_records(path: Path) -> list[Any]:
    """Records of a .wandb file: a 7-byte header, then LevelDB-log framing (32 KiB blocks;
    per chunk crc32, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, at = [], b"", 7
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:
            at += 32768 - at % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        pending += data[at + 7 : at + 7 + length]
        at += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_config_and_every_step(tracked_run: Path) -> None:
    pytest.importorskip("wandb")
    (file,) = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(file)
    (run,) = [r.run for r in records if r.HasField("run")]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.display_name == "tiny"
    assert config["optim.lr"] == 0.01
    logged: dict[int, dict[str, float]] = {}
    for r in records:
        if r.HasField("history"):
            row = logged.setdefault(r.history.step.num, {})
            # a key with "/" is stored split into nested_key
            row.update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
    steps = read_jsonl(tracked_run / "metrics.jsonl")
    assert [logged[r["step"]]["train/loss"] for r in steps] == pytest.approx(
        [r["loss"] for r in steps], rel=1e-12
    )
    evals = read_jsonl(tracked_run / "eval.jsonl")
    assert [logged[e["step"]]["eval/accuracy"] for e in evals] == [e["accuracy"] for e in evals]


def test_a_run_that_fails_reads_failed_in_mlflow(image_data: Path, tmp_path: Path) -> None:
    """The loop closes its trackers in a `finally`; an exception passing through marks the
    MLflow run FAILED, not FINISHED."""
    mlflow = pytest.importorskip("mlflow")
    from visiontune.runs.rundir import RunDir
    from visiontune.runs.trackers import build_trackers

    cfg = tiny_config(image_data, tmp_path, tracking={"mlflow": {}})
    (tmp_path / "tiny").mkdir()
    trackers = build_trackers(cfg, RunDir(tmp_path / "tiny"))
    assert trackers is not None
    with pytest.raises(RuntimeError):
        try:
            trackers.log(1, {"loss": 1.5, "clipped": True, "grad_norm": float("nan")}, "train")
            raise RuntimeError("the loop failed")
        finally:
            trackers.close()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("visiontune").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"train/loss": 1.5, "train/clipped": 1.0}  # NaN left out
