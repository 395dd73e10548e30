"""Corrupt images mid-training, weights-only init, and TensorBoard events."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from visiontune import api
from visiontune.errors import TrainingError


@pytest.fixture()
def corrupt_data(image_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(image_data, root)
    for i, path in enumerate(sorted((root / "train/a").glob("*.png"))[:3]):
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40 + i))  # a header and no image
    return root


def test_corrupt_images_are_skipped_counted_and_named(corrupt_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corrupt_data, tmp_path / "runs", train={"epochs": 1, "max_steps": None})
    result = api.train(cfg)
    assert result.summary["skipped_samples"] == 3
    log = (tmp_path / "runs/tiny/train.log").read_text()
    assert log.count("skipped sample") == 3 and "a_0.png" in log


def test_too_many_corrupt_images_stop_the_run(corrupt_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        corrupt_data, tmp_path / "runs", train={"epochs": 1, "max_steps": None},
        data={"max_bad_samples": 2},
    )  # fmt: skip
    with pytest.raises(TrainingError, match="3 samples could not be loaded.*max_bad_samples=2"):
        api.train(cfg)


def test_init_from_loads_weights_only_and_says_so(image_data: Path, tmp_path: Path) -> None:
    first = tiny_config(image_data, tmp_path / "a", train={"max_steps": 3})
    api.train(first)
    second = tiny_config(
        image_data, tmp_path / "b", train={"max_steps": 1}, init_from=str(tmp_path / "a/tiny"),
        optim={"lr": 1e-12}, tracking={"tensorboard": True},
    )  # fmt: skip
    result = api.train(second)
    assert result.state.step == 1  # a fresh schedule, not a resume at step 3
    log = (tmp_path / "b/tiny/train.log").read_text()
    assert "loaded WEIGHTS ONLY" in log
    before = load_file(str(tmp_path / "a/tiny/best/trainable.safetensors"))
    after = load_file(str(tmp_path / "b/tiny/best/trainable.safetensors"))
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0)
    assert list((tmp_path / "b/tiny/tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "b/tiny/summary.json").read_text())["steps"] == 1
