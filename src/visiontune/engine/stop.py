"""Why and when a run stops: signals, the wall-clock budget, and early stopping.

Signal handlers only set a flag. The loop looks at the flag at optimizer-step boundaries,
where a checkpoint is consistent, saves and exits with EXIT_RESUMABLE so a SLURM script
(`#SBATCH --signal=USR1@90`) can requeue the job and the next start resumes.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

EXIT_RESUMABLE = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 or its time limit after a complete checkpoint."""

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Collects reasons to stop at the next step boundary."""

    def __init__(self, time_limit_s: float | None, started: float | None = None) -> None:
        self.started = time.monotonic() if started is None else started
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
