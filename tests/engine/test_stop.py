"""StopRequest: a time limit that counts from the process start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visiontune.engine import stop

SRC = Path(stop.__file__).resolve().parents[2]


def test_time_limit_counts_the_time_before_the_stop_request_existed() -> None:
    """A process that spends 1.5 s (imports, data checks, model loading) before training sets
    up its StopRequest has 1.5 s less of a 1 s budget."""
    program = (
        "import time; time.sleep(1.5)\n"
        "from visiontune.engine.stop import StopRequest\n"
        "request = StopRequest(time_limit_s=1.0)\n"
        "print(request.reason(0.0), time.monotonic() - request.started)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60
    )
    wall = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    reason, age = done.stdout.split()
    assert reason == "time_limit"
    assert 1.5 <= float(age) <= wall + 0.05  # a tick of /proc/self/stat is 10 ms


def test_process_start_falls_back_to_the_import_without_proc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_proc(path: str) -> Path:
        raise FileNotFoundError(path)

    monkeypatch.setattr(stop, "Path", no_proc)
    assert stop.process_started() == pytest.approx(stop._IMPORTED, abs=1e-6)
