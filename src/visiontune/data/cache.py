"""Cache of a frozen trunk's outputs (SAM image embeddings), in memory or on disk.

When the image encoder has no trainable parameter and its input is not randomly augmented,
its output for an image never changes, so computing it again every epoch is pure waste: for
SAM ViT-B it is most of the step time. The key covers everything the output depends on: the
image file (path, size, modification time), the preprocessing, and on disk also a fingerprint
of the trunk's weights, so a cache directory shared between runs never serves features of
another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def trunk_fingerprint(trunk: nn.Module) -> str:
    """Hash of the trunk's config and every parameter and buffer, in a stable order."""
    digest = hashlib.sha256()
    config = getattr(trunk, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(trunk.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def image_key(image_path: str, preprocessing: str) -> str:
    """Identity of one preprocessed input: the file as it is now, plus how it was prepared."""
    stat = os.stat(image_path)
    text = f"{os.path.abspath(image_path)}|{stat.st_size}|{stat.st_mtime_ns}|{preprocessing}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class FrozenFeatureCache:
    """Maps input keys to trunk outputs; `lookup` computes only what is missing."""

    def __init__(self, directory: Path | None = None, fingerprint: str = "") -> None:
        self.directory = directory / fingerprint if directory is not None else None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.directory is not None and self._path(key).is_file():
            return load_file(str(self._path(key)))["features"]
        return None

    def put(self, key: str, features: torch.Tensor) -> None:
        features = features.detach().to("cpu").contiguous()
        if self.directory is None:
            self.memory[key] = features
            return
        final = self._path(key)
        partial = final.with_suffix(f".{os.getpid()}.tmp")
        save_file({"features": features}, str(partial))
        os.replace(partial, final)

    def lookup(
        self,
        keys: list[str],
        compute: Callable[[list[int]], torch.Tensor],
        device: torch.device,
    ) -> torch.Tensor:
        """Stacked features for `keys`; `compute(indices)` runs the trunk on the missing ones."""
        found = {i: self.get(k) for i, k in enumerate(keys)}
        missing = [i for i, features in found.items() if features is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = compute(missing)
            for row, index in enumerate(missing):
                self.put(keys[index], fresh[row])
                found[index] = fresh[row].detach()
        return torch.stack([found[i].to(device) for i in range(len(keys))])  # type: ignore[union-attr]

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.safetensors"
