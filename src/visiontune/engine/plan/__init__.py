"""`visiontune plan`: will this config fit the card and the time limit? Measured, not guessed.

A plan runs K real optimizer steps of the config in a fresh process (`probe`), then predicts
the run's peak memory and wall clock from them (`forecast`), and with a memory budget
searches the micro-batch and the changes that make it fit (`search`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visiontune.config.schema import Config, parse_duration
from visiontune.engine.plan import search
from visiontune.engine.plan.forecast import TimeBudget, counts, duration
from visiontune.engine.plan.probe import Probe, measure
from visiontune.runs.rundir import LOGGER

PLAN_FILE = "plan.json"
log = logging.getLogger(LOGGER)


@dataclass
class Plan:
    base: Probe
    time: TimeBudget
    effective_batch: int
    limit_s: float | None = None
    micro_batches: list[Probe] = field(default_factory=list)
    fixes: list[tuple[str, Probe]] = field(default_factory=list)
    four_bit_note: str | None = None
    """Why a 4-bit base is not among the measured fixes (None when it is)."""
    compared: list[Probe] = field(default_factory=list)

    @property
    def jobs(self) -> int | None:
        return self.time.jobs(self.limit_s) if self.limit_s else None

    def to_json(self) -> dict[str, Any]:
        return {
            "predicted_peak_memory_mb": self.base.peak_mb,
            "predicted_step_time_s": self.base.step_s,
            "predicted_total_s": self.time.total_s,
            "time_limit_s": self.limit_s,
            "jobs": self.jobs,
            "settings": self.base.settings,
            "measurement": asdict(self.base),
            "time": asdict(self.time),
            "micro_batches": [asdict(p) for p in self.micro_batches],
            "fixes": [{"change": name, **asdict(p)} for name, p in self.fixes],
            "compared": [asdict(p) for p in self.compared],
        }


def make_plan(
    cfg: Config,
    steps: int = 5,
    budget_mb: float | None = None,
    time_limit: str | None = None,
    compare: tuple[str, list[str]] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Plan:
    """Measure `cfg` (then the micro-batch search, the memory savers and the comparison)."""
    say(f"measuring {steps} optimizer steps of the config in a fresh process ...")
    base = measure(cfg, steps, budget_mb=budget_mb)
    limit = time_limit or cfg.train.time_limit
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    plan = Plan(base, time_budget(cfg, base), effective, parse_duration(limit) if limit else None)
    if budget_mb is not None and (base.error is None or base.out_of_memory):
        plan.micro_batches = search.search_micro_batch(cfg, steps, budget_mb, base, say)
        if search.largest_fitting(plan.micro_batches) is None:
            plan.fixes = search.what_makes_it_fit(cfg, steps, budget_mb, say)
            plan.four_bit_note = search.four_bit_note(cfg)
    if compare is not None:
        plan.compared = search.compare(cfg, steps, compare[0], compare[1], budget_mb, say)
    return plan


def time_budget(cfg: Config, probe: Probe) -> TimeBudget:
    evals, saves = counts(cfg, probe.total_steps, probe.eval_s is not None)
    return TimeBudget(
        probe.startup_s, probe.total_steps, probe.step_s, evals, probe.eval_s, saves, probe.save_s
    )


def parse_size(text: str) -> float:
    """`8GiB`, `8GB`, `512MiB`, `800M` -> MiB; the unit is required."""
    units = {"k": 2**-10, "m": 1.0, "g": 2**10, "t": 2**20}
    clean = text.strip().lower().removesuffix("b").removesuffix("i")
    if not clean or clean[-1] not in units:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 8GiB, 24GB, 512MiB)")
    return float(clean[:-1]) * units[clean[-1]]


def describe(plan: Plan, budget_mb: float | None = None) -> list[str]:
    """The plan as the lines `visiontune plan` prints."""
    p = plan.base
    if p.error and not p.out_of_memory:
        return [f"the config could not be measured: {p.error}"]
    if p.error:
        return [f"as configured: {p.error}", *describe_budget(plan, budget_mb or 0.0)]
    mb = p.micro_batch_size
    lines = [
        f"measured on {p.device}: {p.steps} optimizer steps at micro-batch {mb}",
        f"peak memory {p.peak_mb:.0f} MiB"
        + (" (resident set of the process)" if p.device == "cpu" else ""),
        f"  {'process before the model' if p.device == 'cpu' else 'before the model'}"
        f"{p.runtime_mb:12.1f} MiB (measured)",
        f"  frozen weights          {p.frozen_mb:12.1f} MiB (from the parameters)",
        f"  trainable weights       {p.trainable_mb:12.1f} MiB (from the parameters)",
        f"  gradients               {p.gradients_mb:12.1f} MiB (from the parameters)",
        f"  AdamW state             {p.optimizer_mb:12.1f} MiB (2 states per trainable)",
        f"  activations, workspace  {p.activations_mb:12.1f} MiB (peak minus the rest)",
        f"step time {p.step_s:.3f}s ({p.samples_per_s:.1f} samples/s, median after the first step)",
        f"  with {p.settings.get('torch_threads')} torch thread(s) and "
        f"{p.settings.get('num_workers')} data worker(s), as the run will train",
    ]
    t = plan.time
    extra = f", {t.evals} evaluation(s) x {duration(t.eval_s)}" if t.eval_s is not None else ""
    lines.append(
        f"predicted run: start-up {duration(t.startup_s)}, {t.steps} steps x "
        f"{duration(t.step_s)}{extra}, {t.saves} save(s) x {duration(t.save_s or 0)} "
        f"= {duration(t.total_s)}"
    )
    if plan.limit_s is not None:
        jobs = plan.jobs
        if jobs == 1:
            lines.append(f"fits the time limit {duration(plan.limit_s)}")
        elif jobs == 0:
            lines.append(f"not one step fits the time limit {duration(plan.limit_s)}")
        else:
            lines.append(
                f"does not fit the time limit {duration(plan.limit_s)}: {jobs} jobs, "
                f"{jobs - 1} SLURM requeue(s) (`visiontune slurm` writes the script)"
            )
    if budget_mb is not None:
        lines.extend(describe_budget(plan, budget_mb))
    if plan.compared:
        lines.append("comparison:")
        lines.extend(f"  {row_of(c)}" for c in plan.compared)
    return lines


def describe_budget(plan: Plan, budget_mb: float) -> list[str]:
    p = plan.base
    how = (
        "capped with torch.cuda.set_per_process_memory_fraction"
        if p.cap_enforced
        else "the cap cannot be enforced on the CPU; the measured peak is compared with it"
    )
    lines = [f"memory budget {budget_mb:.0f} MiB ({how})"]
    lines.extend(f"  {row_of(c)}" for c in plan.micro_batches)
    best = search.largest_fitting(plan.micro_batches)
    if best is not None:
        effective = plan.effective_batch
        lines.append(
            f"largest micro-batch that fits: {best.micro_batch_size} with grad_accum_steps "
            f"{effective // best.micro_batch_size} (effective batch {effective})"
        )
        return lines
    lines.append("micro-batch 1 does not fit; measured at micro-batch 1:")
    lines.extend(f"  {name:28s} {row_of(probe)}" for name, probe in plan.fixes)
    if plan.four_bit_note is not None:
        lines.append(f"  {plan.four_bit_note}")
    return lines


def row_of(probe: Probe) -> str:
    changes = " ".join(probe.overrides) or "as configured"
    if probe.error:
        return f"{changes}: failed ({probe.error})"
    verdict = "" if probe.budget_mb is None else ("  fits" if probe.fits else "  does NOT fit")
    return (
        f"{changes}: peak {probe.peak_mb:.0f} MiB, {probe.step_s:.3f}s/step, "
        f"{probe.samples_per_s:.1f} samples/s{verdict}"
    )


def plan_for_run(cfg: Config, run_root: Path, steps: int = 8) -> Plan:
    """`train.plan: true`: measure before training, log it and write plan.json into the run;
    summary.json then sets the prediction against what the run measured."""
    log.info("train.plan: measuring %d optimizer steps in a fresh process", steps)
    plan = make_plan(cfg, steps)
    for line in describe(plan):
        log.info("plan: %s", line)
    (run_root / PLAN_FILE).write_text(json.dumps(plan.to_json(), indent=2))
    return plan
