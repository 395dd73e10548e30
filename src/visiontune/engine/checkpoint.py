"""Checkpoints that are complete or do not exist.

Each checkpoint is written into a temporary directory, every file is fsynced, the manifest
(file sizes and hashes) is written last, and the directory is renamed into place. Loading
trusts only directories whose manifest matches their files, so a checkpoint half-written when
a job was killed is never picked up. Pickles are loaded with `weights_only=True`; weights are
safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
STEP_PREFIX = "step-"


def write_atomically(final: Path, fill: Callable[[Path], None], meta: dict[str, Any]) -> Path:
    """Run `fill(tmp_dir)`, fsync everything, write the manifest last, rename into `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        fill(tmp)
        files = {p.name: _describe(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_synced(tmp / MANIFEST, json.dumps({**meta, "files": files}, indent=2))
        _fsync_dir(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}-{time.time_ns()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def is_complete(directory: Path, verify_hashes: bool = True) -> bool:
    """The manifest exists and every file it lists has the recorded size (and hash).

    Hashes are verified before anything is loaded; sizes suffice for housekeeping (pruning),
    which must not re-read gigabytes of optimizer state at every save.
    """
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        for name, info in manifest["files"].items():
            path = directory / name
            if path.stat().st_size != info["bytes"]:
                return False
            if verify_hashes and _describe(path) != info:
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


def step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest step first (incomplete ones included)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(STEP_PREFIX)))


def latest_complete(root: Path) -> Path | None:
    """The newest checkpoint whose files all match their manifest's sizes and hashes."""
    for directory in reversed(step_dirs(root)):
        if is_complete(directory):
            return directory
    return None


def prune(root: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the newest `keep_last` complete checkpoints and those in `keep_steps`."""
    complete = [d for d in step_dirs(root) if is_complete(d, verify_hashes=False)]
    for directory in complete[:-keep_last]:
        if int(directory.name.removeprefix(STEP_PREFIX)) not in keep_steps:
            shutil.rmtree(directory)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
