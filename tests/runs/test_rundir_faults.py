"""Faults an interrupted run leaves in its directory: torn lines, NaN, two jobs, leftovers.

Each test reproduces what the campaign of killed runs found (kill -9, full disk, a second
SLURM job on the same run directory) with real files and real processes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from visiontune.engine import checkpoint as ckpt
from visiontune.errors import VisiontuneError
from visiontune.runs.report import plot_training
from visiontune.runs.rundir import LOCK, RunDir, read_jsonl


def write_lines(path: Path, records: list[dict[str, object]], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def metric(step: int) -> dict[str, object]:
    return {"step": step, "epoch": 0.1 * step, "loss": 1.0 / step, "lr": 0.1,
            "grad_norm": 1.0, "clipped": False}  # fmt: skip


# ---- 1. torn last line ---------------------------------------------------------------------


def test_torn_last_line_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [metric(1), metric(2)], torn='{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2]
    assert "metrics.jsonl:3: skipped a torn last line" in caplog.text


def test_a_bad_middle_line_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "acc\n{"step": 3}\n')
    with pytest.raises(VisiontuneError, match=r"eval\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_plots_are_drawn_from_metrics_with_a_torn_last_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    write_lines(run.metrics, [metric(s) for s in (1, 2, 3)], torn='{"step": 4, "loss": 0.')
    write_lines(run.evals, [{"step": 2, "loss": 0.5, "accuracy": 0.7}], torn='{"ste')
    figure = plot_training(run, max_grad_norm=1.0)
    assert figure is not None and figure.stat().st_size > 0


def test_appending_after_a_torn_line_keeps_every_record_readable(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    write_lines(run.metrics, [metric(1), metric(2)], torn='{"step": 3, "lo')
    run.append_jsonl(run.metrics, metric(3))
    assert [r["step"] for r in read_jsonl(run.metrics)] == [1, 2, 3]
    # a whole record that only lost its newline is kept, not cut off
    run.metrics.write_text(json.dumps(metric(1)) + "\n" + json.dumps(metric(2)))
    run.append_jsonl(run.metrics, metric(3))
    assert [r["step"] for r in read_jsonl(run.metrics)] == [1, 2, 3]


# ---- 2. records after the resumed checkpoint -----------------------------------------------


def test_truncate_records_keeps_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    write_lines(run.metrics, [metric(s) for s in range(1, 7)], torn='{"step": 7, "lo')
    write_lines(run.evals, [{"step": s, "accuracy": 0.5} for s in (2, 4, 6)])
    run.truncate_records(4)
    assert [r["step"] for r in read_jsonl(run.metrics)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(run.evals)] == [2, 4]
    assert run.metrics.read_text().endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "metrics.jsonl"]


def test_truncate_records_interrupted_before_the_rename_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path)
    write_lines(run.metrics, [metric(s) for s in range(1, 5)])
    before = run.metrics.read_bytes()

    def killed(self: Path, target: Path) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run.truncate_records(2)
    assert run.metrics.read_bytes() == before


# ---- 3. NaN and infinities -----------------------------------------------------------------


def _strict(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_written_as_null(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    record = {"step": 1, "grad_norm": float("nan"), "loss": float("inf"),
              "per_class": [0.5, float("-inf")], "nested": {"x": float("nan")}}  # fmt: skip
    run.append_jsonl(run.metrics, record)
    run.write_json(run.summary, record)
    line = _strict(run.metrics.read_text())
    assert line == {"step": 1, "grad_norm": None, "loss": None,
                    "per_class": [0.5, None], "nested": {"x": None}}  # fmt: skip
    assert _strict(run.summary.read_text()) == line


# ---- 4. one training process per run directory ---------------------------------------------

# Forked, not spawned: a real second process (own pid, own POSIX locks, killable by -9)
# without paying the import of torch and peft again.
FORK = multiprocessing.get_context("fork")


def hold_lock(root: Path, ready: Connection) -> None:
    RunDir.prepare(root, resume=True, overwrite=False)
    ready.send("locked")
    time.sleep(120)


def start_holder(root: Path) -> BaseProcess:
    ready, child_end = FORK.Pipe()
    holder = FORK.Process(target=hold_lock, args=(root, child_end), daemon=True)
    holder.start()
    assert ready.poll(30) and ready.recv() == "locked"
    return holder


def test_a_second_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    root = tmp_path / "run"
    holder = start_holder(root)
    try:
        (root / "metrics.jsonl").write_text(json.dumps(metric(1)) + "\n")
        expected = f"in use by pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(VisiontuneError, match=expected):
            RunDir.prepare(root, resume=True, overwrite=False)
        with pytest.raises(VisiontuneError, match=expected):
            RunDir.prepare(root, resume=False, overwrite=True)
        assert [p.name for p in tmp_path.iterdir()] == ["run"]  # not renamed aside
    finally:
        holder.kill()
        holder.join()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    root = tmp_path / "run"
    holder = start_holder(root)
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    assert json.loads((root / LOCK).read_text())["pid"] == holder.pid
    run = RunDir.prepare(root, resume=True, overwrite=False)
    assert json.loads((run.root / LOCK).read_text())["pid"] == os.getpid()
    run.release()


def test_the_lock_is_held_until_released_and_a_fresh_dir_ignores_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run = RunDir.prepare(root, resume=False, overwrite=False)
    probe = subprocess.run(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\n"
         "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n"
         "    sys.exit(3)\n", str(root / LOCK)],
        check=False,
    )  # fmt: skip
    assert probe.returncode == 3
    run.release()
    # a directory holding nothing but the lock file of a job that died at once is new
    assert RunDir.prepare(root, resume=False, overwrite=False).root == root


# ---- 5. leftovers of interrupted saves and deletes -----------------------------------------


def fill_with(text: str, size: int = 1000) -> Callable[[Path], None]:
    def fill(directory: Path) -> None:
        (directory / "weights.bin").write_text(text * size)
        (directory / "state.json").write_text(json.dumps({"text": text}))

    return fill


def test_resume_removes_leftovers_and_keeps_complete_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    checkpoints = root / "checkpoints"
    for step in (2, 4, 6):
        ckpt.write_atomically(checkpoints / f"step-{step:08d}", fill_with(str(step)), {})
    ckpt.write_atomically(root / "best", fill_with("b"), {})
    (checkpoints / "step-00000006" / "manifest.json").unlink()  # prune killed mid-delete
    (checkpoints / "step-00000004" / "weights.bin").unlink()
    torn_tmp = checkpoints / ".tmp-step-00000008-4242-1700000000000000000"
    torn_tmp.mkdir()
    (torn_tmp / "weights.bin").write_text("half")
    old_best = root / ".old-best-1700000000000000000"
    old_best.mkdir()
    (old_best / "weights.bin").write_text("half deleted")
    tmp_best = root / ".tmp-best-4242-1700000000000000001"
    tmp_best.mkdir()
    (tmp_best / "weights.bin").write_text("half written")
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        RunDir.prepare(root, resume=True, overwrite=False).release()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]
    assert sorted(p.name for p in root.iterdir()) == ["best", "checkpoints", LOCK]
    assert ckpt.verify(checkpoints / "step-00000002") is None
    assert ckpt.verify(root / "best") is None
    for gone in (torn_tmp, old_best, tmp_best):
        assert f"removing {gone}" in caplog.text
    assert f"removing {checkpoints / 'step-00000006'}: no manifest.json" in caplog.text
    assert f"removing {checkpoints / 'step-00000004'}: weights.bin is missing" in caplog.text


def test_a_best_replacement_killed_between_its_renames_is_restored(tmp_path: Path) -> None:
    root = tmp_path / "run"
    ckpt.write_atomically(root / "best", fill_with("old"), {"step": 2})
    ckpt.write_atomically(root / "newer", fill_with("new"), {"step": 4})
    (root / "best").rename(root / ".old-best-1700000000000000000")
    (root / "newer").rename(root / ".tmp-best-4242-1700000000000000001")
    RunDir.prepare(root, resume=True, overwrite=False).release()
    assert ckpt.verify(root / "best") is None
    assert json.loads((root / "best" / "state.json").read_text()) == {"text": "new"}
    assert sorted(p.name for p in root.iterdir()) == ["best", LOCK]


def save_forever(root: Path, step: int, progress: Connection) -> None:
    def fill(directory: Path) -> None:
        for i in range(8):
            (directory / f"part{i}.bin").write_bytes(bytes([i]) * 400_000)

    while True:
        step += 1
        ckpt.write_atomically(root / "checkpoints" / f"step-{step:08d}", fill, {"step": step})
        ckpt.write_atomically(root / "best", fill, {"step": step})
        ckpt.prune(root / "checkpoints", keep_last=2, keep_steps=set())
        progress.send(step)


def test_kill_9_during_saves_leaves_a_resumable_directory(tmp_path: Path) -> None:
    root = tmp_path / "run"
    step = 0
    for delay in (0.01, 0.05, 0.13, 0.21, 0.34):
        progress, child_end = FORK.Pipe()
        saver = FORK.Process(target=save_forever, args=(root, step * 10, child_end))
        saver.start()
        assert progress.poll(30)
        step = progress.recv()
        time.sleep(delay)
        assert saver.pid is not None
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
        RunDir.prepare(root, resume=True, overwrite=False).release()
        leftovers = [p for p in root.rglob(".*") if p.name != LOCK]
        assert leftovers == []
        assert ckpt.verify(root / "best") is None
        latest = ckpt.latest_complete(root / "checkpoints")
        assert latest is not None and int(latest.name.removeprefix("step-")) >= step
        assert all(ckpt.verify(d) is None for d in ckpt.step_dirs(root / "checkpoints"))
