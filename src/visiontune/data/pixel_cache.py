"""Cache of decoded, resized images (uint8, before augmentation), on disk or in shared memory.

Decoding and resizing a 768 px JPEG costs about 12 ms of a core; a GPU step eats images far
faster, and a user training dozens of epochs over the same images pays for that decode every
epoch. The cache keeps what the deterministic part of preprocessing produces, as uint8 (so an
entry costs what its pixels cost and reading it back is exact: PIL's resize already rounds to
uint8), and random augmentation runs afterwards on the tensor, so every epoch still differs.

An entry's key is the image file as it is now (absolute path, size, modification time) plus the
preprocessing settings: a replaced file or a changed `data.preprocess` simply misses. Each entry
carries the cache format version, its key text and a CRC of its pixels; an entry that does not
match all three is rebuilt, never trusted. Entries are written to a temporary file and renamed,
so a worker never reads half an entry. `memory` is the same store in a tmpfs folder (/dev/shm)
owned by this run: workers share it through the OS (one copy of the pixels, not one per worker)
and it is removed when the run ends.

Failures never stop training: an unusable folder means no cache (one warning), a full disk
means caching stops (one warning) while training goes on decoding.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from visiontune.config.schema import DataConfig

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
"""Bumped whenever what an entry holds changes meaning; older entries are then rebuilt."""
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
Pixels = dict[str, torch.Tensor]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "visiontune" / "pixels"


class PixelCache:
    """Preprocessed pixels by (image file, preprocessing settings); `load` fills misses."""

    def __init__(self, directory: Path, settings: str, owned: bool = False) -> None:
        self.directory = directory
        self.settings = settings
        # Shared with forked or spawned workers, so one full disk stops them all.
        self._stopped = torch.zeros(1, dtype=torch.uint8).share_memory_()
        if owned:
            owner = os.getpid()
            atexit.register(_remove_if_owner, directory, owner)

    @classmethod
    def from_config(cls, data: DataConfig, settings: str) -> PixelCache | None:
        """The configured cache, or None (`cache: none`, or a folder that cannot be used)."""
        if data.cache == "none":
            return None
        if data.cache == "memory":
            shm = Path("/dev/shm")
            root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
            directory = Path(tempfile.mkdtemp(prefix="visiontune-pixels-", dir=root))
            return cls(directory, settings, owned=True)
        directory = (data.cache_dir or default_cache_dir()).expanduser()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
                pass
        except OSError as err:
            log.warning(
                "data.cache_dir %s cannot be written (%s): training without the image cache",
                directory.resolve(), err.strerror or err,
            )  # fmt: skip
            return None
        return cls(directory, settings)

    @property
    def stopped(self) -> bool:
        return bool(self._stopped.item())

    def key_text(self, image: Path) -> str:
        stat = image.stat()
        return f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.settings}"

    def entry_path(self, key_text: str) -> Path:
        digest = hashlib.sha256(key_text.encode()).hexdigest()[:32]
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def load(self, image: Path, make: Callable[[], Pixels]) -> Pixels:
        """The cached pixels of `image`, or `make()`'s (stored for next time)."""
        try:
            key_text = self.key_text(image)
        except OSError:
            return make()  # a missing file: `make` raises the error that names it
        entry = self.entry_path(key_text)
        cached = self._read(entry, key_text, image)
        if cached is not None:
            return cached
        pixels = make()
        if not self.stopped:
            self._write(entry, key_text, pixels)
        return pixels

    def _read(self, entry: Path, key_text: str, image: Path) -> Pixels | None:
        try:
            data = entry.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            log.warning("cache entry %s for %s is unreadable (%s); rebuilt", entry, image, err)
            return None
        try:
            tensors = load(data)
            meta = _metadata(data)
        except (SafetensorError, ValueError, OSError) as err:
            log.warning("cache entry %s for %s is damaged (%s); rebuilt", entry, image, err)
            return None
        if meta.get("version") != CACHE_VERSION:
            log.info("cache entry %s was written by another version; rebuilt", entry)
            return None
        if meta.get("key") != key_text or meta.get("crc") != str(checksum(tensors)):
            log.warning("cache entry %s for %s does not match its contents; rebuilt", entry, image)
            return None
        return tensors

    def _write(self, entry: Path, key_text: str, pixels: Pixels) -> None:
        meta = {"version": CACHE_VERSION, "key": key_text, "crc": str(checksum(pixels))}
        data = save({k: v.contiguous() for k, v in pixels.items()}, metadata=meta)
        temporary = entry.with_name(f".{entry.stem}.{os.getpid()}.tmp")
        try:
            entry.parent.mkdir(exist_ok=True)
            temporary.write_bytes(data)
            os.replace(temporary, entry)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            self._stop(err)

    def _stop(self, err: OSError) -> None:
        """Stop caching for every worker; warn once (the first worker to get here)."""
        if self.stopped:
            return
        self._stopped.fill_(1)
        why = "the disk is full" if err.errno in _NO_SPACE else f"it failed ({err})"
        log.warning(
            "stopped writing the image cache in %s: %s; training goes on, decoding images that "
            "are not cached yet",
            self.directory, why,
        )  # fmt: skip


def checksum(pixels: Pixels) -> int:
    crc = 0
    for name in sorted(pixels):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(pixels[name].contiguous().numpy().tobytes(), crc)
    return crc


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a serialised safetensors file (its JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__") or {})


def _remove_if_owner(directory: Path, owner: int) -> None:
    """Workers inherit atexit hooks when forked; only the run that made the folder removes it."""
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)
