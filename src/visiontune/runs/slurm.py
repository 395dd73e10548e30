"""`visiontune slurm`: an sbatch script that trains across nodes and outlives its time limit.

The chain of jobs works like this:

- `#SBATCH --signal=USR1@<margin>` without `B:` makes SLURM signal every process of the job
  step (`srun`); with `B:` only the batch shell would. Which processes of the step it reaches
  depends on the cluster's process tracking (a cgroup: all of them; a process group: not
  torchrun's workers, which torchrun starts in sessions of their own). So each node's task is
  a small bash wrapper that forwards USR1 to torchrun's children, the training processes,
  and starts torchrun with USR1 ignored: torchrun has no handler for it, and the default
  action of USR1 is to die. The training processes replace the inherited "ignore" with their
  own handler (engine/stop.py), which only sets a flag.
- `train.time_limit` is the job's `--time` minus the margin, so the loop usually saves
  before the signal comes: it keeps the next step and a save in hand (engine/stop.py).
- After a stop every rank saves together and exits 75. torchrun reports a worker that exited
  75 as its own exit 1, so the batch shell cannot see the 75: the rank-0 training process runs
  `scontrol requeue $SLURM_JOB_ID` itself (`requeue_if_asked`), after the checkpoint is
  complete. The requeued job runs the same script, whose `--resume` continues from the
  newest complete checkpoint (and honours `init_from` when there is none yet).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from visiontune.config.schema import Config, parse_duration
from visiontune.engine.plan.forecast import TimeBudget, counts, duration
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.runs.rundir import LOGGER

log = logging.getLogger(LOGGER)

REQUEUE_ENV = "VISIONTUNE_SLURM_REQUEUE"
"""Set to 1 by the generated script: only then does an exit 75 requeue the job."""
RESUMABLE = 75
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time(text: str) -> float:
    """Seconds of a SLURM `--time` (`8:00:00`, `90`, `1-12`, `2-0:30:00`) or a duration
    in visiontune's own form (`7h50m`).

    SLURM reads `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M` and `D-H:M:S`: a bare number is minutes.
    """
    match = _SLURM_TIME.match(text.strip())
    if match is None:
        try:
            return parse_duration(text)
        except ValueError:
            raise ValueError(
                f"not a time limit: {text!r} (use SLURM's 8:00:00, 1-12:00:00 or 480, or 7h50m)"
            ) from None
    days, first, second, third = match.groups()
    a, b, c = int(first), int(second or 0), int(third or 0)
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return float(((int(days) * 24 + a) * 60 + b) * 60 + c)
    if third is not None:  # H:M:S
        return float((a * 60 + b) * 60 + c)
    return float(a * 60 + b)  # M or M:S


def slurm_time(seconds: float) -> str:
    """`08:00:00` or `1-12:00:00`: the form sbatch's `--time` reads."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


def time_limit_override(seconds: float) -> str:
    """`7h55m0s`: train.time_limit in the form its parser reads."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s"


@dataclass
class SlurmJob:
    """What `visiontune slurm` was asked for."""

    config: Path
    overrides: list[str]
    time_s: float
    gpus_per_node: int
    nodes: int = 1
    account: str | None = None
    partition: str | None = None
    margin_s: int = 300

    @property
    def train_limit_s(self) -> float:
        return self.time_s - self.margin_s


def render(job: SlurmJob, cfg: Config, log_file: Path) -> str:
    """The sbatch script: one srun task per node, each a torchrun of `gpus_per_node` ranks
    meeting at the first node through c10d."""
    options = [
        f"--job-name={cfg.name}",
        f"--time={slurm_time(job.time_s)}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={job.gpus_per_node}",
        f"--signal=USR1@{job.margin_s}",
        "--requeue",
        "--open-mode=append",
        f"--chdir={Path.cwd()}",
        f"--output={log_file}",
    ]
    if job.account:
        options.append(f"--account={job.account}")
    if job.partition:
        options.append(f"--partition={job.partition}")
    train = [
        str(job.config.resolve()),
        "--resume",
        f"train.time_limit={time_limit_override(job.train_limit_s)}",
        *job.overrides,
    ]
    header = "\n".join(f"#SBATCH {option}" for option in options)
    return f"""#!/bin/bash
{header}
# Written by `visiontune slurm`. Every job of the chain runs this same script: `--resume`
# starts the run when it does not exist yet and otherwise continues its newest complete
# checkpoint. USR1 comes {job.margin_s}s before the limit to the job step: on each node the
# wrapper below passes it to torchrun's children, the training processes, which save at the
# next step and exit 75 (torchrun itself ignores USR1: it would die of it). Rank 0 then runs
# `scontrol requeue $SLURM_JOB_ID` ({REQUEUE_ENV}=1): torchrun turns a 75 into its own 1.
set -u
export {REQUEUE_ENV}=1
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${{MASTER_PORT:-29500}}
export MASTER_ADDR MASTER_PORT

# A trapped signal ends `wait` early: wait again until torchrun itself has exited.
forward_usr1='
(trap "" USR1; exec "$@") &
torchrun_pid=$!
trap "pkill -USR1 -P $torchrun_pid" USR1
while :; do
  wait "$torchrun_pid"
  code=$?
  kill -0 "$torchrun_pid" 2>/dev/null || exit "$code"
done'

srun --kill-on-bad-exit=0 --ntasks-per-node=1 \\
  bash -c "$forward_usr1" node \\
  torchrun --nnodes="$SLURM_NNODES" --nproc-per-node={job.gpus_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \\
    -m visiontune.cli train {shlex.join(train)}
"""


def write_script(path: Path, text: str) -> Path | None:
    """Write the script; an existing different one is renamed aside (returned), never lost."""
    aside = None
    if path.exists() and path.read_text() != text:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = path.with_name(f"{path.name}.replaced-{stamp}")
        number = 1
        while aside.exists():  # two replacements within one second
            number += 1
            aside = path.with_name(f"{path.name}.replaced-{stamp}-{number}")
        path.rename(aside)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return aside


def submit(script: Path) -> str:
    """`sbatch SCRIPT`; its answer ("Submitted batch job 123"), or an error naming why not."""
    try:
        done = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise VisiontuneError(
            f"sbatch is not on PATH: run this on a SLURM login node, or submit {script} there"
        ) from None
    if done.returncode != 0:
        raise VisiontuneError(f"sbatch {script} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout.strip()


# ---- will one job do useful work? ----------------------------------------------------------


@dataclass
class JobTiming:
    """Start-up, step and save time of the run, and where they come from."""

    budget: TimeBudget
    source: str


def check_job(job: SlurmJob, cfg: Config, timing: JobTiming) -> list[str]:
    """The forecast lines to print; a `ConfigError` when no job of this length can save.

    A job must fit its start-up, one step and one save, and the signal margin must cover
    the step under way and the save, or every job ends killed with nothing saved.
    """
    t = timing.budget
    one = t.step_s + (t.save_s or 0.0)
    problems = []
    if job.time_s < t.startup_s + one:
        problems.append(
            f"--time {slurm_time(job.time_s)} is shorter than start-up {duration(t.startup_s)} "
            f"+ one step {duration(t.step_s)} + one save {duration(t.save_s or 0.0)} "
            f"({timing.source}): no job could save a checkpoint"
        )
    if job.margin_s < one:
        problems.append(
            f"--signal-margin {job.margin_s}s is shorter than one step plus one save "
            f"({duration(one)}, {timing.source}): the job would be killed before its checkpoint "
            f"is written; use --signal-margin {math.ceil(1.5 * one)} or more"
        )
    if job.margin_s >= job.time_s:
        problems.append(f"--signal-margin {job.margin_s}s is not shorter than --time")
    if problems:
        raise ConfigError(problems, source="visiontune slurm")
    jobs = t.jobs(job.time_s)
    lines = [
        f"timing ({timing.source}): start-up {duration(t.startup_s)}, "
        f"{duration(t.step_s)} per step, {duration(t.save_s or 0.0)} per save",
        f"predicted run: {t.steps} steps, about {duration(t.total_s)} in all; "
        f"{jobs} job(s) of {slurm_time(job.time_s)}, {max(jobs - 1, 0)} requeue(s)",
    ]
    every = cfg.checkpoint.every_steps
    usable = job.time_s - t.startup_s - job.margin_s
    interval = (every or t.steps) * t.step_s + (t.save_s or 0.0)
    if jobs > 1 and interval > usable:
        fits = max(1, int((usable - (t.save_s or 0.0)) / t.step_s))
        lines.append(
            f"warning: one job ({duration(usable)} of training after start-up and the margin) "
            f"cannot cover one checkpoint interval (checkpoint.every_steps={every}: "
            f"{duration(interval)}): each job saves only when it is stopped, and a job that "
            f"dies otherwise loses all its steps; set checkpoint.every_steps={fits} or less"
        )
    return lines


def measured_timing(cfg: Config, steps: int = 3) -> JobTiming:
    """Run `steps` real optimizer steps in a fresh process (the plan's probe) on this machine."""
    from visiontune.engine.plan import time_budget
    from visiontune.engine.plan.probe import measure

    probe = measure(cfg, steps)
    if probe.error is not None:
        raise VisiontuneError(f"could not measure a step of {cfg.name}: {probe.error}")
    return JobTiming(time_budget(cfg, probe), f"measured on this machine's {probe.device}")


def given_timing(cfg: Config, step_s: float, save_s: float, total_steps: int) -> JobTiming:
    """Step and save times the user measured on the cluster (start-up counted as zero)."""
    evals, saves = counts(cfg, total_steps, getattr(cfg.data, cfg.eval.split) is not None)
    budget = TimeBudget(0.0, total_steps, step_s, evals, None, saves, save_s)
    return JobTiming(budget, "--step-time and --save-time as given")


def total_steps(cfg: Config) -> int:
    """The run's optimizer steps: train.max_steps, or epochs over the train split's batches."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    from visiontune.api import make_task
    from visiontune.engine.order import DataOrder, train_indices

    train = make_task(cfg).datasets().train
    t = cfg.train
    order = DataOrder(
        train_indices(len(train), t.max_samples, t.seed), t.micro_batch_size, t.seed,
        t.overfit_batches,
    )  # fmt: skip
    return math.ceil(t.epochs * math.ceil(order.batches_per_epoch / t.grad_accum_steps))  # type: ignore[operator]


# ---- inside the job -------------------------------------------------------------------------


def requeue_if_asked(exit_code: int) -> None:
    """On exit 75 in a job of `visiontune slurm`, rank 0 requeues it (the others do nothing).

    Called once training has returned, so the checkpoint is complete on every rank. A failed
    `scontrol` is logged with the command that continues the run by hand; it is no reason to
    change the exit code.
    """
    if exit_code != RESUMABLE or os.environ.get(REQUEUE_ENV) != "1":
        return
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    job_id = os.environ.get("SLURM_JOB_ID")
    if rank != "0" or not job_id:
        return
    command = ["scontrol", "requeue", job_id]
    log.info("requeueing the job: %s", shlex.join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        failure = (done.stderr or done.stdout).strip() if done.returncode else None
    except FileNotFoundError:
        failure = "scontrol is not on PATH"
    if failure:
        log.error(
            "could not requeue job %s (%s): submit the same script again to continue",
            job_id, failure,
        )  # fmt: skip
