import os
from pathlib import Path

import pytest
import torch

from visiontune.engine import checkpoint as ckpt


def fill_with(text: str):
    def fill(directory: Path) -> None:
        (directory / "a.txt").write_text(text)

    return fill


def test_atomic_write_then_completeness_and_latest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt.write_atomically(root / "step-00000002", fill_with("two"), {"step": 2})
    ckpt.write_atomically(root / "step-00000004", fill_with("four"), {"step": 4})
    assert ckpt.latest_complete(root) == root / "step-00000004"
    # a kill mid-write leaves a directory whose files do not match its manifest, or none
    (root / "step-00000004" / "a.txt").write_text("torn")
    (root / "step-00000006").mkdir()
    (root / "step-00000006" / "a.txt").write_text("no manifest")
    assert not ckpt.is_complete(root / "step-00000006")
    assert ckpt.latest_complete(root) == root / "step-00000002"


def test_failed_fill_leaves_nothing(tmp_path: Path) -> None:
    def broken(directory: Path) -> None:
        (directory / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.write_atomically(tmp_path / "step-00000001", broken, {})
    assert os.listdir(tmp_path) == []


def test_prune_keeps_last_and_best(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        ckpt.write_atomically(tmp_path / f"step-{step:08d}", fill_with(str(step)), {})
    ckpt.prune(tmp_path, keep_last=2, keep_steps={2})
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == [
        "step-00000002", "step-00000004", "step-00000005"
    ]  # fmt: skip


def test_rng_state_roundtrip_through_weights_only_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    torch.manual_seed(3)
    ckpt.save_torch(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(ckpt.load_torch(tmp_path / "rng.pt"))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
