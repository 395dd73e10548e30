"""The library surface: train, evaluate and predict; the CLI is a thin layer over these.

Each reads as config -> task (data, adapter, loss, metrics) -> runner/loop -> run directory.
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontune.config.load import dump_yaml, load_config
from visiontune.config.schema import Config, parse_duration
from visiontune.engine import checkpoint as ckpt
from visiontune.engine import distributed
from visiontune.engine import state as st
from visiontune.engine.loop import Loop
from visiontune.engine.plan import plan_for_run
from visiontune.engine.runner import Runner
from visiontune.engine.state import TrainState
from visiontune.engine.stop import EXIT_RESUMABLE, StopRequest
from visiontune.errors import VisiontuneError
from visiontune.models.lora import check_trainable_share
from visiontune.runs import ledger
from visiontune.runs.budget import refuse_if_spent
from visiontune.runs.record import Heartbeat, RunRecord
from visiontune.runs.remote import RemoteRun
from visiontune.runs.report import plot_training, write_summary
from visiontune.runs.rundir import LOGGER, RunDir, setup_logging
from visiontune.runs.trackers import Trackers, build_trackers
from visiontune.task import Metrics, ModelAdapter, Task, resolved_config

log = logging.getLogger(LOGGER)

TASKS = {
    "classify": "visiontune.tasks.classify:ClassifyTask",
    "segment": "visiontune.tasks.segment:SegmentTask",
    "ground": "visiontune.tasks.ground:GroundTask",
    "translate": "visiontune.tasks.translate:TranslateTask",
}


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    summary: dict[str, Any]

    @property
    def exit_code(self) -> int:
        """0 when finished; EXIT_RESUMABLE when stopped by a signal or the time limit."""
        reason = self.state.stop_reason or ""
        return EXIT_RESUMABLE if reason.startswith(("signal", "time_limit")) else 0


def make_task(cfg: Config) -> Task:
    path = TASKS[cfg.task.type]
    if cfg.task.type == "segment":
        from visiontune.models.sam3 import is_sam3

        path = "visiontune.tasks.segment_sam3:Sam3SegmentTask" if is_sam3(cfg.model) else path
    module_name, class_name = path.split(":")
    return getattr(importlib.import_module(module_name), class_name)(cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    cfg: Config, resume: bool = False, overwrite: bool = False, allow_duplicate: bool = False
) -> TrainResult:
    """Train as `cfg` says into `cfg.run_dir`; with `resume`, continue its latest checkpoint.

    SIGTERM/SIGUSR1 are caught from the first moment to the last: a signal during set-up ends
    the run before training (exit 75, nothing to save yet), one after the last step saves and
    exits 75. A failure after the run directory exists is recorded (train.log, summary.json
    and run.json with status `failed` and the message) before it propagates. A new run that
    repeats a finished or running one (same settings, same data) is refused unless
    `allow_duplicate`, and so is one whose runs root has spent its `tracking.budget`.
    """
    started = time.monotonic()
    limit = parse_duration(cfg.train.time_limit) if cfg.train.time_limit else None
    distributed.start()
    try:
        cfg = distributed.resolve_batch(cfg, distributed.world_size())
        if not distributed.is_main():
            with StopRequest(limit) as stop:
                return train_follower(cfg, resume, stop)
        if not resume:
            refuse_repeated_settings(cfg, allow_duplicate)
        refuse_if_spent(cfg)
        with StopRequest(limit) as stop:
            run = RunDir.prepare(cfg.run_dir, resume=resume, overwrite=overwrite)
            try:
                distributed.barrier("waiting for rank 0 to prepare the run directory")
                return train_in(run, cfg, resume, stop, started)
            finally:
                run.release()
    finally:
        distributed.stop()


def train_follower(cfg: Config, resume: bool, stop: StopRequest) -> TrainResult:
    """A rank other than 0: the same loop, reading the run directory rank 0 prepared and
    writing nothing into it (its warnings and errors go to its stderr)."""
    setup_logging(None)
    logging.getLogger(LOGGER).setLevel(logging.WARNING)
    distributed.barrier("waiting for rank 0 to prepare the run directory")
    run = RunDir(cfg.run_dir)
    loop = prepare_loop(cfg, run, resume, stop)
    state = loop.run() if loop is not None else TrainState(stop_reason="time_limit")
    return TrainResult(run.root, state, {})


def train_in(
    run: RunDir, cfg: Config, resume: bool, stop: StopRequest, started: float
) -> TrainResult:
    """The run of `train` inside its locked run directory, its record kept alive meanwhile."""
    remote = RemoteRun.for_config(cfg)
    if remote and resume:
        remote.pull_log(run)  # first: the log of this job goes on after the earlier jobs'
    setup_logging(run.log)
    if remote and resume:
        remote.pull_into(run)
    record = RunRecord.start(run, cfg, resume)
    # closed here, after the summary and the curves exist, so trackers keep them as artifacts
    trackers = build_trackers(cfg, run) if distributed.is_main() else None
    loop: Loop | None = None
    try:
        with Heartbeat(record):
            if cfg.train.plan and not resume:
                plan_for_run(cfg, run.root)
            loop = prepare_loop(cfg, run, resume, stop, trackers)
            if loop is None:
                state = TrainState(stop_reason=stop.requested() or "time_limit")
                log.warning("stopping before training (%s): nothing to save", state.stop_reason)
            else:
                state = loop.run()
    except Exception as err:
        state = loop.state if loop is not None else TrainState()
        log.exception("training failed at step %d: %s", state.step, err)
        state.stop_reason = "failed"
        adapter = loop.runner.adapter if loop is not None else None
        summary = write_summary(run, cfg, state, adapter, time.monotonic() - started)
        summary["error"] = f"{type(err).__name__}: {err}"
        run.write_json(run.summary, summary)
        record.finish(summary)
        ledger.write_cache(cfg.output_dir)
        if trackers:
            trackers.close()  # inside the handler: marked failed
        raise
    if loop is not None:
        plot_training(run, cfg.train.max_grad_norm, cfg.tracking.bootstrap_samples)
    adapter = loop.runner.adapter if loop is not None else None
    summary = write_summary(run, cfg, state, adapter, time.monotonic() - started)
    record.finish(summary)
    if trackers:
        trackers.close()
    if remote:
        remote.push_records(run)
    ledger.write_cache(cfg.output_dir)
    log.info("run directory: %s", run.root.resolve())
    return TrainResult(run.root, state, summary)


def refuse_repeated_settings(cfg: Config, allow_duplicate: bool) -> None:
    """Refuse to train what already ran (or runs) on the same data, naming it and its result;
    with `allow_duplicate`, only warn (a second seed of noise on purpose, say)."""
    for earlier in ledger.earlier_runs(cfg):
        best = earlier.get("best") or {"metric": earlier["metric"], "value": None}
        message = (
            f"these exact settings on the same data already ran as {earlier['run_dir']} "
            f"({earlier['status']}, best {best['metric']} {best['value']})"
        )
        if not allow_duplicate:
            raise VisiontuneError(
                f"{message}: see `visiontune runs show {earlier['run_dir']}`; pass "
                "--allow-duplicate to train it again anyway"
            )
        log.warning("%s; training again (--allow-duplicate)", message)


def prepare_loop(
    cfg: Config, run: RunDir, resume: bool, stop: StopRequest, trackers: Trackers | None = None
) -> Loop | None:
    """Data, adapter and loop, resumed or initialised; None when a stop came during set-up
    (checked after each slow phase, and the time limit once set-up is done)."""
    seed_everything(cfg.train.seed)
    task = make_task(cfg)
    splits = task.datasets()
    if distributed.agree_stop(stop.requested()):
        return None
    adapter = build_adapter(task, cfg, run, report=distributed.is_main())
    if distributed.agree_stop(stop.requested()):
        return None
    if distributed.is_main():
        run.config.write_text(dump_yaml(resolved_config(task, cfg)))
    loop = Loop(cfg, task, Runner(cfg, adapter), splits, run, stop, trackers)
    distributed.seed_rank_stream(cfg.train.seed)
    start_from(loop, cfg, run, resume)
    if distributed.agree_stop(stop.requested() or stop.reason(0.0)):
        return None
    return loop


def start_from(loop: Loop, cfg: Config, run: RunDir, resume: bool) -> None:
    """Continue the latest complete checkpoint, else start from `init_from`'s weights.

    `--resume` of a run with no checkpoint yet is a first start, so it honours init_from: the
    SLURM script passes `--resume` to the first job as to every requeued one.
    """
    latest = ckpt.latest_complete(run.checkpoints) if resume else None
    main = distributed.is_main()
    if latest is not None:
        loop.resume_from(latest)
        if main:
            run.truncate_records(loop.state.step)
        return
    if resume and main:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", run.root)
        run.truncate_records(0)
    if cfg.init_from is not None:
        source, label = weights_dir(cfg.init_from)
        st.load_weights(loop.runner.adapter, source)
        log.warning(
            "init_from: loaded WEIGHTS ONLY from %s (%s); optimizer, schedule and step start "
            "fresh (this is not a resume: use --resume to continue a run)",
            source, label,
        )  # fmt: skip


def build_adapter(task: Task, cfg: Config, run: RunDir, report: bool = False) -> ModelAdapter:
    """The task's model adapter; with `report`, what trains (once per run, at its start).

    Inline random-init models and models of a user's builder (whose initialisation we cannot
    vouch for) pin their frozen weights in the run directory, so eval and predict rebuild
    exactly the base training saw.
    """
    adapter = task.adapter()
    if report:
        rows = adapter.trainable_rows()
        for row in rows:
            share = row.trainable / row.total if row.total else 0.0
            log.info(
                "  %-28s %12d / %12d trainable (%.2f%%)",
                row.component, row.trainable, row.total, 100 * share,
            )  # fmt: skip
        warning = check_trainable_share(rows, cfg.lora.enabled)
        if warning:
            log.warning(warning)
    if (cfg.model.config is not None or cfg.model.builder is not None) and distributed.is_main():
        frozen = {
            n: p.detach().contiguous() for n, p in adapter.named_parameters() if not p.requires_grad
        }
        if run.base_weights.is_file():
            adapter.load_state_dict(ckpt.read_base_weights(run.base_weights), strict=False)
        elif frozen:
            ckpt.write_base_weights(frozen, run.base_weights)
    return adapter


def weights_dir(path: Path) -> tuple[Path, str]:
    """The weights a path means, and a label saying which: a checkpoint or best/ directory
    itself; for a run directory its best/, else (missing or damaged) its latest checkpoint."""
    path = Path(path)
    if (path / st.WEIGHTS).is_file():
        return path, path.name
    best = path / "best"
    if (best / st.WEIGHTS).is_file():
        damage = ckpt.verify(best)
        if damage is None:
            manifest = st.read_manifest(best) or {}
            return best, f"best (step {manifest.get('step')})"
        log.warning("%s is damaged (%s): not used", best, damage)
    latest = ckpt.latest_complete(path / "checkpoints")
    if latest is not None:
        label = f"latest checkpoint {latest.name} (no usable best/)"
        log.warning("%s: evaluating the %s", path, label)
        return latest, label
    raise VisiontuneError(f"{path}: no weights found (expected best/ or checkpoints/step-*)")


@dataclass
class LoadedRun:
    """A finished (or interrupted) run ready to evaluate or predict, and which weights it has."""

    cfg: Config
    task: Task
    runner: Runner
    weights: Path
    label: str


def load_run(run_dir: Path, checkpoint: Path | None = None) -> LoadedRun:
    """The config, the task and a runner over the trained adapter of a run."""
    run = RunDir(Path(run_dir))
    if not run.config.is_file():
        raise VisiontuneError(f"{run.root} is not a visiontune run directory (no config.yaml)")
    setup_logging(None)
    cfg = load_config(run.config)
    seed_everything(cfg.train.seed)
    task = make_task(cfg)
    adapter = build_adapter(task, cfg, run)
    source, label = weights_dir(checkpoint or run.root)
    st.load_weights(adapter, source)
    runner = Runner(cfg, adapter)
    runner.model.eval()
    return LoadedRun(cfg, task, runner, source, label)


def evaluate(
    run_dir: Path, split: str = "val", checkpoint: Path | None = None
) -> tuple[Metrics, Path]:
    """Score a run's best/ weights (or a checkpoint) on a split; save metrics and figures."""
    loaded = load_run(run_dir, checkpoint)
    dataset = loaded.task.datasets().get(split)
    if dataset is None:
        raise VisiontuneError(f"the run's config has no {split} split (data.{split})")
    metrics = loaded.runner.evaluate(loaded.task, dataset)
    out = Path(run_dir) / f"eval-{split}-{loaded.weights.name}"
    out.mkdir(exist_ok=True)
    record = {"split": split, "weights": loaded.label, **metrics.scalars}
    RunDir(out).write_json(out / "metrics.json", {**record, "tables": metrics.tables})
    loaded.task.save_figures(metrics, out)
    log.info("evaluated %s on %s", loaded.label, split)
    return metrics, out


def predict(
    run_dir: Path, inputs: list[dict[str, Any]], out_dir: Path, checkpoint: Path | None = None
) -> list[dict[str, Any]]:
    """Predictions of best/ (or a checkpoint) under the same precision policy as eval."""
    loaded = load_run(run_dir, checkpoint)
    return loaded.runner.predict(loaded.task, inputs, out_dir)
