"""The library surface: train, evaluate and predict; the CLI is a thin layer over these."""

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
from safetensors.torch import load_file, save_file
from torch import nn

from visiontune.config.load import dump_yaml, load_config
from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.loop import Loop, TrainState, run_evaluation
from visiontune.engine.precision import Precision, resolve_device
from visiontune.engine.stop import EXIT_RESUMABLE
from visiontune.errors import VisiontuneError
from visiontune.models.lora import check_trainable_share, trainable_report
from visiontune.runs import ledger
from visiontune.runs.report import plot_training, write_summary
from visiontune.runs.rundir import LOGGER, RunDir, setup_logging
from visiontune.task import Metrics, Task, resolved_config

log = logging.getLogger(LOGGER)

TASKS = {
    "classify": "visiontune.tasks.classify:ClassifyTask",
    "segment": "visiontune.tasks.segment:SegmentTask",
    "ground": "visiontune.tasks.ground:GroundTask",
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
    module_name, class_name = TASKS[cfg.task.type].split(":")
    return getattr(importlib.import_module(module_name), class_name)(cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train as `cfg` says into `cfg.run_dir`; with `resume`, continue its latest checkpoint."""
    started = time.monotonic()
    run = RunDir.prepare(cfg.run_dir, resume=resume, overwrite=overwrite)
    setup_logging(run.log)
    if not resume:
        for earlier in ledger.earlier_runs(cfg):
            best = earlier["best"]
            log.warning(
                "these exact settings already ran as %s (%s, best %s %s): see visiontune runs",
                earlier["run_dir"], earlier["status"], best["metric"], best["value"],
            )  # fmt: skip
    seed_everything(cfg.train.seed)
    task = make_task(cfg)
    splits = task.datasets()
    model = build_model(task, cfg, run)
    run.config.write_text(dump_yaml(resolved_config(task, cfg)))
    loop = Loop(cfg, task, model, splits, run, started=started)
    if resume:
        latest = ckpt.latest_complete(run.checkpoints)
        if latest is None:
            log.warning("--resume: no complete checkpoint in %s; starting from step 0", run.root)
        else:
            loop.resume_from(latest)
    elif cfg.init_from is not None:
        source = weights_dir(cfg.init_from)
        ckpt.load_weights(model, source)
        log.warning(
            "init_from: loaded WEIGHTS ONLY from %s; optimizer, schedule and step start fresh "
            "(this is not a resume: use --resume to continue a run)",
            source,
        )
    state = loop.run()
    plot_training(run, cfg.train.max_grad_norm)
    summary = write_summary(run, cfg, state, model, time.monotonic() - started)
    ledger.record(cfg, summary)
    log.info("run directory: %s", run.root.resolve())
    return TrainResult(run.root, state, summary)


def build_model(task: Task, cfg: Config, run: RunDir) -> nn.Module:
    """Build the task's model, report what trains, and pin the random init of inline models."""
    model = task.build_model()
    rows = trainable_report(model)
    for row in rows:
        share = row.trainable / row.total if row.total else 0.0
        log.info(
            "  %-28s %12d / %12d trainable (%.2f%%)",
            row.module,
            row.trainable,
            row.total,
            100 * share,
        )
    warning = check_trainable_share(rows, cfg.lora.enabled)
    if warning:
        log.warning(warning)
    if cfg.model.config is not None:
        frozen = {
            n: p.detach().contiguous() for n, p in model.named_parameters() if not p.requires_grad
        }
        if run.base_weights.is_file():
            model.load_state_dict(load_file(str(run.base_weights)), strict=False)
        elif frozen:
            save_file(frozen, str(run.base_weights))
    return model


def weights_dir(path: Path) -> Path:
    """A run directory means its best/ weights; a checkpoint or best/ directory itself."""
    path = Path(path)
    if (path / ckpt.WEIGHTS).is_file():
        return path
    if (path / "best" / ckpt.WEIGHTS).is_file():
        return path / "best"
    latest = ckpt.latest_complete(path / "checkpoints")
    if latest is not None:
        return latest
    raise VisiontuneError(f"{path}: no weights found (expected best/ or checkpoints/step-*)")


def load_run(run_dir: Path, checkpoint: Path | None = None) -> tuple[Config, Task, nn.Module]:
    """The config, task and trained model of a finished (or interrupted) run."""
    run = RunDir(Path(run_dir))
    if not run.config.is_file():
        raise VisiontuneError(f"{run.root} is not a visiontune run directory (no config.yaml)")
    setup_logging(None)
    cfg = load_config(run.config)
    seed_everything(cfg.train.seed)
    task = make_task(cfg)
    model = build_model(task, cfg, run)
    ckpt.load_weights(model, weights_dir(checkpoint or run.root))
    model.to(resolve_device(cfg.train.device))
    model.eval()
    return cfg, task, model


def evaluate(
    run_dir: Path, split: str = "val", checkpoint: Path | None = None
) -> tuple[Metrics, Path]:
    """Score a run's best/ weights (or a checkpoint) on a split; save metrics and figures."""
    cfg, task, model = load_run(run_dir, checkpoint)
    dataset = task.datasets().get(split)
    if dataset is None:
        raise VisiontuneError(f"the run's config has no {split} split (data.{split})")
    precision = Precision(cfg.precision, next(model.parameters()).device)
    metrics = run_evaluation(cfg, task, model, dataset, precision)
    source = "best" if checkpoint is None else Path(checkpoint).name
    out = Path(run_dir) / f"eval-{split}-{source}"
    out.mkdir(exist_ok=True)
    RunDir(out).write_json(
        out / "metrics.json",
        {"split": split, "weights": source, **metrics.scalars, "tables": metrics.tables},
    )
    task.save_figures(metrics, out)
    return metrics, out


def predict(
    run_dir: Path, inputs: list[dict[str, Any]], out_dir: Path, checkpoint: Path | None = None
) -> list[dict[str, Any]]:
    _, task, model = load_run(run_dir, checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        return task.predict(model, inputs, out_dir)
