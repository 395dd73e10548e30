"""How long a run takes, from measured step, evaluation and save times, and whether it fits.

Used twice: by `visiontune plan` (times from a measuring process) and at the start of every
`train` (times from the run's own first steps), so both predictions are the same arithmetic.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass

from visiontune.config.schema import Config, parse_duration
from visiontune.engine.stop import StopRequest
from visiontune.runs.rundir import LOGGER

log = logging.getLogger(LOGGER)

WARMUP_STEPS = 1
"""Steps left out of the step time: the first one pays for lazy initialisation."""
MEASURED_STEPS = 3
"""Steps timed before `train` announces its forecast."""


@dataclass
class TimeBudget:
    """The predicted wall clock of a run and what it costs against a time limit."""

    startup_s: float
    steps: int
    step_s: float
    evals: int
    eval_s: float | None
    saves: int
    save_s: float | None

    @property
    def total_s(self) -> float:
        return (
            self.startup_s
            + self.steps * self.step_s
            + self.evals * (self.eval_s or 0.0)
            + self.saves * (self.save_s or 0.0)
        )

    def jobs(self, limit_s: float) -> int:
        """Jobs of `limit_s` each the run needs: every job pays the start-up again and keeps
        back the stop margin (two steps, a save and an evaluation, as the loop does)."""
        if self.total_s <= limit_s:
            return 1
        margin = 2 * self.step_s + (self.save_s or 0.0) + (self.eval_s or 0.0)
        usable = limit_s - self.startup_s - margin
        if usable <= self.step_s:
            return 0  # not one step fits: no number of requeues finishes the run
        return math.ceil((self.total_s - self.startup_s) / usable)


def counts(cfg: Config, total_steps: int, has_eval: bool) -> tuple[int, int]:
    """Evaluations and checkpoint saves a run of `total_steps` makes (the final ones too)."""
    every_eval, every_save = cfg.eval.every_steps, cfg.checkpoint.every_steps
    evals = (total_steps // every_eval if every_eval else 0) if has_eval else 0
    if has_eval and not (every_eval and total_steps % every_eval == 0):
        evals += 1
    saves = total_steps // every_save if every_save else 0
    if not (every_save and total_steps % every_save == 0):
        saves += 1
    return evals, saves


def duration(seconds: float) -> str:
    """`2h05m`, `4m10s`, `12.3s`: the form train.time_limit is written in."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class TrainForecast:
    """At the start of a `train`: the predicted total time once the first steps are timed,
    and a warning when the time limit can arrive before any checkpoint is written."""

    def __init__(self, cfg: Config, total_steps: int, stop: StopRequest):
        self.cfg, self.total_steps, self.stop = cfg, total_steps, stop
        self.start_step: int | None = None
        self.times: list[float] = []
        self.announced = False

    def observe(self, step: int, step_s: float, has_eval: bool) -> None:
        """Called after each optimizer step; speaks once, after MEASURED_STEPS timed steps
        (or at the last step of a shorter run)."""
        if self.announced:
            return
        if self.start_step is None:
            self.start_step = step - 1  # a resumed run starts after its checkpoint
        self.times.append(step_s)
        timed = self.times[WARMUP_STEPS:]
        if len(timed) < MEASURED_STEPS and step < self.total_steps:
            return
        self.announced = True
        step_s = statistics.median(timed or self.times)
        remaining = self.total_steps - step
        evals, saves = counts(self.cfg, self.total_steps, has_eval)
        left = remaining * step_s
        log.info(
            "forecast from %d measured steps: %s per step, %d steps left = %s of training, "
            "plus %d evaluation(s) and %d checkpoint save(s) (timed as they happen); "
            "the whole run about %s",
            len(timed or self.times), duration(step_s), remaining, duration(left),
            evals, saves, duration(time.monotonic() - self.stop.started + left),
        )  # fmt: skip
        self.warn_time_limit(step, step_s)

    def warn_time_limit(self, step: int, step_s: float) -> None:
        """The loop saves when the limit nears, but only if its step-time estimate holds; a
        periodic checkpoint before the limit is the protection that does not depend on it."""
        limit = self.cfg.train.time_limit
        if limit is None:
            if os.environ.get("SLURM_JOB_ID"):
                log.warning(
                    "running under SLURM without train.time_limit: the job's time limit would "
                    "kill the run without a checkpoint; set train.time_limit a few minutes "
                    "under --time (`visiontune slurm` does both)"
                )
            return
        left_s = parse_duration(limit) - (time.monotonic() - self.stop.started)
        reach = step + max(0, int(left_s / step_s))
        if reach >= self.total_steps:
            return
        every = self.cfg.checkpoint.every_steps
        first_save = (step // every + 1) * every if every else None
        log.warning(
            "train.time_limit %s ends this job at about step %d of %d: the run saves at the "
            "limit, exits 75 and continues with --resume; %s",
            limit, reach, self.total_steps, self.jobs_after(reach, step_s, parse_duration(limit)),
        )  # fmt: skip
        if first_save is None or first_save > reach:
            log.warning(
                "no periodic checkpoint comes before the time limit (checkpoint.every_steps=%s):"
                " if a step runs longer than measured, the limit is reached without a "
                "checkpoint and steps %d-%d are lost; set checkpoint.every_steps=%d or less",
                every, (self.start_step or 0) + 1, reach, max(1, (reach - step) // 2),
            )  # fmt: skip

    def jobs_after(self, reach: int, step_s: float, limit_s: float) -> str:
        """How many more jobs of the same limit finish the run (each a requeue under SLURM).

        Each pays this job's start-up again (the time before its first step) and keeps two
        steps back, as the loop's stop margin does; saves and evaluations are not counted, so
        this is the least number.
        """
        startup_s = max(0.0, time.monotonic() - self.stop.started - sum(self.times))
        per_job = int((limit_s - startup_s - 2 * step_s) / step_s)
        if per_job < 1:
            return "a job of this limit cannot train even one step after its start-up"
        more = math.ceil((self.total_steps - reach) / per_job)
        return f"about {more} more job(s) of {per_job} steps finish it ({more} requeue(s))"
