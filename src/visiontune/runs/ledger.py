"""The ledger: every run under a runs root, built by scanning the run directories' records.

There is no shared file to lock: each run writes only its own `run.json` (see record.py), and
every ledger view is a scan. `ledger.jsonl` at the root is a cache, rewritten whole and
atomically from a scan after each run, for people and scripts that read one file; deleting it
loses nothing. The same experiment (identical result-changing settings and identical data) is
recognised before training starts.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontune.config.schema import Config
from visiontune.runs.record import config_hash, dataset_fingerprint, scan
from visiontune.runs.rundir import RunDir

if TYPE_CHECKING:
    from rich.table import Table

LEDGER = "ledger.jsonl"
MAX_SETTINGS = 8
FIXED_COLUMNS = 4  # run, status, steps, best
# A new run with the same settings and data as one of these repeats it; a failed or
# interrupted run is no result, so trying again is not a repeat.
REPEATED = {
    "running",
    "completed",
    "early-stopped",
    "stopped-by-budget",
    "stopped-by-signal",
    "stopped-by-time-limit",
}


def read(output_dir: Path) -> list[dict[str, Any]]:
    """The readable records under a runs root, oldest first."""
    return scan(Path(output_dir)).records


def earlier_runs(cfg: Config) -> list[dict[str, Any]]:
    """Finished or running runs with these settings on this data, other than `cfg.run_dir`.

    A directory renamed aside by `--overwrite` was replaced on purpose and does not count.
    """
    wanted, data = config_hash(cfg), None
    here = str(cfg.run_dir.resolve())
    found = []
    for record in read(cfg.output_dir):
        replaced = record["dir"].startswith(f"{cfg.name}.replaced-")
        if record["config_hash"] != wanted or record["run_dir"] == here or replaced:
            continue
        if record["status"] not in REPEATED:
            continue
        data = data or dataset_fingerprint(cfg)
        if record["dataset"]["hash"] == data["hash"]:
            found.append(record)
    return found


def write_cache(output_dir: Path) -> None:
    """Rewrite `ledger.jsonl` whole from a scan: parallel writers each leave a complete file."""
    records = read(output_dir)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    RunDir(Path(output_dir)).write_text(Path(output_dir) / LEDGER, text)


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
    groups: dict[str, list[dict[str, Any]]] = {}
    for task, runs in by_task.items():
        metrics = {_best(e)["metric"] for e in runs}
        for e in runs:
            title = task if len(metrics) == 1 else f"{task}, selected by {_best(e)['metric']}"
            groups.setdefault(title, []).append(e)
    return [_task_table(title, runs, max_settings) for title, runs in groups.items()]


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
        best = _best(e)
        score = "-" if best["value"] is None else f"{best['metric']} {best['value']:.4f}"
        values = [_short(e["settings"].get(key)) for key in shown]
        rows.append([e["name"], str(e["status"]), str(e.get("steps", "-")), score, *values])
    header = ["run", "status", "steps", "best", *shown]
    return RunTable(task, header, rows, ranked[max_settings:])


def _best(entry: dict[str, Any]) -> dict[str, Any]:
    """The best metric, `value` None for a run that has not evaluated yet."""
    return entry.get("best") or {"metric": entry.get("metric", "?"), "value": None, "step": None}


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _column_width(index: int, header: list[str], rows: list[list[str]]) -> int:
    """Characters a column takes in a rich table: content, two of padding, one of border."""
    title = max(len(part) for part in header[index].replace(".", ".\n").splitlines())
    return max([title, *(len(row[index]) for row in rows)]) + 3
