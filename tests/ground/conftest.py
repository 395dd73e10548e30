"""Fixtures for the ground task: the tiny example's data and processor, built locally.

Everything comes from examples/gui_click/make_tiny.py (a BPE tokenizer trained in-process
with Qwen2-VL's special tokens and chat template, synthetic screens), so the tests run the
same example a user runs, with no network.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForImageTextToText

from visiontune.config.load import load_config
from visiontune.config.schema import Config
from visiontune.models.load import build_config
from visiontune.models.qwen_vl import VisionChatProcessor

EXAMPLES = Path(__file__).parents[2] / "examples" / "gui_click"
TINY_YAML = EXAMPLES / "gui_click_tiny.yaml"


def _make_tiny() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny", EXAMPLES / "make_tiny.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def make_tiny() -> ModuleType:
    return _make_tiny()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, make_tiny: ModuleType) -> Path:
    """processor/, screens/, train.jsonl and val.jsonl of the tiny example."""
    return make_tiny.write_tiny_example(tmp_path_factory.mktemp("gui_click"))


@pytest.fixture(scope="session")
def processor(tiny_data: Path) -> VisionChatProcessor:
    return VisionChatProcessor.load(str(tiny_data / "processor"), 56 * 56, 112 * 112)


@pytest.fixture(scope="session")
def ground_config(tiny_data: Path) -> Callable[..., Config]:
    """The tiny example's YAML pointed at the generated data, plus dotted overrides."""

    def make(out: Path, *overrides: str) -> Config:
        paths = [
            f"data.train={tiny_data / 'train.jsonl'}",
            f"data.val={tiny_data / 'val.jsonl'}",
            f"task.processor={tiny_data / 'processor'}",
            f"output_dir={out}",
            "data.num_workers=0",
        ]
        return load_config(TINY_YAML, [*paths, *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """The tiny example's Qwen2-VL, randomly initialised and saved with save_pretrained, with
    its processor files next to it: what a hub checkpoint directory looks like."""
    cfg = load_config(TINY_YAML, [f"data.train={tiny_data / 'train.jsonl'}"])
    assert cfg.model.config is not None
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(build_config(cfg.model.config))
    out = tmp_path_factory.mktemp("tiny_qwen2_vl")
    model.save_pretrained(str(out))
    VisionChatProcessor.load(str(tiny_data / "processor"), 56 * 56, 112 * 112).save_pretrained(out)
    return out
