"""Why and when a run stops: signals, the wall-clock budget, and early stopping.

Signal handlers only set a flag; the engine acts on it where its state is consistent. Install
one `StopRequest` when a training process starts, before the data and the model are set up,
and keep it until the run has saved, so SIGTERM/SIGUSR1 never kill the process with their
default action in the middle of a setup or a save. The engine then asks it:

- at the boundaries of set-up (data checked, model built, checkpoint loaded), `requested()`:
  there is nothing to save yet, so the run stops there with EXIT_RESUMABLE, and SLURM
  requeues the job (`visiontune slurm`, `examples/slurm/train.sbatch`);
- after each optimizer step, `reason(...)`: save a checkpoint, exit EXIT_RESUMABLE, resume;
- before the final evaluation, `requested()`: save and exit EXIT_RESUMABLE, and the resumed
  job evaluates; a signal that arrives during the final evaluation or save is seen only
  after them, because dying in the middle would lose them, and the run is then complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

from visiontune.runs.rundir import LOGGER

log = logging.getLogger(LOGGER)

EXIT_RESUMABLE = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 or its time limit, resumable from its last
complete checkpoint (or from the start when the stop came before the first one)."""

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
    """Collects reasons to stop: the first signal received, and the time limit.

    `time_limit_s` is a budget for the whole process (a scheduler's wall clock), so by default
    it counts from the process start, not from the start of training; pass `started` (on the
    `time.monotonic()` clock) to count from elsewhere.
    """

    def __init__(self, time_limit_s: float | None, started: float | None = None) -> None:
        self.started = process_started() if started is None else started
        self.time_limit_s = time_limit_s
        self._signal: str | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGUSR1 until `uninstall`; installing twice is harmless.

        Python delivers signals to the main thread only, so from another thread (a caller
        running training in a worker) nothing is installed and only the time limit stops.
        """
        if self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: SIGTERM/SIGUSR1 are not caught")
            return
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            # None: the previous handler was not installed from Python; the default is closest.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the work happens where the engine's state is consistent. The first
        # signal is the reason; a TERM that follows SLURM's USR1 changes nothing.
        if self._signal is None:
            self._signal = signal.Signals(signum).name

    def requested(self) -> str | None:
        """`signal:SIGUSR1` (or `signal:SIGTERM`) once one has arrived, else None.

        For phase boundaries outside the step loop, where the time limit's margin has no
        meaning (nothing would be saved) but a signal must still end the run.
        """
        return f"signal:{self._signal}" if self._signal else None

    def reason(self, margin_s: float, eval_s: float = 0.0) -> str | None:
        """`signal:SIGUSR1`, `time_limit`, or None, after an optimizer step.

        The time limit keeps `margin_s` back: what the next step and a checkpoint save need
        (the engine passes two steps, one of them slack for jitter, plus one save) so that the
        checkpoint is written before the kill. `eval_s` is the expected length of an
        evaluation that will run before the next check (0 when none is due): an evaluation
        can take minutes (generation over a validation set), and a kill in its middle would
        lose every step since the last checkpoint.
        """
        if self._signal:
            return f"signal:{self._signal}"
        if self.time_limit_s is not None:
            elapsed = time.monotonic() - self.started
            if elapsed + margin_s + eval_s >= self.time_limit_s:
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
