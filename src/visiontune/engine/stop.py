"""Why and when a run stops: signals, the wall-clock budget, and early stopping.

Signal handlers only set a flag. The loop looks at the flag at optimizer-step boundaries,
where a checkpoint is consistent, saves and exits with EXIT_RESUMABLE so a SLURM script
(`#SBATCH --signal=USR1@90`) can requeue the job and the next start resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from types import FrameType

EXIT_RESUMABLE = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 or its time limit after a complete checkpoint."""

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_IMPORTED = time.monotonic()


def process_started() -> float:
    """When this process started, on the `time.monotonic()` clock.

    A scheduler's time limit counts from the job's start, and imports, data checks and model
    loading spend it as much as training does. Linux gives the process start in clock ticks
    after boot (/proc/self/stat, field 22) and the time since boot (/proc/uptime) on the same
    clock. Where /proc is missing, or gives an age shorter than the time since this module was
    imported (a container that virtualises uptime), the import is the latest possible start.
    """
    now = time.monotonic()
    age = now - _IMPORTED
    with contextlib.suppress(OSError, ValueError, IndexError):
        after_comm = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = max(age, uptime - int(after_comm[19]) / os.sysconf("SC_CLK_TCK"))
    return now - age


class StopRequest:
    """Collects reasons to stop at the next step boundary.

    `time_limit_s` is a budget for the whole process (a scheduler's wall clock), so by default
    it counts from the process start, not from the start of training; pass `started` (on the
    `time.monotonic()` clock) to count from elsewhere.
    """

    def __init__(self, time_limit_s: float | None, started: float | None = None) -> None:
        self.started = process_started() if started is None else started
        self.time_limit_s = time_limit_s
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def reason(self, margin_s: float) -> str | None:
        """`signal:SIGUSR1`, `time_limit`, or None. The time limit keeps `margin_s` (about two
        steps plus one checkpoint save) so the checkpoint is written before the kill."""
        if self.signal_name:
            return f"signal:{self.signal_name}"
        if self.time_limit_s is not None:
            elapsed = time.monotonic() - self.started
            if elapsed + margin_s >= self.time_limit_s:
                return "time_limit"
        return None


class EarlyStopping:
    """Patience counted in evaluations, never before `min_steps`."""

    def __init__(self, mode: str, patience: int | None, min_delta: float, min_steps: int):
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.min_steps = min_steps

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta

    def should_stop(self, evals_without_improvement: int, step: int) -> bool:
        return (
            self.patience is not None
            and evals_without_improvement >= self.patience
            and step >= self.min_steps
        )
