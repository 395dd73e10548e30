"""The spending limit over a runs root: `tracking.budget` at `tracking.cost_per_gpu_hour`.

Spend is summed from the run records under `output_dir` (scanned, never a shared counter, so
parallel jobs need no lock), running ones counted up to their latest heartbeat. Other runs'
spend is rescanned at most once a minute; this run's own cost is its clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from visiontune.config.schema import Config
from visiontune.errors import VisiontuneError
from visiontune.runs.record import RECORD, cost_so_far, read_record, scan

RESCAN_EVERY_S = 60.0
STOPPED_BY_BUDGET = "stopped_by_budget"


@dataclass
class _Others:
    spent: float
    scanned_at: float


_others: dict[Path, _Others] = {}


def spent_by_others(root: Path, run_dir: Path, now: float) -> float:
    """What every run under `root` except `run_dir` has cost so far."""
    here = str(run_dir.resolve())
    return sum(cost_so_far(r, now) for r in scan(root).records if r["run_dir"] != here)


def spent_in_root(root: Path, now: float | None = None) -> float:
    return sum(cost_so_far(r, now) for r in scan(root).records)


def refuse_if_spent(cfg: Config) -> None:
    """Before training: a budget already used up stops the run before it costs anything."""
    budget = cfg.tracking.budget
    if budget is None:
        return
    spent = spent_in_root(cfg.output_dir)
    if spent >= budget:
        raise VisiontuneError(
            f"tracking.budget: {spent:.2f} of {budget:.2f} already spent by the runs in "
            f"{cfg.output_dir}; raise the budget to train more"
        )


def over_budget(cfg: Config, run_dir: Path, step_seconds: float) -> str | None:
    """`stopped_by_budget` when finishing one more step would exceed the budget, else None."""
    budget, price = cfg.tracking.budget, cfg.tracking.cost_per_gpu_hour
    if budget is None:
        return None
    now = time.time()
    cached = _others.get(run_dir)
    if cached is None or now - cached.scanned_at > RESCAN_EVERY_S:
        cached = _Others(spent_by_others(Path(cfg.output_dir), run_dir, now), now)
        _others[run_dir] = cached
    own = read_record(run_dir / RECORD)
    if own is None:
        return None
    own_cost = cost_so_far({**own, "heartbeat": now}, now)
    next_step = own["devices"] * price * step_seconds / 3600
    return STOPPED_BY_BUDGET if cached.spent + own_cost + next_step > budget else None
