"""Layout of `runs/<name>/` and the rule that nothing already written is ever lost.

runs/<name>/
  config.yaml      resolved config          train.log      everything logged
  metrics.jsonl    one line per optimizer step
  eval.jsonl       one line per evaluation  summary.json   the end of the story
  checkpoints/     step-XXXXXXXX/ (complete ones have manifest.json)
  best/            weights of the best evaluation (PEFT adapter + trainable.safetensors)
  figures/         loss curves, confusion matrices, masks
  train.lock       held by the process that trains here (pid, host, start time inside)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from visiontune.engine.checkpoint import clean_stale
from visiontune.errors import VisiontuneError

LOGGER = "visiontune"
LOCK = "train.lock"

_logger = logging.getLogger(LOGGER)

# One descriptor per locked run directory for the whole process: POSIX record locks belong to
# the process, and closing ANY descriptor of the file drops them, so the lock file is never
# opened twice by the process that holds it.
_held_locks: dict[Path, int] = {}


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
        """Lock the run dir for this process; refuse an existing one unless resuming or
        overwriting.

        `--overwrite` never deletes: the old directory is renamed aside with a timestamp.
        `--resume` of a run that does not exist yet starts it, so one SLURM script serves the
        first job and every requeued one. The lock is taken before anything is decided, so a
        second job on the same directory (resume or overwrite alike) is refused, and what
        killed saves left behind is cleaned only once nobody can still be writing it.
        """
        if root.exists():
            lock_run(root)
            if any(p.name != LOCK for p in root.iterdir()):
                if overwrite:
                    aside = root.with_name(f"{root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                    root.rename(aside)
                    release_run(root)
                    _logger.warning("moved the existing %s aside to %s", root, aside)
                elif not resume:
                    release_run(root)
                    raise VisiontuneError(
                        f"run directory {root} already exists: pass --resume to continue it or "
                        "--overwrite to start again (the old one is kept, renamed aside)"
                    )
                else:
                    clean_stale(root)
                    clean_stale(root / "checkpoints")
        elif resume:
            _logger.warning("--resume: %s is new; starting at step 0", root)
        root.mkdir(parents=True, exist_ok=True)
        lock_run(root)
        return cls(root)

    def release(self) -> None:
        """Give the lock back before the process ends (a library caller that trains again)."""
        release_run(self.root)

    def append_jsonl(self, path: Path, record: dict[str, Any]) -> None:
        append_jsonl(path, record)

    def write_json(self, path: Path, record: dict[str, Any]) -> None:
        """Strict JSON, replaced atomically: a kill mid-write keeps the previous version."""
        _replace_text(path, json.dumps(_finite(record), indent=2, allow_nan=False) + "\n")

    def write_text(self, path: Path, text: str) -> None:
        """Replaced atomically: a reader sees the old file or the new one, never half."""
        _replace_text(path, text)

    def truncate_records(self, step: int) -> None:
        """Keep only records with `step <= step` in metrics.jsonl and eval.jsonl.

        Called on resume from the checkpoint of `step`: the steps a killed job logged after
        its last checkpoint are trained again and would otherwise appear twice. Each file is
        rewritten through a temp file and a rename, so a kill here loses nothing.
        """
        for path in (self.metrics, self.evals):
            if not path.is_file():
                continue
            lines = _parse_lines(path)
            kept = [text for text, record in lines if record.get("step", 0) <= step]
            _replace_text(path, "".join(text + "\n" for text in kept))
            if len(kept) < len(lines):
                _logger.info(
                    "%s: dropped %d record(s) after step %d (logged after the checkpoint "
                    "resumed from)", path, len(lines) - len(kept), step,
                )  # fmt: skip


def lock_run(root: Path) -> None:
    """Lock `root` for this process, or refuse naming the process that holds it.

    `fcntl.lockf` (a POSIX record lock), not `flock`: NFSv3 (through the NLM lock manager)
    and NFSv4 carry record locks to the server, so two jobs on different nodes see each
    other, whereas `flock` on NFS is local to one node on older kernels and BSDs. The kernel
    (or the NFS server, once the client's lease lapses) drops the lock when the process dies,
    by kill -9 too, so a crashed job never blocks its requeued successor; the pid, host and
    time written in the file only tell the user who holds it. Re-locking a directory this
    process already holds is a no-op.
    """
    path = (root / LOCK).resolve()
    if path in _held_locks:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise VisiontuneError(
                f"run directory {root} is in use by {_holder(path)}: two jobs training in one "
                "run directory overwrite each other's checkpoints. Wait for that job, stop it, "
                "or give this one another run name"
            ) from None
        _logger.warning(
            "cannot lock %s (%s): this filesystem offers no locks, so a second job training "
            "in the same run directory would not be detected", path, exc,
        )  # fmt: skip
        return
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _held_locks[path] = fd


def release_run(root: Path) -> None:
    """Drop this process's lock on `root` (no-op if it holds none).

    Keyed by the path it was locked under, so it also releases a directory just renamed aside.
    """
    fd = _held_locks.pop((root / LOCK).resolve(), None)
    if fd is not None:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on host {holder['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded its pid yet)"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one strict-JSON line (NaN and infinities become null).

    A line torn by a full disk or a kill is repaired first, so the new record never glues
    onto it and turns a skippable torn last line into a corrupt middle one.
    """
    line = json.dumps(_finite(record), allow_nan=False) + "\n"
    _repair_torn_tail(path)
    with path.open("a") as fh:
        fh.write(line)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a run's jsonl file: the one reader of metrics.jsonl and eval.jsonl.

    A torn final line (a full disk or a kill mid-append) is skipped with a warning; a bad
    line anywhere else means the file was damaged otherwise and is an error naming it.
    """
    return [record for _, record in _parse_lines(path)]


def _parse_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line text, record) pairs, blank lines and a torn final line left out."""
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    numbered = [(n, text) for n, text in enumerate(lines, start=1) if text.strip()]
    parsed = []
    for i, (number, text) in enumerate(numbered):
        try:
            parsed.append((text, json.loads(text)))
        except ValueError as exc:
            if i < len(numbered) - 1:
                raise VisiontuneError(
                    f"{path}:{number}: not valid JSON ({exc}); only a torn last line is "
                    "skipped, so this file was damaged some other way"
                ) from None
            _logger.warning(
                "%s:%d: skipped a torn last line (%d characters)", path, number, len(text)
            )
    return parsed


def _repair_torn_tail(path: Path) -> None:
    """End the file on a newline: complete a whole record, cut off a torn one."""
    try:
        with path.open("rb") as fh:
            if fh.seek(0, os.SEEK_END) == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) == b"\n":
                return
    except FileNotFoundError:
        return
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:
        _logger.warning("%s: removed a torn last line (%d bytes)", path, len(data) - cut)
        os.truncate(path, cut)
        return
    with path.open("a") as fh:
        fh.write("\n")


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _finite(value: Any) -> Any:
    """NaN and infinities as None (JSON null): strict JSON readers reject NaN/Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


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
