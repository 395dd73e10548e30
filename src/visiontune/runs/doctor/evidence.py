"""What a run left behind, read so that a missing or damaged file narrows the diagnosis
instead of ending it: every reading problem becomes a note in the report."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from visiontune.config.schema import Config
from visiontune.errors import VisiontuneError
from visiontune.runs.rundir import LOGGER, RunDir, read_jsonl

Level = Literal["ok", "warn", "not checked"]

# Metrics that count hits among n samples, so their evaluation noise is binomial.
PROPORTION_METRICS = ("accuracy", "click_accuracy")
PER_CLASS_PROPORTIONS = ("sensitivity.", "specificity.")


@dataclass
class Finding:
    """One verdict: `title` carries the number, `evidence` what it was computed from."""

    rule: str
    level: Level
    title: str
    evidence: str = ""


@dataclass
class Report:
    run_dir: Path
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figure: Path | None = None

    def of(self, level: Level) -> list[Finding]:
        return [f for f in self.findings if f.level == level]

    def text(self) -> str:
        lines = [f"visiontune doctor {self.run_dir}"]
        lines += [f"note: {note}" for note in self.notes]
        for level in ("warn", "ok"):
            for f in self.of(level):  # type: ignore[arg-type]
                lines.append(f"[{level:4s}] {f.rule}: {f.title}")
                if f.evidence:
                    lines.append(f"       evidence: {f.evidence}")
        skipped = self.of("not checked")
        if skipped:
            lines.append("could not check:")
            lines += [f"  - {f.rule}: {f.title}" for f in skipped]
        warned = len(self.of("warn"))
        lines.append(f"{warned} warning(s), {len(self.of('ok'))} check(s) passed")
        if self.figure is not None:
            lines.append(f"figure: {self.figure}")
        return "\n".join(lines)


@dataclass
class Evidence:
    run: RunDir
    cfg: Config | None
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    summary: dict[str, Any]
    log_lines: list[str]
    notes: list[str]

    @cached_property
    def updates_per_epoch(self) -> int | None:
        """From the logged epoch fraction (step / updates per epoch, rounded to 4 places)."""
        for record in reversed(self.steps):
            epoch = record.get("epoch")
            if isinstance(epoch, int | float) and epoch > 0:
                return max(1, round(record["step"] / epoch))
        return None

    @cached_property
    def total_steps(self) -> int | None:
        if self.cfg is None:
            return None
        if self.cfg.train.max_steps:
            return self.cfg.train.max_steps
        per_epoch = self.updates_per_epoch or self.data_updates_per_epoch
        if per_epoch is None or self.cfg.train.epochs is None:
            return None
        return math.ceil(self.cfg.train.epochs * per_epoch)

    @property
    def data_updates_per_epoch(self) -> int | None:
        if self.cfg is None or self.splits is None:
            return None
        train = self.cfg.train
        samples = len(self.splits.train)
        if train.max_samples:
            samples = min(samples, train.max_samples)
        batches = math.ceil(samples / train.micro_batch_size)
        if train.overfit_batches:
            batches = min(batches, train.overfit_batches)
        return math.ceil(batches / train.grad_accum_steps)

    @cached_property
    def splits(self) -> Any:
        """The run's data as its config reads it today, or None (with a note) when it no
        longer loads: data checks then say so instead of failing the whole diagnosis."""
        if self.cfg is None:
            return None
        if not Path(self.cfg.data.train).exists():
            # checked first: building the task would fetch a hub model's processor for nothing
            self.notes.append(
                f"data.train {self.cfg.data.train} no longer exists; data not checked"
            )
            return None
        from visiontune import api

        logging.getLogger(LOGGER).disabled = True  # the loaders' own warnings are not findings
        try:
            return api.make_task(self.cfg).datasets()
        except (VisiontuneError, OSError) as err:
            self.notes.append(f"the data of config.yaml did not load ({err}); data not checked")
            return None
        finally:
            logging.getLogger(LOGGER).disabled = False

    def eval_samples(self, metric: str) -> int | None:
        """How many samples a proportion metric counts on the eval split, else None."""
        if self.splits is None or self.cfg is None:
            return None
        dataset = self.splits.get(self.cfg.eval.split)
        if dataset is None:
            return None
        if metric in PROPORTION_METRICS:
            return len(dataset)
        for prefix in PER_CLASS_PROPORTIONS:
            if metric.startswith(prefix) and hasattr(dataset, "labels"):
                name = metric[len(prefix) :]
                classes = list(self.cfg.data.classes or [])
                if name not in classes:
                    return None
                hits = sum(label == classes.index(name) for label in dataset.labels)
                return hits if prefix == "sensitivity." else len(dataset.labels) - hits
        return None


def load_evidence(root: Path) -> Evidence:
    run = RunDir(root)
    notes: list[str] = []
    if not root.is_dir():
        raise VisiontuneError(f"{root} is not a directory")
    cfg = _config(run, notes)
    steps = _records(run.metrics, "optimizer step", notes)
    evals = _records(run.evals, "evaluation", notes)
    summary: dict[str, Any] = {}
    if run.summary.is_file():
        try:
            summary = json.loads(run.summary.read_text())
        except ValueError as err:
            notes.append(f"{run.summary}: not valid JSON ({err}); status and counts unknown")
    else:
        notes.append("no summary.json: the run is still training, or was killed")
    log_lines = run.log.read_text(errors="replace").splitlines() if run.log.is_file() else []
    if not log_lines:
        notes.append("no train.log: skipped samples are known only from summary.json")
    return Evidence(run, cfg, steps, evals, summary, log_lines, notes)


def _config(run: RunDir, notes: list[str]) -> Config | None:
    from visiontune.config.load import load_config

    if not run.config.is_file():
        notes.append(f"no {run.config.name}: settings, schedule and data not checked")
        return None
    try:
        return load_config(run.config)
    except VisiontuneError as err:
        notes.append(
            f"{run.config} does not load with this visiontune (an older run?): {err}; "
            "settings, schedule and data not checked"
        )
        return None


def _records(path: Path, what: str, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        notes.append(f"no {path.name} yet: no {what} logged")
        return []
    logger = logging.getLogger(LOGGER)
    torn = _TornLines()
    logger.addHandler(torn)
    try:
        records = read_jsonl(path)
    except VisiontuneError as err:
        notes.append(f"{err}; its checks not run")
        return []
    finally:
        logger.removeHandler(torn)
    notes.extend(torn.messages)
    good = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]
    if len(good) < len(records):
        notes.append(f"{path}: {len(records) - len(good)} record(s) without a step left out")
    if not good:
        notes.append(f"{path.name} holds no {what} yet")
    return good


class _TornLines(logging.Handler):
    """Collects read_jsonl's torn-last-line warning, so the report names it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(
            record.getMessage() + " (written while the run was being killed or still writing)"
        )
