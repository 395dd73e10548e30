"""Self-contained HTML pages (pictures inlined as base64): one for a run, one for a runs root.

A page a user opens in a browser, mails, or attaches to a ticket, with nothing beside it to
lose: the run's curves, its metrics with their 95% intervals, the acceptance criteria, the
confusion matrix; for a root, the runs table, the best run and the attempts log.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from visiontune.runs import attempts
from visiontune.runs.bootstrap import intervals
from visiontune.runs.record import scan

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f2f2f2; } img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.pass { color: #176f2c; } .fail { color: #b00020; } code { background: #f6f6f6; }
"""


def run_report(run_dir: Path) -> Path:
    """`<run>/report.html` for one run; returns its path."""
    run_dir = Path(run_dir)
    record = attempts.find_run(run_dir.parent, str(run_dir))
    interval_plot = plot_intervals(record, run_dir / "figures" / "metric_intervals.png")
    body = [f"<h1>{_e(record['name'])}: {_e(record['status'])}</h1>", _facts(record)]
    body += ["<h2>Metrics at the best evaluation</h2>", _metrics_table(record)]
    if record.get("criteria"):
        body += ["<h2>Acceptance criteria</h2>", _markdown(attempts.criteria_lines(record))]
    figures = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").is_dir() else []
    body += ["<h2>Pictures</h2>", *(_image(p) for p in figures if p != interval_plot)]
    if interval_plot is not None:
        body.append(_image(interval_plot))
    return _write(run_dir / "report.html", f"visiontune run {record['name']}", body)


def root_report(root: Path) -> Path:
    """`<root>/report.html`: the runs table, the best run, the attempts log, each run's curves."""
    found = scan(root)
    best = attempts.best_run(found.records)
    body = [f"<h1>Runs under {_e(str(Path(root).resolve()))}</h1>", _runs_table(found.records)]
    if best is not None:
        body.append(f"<h2>Best run: {_e(best['name'])}</h2>")
        curves = Path(best["run_dir"]) / "figures" / "training_curves.png"
        if curves.is_file():
            body.append(_image(curves))
    body += ["<h2>Attempts log</h2>", _markdown(attempts.attempts_log(root).splitlines())]
    return _write(Path(root) / "report.html", "visiontune runs", body)


def plot_intervals(record: dict[str, Any], path: Path) -> Path | None:
    """Every metric of the best weights' evaluation with its bootstrap 95% interval."""
    samples = attempts.eval_samples(record)
    if samples is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = intervals(samples)
    names = list(found)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    values = [found[n].value for n in names]
    low = [found[n].value - found[n].low for n in names]
    high = [found[n].high - found[n].value for n in names]
    ax.errorbar(values, range(len(names)), xerr=[low, high], fmt="o", capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlim=(-0.02, 1.02), title=f"{record['name']}: val metrics, bootstrap 95% intervals")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _facts(record: dict[str, Any]) -> str:
    cost = record.get("cost")
    rows = {
        "run directory": record["run_dir"],
        "steps": record.get("steps", "-"),
        "config hash": record["config_hash"],
        "data": f"{record['dataset']['files']} files, fingerprint {record['dataset']['hash']}",
        "code": f"visiontune {record['version']}, git {record.get('git_commit') or '-'}",
        "device-hours": f"{record.get('gpu_hours') or 0:.4f}",
        "cost": "-" if cost is None else f"{cost:.2f}",
    }
    return _table(["run", record["name"]], [[k, str(v)] for k, v in rows.items()])


def _metrics_table(record: dict[str, Any]) -> str:
    samples = attempts.eval_samples(record)
    bounds = intervals(samples) if samples is not None else {}
    rows = []
    for name, value in attempts.metrics_at_best(record).items():
        ci = bounds.get(name)
        rows.append([name, f"{value:.4f}", "-" if ci is None else f"[{ci.low:.4f}, {ci.high:.4f}]"])
    return _table(["metric", "value", "95% interval"], rows)


def _runs_table(records: list[dict[str, Any]]) -> str:
    keys = attempts.varying_settings(records)
    rows = []
    for r in records:
        best = r.get("best") or {}
        value = best.get("value")
        score = "-" if value is None else f"{best['metric']} {value:.4f}"
        cost = r.get("cost")
        rows.append(
            [r["name"], r["status"], str(r.get("steps", "-")), score,
             "-" if cost is None else f"{cost:.2f}",
             *(str(r["settings"].get(k)) for k in keys)]
        )  # fmt: skip
    return _table(["run", "status", "steps", "best", "cost", *keys], rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _markdown(lines: list[str]) -> str:
    """The few markdown forms the attempts log uses: headings, bullets, checkboxes, code."""
    out = []
    for line in lines:
        text = _e(line)
        text = text.replace("[x]", "&#9745;").replace("[ ]", "&#9744;")
        text = "".join(
            f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(text.split("`"))
        )
        text = text.replace("PASS", '<span class="pass">PASS</span>')
        text = text.replace("FAIL", '<span class="fail">FAIL</span>')
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 6)
            out.append(f"<h{level}>{text.lstrip('#').strip()}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{text[2:]}</li>")
        elif line.strip():
            out.append(f"<p>{text}</p>")
    return "\n".join(out)


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{_e(path.name)}" src="data:image/png;base64,{data}"></figure>'


def _write(path: Path, title: str, body: list[str]) -> Path:
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    path.write_text(page)
    return path


def _e(text: str) -> str:
    return html.escape(str(text))
