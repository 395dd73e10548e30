import errno
import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch

from visiontune.engine import checkpoint as ckpt
from visiontune.errors import VisiontuneError


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


# ---- a full disk ---------------------------------------------------------------------------


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    previous = ckpt.write_atomically(root / "step-00000002", fill_with("x" * 2_000_000), {})

    def disk_full(directory: Path) -> None:
        (directory / "a.txt").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(VisiontuneError) as caught:
        ckpt.write_atomically(root / "step-00000004", disk_full, {})
    message = str(caught.value)
    assert f"disk full while saving {root / 'step-00000004'}" in message
    assert "the filesystem mounted at /" in message and "MB free" in message
    assert "needs about 2.0 MB (the size of step-00000002)" in message
    assert isinstance(caught.value.__cause__, OSError)
    assert os.listdir(root) == ["step-00000002"]
    assert ckpt.verify(previous) is None
    assert ckpt.latest_complete(root) == previous


def test_a_torch_save_cut_short_is_reported_as_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    best = ckpt.write_atomically(tmp_path / "best", fill_with("best"), {"step": 1})

    def short_write(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"PK" * 100)
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 24640 vs 24528"
        )

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(VisiontuneError, match=r"needs about 0\.0 MB \(the size of best\)"):
        ckpt.write_atomically(
            tmp_path / "best", lambda d: ckpt.save_torch({"x": 1}, d / "optimizer.pt"), {}
        )
    assert os.listdir(tmp_path) == ["best"]
    assert (best / "a.txt").read_text() == "best" and ckpt.verify(best) is None


def test_other_failures_are_not_called_a_full_disk(tmp_path: Path) -> None:
    def bug(directory: Path) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        ckpt.write_atomically(tmp_path / "step-00000001", bug, {})


# ---- damage is detected and said ------------------------------------------------------------


def test_verify_says_why_a_checkpoint_is_damaged(tmp_path: Path) -> None:
    best = ckpt.write_atomically(tmp_path / "best", fill_with("abcdef"), {})
    assert ckpt.verify(best) is None
    (best / "a.txt").write_text("abcdeX")  # same size, one byte flipped: bit rot
    assert ckpt.verify(best, verify_hashes=False) is None
    assert ckpt.verify(best) == (
        "a.txt does not match its sha256 in the manifest (the file is damaged)"
    )
    (best / "a.txt").write_text("abc")
    assert ckpt.verify(best) == "a.txt is 3 bytes, the manifest says 6"
    (best / "a.txt").unlink()
    assert ckpt.verify(best) == "a.txt is missing"
    (best / ckpt.MANIFEST).write_text('{"files": ')
    assert ckpt.verify(best).startswith("manifest.json is unreadable")
    (best / ckpt.MANIFEST).unlink()
    assert ckpt.verify(best) == "no manifest.json (a save or a delete was interrupted)"


def test_latest_complete_logs_every_checkpoint_it_skips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (2, 4, 6):
        ckpt.write_atomically(tmp_path / f"step-{step:08d}", fill_with(str(step) * 10), {})
    (tmp_path / "step-00000006" / "a.txt").write_text("9" * 10)
    (tmp_path / "step-00000004" / ckpt.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_complete(tmp_path) == tmp_path / "step-00000002"
    assert (
        f"skipping damaged checkpoint {tmp_path / 'step-00000006'}: a.txt does not match its "
        "sha256" in caplog.text
    )
    assert f"skipping damaged checkpoint {tmp_path / 'step-00000004'}: no manifest" in caplog.text


def test_base_weights_are_verified_on_read(tmp_path: Path) -> None:
    path = tmp_path / "base_weights.safetensors"
    tensors = {"frozen.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8)}
    ckpt.write_base_weights(tensors, path)
    assert torch.equal(ckpt.read_base_weights(path)["frozen.weight"], tensors["frozen.weight"])
    data = bytearray(path.read_bytes())
    data[-4] ^= 0xFF  # a flipped bit in the last tensor value: safetensors loads it happily
    path.write_bytes(bytes(data))
    with pytest.raises(VisiontuneError, match=r"base_weights\.safetensors is damaged"):
        ckpt.read_base_weights(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base_weights.safetensors", "base_weights.safetensors.sha256.json"
    ]  # fmt: skip


# ---- the cost of a save ----------------------------------------------------------------------


def test_saving_best_flushes_only_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "base_weights.safetensors").write_bytes(b"0" * 1000)
    synced = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    ckpt.write_atomically(tmp_path / "best", fill_with("b"), {})
    assert {p.name for p in synced} >= {"a.txt", ckpt.MANIFEST}
    assert not {tmp_path / "metrics.jsonl", tmp_path / "base_weights.safetensors"} & set(synced)


def test_prune_reads_no_file_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (1, 2, 3):
        ckpt.write_atomically(tmp_path / f"step-{step:08d}", fill_with(str(step)), {})

    def no_hashing(*args: object) -> None:
        raise AssertionError("prune hashed a file")

    monkeypatch.setattr(hashlib, "file_digest", no_hashing)
    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    ckpt.prune(tmp_path, keep_last=1, keep_steps=set())
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == ["step-00000003"]
