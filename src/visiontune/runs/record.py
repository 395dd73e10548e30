"""The run record: `<run>/run.json`, the one machine-readable account of a run.

Each run writes only its own record (atomically, temp file + rename), so hundreds of SLURM
array jobs can share one runs root on a network filesystem without a lock: every ledger
command builds its view by scanning the run directories. The record holds what a hand-kept
"attempts log" would: the settings and a hash of those that change the result, which data it
saw (a fingerprint), which code (package version, git commit), when it started and ended, a
heartbeat, its status, its best and final metrics, its device-hours and cost.

A run killed with -9 cannot say so; its record still reads `running`, and the reader calls it
`interrupted` once the heartbeat is older than `STALE_AFTER_S`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune import __version__
from visiontune.config.load import flat_settings
from visiontune.config.schema import Config
from visiontune.runs.rundir import RunDir

RECORD = "run.json"
HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 600.0
CONTENT_HASH_MAX_BYTES = 64 * 2**20

# Keys that change where and how a run reports, never what it learns: two runs that differ
# only in them are the same experiment.
OUTPUT_ONLY = ("name", "output_dir", "tracking.", "train.log_every", "train.time_limit")

STATUS = {
    "completed": "completed",
    "failed": "failed",
    "early_stopped": "early-stopped",
    "stopped_by_budget": "stopped-by-budget",
    "time_limit": "stopped-by-time-limit",
}


def settings(cfg: Config) -> dict[str, Any]:
    """Every option as a dotted key, output-only keys left out."""
    return {k: v for k, v in flat_settings(cfg).items() if not k.startswith(OUTPUT_ONLY)}


def config_hash(cfg: Config) -> str:
    text = json.dumps(settings(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dataset_fingerprint(cfg: Config) -> dict[str, Any]:
    """Which data a run saw: every file under data.train/val/test with its size, hashed.

    Small sets (up to 64 MiB in all) hash the file contents, so a copy or a `touch` leaves the
    fingerprint alone; larger ones hash names, sizes and modification times, which costs one
    `stat` per file however big the images are.
    """
    files: list[tuple[str, Path]] = []
    for split in ("train", "val", "test"):
        root = getattr(cfg.data, split)
        if root is None:
            continue
        root = Path(root)
        found = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        files.extend(
            (f"{split}/{p.relative_to(root) if root.is_dir() else p.name}", p) for p in found
        )
    stats = [(name, path, path.stat()) for name, path in files if path.exists()]
    total = sum(stat.st_size for _, _, stat in stats)
    by_content = total <= CONTENT_HASH_MAX_BYTES
    digest = hashlib.sha256()
    for name, path, stat in stats:
        digest.update(f"{name}\0{stat.st_size}\0".encode())
        digest.update(path.read_bytes() if by_content else str(stat.st_mtime_ns).encode())
    return {
        "files": len(stats),
        "bytes": total,
        "method": "content" if by_content else "size+mtime",
        "hash": digest.hexdigest()[:16],
    }


def git_commit(directory: Path) -> str | None:
    """The commit checked out in `directory` (with `+dirty` for uncommitted changes), if any."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory, capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def status_of(record: dict[str, Any], now: float | None = None) -> str:
    """The record's status, `interrupted` for a `running` one whose heartbeat went stale."""
    status = str(record.get("status", "?"))
    now = time.time() if now is None else now
    if status == "running" and now - float(record.get("heartbeat", 0)) > STALE_AFTER_S:
        return "interrupted"
    return status


def status_name(stop_reason: str | None) -> str:
    """The record's status for the loop's stop reason."""
    reason = stop_reason or "failed"
    return "stopped-by-signal" if reason.startswith("signal") else STATUS.get(reason, reason)


def cost_so_far(record: dict[str, Any], now: float | None = None) -> float:
    """Cost of a record, a running one counted up to its latest heartbeat."""
    if record.get("status") == "running":
        alive = float(record.get("heartbeat", record["segment_started"]))
        if now is not None:
            alive = min(alive, now)
        hours = (record["earlier_seconds"] + alive - record["segment_started"]) / 3600
        return hours * record["devices"] * record["cost_per_gpu_hour"]
    return float(record.get("cost") or 0.0)


@dataclass
class RunRecord:
    """The record of the run training in `run`; only its own process writes it."""

    run: RunDir
    data: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def path(self) -> Path:
        return self.run.root / RECORD

    @classmethod
    def start(cls, run: RunDir, cfg: Config, resume: bool) -> RunRecord:
        """Write the `running` record; a resumed run keeps its start time and earlier hours."""
        earlier = read_record(run.root / RECORD) if resume else None
        now = time.time()
        data = {
            "name": cfg.name,
            "run_dir": str(run.root.resolve()),
            "task": cfg.task.type,
            "config_hash": config_hash(cfg),
            "settings": settings(cfg),
            "dataset": dataset_fingerprint(cfg),
            "version": __version__,
            "git_commit": git_commit(Path.cwd()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": (earlier or {}).get("started", now),
            "segment_started": now,
            "earlier_seconds": _seconds(earlier) if earlier else 0.0,
            "heartbeat": now,
            "ended": None,
            "status": "running",
            "metric": cfg.eval.metric,
            "mode": cfg.eval.mode,
            "devices": 1,  # the runner trains on one device
            "cost_per_gpu_hour": cfg.tracking.cost_per_gpu_hour,
            "budget": cfg.tracking.budget,
            "criteria": dict(cfg.acceptance),
        }
        record = cls(run, data)
        record.write()
        return record

    def write(self) -> None:
        with self.lock:
            self.run.write_json(self.path, self.data)

    def beat(self) -> None:
        """Heartbeats stop once the run has ended: a late beat must not reopen it."""
        with self.lock:
            if self.data["ended"] is not None:
                return
            self.data["heartbeat"] = time.time()
            self.run.write_json(self.path, self.data)

    def finish(self, summary: dict[str, Any]) -> None:
        """Status, end time, metrics, device-hours and cost, from the run's summary."""
        with self.lock:
            self._finish(summary)
        self.write()

    def _finish(self, summary: dict[str, Any]) -> None:
        now = time.time()
        seconds = self.data["earlier_seconds"] + now - self.data["segment_started"]
        hours = seconds / 3600 * self.data["devices"]
        self.data.update(
            status=status_name(summary["status"]),
            ended=now,
            heartbeat=now,
            seconds=round(seconds, 3),
            steps=summary["steps"],
            best=summary["best"],
            final=summary["last_eval"],
            acceptance=summary["acceptance"],
            gpu_hours=hours,
            cost=hours * self.data["cost_per_gpu_hour"],
            error=summary.get("error"),
        )


def _seconds(record: dict[str, Any]) -> float:
    if record.get("seconds") is not None:
        return float(record["seconds"])
    return float(record["earlier_seconds"]) + float(record["heartbeat"]) - record["segment_started"]


class Heartbeat:
    """Rewrites the record's heartbeat every `HEARTBEAT_EVERY_S` from a daemon thread, so a
    long evaluation or a slow step never reads as a dead run."""

    def __init__(self, record: RunRecord, every_s: float = HEARTBEAT_EVERY_S) -> None:
        self.record, self.every_s = record, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="visiontune-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self.record.beat()


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Scan:
    """The records under a runs root, and the record files that could not be read."""

    records: list[dict[str, Any]]
    unreadable: list[tuple[Path, str]]


def scan(root: Path) -> Scan:
    """Every run directory's record under `root` (one level), oldest start first.

    A half-written or damaged record is listed with its path and reason; the others still
    count. The reader adds `status` as it is now (stale heartbeats read `interrupted`).
    """
    records, unreadable = [], []
    root = Path(root)
    paths = sorted(root.glob(f"*/{RECORD}")) if root.is_dir() else []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or "config_hash" not in data:
                raise ValueError("not a run record")
        except (OSError, ValueError) as err:
            unreadable.append((path, str(err)))
            continue
        data["status"] = status_of(data)
        data["dir"] = path.parent.name
        records.append(data)
    records.sort(key=lambda r: float(r.get("started") or 0))
    return Scan(records, unreadable)
