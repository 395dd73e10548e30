"""The ledger: one line per run in `<output_dir>/ledger.jsonl`, so nobody keeps a hand-written
log of which hyper-parameters they already tried.

Each line holds the run's settings (flattened, dotted keys), its status and best metric. The
same experiment (identical settings apart from the run name) is recognised before training
starts, and `visiontune runs` prints the runs side by side with only the settings that differ.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from visiontune.config.load import flat_settings
from visiontune.config.schema import Config

LEDGER = "ledger.jsonl"
_NOT_SETTINGS = {"name", "output_dir"}


def settings(cfg: Config) -> dict[str, Any]:
    """Every option as a dotted key, without the run's name and location."""
    return {k: v for k, v in flat_settings(cfg).items() if k not in _NOT_SETTINGS}


def experiment_id(cfg: Config) -> str:
    text = json.dumps(settings(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read(output_dir: Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / LEDGER
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def earlier_runs(cfg: Config) -> list[dict[str, Any]]:
    """Finished entries of the ledger with exactly these settings."""
    wanted = experiment_id(cfg)
    return [e for e in read(cfg.output_dir) if e["experiment"] == wanted]


def record(cfg: Config, summary: dict[str, Any]) -> None:
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "name": cfg.name,
        "run_dir": summary["run_dir"],
        "experiment": experiment_id(cfg),
        "status": summary["status"],
        "steps": summary["steps"],
        "best": summary["best"],
        "accepted": summary["accepted"],
        "settings": settings(cfg),
    }
    with (Path(cfg.output_dir) / LEDGER).open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


def table(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: name, status, steps, best metric, then each setting that varies.

    A run resumed several times has several entries; its latest one stands for it.
    """
    entries = list({e["run_dir"]: e for e in entries}.values())
    varying = sorted(
        key
        for key in {k for e in entries for k in e["settings"]}
        if len({json.dumps(e["settings"].get(key)) for e in entries}) > 1
    )
    header = ["run", "status", "steps", "best", *varying]
    rows = []
    for e in entries:
        best = e["best"]
        shown = "-" if best["value"] is None else f"{best['metric']} {best['value']:.4f}"
        values = [_short(e["settings"].get(key)) for key in varying]
        rows.append([e["name"], str(e["status"]), str(e["steps"]), shown, *values])
    return header, rows


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
