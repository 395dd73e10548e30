"""Shared fixtures: a tiny image-folder dataset and a tiny-ViT config (no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from visiontune.config.schema import Config

TINY_VIT = {
    "model_type": "vit",
    "image_size": 16,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def make_imagefolder(root: Path, per_class: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """Classes told apart by colour and a stripe, so a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for k, (name, count) in enumerate(per_class.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 60, (size, size, 3)) + np.array(colours[k % 4]) // 2
            pixels[:, (k * 4) % size : (k * 4) % size + 3] = 255
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="session")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (3 classes, 23 images: odd on purpose, for short last batches) and val/."""
    root = tmp_path_factory.mktemp("images")
    make_imagefolder(root / "train", {"a": 8, "b": 8, "c": 7}, seed=0)
    make_imagefolder(root / "val", {"a": 4, "b": 4, "c": 4}, seed=1)
    return root


def tiny_config(data_root: Path, out: Path, **sections: Any) -> Config:
    """A complete config for a tiny random ViT; `sections` override whole keys."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(out),
        "model": {"config": TINY_VIT},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear"},
        "data": {
            "train": str(data_root / "train"),
            "val": str(data_root / "val"),
            "preprocess": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
            # in-process loading: a worker per loader costs more than these 16 px images
            # (tests/data/test_worker_loader.py covers workers)
            "num_workers": 0,
        },
        "train": {"micro_batch_size": 4, "max_steps": 6, "seed": 0, "log_every": 1},
        "optim": {"lr": 0.01},
        "schedule": {"type": "constant"},
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and isinstance(raw.get(key), dict)
        raw[key] = {**raw[key], **value} if merge else value
    return Config.model_validate(raw)
