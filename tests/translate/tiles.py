"""Helpers of the translate tests: copies of the real TerraMesh tiles (never the originals)
and a config of a small translate run of the test-only model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from visiontune.config.schema import Config

TILES = Path(__file__).resolve().parents[3] / "shared" / "data" / "terramesh_tiles"
NAMES = ["282D_485L_3_3", "38D_378R_2_3", "433D_629L_3_1", "609U_541L_3_0", "637U_59R_1_3"]
VAL = NAMES[0]


def copy_tiles(root: Path, sides: tuple[str, ...] = ("S1RTC", "S2RGB"), val: str = VAL) -> Path:
    """train/ (four tiles) and val/ (the fifth), each with the given side folders."""
    if not TILES.is_dir():
        pytest.skip(f"the TerraMesh tiles are not at {TILES}")
    for name in NAMES:
        split = "val" if name == val else "train"
        for side in sides:
            folder = root / split / side
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(TILES / side / f"{name}.tif", folder / f"{name}.tif")
    return root


def translate_config(root: Path, out: Path, **sections: Any) -> Config:
    """A small translate run of the test-only model on copies of the real tiles."""
    raw: dict[str, Any] = {
        "name": "translate",
        "output_dir": str(out),
        "model": {"builder": "user_code_for_tests:tiny_translator", "builder_args": {"dim": 8}},
        "lora": {
            "rank": 4,
            "alpha": 8,
            "dropout": 0.0,
            "targets": "re:.*cross_attn\\.(q|kv|proj)$",
            "modules_to_save": ["head"],
        },
        "data": {
            "format": "paired",
            "train": str(root / "train"),
            "val": str(root / "val"),
            "num_workers": 0,
        },
        "task": {
            "type": "translate",
            "source": {"dir": "S1RTC", "db_clip": [-30, 5]},
            "target": {"dir": "S2RGB", "scale": "range", "range": [0, 255]},
            "crop_size": 32,
            "crops_per_tile": 2,
            "tile_overlap": 8,
            "losses": [{"fn": "user_code_for_tests:plain_l1"}],
        },
        "train": {"micro_batch_size": 4, "max_steps": 2, "log_every": 1},
        "checkpoint": {"every_steps": None},
        "optim": {"lr": 0.01},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return Config.model_validate(raw)
