"""The ledger: one line per run in `<output_dir>/ledger.jsonl`, so nobody keeps a hand-written
log of which hyper-parameters they already tried.

Each line holds the run's settings (flattened, dotted keys), its status and best metric. The
same experiment (identical settings apart from the run name) is recognised before training
starts, and `visiontune runs` prints the runs side by side, one table per task, with only the
settings that differ between that task's runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontune.config.load import flat_settings
from visiontune.config.schema import Config
from visiontune.runs.rundir import append_jsonl, read_jsonl

if TYPE_CHECKING:
    from rich.table import Table

LEDGER = "ledger.jsonl"
MAX_SETTINGS = 8
FIXED_COLUMNS = 4  # run, status, steps, best
_NOT_SETTINGS = {"name", "output_dir"}


def settings(cfg: Config) -> dict[str, Any]:
    """Every option as a dotted key, without the run's name and location."""
    return {k: v for k, v in flat_settings(cfg).items() if k not in _NOT_SETTINGS}


def experiment_id(cfg: Config) -> str:
    text = json.dumps(settings(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read(output_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(output_dir) / LEDGER)


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
    append_jsonl(Path(cfg.output_dir) / LEDGER, entry)


@dataclass(frozen=True)
class RunTable:
    """One task's runs side by side: name, status, steps, best metric, differing settings.

    Settings come most-varied first. `left_out` names the differing settings beyond the cap:
    a table wider than a terminal gets squeezed until nothing in it can be read.
    """

    task: str
    header: list[str]
    rows: list[list[str]]
    left_out: list[str]

    def to_rich(self, width: int) -> Table:
        """A rich table at most `width` characters wide that never shortens a run name.

        Setting columns that would not fit are dropped, least varied first, and named in the
        caption with those beyond the cap; a dotted key's header breaks at its dots.
        """
        from rich.table import Table

        columns = [_column_width(i, self.header, self.rows) for i in range(len(self.header))]
        used, shown = 1 + sum(columns[:FIXED_COLUMNS]), FIXED_COLUMNS
        while shown < len(columns) and used + columns[shown] <= width:
            used, shown = used + columns[shown], shown + 1
        hidden = [*self.header[shown:], *self.left_out]
        caption = None
        if hidden:
            names = ", ".join(hidden[:4]) + (", ..." if len(hidden) > 4 else "")
            caption = f"{len(hidden)} more differing setting(s) not shown: {names}"
        table = Table(title=f"task: {self.task}", caption=caption, caption_justify="left")
        table.add_column(self.header[0], no_wrap=True, min_width=columns[0] - 3)
        for name in self.header[1:shown]:
            table.add_column(name.replace(".", ".\n"), overflow="fold")
        for row in self.rows:
            table.add_row(*row[:shown])
        return table


def tables(entries: list[dict[str, Any]], max_settings: int = MAX_SETTINGS) -> list[RunTable]:
    """One table per task (in order of first appearance), each showing only the settings that
    differ between that task's runs, at most `max_settings` of them.

    Settings shared by every run of a task say nothing, and a classify run's settings say
    nothing about a ground run, so both stay out. When more than `max_settings` differ, the ones
    on which the most runs depart from the task's usual value are shown (what was swept), ties
    by name. A run resumed several times has several entries; its latest one stands for it.
    """
    latest = list({e["run_dir"]: e for e in entries}.values())
    by_task: dict[str, list[dict[str, Any]]] = {}
    for entry in latest:
        by_task.setdefault(str(entry["settings"].get("task.type", "?")), []).append(entry)
    return [_task_table(task, runs, max_settings) for task, runs in by_task.items()]


def _task_table(task: str, runs: list[dict[str, Any]], max_settings: int) -> RunTable:
    departures: dict[str, int] = {}
    for key in {k for e in runs for k in e["settings"]}:
        counts = Counter(json.dumps(e["settings"].get(key), sort_keys=True) for e in runs)
        if len(counts) > 1:
            departures[key] = len(runs) - max(counts.values())
    ranked = sorted(departures, key=lambda k: (-departures[k], k))
    shown = ranked[:max_settings]
    rows = []
    for e in runs:
        best = e["best"]
        score = "-" if best["value"] is None else f"{best['metric']} {best['value']:.4f}"
        values = [_short(e["settings"].get(key)) for key in shown]
        rows.append([e["name"], str(e["status"]), str(e["steps"]), score, *values])
    header = ["run", "status", "steps", "best", *shown]
    return RunTable(task, header, rows, ranked[max_settings:])


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _column_width(index: int, header: list[str], rows: list[list[str]]) -> int:
    """Characters a column takes in a rich table: content, two of padding, one of border."""
    title = max(len(part) for part in header[index].replace(".", ".\n").splitlines())
    return max([title, *(len(row[index]) for row in rows)]) + 3
