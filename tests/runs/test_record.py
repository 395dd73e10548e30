"""Every run keeps its own record; parallel jobs share a runs root without a lock; a run killed
with -9 reads as interrupted once its heartbeat is stale."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from visiontune.config.load import dump_yaml
from visiontune.runs import ledger, record
from visiontune.runs.record import RECORD, config_hash, dataset_fingerprint, scan


def test_the_hash_ignores_output_only_keys_and_sees_every_other(
    image_data: Path, tmp_path: Path
) -> None:
    base = tiny_config(image_data, tmp_path)
    renamed = tiny_config(
        image_data,
        tmp_path / "elsewhere",
        name="other",
        tracking={"tensorboard": True, "cost_per_gpu_hour": 2.5},
        train={"micro_batch_size": 4, "max_steps": 6, "seed": 0, "log_every": 3},
    )
    assert config_hash(base) == config_hash(renamed)
    assert config_hash(base) != config_hash(tiny_config(image_data, tmp_path, optim={"lr": 0.02}))
    seeded = tiny_config(image_data, tmp_path, train={"max_steps": 6, "seed": 1})
    assert config_hash(base) != config_hash(seeded)


def test_the_dataset_fingerprint_follows_content_not_location(
    image_data: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(image_data, copy)  # copytree does not keep mtimes: content must decide
    original = dataset_fingerprint(tiny_config(image_data, tmp_path))
    copied = dataset_fingerprint(tiny_config(copy, tmp_path))
    assert copied == original and original["method"] == "content"
    files = sorted(p for p in (image_data / "train").rglob("*") if p.is_file())
    files += sorted(p for p in (image_data / "val").rglob("*") if p.is_file())
    assert original["files"] == len(files) == 35
    assert original["bytes"] == sum(p.stat().st_size for p in files)
    victim = next((copy / "train").rglob("*.png"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert dataset_fingerprint(tiny_config(copy, tmp_path))["hash"] != original["hash"]


def _train_command(cfg_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "visiontune.cli", "train", str(cfg_path), *extra]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}  # 3 jobs on 2 cores


def test_parallel_trainings_into_one_root_leave_every_record_intact(
    image_data: Path, tmp_path: Path
) -> None:
    """Three processes at once, as SLURM array jobs: each writes only its own directory."""
    root = tmp_path / "runs"
    jobs = []
    for lr in (0.01, 0.02, 0.03):
        cfg = tiny_config(
            image_data, root, name=f"lr-{lr}", optim={"lr": lr}, train={"max_steps": 2}
        )
        cfg_path = tmp_path / f"lr-{lr}.yaml"
        cfg_path.write_text(dump_yaml(cfg))
        jobs.append(subprocess.Popen(_train_command(cfg_path), env=_env(), cwd=tmp_path))
    assert [job.wait(timeout=300) for job in jobs] == [0, 0, 0]
    found = scan(root)
    assert found.unreadable == []
    assert sorted(r["name"] for r in found.records) == ["lr-0.01", "lr-0.02", "lr-0.03"]
    for rec in found.records:
        assert rec["status"] == "completed" and rec["steps"] == 2
        assert rec["ended"] >= rec["started"]
        assert rec["settings"]["optim.lr"] == float(rec["name"][3:])
        assert json.loads((root / rec["name"] / RECORD).read_text())["pid"] != os.getpid()
    cached = [json.loads(line) for line in (root / ledger.LEDGER).read_text().splitlines()]
    assert {r["name"] for r in cached} <= {"lr-0.01", "lr-0.02", "lr-0.03"}


def test_a_run_killed_with_minus_9_reads_as_interrupted_once_its_heartbeat_is_stale(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "runs"
    cfg = tiny_config(
        image_data, root, name="killed", train={"micro_batch_size": 1, "max_steps": 100000}
    )
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(dump_yaml(cfg))
    job = subprocess.Popen(_train_command(cfg_path), env=_env(), cwd=tmp_path)
    metrics = root / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    (running,) = scan(root).records
    assert running["status"] == "running"  # the heartbeat is fresh: it may still be alive
    assert record.status_of(running, now=running["heartbeat"] + record.STALE_AFTER_S + 1) == (
        "interrupted"
    )
    monkeypatch.setattr(record, "STALE_AFTER_S", 0.0)
    (stale,) = scan(root).records
    assert stale["status"] == "interrupted"


def test_a_corrupt_record_is_listed_with_its_path_and_the_others_still_show(
    tmp_path: Path,
) -> None:
    good, torn = tmp_path / "good", tmp_path / "torn"
    good.mkdir()
    torn.mkdir()
    (good / RECORD).write_text(
        json.dumps({"name": "good", "config_hash": "x", "status": "completed", "started": 1})
    )
    (torn / RECORD).write_text('{"name": "torn", "config_h')
    found = scan(tmp_path)
    assert [r["name"] for r in found.records] == ["good"]
    assert [path for path, _ in found.unreadable] == [torn / RECORD]
