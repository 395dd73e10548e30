"""checkpoint.remote_dir: the run mirrored to an fsspec URL, completion by the manifest written
last, resume from the newest complete copy, pruning that never drops the last complete one.

fsspec's own `file://` and `memory://` filesystems stand in for gs:// and s3:// (same API);
uploads are interrupted by making the filesystem's `put_file` fail part-way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_config
from visiontune import api
from visiontune.config import load_config
from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.state import WEIGHTS
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.runs.remote import RemoteRun
from visiontune.runs.rundir import RunDir, read_jsonl


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh memory:// prefix, emptied afterwards (the memory filesystem is per process)."""
    url = f"memory://bucket-{id(object())}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def with_train(cfg: Config, **train: object) -> Config:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = ckpt.latest_complete(run_dir / "checkpoints")
    assert latest is not None
    return load_file(str(latest / WEIGHTS))


def test_a_run_mirrored_to_a_file_url_resumes_on_a_machine_without_its_run_dir(
    image_data: Path, tmp_path: Path
) -> None:
    remote_url = (tmp_path / "bucket").as_uri()
    cfg = tiny_config(
        image_data, tmp_path / "local",
        train={"max_steps": 4}, checkpoint={"every_steps": 2, "keep_last": 1, "keep_best": False,
                                            "remote_dir": remote_url},
    )  # fmt: skip
    cfg.eval.every_steps = 2
    assert api.train(cfg).exit_code == 0
    remote = tmp_path / "bucket/tiny"
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["step-00000004"]
    assert ckpt.verify(remote / "checkpoints/step-00000004") is None  # sizes and sha256
    assert ckpt.verify(remote / "best") is None
    assert [r["step"] for r in read_jsonl(remote / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((remote / "summary.json").read_text())["status"] == "completed"

    shutil.rmtree(tmp_path / "local")  # a new node: nothing local
    resumed = api.train(with_train(cfg, max_steps=6), resume=True)
    assert resumed.state.step == 6
    log = (tmp_path / "local/tiny/train.log").read_text()
    assert log.startswith((remote / "train.log").read_text().split("\n", 1)[0])  # earlier jobs'
    assert "training 4 optimizer steps" in log  # the first job's log goes on
    assert f"pulled step-00000004 from {remote_url}/tiny" in log
    assert "resumed from" in log
    assert [r["step"] for r in read_jsonl(tmp_path / "local/tiny/metrics.jsonl")] == list(
        range(1, 7)
    )

    straight = tiny_config(
        image_data, tmp_path / "straight", train={"max_steps": 6},
        checkpoint={"every_steps": 2, "keep_last": 1, "keep_best": False},
    )  # fmt: skip
    straight.eval.every_steps = 2
    api.train(straight, allow_duplicate=True)
    expected = final_weights(tmp_path / "straight/tiny")
    got = final_weights(tmp_path / "local/tiny")
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def trained(image_data: Path, tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """A run with complete checkpoints step-1 and step-2 (no remote); tests only read it."""
    out = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(
        image_data, out, train={"max_steps": 2}, checkpoint={"every_steps": 1, "keep_last": 5}
    )
    cfg.data.val = None
    api.train(cfg)
    return RunDir(out / "tiny")


def fail_after(remote: RemoteRun, monkeypatch: pytest.MonkeyPatch, uploads: int) -> list[str]:
    """Make the remote's `put_file` fail after `uploads` more files (a job killed mid-upload)."""
    done: list[str] = []
    real = remote.fs.put_file

    def put_file(local: str, target: str, **kwargs: object) -> None:
        if len(done) == uploads:
            raise ConnectionError("upload interrupted")
        real(local, target, **kwargs)
        done.append(target)

    monkeypatch.setattr(remote.fs, "put_file", put_file)
    return done


def test_an_interrupted_upload_is_never_resumed_from_nor_pruned_over(
    trained: RunDir, tmp_path: Path, memory_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = trained
    step1, step2 = ckpt.step_dirs(run.checkpoints)
    remote = RemoteRun(f"{memory_root}/tiny")
    remote.push_checkpoint(step1, run, keep_last=1, keep=set())
    uploaded = fail_after(remote, monkeypatch, uploads=3)
    with pytest.raises(ConnectionError):
        remote.push_checkpoint(step2, run, keep_last=1, keep=set())
    assert len(uploaded) == 3
    monkeypatch.undo()
    newer = remote.path("checkpoints", step2.name)
    assert remote.verify(newer) == "no manifest.json (an upload or a delete was interrupted)"
    remote.prune(keep_last=1, keep=set())  # step-1 is the newest complete: it stays
    assert [s for s, _ in remote.steps()] == [1, 2]

    fresh = RunDir(tmp_path / "second/tiny")
    fresh.root.mkdir(parents=True)
    pulled = remote.pull_into(fresh)
    assert pulled == fresh.checkpoints / step1.name
    assert ckpt.verify(pulled) is None
    assert load_file(str(pulled / WEIGHTS)).keys() == load_file(str(step1 / WEIGHTS)).keys()
    assert (fresh.root / "metrics.jsonl").read_text() == (run.root / "metrics.jsonl").read_text()

    remote.push_checkpoint(step2, run, keep_last=1, keep=set())  # the upload done again
    assert [s for s, _ in remote.steps()] == [2]


def test_a_re_upload_interrupted_over_a_complete_copy_leaves_it_incomplete_not_mixed(
    trained: RunDir, memory_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = trained
    step1, step2 = ckpt.step_dirs(run.checkpoints)
    remote = RemoteRun(f"{memory_root}/tiny")
    target = remote.path("checkpoints", step1.name)
    remote.push_dir(step1, target)
    assert remote.verify(target) is None
    fail_after(remote, monkeypatch, uploads=1)
    with pytest.raises(ConnectionError):
        remote.push_dir(step2, target)  # other contents under the same name, cut short
    assert remote.verify(target) is not None


def test_a_damaged_remote_file_of_the_right_size_fails_the_hash_and_an_older_copy_is_used(
    trained: RunDir, tmp_path: Path, memory_root: str
) -> None:
    run = trained
    remote = RemoteRun(f"{memory_root}/tiny")
    for step_dir in ckpt.step_dirs(run.checkpoints):
        remote.push_checkpoint(step_dir, run, keep_last=5, keep=set())
    weights = remote.path("checkpoints", "step-00000002", WEIGHTS)
    size = remote.fs.size(weights)
    remote.fs.pipe_file(weights, b"\0" * size)
    assert remote.verify(remote.path("checkpoints", "step-00000002")) is None  # sizes agree
    fresh = RunDir(tmp_path / "second/tiny")
    fresh.root.mkdir(parents=True)
    assert remote.pull_into(fresh) == fresh.checkpoints / "step-00000001"
    assert [p.name for p in fresh.checkpoints.iterdir()] == ["step-00000001"]  # no leftovers


def test_a_local_checkpoint_as_new_as_the_remote_is_not_pulled(
    trained: RunDir, tmp_path: Path, memory_root: str
) -> None:
    run = trained
    remote = RemoteRun(f"{memory_root}/tiny")
    remote.push_checkpoint(ckpt.step_dirs(run.checkpoints)[0], run, keep_last=5, keep=set())
    assert remote.pull_into(run) is None


def test_remote_dir_must_be_a_url_and_a_missing_backend_names_the_extra(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    raw = {
        "model": {"config": {"model_type": "vit"}},
        "data": {"train": str(tmp_path)},
        "train": {"max_steps": 1},
        "checkpoint": {"remote_dir": "bucket/runs"},
    }
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="checkpoint.remote_dir 'bucket/runs' is not a URL"):
        load_config(path)
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(VisiontuneError, match=r"pip install 'visiontune\[gcs\]'"):
            RemoteRun("gs://bucket/runs/tiny")
