"""A run directory mirrored to an fsspec URL (`gs://`, `s3://`, anything fsspec opens).

Why a mirror, not a run directory that lives on the object store: the run directory is also
a lock (`train.lock`, a POSIX record lock), append-only logs (metrics.jsonl) and atomic
renames, none of which an object store has. So training reads and writes a local run
directory as always, and every complete checkpoint, `best/` and the run's records are copied
to `<checkpoint.remote_dir>/<name>/` as they are written. `--resume` on a machine whose local
run directory is missing or older pulls the newest complete checkpoint (and the records it
lacks) back first, then resumes from it as from a local one.

Object stores have no rename, so completion is the manifest: a directory is uploaded file by
file with its `manifest.json` last (an earlier manifest deleted first), and a remote directory
counts only when its manifest is there and every listed file has its listed size. A pulled
checkpoint is downloaded into a temporary local directory, checked against the manifest's
sha256 hashes, and only then renamed into place. Pruning deletes a manifest before the files
it lists, and never the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.errors import VisiontuneError
from visiontune.runs.rundir import LOGGER, RunDir

log = logging.getLogger(LOGGER)

RECORDS = ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json", "run.json", "train.log")
BASE_WEIGHTS = ("base_weights.safetensors", "base_weights.safetensors.sha256.json")
EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}


class RemoteRun:
    """The mirror of one run at `url` (`<checkpoint.remote_dir>/<name>`)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as err:
            protocol = self.url.split("://", 1)[0]
            extra = EXTRAS.get(protocol)
            hint = f"pip install 'visiontune[{extra}]'" if extra else "install its fsspec backend"
            raise VisiontuneError(
                f"checkpoint.remote_dir {url}: fsspec cannot open {protocol}:// here ({err}); "
                f"{hint}"
            ) from None
        self.local_fs = "file" in (
            (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        )

    @classmethod
    def for_config(cls, cfg: Config) -> RemoteRun | None:
        """The run's mirror, or None without `checkpoint.remote_dir` or on a rank other than 0
        (rank 0 alone writes a run, so it alone copies it)."""
        remote = cfg.checkpoint.remote_dir
        if remote is None or os.environ.get("RANK", "0") != "0":
            return None
        return cls(f"{remote.rstrip('/')}/{cfg.name}")

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # ---- upload ----------------------------------------------------------------------------

    def push_checkpoint(self, local: Path, run: RunDir, keep_last: int, keep: set[int]) -> None:
        """Copy a complete local checkpoint, then the run's records; prune as locally."""
        started = time.monotonic()
        self.push_dir(local, self.path("checkpoints", local.name))
        self.push_records(run)
        self.prune(keep_last, keep)
        log.info("copied %s to %s (%.1fs)", local.name, self.url, time.monotonic() - started)

    def push_best(self, local: Path) -> None:
        self.push_dir(local, self.path("best"))

    def push_records(self, run: RunDir) -> None:
        """The small files of the run, replaced whole; frozen base weights once."""
        for name in RECORDS:
            if (run.root / name).is_file():
                self.put(run.root / name, self.path(name))
        for name in BASE_WEIGHTS:
            source = run.root / name
            if source.is_file() and not self.fs.exists(self.path(name)):
                self.put(source, self.path(name))

    def push_dir(self, local: Path, remote: str) -> None:
        """Every file of `local`, the manifest last; the remote's earlier manifest goes first,
        so the directory never looks complete while it holds a mix of two versions."""
        manifest = f"{remote}/{ckpt.MANIFEST}"
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        files = {
            p.relative_to(local).as_posix(): p
            for p in sorted(local.rglob("*"))
            if p.is_file() and p.name != ckpt.MANIFEST
        }
        for relative, stale in self.files_under(remote).items():
            if relative not in files:
                self.fs.rm_file(stale)
        for relative, path in files.items():
            self.put(path, f"{remote}/{relative}")
        self.put(local / ckpt.MANIFEST, manifest)

    def put(self, local: Path, remote: str) -> None:
        if self.local_fs:
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), remote)

    def files_under(self, remote: str) -> dict[str, str]:
        """Relative path -> full path of every file under `remote` (none when it is absent)."""
        if not self.fs.exists(remote):
            return {}
        base = self.fs._strip_protocol(remote).rstrip("/")
        return {f[len(base) :].lstrip("/"): f for f in self.fs.find(remote)}

    # ---- what is there ---------------------------------------------------------------------

    def steps(self) -> list[tuple[int, str]]:
        """(step, remote dir) of every checkpoint directory, oldest first."""
        root = self.path("checkpoints")
        if not self.fs.exists(root):
            return []
        found = []
        for entry in self.fs.ls(root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            number = name.removeprefix(ckpt.STEP_PREFIX)
            if name.startswith(ckpt.STEP_PREFIX) and number.isdigit():
                found.append((int(number), f"{root}/{name}"))
        return sorted(found)

    def verify(self, remote: str) -> str | None:
        """Why `remote` is not a complete copy (sizes against its manifest), or None."""
        try:
            manifest = json.loads(self.fs.cat_file(f"{remote}/{ckpt.MANIFEST}"))
            listed = manifest["files"]
        except FileNotFoundError:
            return f"no {ckpt.MANIFEST} (an upload or a delete was interrupted)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{ckpt.MANIFEST} is unreadable ({exc!r})"
        for name, info in listed.items():
            try:
                size = self.fs.size(f"{remote}/{name}")
            except FileNotFoundError:
                return f"{name} is missing"
            if size != info["bytes"]:
                return f"{name} is {size} bytes, the manifest says {info['bytes']}"
        return None

    def prune(self, keep_last: int, keep: set[int]) -> None:
        """Keep the newest `keep_last` complete checkpoints and the steps in `keep`; remove
        incomplete ones older than the newest complete one (interrupted uploads or deletes).
        The newest complete checkpoint is never removed."""
        listed = self.steps()
        complete = [(s, d) for s, d in listed if self.verify(d) is None]
        if not complete:
            return
        newest = complete[-1][0]
        kept = {s for s, _ in complete[-keep_last:]} | keep | {newest}
        for step, directory in listed:
            if step not in kept and step <= newest:
                self.remove(directory)

    def remove(self, remote: str) -> None:
        manifest = f"{remote}/{ckpt.MANIFEST}"
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        self.fs.rm(remote, recursive=True)

    # ---- download --------------------------------------------------------------------------

    def pull_log(self, run: RunDir) -> None:
        """train.log of the earlier jobs, when this machine has none, before logging starts."""
        if not run.log.exists() and self.fs.exists(self.path(run.log.name)):
            self.fs.get_file(self.path(run.log.name), str(run.log))

    def pull_into(self, run: RunDir) -> Path | None:
        """Bring the newest complete checkpoint here when it is newer than every local one,
        and the records and best/ the local run directory lacks; return the pulled path."""
        for name in (*RECORDS, *BASE_WEIGHTS):
            target = run.root / name
            if not target.exists() and self.fs.exists(self.path(name)):
                self.fs.get_file(self.path(name), str(target))
        if not run.best.exists() and self.verify(self.path("best")) is None:
            self.pull_dir(self.path("best"), run.best)
        local = ckpt.latest_complete(run.checkpoints)
        local_step = int(local.name.removeprefix(ckpt.STEP_PREFIX)) if local else -1
        for step, remote in reversed(self.steps()):
            if step <= local_step:
                return None
            reason = self.verify(remote)
            if reason is None:
                final = run.checkpoints / f"{ckpt.STEP_PREFIX}{step:08d}"
                if self.pull_dir(remote, final):
                    log.info("pulled %s from %s", final.name, self.url)
                    return final
            else:
                log.warning("skipping the remote %s: %s", remote, reason)
        return None

    def pull_dir(self, remote: str, final: Path) -> bool:
        """Download into a temporary directory, check every hash, then rename into place."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{ckpt.TMP_PREFIX}{final.name}-{os.getpid()}-{time.time_ns()}"
        try:
            for relative, source in self.files_under(remote).items():
                target = tmp / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(source, str(target))
            damage = ckpt.verify(tmp)
            if damage is not None:
                log.warning("the remote %s does not match its manifest: %s", remote, damage)
                return False
            if final.exists():  # a local leftover the size check already found incomplete
                shutil.rmtree(final)
            tmp.rename(final)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
