"""Layout of `runs/<name>/` and the rule that nothing already written is ever lost.

runs/<name>/
  config.yaml      resolved config          train.log      everything logged
  metrics.jsonl    one line per optimizer step
  eval.jsonl       one line per evaluation  summary.json   the end of the story
  checkpoints/     step-XXXXXXXX/ (complete ones have manifest.json)
  best/            weights of the best evaluation (PEFT adapter + trainable.safetensors)
  figures/         loss curves, confusion matrices, masks
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from visiontune.errors import VisiontuneError

LOGGER = "visiontune"


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    evals = property(lambda self: self.root / "eval.jsonl")
    log = property(lambda self: self.root / "train.log")
    checkpoints = property(lambda self: self.root / "checkpoints")
    best = property(lambda self: self.root / "best")
    figures = property(lambda self: self.root / "figures")
    summary = property(lambda self: self.root / "summary.json")
    base_weights = property(lambda self: self.root / "base_weights.safetensors")

    @classmethod
    def prepare(cls, root: Path, resume: bool, overwrite: bool) -> RunDir:
        """Create the run dir; refuse an existing one unless resuming or overwriting.

        `--overwrite` never deletes: the old directory is renamed aside with a timestamp.
        `--resume` of a run that does not exist yet starts it, so one SLURM script serves the
        first job and every requeued one.
        """
        if root.exists() and any(root.iterdir()):
            if overwrite:
                aside = root.with_name(f"{root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                root.rename(aside)
                logging.getLogger(LOGGER).warning("moved the existing %s aside to %s", root, aside)
            elif not resume:
                raise VisiontuneError(
                    f"run directory {root} already exists: pass --resume to continue it or "
                    "--overwrite to start again (the old one is kept, renamed aside)"
                )
        elif resume:
            logging.getLogger(LOGGER).warning("--resume: %s is new; starting at step 0", root)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def append_jsonl(self, path: Path, record: dict[str, Any]) -> None:
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def write_json(self, path: Path, record: dict[str, Any]) -> None:
        path.write_text(json.dumps(record, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def setup_logging(log_file: Path | None, debug: bool = False) -> logging.Logger:
    """Console (rich on a terminal, plain lines otherwise, e.g. SLURM logs) plus train.log."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if sys.stdout.isatty():
        from rich.logging import RichHandler

        console: logging.Handler = RichHandler(show_path=False, markup=False)
    else:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(console)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger
