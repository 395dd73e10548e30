"""Checkpoints that are complete or do not exist.

Each checkpoint is written into a temporary directory, every file is fsynced, the manifest
(file sizes and hashes) is written last, and the directory is renamed into place. Loading
trusts only directories whose manifest matches their files, so a checkpoint half-written when
a job was killed is never picked up. Pickles are loaded with `weights_only=True`; weights are
safetensors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from visiontune.errors import VisiontuneError

MANIFEST = "manifest.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How torch.save ("unexpected pos 24640 vs 24528", "file write failed") and safetensors
# ("StorageFull", "QuotaExceeded") report a write the disk refused.
DISK_FULL_MARKERS = (
    "no space left on device",
    "disk quota exceeded",
    "unexpected pos",
    "file write failed",
    "storagefull",
    "quotaexceeded",
)

log = logging.getLogger(__name__)


def write_atomically(final: Path, fill: Callable[[Path], None], meta: dict[str, Any]) -> Path:
    """Run `fill(tmp_dir)`, fsync everything, write the manifest last, rename into `final`.

    Each file is read back once, hashing and fsyncing through one descriptor: the writers
    (torch.save, safetensors) cannot hash while they write, so one read from the page cache
    is the least it costs. A full disk becomes a `VisiontuneError` that names the disk, the
    free space and the size of the previous checkpoint, with the temp dir gone and every
    earlier checkpoint untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        fill(tmp)
        files = {p.name: _describe_synced(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_synced(tmp / MANIFEST, json.dumps({**meta, "files": files}, indent=2))
        _fsync_entries(tmp)
        if final.exists():
            old = final.parent / f"{OLD_PREFIX}{final.name}-{time.time_ns()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_entries(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(exc):
            raise VisiontuneError(_disk_full_message(final)) from exc
        raise
    return final


def verify(directory: Path, verify_hashes: bool = True) -> str | None:
    """Why `directory` (a checkpoint or best/) is not a complete checkpoint, or None if it is.

    Hashes are verified before anything is loaded; sizes suffice for housekeeping (pruning,
    clean-up), which must not re-read gigabytes of optimizer state at every save.
    """
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        listed = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (a save or a delete was interrupted)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc!r})"
    for name, info in listed.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != info["bytes"]:
            return f"{name} is {size} bytes, the manifest says {info['bytes']}"
        if verify_hashes and _sha256(path) != info["sha256"]:
            return f"{name} does not match its sha256 in the manifest (the file is damaged)"
    return None


def is_complete(directory: Path, verify_hashes: bool = True) -> bool:
    """The manifest exists and every file it lists has the recorded size (and hash)."""
    return verify(directory, verify_hashes) is None


def step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest step first (incomplete ones included)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(STEP_PREFIX)))


def latest_complete(root: Path) -> Path | None:
    """The newest checkpoint whose files all match their manifest's sizes and hashes.

    Each newer one passed over is logged with its reason: resuming from an older step than
    the user expects must never be silent.
    """
    for directory in reversed(step_dirs(root)):
        reason = verify(directory)
        if reason is None:
            return directory
        log.warning("skipping damaged checkpoint %s: %s", directory, reason)
    return None


def prune(root: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the newest `keep_last` complete checkpoints and those in `keep_steps`."""
    complete = [d for d in step_dirs(root) if is_complete(d, verify_hashes=False)]
    for directory in complete[:-keep_last]:
        if int(directory.name.removeprefix(STEP_PREFIX)) not in keep_steps:
            shutil.rmtree(directory)
    for stale in root.glob(f"{TMP_PREFIX}*"):
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


def clean_stale(directory: Path) -> list[Path]:
    """Remove what interrupted saves and deletes left in `directory` (a run root or its
    checkpoints/), logging each path; return the paths removed.

    Only called while the run directory is locked, so nothing here is still being written.
    A complete leftover whose target is missing (a kill between the two renames that replace
    best/, or between the manifest and the rename) is put back instead of deleted: a complete
    checkpoint is never deleted. Step directories that fail the size check (no manifest, a
    listed file missing or cut short) are the remains of an interrupted prune or damage; no
    resume can use them.
    """
    if not directory.is_dir():
        return []
    leftovers: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            leftovers.setdefault(_leftover_target(path.name), []).append(path)
    removed = []
    for target, paths in leftovers.items():
        if target and not (directory / target).exists():
            _restore_newest_complete(paths, directory / target)
        for path in paths:
            if path.exists():
                _remove(path, "left by an interrupted save")
                removed.append(path)
    for step_dir in step_dirs(directory):
        reason = verify(step_dir, verify_hashes=False)
        if reason is not None:
            _remove(step_dir, reason)
            removed.append(step_dir)
    return removed


def _leftover_target(name: str) -> str:
    """`best` from `.tmp-best-<pid>-<ns>` or `.old-best-<ns>`; "" when the name is not ours."""
    if name.startswith(TMP_PREFIX):
        target, *numbers = name.removeprefix(TMP_PREFIX).rsplit("-", 2)
    else:
        target, *numbers = name.removeprefix(OLD_PREFIX).rsplit("-", 1)
    return target if numbers and all(n.isdigit() for n in numbers) else ""


def _restore_newest_complete(paths: list[Path], target: Path) -> None:
    """A `.tmp-` copy is newer than an `.old-` one (the old is renamed aside first)."""
    ranked = sorted(paths, key=lambda p: (p.name.startswith(TMP_PREFIX), p.name), reverse=True)
    for path in ranked:
        if path.is_dir() and verify(path) is None:
            path.rename(target)
            log.warning("restored the complete %s as %s (its save was interrupted)", path, target)
            return


def _remove(path: Path, reason: str) -> None:
    log.warning("removing %s: %s", path, reason)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def write_base_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save the frozen random init of an inline model with a sidecar size+sha256.

    Every resume, eval and export rebuilds the model on these weights; a damaged file would
    silently give a different model, so `read_base_weights` checks it. The sidecar is written
    before the weights are renamed into place, so weights never exist without it.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}")
    try:
        save_file(tensors, str(tmp))
        _write_synced(_sidecar(path), json.dumps(_describe_synced(tmp)))
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_entries(path.parent)


def read_base_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load what `write_base_weights` saved, refusing a file that does not match its hash."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        log.warning("%s has no %s (written by an older visiontune): not verified", path, sidecar)
        return load_file(str(path))
    expected = json.loads(sidecar.read_text())
    actual = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    if actual != expected:
        raise VisiontuneError(
            f"{path} is damaged: {actual['bytes']} bytes with sha256 {actual['sha256'][:12]}..., "
            f"but it was written as {expected['bytes']} bytes with sha256 "
            f"{expected['sha256'][:12]}... ({sidecar}). These are the frozen random-init "
            "weights this run trained on: restore the file from a copy, or start the run again "
            "with --overwrite"
        )
    return load_file(str(path))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when torch or safetensors wrap it in their own exception text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if any(marker in str(seen).lower() for marker in DISK_FULL_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _disk_full_message(final: Path) -> str:
    mount = final.parent.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    free = shutil.disk_usage(final.parent).free
    previous = _previous_of_kind(final)
    needed = (
        f"about {_megabytes(_manifest_bytes(previous))} (the size of {previous.name})"
        if previous is not None
        else "an unknown amount (no earlier checkpoint of this kind to measure)"
    )
    return (
        f"disk full while saving {final}: the filesystem mounted at {mount} has "
        f"{_megabytes(free)} free and the save needs {needed}. Earlier checkpoints are intact "
        "and the partial save was removed; free space (or lower checkpoint.keep_last) and "
        "continue with --resume"
    )


def _previous_of_kind(final: Path) -> Path | None:
    """best/ replaces itself; a step checkpoint is measured by the newest earlier one."""
    candidates = [final]
    if final.name.startswith(STEP_PREFIX):
        candidates += list(reversed(step_dirs(final.parent)))
    return next((c for c in candidates if _manifest_bytes(c) is not None), None)


def _manifest_bytes(directory: Path) -> int | None:
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        return sum(info["bytes"] for info in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _megabytes(count: int | None) -> str:
    return f"{(count or 0) / 1e6:.1f} MB"


def _describe_synced(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file just written, fsynced through the same descriptor."""
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        os.fsync(fh.fileno())
        return {"bytes": os.fstat(fh.fileno()).st_size, "sha256": digest}


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_entries(directory: Path) -> None:
    """Make the directory's entries (renames, new files) durable; its files are synced apart."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
