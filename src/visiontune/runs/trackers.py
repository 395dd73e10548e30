"""Optional experiment trackers; the run directory's JSONL files are always written.

None is needed to train: each mirrors what the loop logs (the resolved config as params, every
step's and every evaluation's scalars) into a tool people already use. The loop logs through
one call to a fan-out over the configured ones.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Protocol

from visiontune.config.load import flat_settings
from visiontune.config.schema import Config, MlflowConfig, WandbConfig
from visiontune.errors import ConfigError
from visiontune.runs.rundir import RunDir

# What a finished run leaves that a tracker keeps as artifacts (those present at close).
ARTIFACTS = ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json", "figures")


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float], prefix: str) -> None: ...

    def close(self) -> None: ...


class Trackers:
    """Every configured tracker behind the one `log`/`close` the loop calls."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        for tracker in self.trackers:
            tracker.log(step, scalars, prefix)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def build_trackers(cfg: Config, run: RunDir) -> Trackers | None:
    """The trackers `tracking` asks for; None when it asks for none."""
    found: list[Tracker] = []
    if cfg.tracking.tensorboard:
        found.append(TensorBoard(run.root / "tensorboard"))
    if cfg.tracking.mlflow is not None:
        found.append(MLflow(cfg, cfg.tracking.mlflow, run))
    if cfg.tracking.wandb is not None:
        found.append(WandB(cfg, cfg.tracking.wandb, run))
    return Trackers(found) if found else None


def numbers(scalars: dict[str, float]) -> dict[str, float]:
    """The finite numbers among `scalars` (flags as 0/1): what every tracker can plot."""
    out = {}
    for key, value in scalars.items():
        if isinstance(value, bool | int | float) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def _missing(key: str, package: str, extra: str) -> ConfigError:
    return ConfigError(
        [f"{key}: the {package} package is not installed (pip install 'visiontune[{extra}]')"]
    )


class TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tracking.tensorboard", "tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per training run: config as params, `train/...` and `eval/...` metrics
    per step, and the run directory's records and figures as artifacts at the end.

    The default store is a SQLite file in the runs root with artifacts beside it, so nothing
    lands in the working directory's ./mlruns.
    """

    def __init__(self, cfg: Config, settings: MlflowConfig, run: RunDir) -> None:
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Param
        except ImportError:
            raise _missing("tracking.mlflow", "mlflow-skinny", "mlflow") from None
        root = Path(cfg.output_dir).resolve()
        uri = settings.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir = run
        experiment = self.client.get_experiment_by_name(settings.experiment)
        if experiment is None:
            experiment_id = self.client.create_experiment(
                settings.experiment, artifact_location=(root / "mlartifacts").as_uri()
            )
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(
            experiment_id, run_name=cfg.name, tags={"visiontune.run_dir": str(run.root.resolve())}
        ).info.run_id
        params = [Param(key, str(value)) for key, value in flat_settings(cfg).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}/{k}", v, now, step) for k, v in numbers(scalars).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Called by `api.train` after the summary and the curves are written; called while
        an exception is handled, it marks the run FAILED."""
        failed = sys.exc_info()[0] is not None
        for name in ARTIFACTS:
            path = self.run_dir.root / name
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandB:
    """Weights & Biases, offline by default: the run is written under the run directory's
    wandb/ and uploaded later, if ever, with `wandb sync`."""

    def __init__(self, cfg: Config, settings: WandbConfig, run: RunDir) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("tracking.wandb", "wandb", "wandb") from None
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=settings.project,
            name=cfg.name,
            mode=settings.mode,
            dir=str(run.root),
            config=flat_settings(cfg),
            reinit="create_new",
        )

    def log(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in numbers(scalars).items()}, step=step)

    def close(self) -> None:
        """Called by `api.train` after the summary is written; called while an exception is
        handled, it marks the run failed."""
        self.run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
