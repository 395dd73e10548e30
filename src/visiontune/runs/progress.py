"""Progress: a rich bar on a terminal, plain periodic log lines elsewhere (SLURM logs)."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any, Self

from visiontune.runs.rundir import LOGGER


class TerminalBar:
    """A rich bar started and stopped with the context, when there is one (`self.bar`): on a
    terminal; elsewhere (CI and SLURM logs) subclasses write plain lines instead."""

    bar: Any = None

    def __enter__(self) -> Self:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()


class TrainProgress(TerminalBar):
    def __init__(self, total_steps: int, start_step: int, log_every: int) -> None:
        self.total = total_steps
        self.log_every = log_every
        self.log = logging.getLogger(LOGGER)
        self.started = time.monotonic()
        self.start_step = start_step
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
            )
            self.task_id = self.bar.add_task("train", total=total_steps, stats="")
            self.bar.update(self.task_id, completed=start_step)

    def update(self, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {samples_per_s:.1f} samples/s"
        if self.bar is not None:
            self.bar.update(self.task_id, completed=step, stats=stats)
        elif step % self.log_every == 0 or step == self.total:
            self.log.info("step %d/%d  %s  eta %s", step, self.total, stats, self._eta(step))

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        remaining = (time.monotonic() - self.started) / done * (self.total - step)
        minutes, seconds = divmod(int(remaining), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
