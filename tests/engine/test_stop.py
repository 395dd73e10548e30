"""StopRequest with real signals: caught in every phase of a run, and a time limit that counts
from the process start with a margin that covers a due evaluation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from visiontune.engine import stop
from visiontune.engine.stop import StopRequest

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


def test_time_limit_margin_includes_a_due_evaluation() -> None:
    request = StopRequest(time_limit_s=100.0, started=time.monotonic() - 90.0)
    assert request.reason(3.0) is None
    assert request.reason(3.0, eval_s=10.0) == "time_limit"
    assert request.reason(3.0, eval_s=0.0) is None


def test_a_signal_during_setup_is_caught_and_seen_at_the_next_phase_boundary() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest(time_limit_s=None) as request:
        assert request.requested() is None  # e.g. after loading the config
        os.kill(os.getpid(), signal.SIGUSR1)  # while the model loads
        assert request.requested() == "signal:SIGUSR1"  # before the data check
        assert request.reason(0.0) == "signal:SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_one_installation_catches_signals_after_the_last_step_and_keeps_the_first() -> None:
    request = StopRequest(time_limit_s=None)
    request.install()
    try:
        assert request.reason(0.0) is None  # the last step: nothing yet
        os.kill(os.getpid(), signal.SIGUSR1)  # during the final evaluation
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's TERM, during the final save
        assert request.requested() == "signal:SIGUSR1"
    finally:
        request.uninstall()


def test_installing_twice_still_restores_the_original_handlers() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    request = StopRequest(time_limit_s=None)
    request.install()
    request.install()
    request.uninstall()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_installing_outside_the_main_thread_leaves_signals_alone() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    errors: list[BaseException] = []

    def train_in_a_worker() -> None:
        request = StopRequest(time_limit_s=1.0, started=time.monotonic() - 2.0)
        try:
            request.install()
            assert request.reason(0.0) == "time_limit"
            request.uninstall()
        except BaseException as error:  # reported to the main thread below
            errors.append(error)

    worker = threading.Thread(target=train_in_a_worker)
    worker.start()
    worker.join()
    assert errors == []
    assert signal.getsignal(signal.SIGUSR1) == before
