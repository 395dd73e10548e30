"""Builders shared by the segmentation tests: the tiny in-process SAM and configs around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from visiontune.config.schema import Config

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "examples" / "tiny" / "reasonseg_tiny.yaml"


def tiny_sam() -> dict[str, Any]:
    """The inline SAM of the tiny example (64 px frame, 8x8 embeddings)."""
    return yaml.safe_load(TINY_YAML.read_text())["model"]["config"]


def segment_config(data: dict[str, Any], task: dict[str, Any], **sections: Any) -> Config:
    """A Config with the tiny SAM, the given data/task sections and short training."""
    raw: dict[str, Any] = {
        "model": {"config": tiny_sam()},
        "data": {"num_workers": 0, **data},
        "task": {"type": "segment", **task},
        "train": {"max_steps": 2, "micro_batch_size": 4},
    }
    raw.update(sections)
    return Config.model_validate(raw)


def tiny_text_model() -> dict[str, Any]:
    """A 1-layer BERT built in-process with the tiny example's word-level tokenizer."""
    return {
        "config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 64},
        "tokenizer": str(ROOT / "examples" / "tiny" / "tokenizer"),
    }  # fmt: skip


def crack_data(root: Path, count: int = 4) -> Path:
    """Images with a diagonal dark line and its mask: a thin-structure (crack) layout."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        img = Image.new("RGB", (40, 32), (180, 180, 170))
        mask = Image.new("L", (40, 32), 0)
        for x in range(4 + i, 36):
            y = (x * (i + 1)) % 30
            img.putpixel((x, y), (20, 20, 20))
            mask.putpixel((x, y), 255)
        img.save(root / "images" / f"c{i}.png")
        mask.save(root / "masks" / f"c{i}.png")
    return root
