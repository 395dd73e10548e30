"""The attempts log a user used to keep by hand, kept from the run records: which run is best
and with which settings, how every other attempt differs from it, what each cost, whether the
acceptance criteria hold, and whether a difference between two runs is more than noise.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontune.errors import VisiontuneError
from visiontune.metrics.acceptance import judge
from visiontune.runs.bootstrap import Interval, Samples, intervals, paired_difference, verdict
from visiontune.runs.record import RECORD, Scan, read_record, scan, status_of
from visiontune.runs.rundir import read_jsonl

FINISHED = {"completed", "early-stopped", "stopped-by-budget"}


def find_run(root: Path, run: str) -> dict[str, Any]:
    """A record by run directory path or by run name under `root`."""
    for path in (Path(run) / RECORD, Path(root) / run / RECORD):
        if path.is_file():
            record = read_record(path)
            if record is None:
                raise VisiontuneError(f"{path}: the run record is unreadable (half-written?)")
            record["status"] = status_of(record)
            record["dir"] = path.parent.name
            return record
    names = ", ".join(r["name"] for r in scan(root).records) or "none"
    raise VisiontuneError(f"no run {run!r} (as a path or under {root}); runs there: {names}")


def eval_history(record: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(record["run_dir"]) / "eval.jsonl"
    return read_jsonl(path) if path.is_file() else []


def metrics_at_best(record: dict[str, Any]) -> dict[str, float]:
    """Every metric of the evaluation that selected best/ (else the last one)."""
    best_step = (record.get("best") or {}).get("step")
    history = eval_history(record)
    row = next((e for e in history if e.get("step") == best_step), None)
    row = row or (history[-1] if history else record.get("final") or {})
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}


def known_metrics(records: list[dict[str, Any]]) -> list[str]:
    return sorted({name for r in records for name in metrics_at_best(r)})


def check_metric(records: list[dict[str, Any]], metric: str) -> None:
    known = known_metrics(records)
    if metric not in known:
        raise VisiontuneError(f"unknown metric {metric!r}; known: {', '.join(known) or 'none'}")


def direction(record: dict[str, Any], metric: str) -> str:
    """max or min: the run's own eval.mode for its selection metric; losses go down."""
    if metric == record.get("metric"):
        return str(record.get("mode", "max"))
    return "min" if "loss" in metric else "max"


def sorted_by(records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best first; runs without the metric last."""
    check_metric(records, metric)
    flip = -1 if records and direction(records[0], metric) == "max" else 1

    def key(record: dict[str, Any]) -> tuple[int, float]:
        value = metrics_at_best(record).get(metric)
        return (1, 0.0) if value is None else (0, flip * value)

    return sorted(records, key=key)


def best_run(records: list[dict[str, Any]], metric: str | None = None) -> dict[str, Any] | None:
    """The best finished run by `metric` (default: the runs' own selection metric)."""
    done = [r for r in records if r["status"] in FINISHED]
    if not done:
        return None
    metric = metric or str(done[0].get("metric"))
    ranked = [r for r in sorted_by(done, metric) if metric in metrics_at_best(r)]
    return ranked[0] if ranked else None


def eval_samples(record: dict[str, Any]) -> Samples | None:
    """Per-sample predictions of the run's best weights on val, if `visiontune eval` saved them."""
    for path in sorted(Path(record["run_dir"]).glob("eval-val-best*/metrics.json")):
        tables = json.loads(path.read_text()).get("tables", {})
        if "samples" in tables and "classes" in tables:
            return Samples.from_table(tables["samples"], tables["classes"])
    return None


@dataclass
class Diff:
    settings: list[tuple[str, Any, Any]]
    metrics: list[tuple[str, float | None, float | None]]
    noise: dict[str, Interval]


def diff(a: dict[str, Any], b: dict[str, Any]) -> Diff:
    """Settings that differ, metrics at best of both, and paired intervals of the metric
    differences when both runs' best weights were evaluated on the same val samples."""
    keys = sorted(set(a["settings"]) | set(b["settings"]))
    settings = [
        (k, a["settings"].get(k), b["settings"].get(k))
        for k in keys
        if a["settings"].get(k) != b["settings"].get(k)
    ]
    ma, mb = metrics_at_best(a), metrics_at_best(b)
    metrics = [(k, ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb))]
    noise: dict[str, Interval] = {}
    sa, sb = eval_samples(a), eval_samples(b)
    if sa is not None and sb is not None and sorted(sa.ids) == sorted(sb.ids):
        noise = paired_difference(sa, sb)
    return Diff(settings, metrics, noise)


def diff_lines(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    result = diff(a, b)
    lines = [f"{a['name']} -> {b['name']}", "settings:"]
    lines += [f"  {k}: {_show(x)} -> {_show(y)}" for k, x, y in result.settings] or ["  (same)"]
    lines.append("metrics at the best evaluation:")
    for name, x, y in result.metrics:
        if name in result.noise and x is not None and y is not None:
            lines.append("  " + verdict(name, x, y, result.noise[name]))
        else:
            lines.append(f"  {name}: {_num(x)} -> {_num(y)}")
    if not result.noise:
        lines.append(
            "  (no interval: run `visiontune eval RUN` on both to save per-sample predictions)"
        )
    return lines


def criteria_lines(record: dict[str, Any]) -> list[str]:
    """PASS on the point estimate; `not yet proven` when the interval's lower bound fails."""
    criteria = record.get("criteria") or {}
    values = metrics_at_best(record)
    samples = eval_samples(record)
    bounds = intervals(samples) if samples is not None else {}
    lines = []
    for name, text in criteria.items():
        value = values.get(name)
        if value is None:
            lines.append(f"- [ ] {name} {text}: FAIL (not measured)")
            continue
        passed = bool(judge({name: text}, {name: value})[name]["passed"])
        ci = bounds.get(name)
        line = f"{name} {text}: {'PASS' if passed else 'FAIL'} ({value:.4f}"
        if ci is not None:
            line += f", 95% CI [{ci.low:.4f}, {ci.high:.4f}]"
            weakest = ci.low if text.strip().startswith(">") else ci.high
            if passed and not judge({name: text}, {name: weakest})[name]["passed"]:
                line += "; not yet proven"
        lines.append(f"- [{'x' if passed else ' '}] {line})")
    return lines


def attempts_log(root: Path, metric: str | None = None) -> str:
    """The markdown attempts log of a runs root."""
    found = scan(root)
    records = found.records
    lines = [f"# Training attempts: {Path(root).resolve()}", ""]
    lines.append(f"_written {time.strftime('%Y-%m-%d %H:%M')} from {len(records)} run records_")
    best = best_run(records, metric)
    if best is not None:
        name = metric or best["metric"]
        lines += ["", f"## Best: {best['name']} ({name} {metrics_at_best(best)[name]:.4f})", ""]
        varied = varying_settings(records)
        lines.append(f"Full resolved config: `{best['run_dir']}/config.yaml`. Settings tried:")
        lines += [""] + [f"- `{k}`: {_show(best['settings'].get(k))}" for k in varied]
        if best.get("criteria"):
            lines += ["", "### Acceptance criteria", "", *criteria_lines(best)]
    lines += ["", "## Attempts", ""]
    for record in records:
        lines += _attempt(record, best)
    lines += ["## Spend", "", _spend(records)]
    if found.unreadable:
        lines += ["", "## Unreadable records", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in found.unreadable]
    return "\n".join(lines) + "\n"


def varying_settings(records: list[dict[str, Any]]) -> list[str]:
    """The settings on which the runs differ: what was tried."""
    every = sorted({k for r in records for k in r["settings"]})
    return [k for k in every if len({repr(r["settings"].get(k)) for r in records}) > 1]


def _attempt(record: dict[str, Any], best: dict[str, Any] | None) -> list[str]:
    cost = record.get("cost")
    lines = [
        f"### {record['name']}: {record['status']}",
        "",
        f"- steps {record.get('steps', '-')}, device-hours {record.get('gpu_hours') or 0:.3f}"
        + (f", cost {cost:.2f}" if cost is not None else ""),
    ]
    if best is not None and record is not best:
        differing = diff(best, record).settings
        changes = [f"`{k}` {_show(y)} (best: {_show(x)})" for k, x, y in differing]
        lines.append("- differs from the best: " + ("; ".join(changes) or "nothing (a repeat)"))
    metric = record.get("metric")
    trajectory = [f"{e['step']}: {e[metric]:.4f}" for e in eval_history(record) if metric in e]
    if trajectory:
        lines.append(f"- {metric} by step: " + ", ".join(trajectory))
    if record.get("error"):
        lines.append(f"- error: {record['error']}")
    return [*lines, ""]


def _spend(records: list[dict[str, Any]]) -> str:
    spent = sum(float(r.get("cost") or 0.0) for r in records)
    budgets = {r.get("budget") for r in records} - {None}
    text = f"total spend {spent:.2f}"
    if budgets:
        budget = max(budgets)
        text += f" of a budget of {budget:.2f} ({budget - spent:.2f} left)"
    return text


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def scan_or_fail(root: Path) -> Scan:
    found = scan(root)
    if not found.records and not found.unreadable:
        raise VisiontuneError(f"no run records (*/run.json) under {root}")
    return found
