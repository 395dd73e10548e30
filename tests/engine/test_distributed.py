"""Data-parallel training on CPU with gloo: 2 real ranks started by `visiontune train --nproc 2`
(torchrun's launcher) against one process at twice the micro-batch, trained in-process.

Tolerance (fp32): per-step losses and gradient norms agree to rel 1e-5, and weights after a
few AdamW steps to atol 2e-5. The all-reduce adds the two ranks' gradients in another order
than one process sums a batch, a ~1e-7 relative difference that Adam's division by sqrt(v)
carries into the update.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import make_imagefolder, tiny_config
from tests.ground.conftest import TINY_YAML as GROUND_YAML
from tests.ground.conftest import _make_tiny
from tests.segment.builders import ROOT, crack_data
from visiontune import api
from visiontune.config.load import load_config
from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.state import WEIGHTS
from visiontune.errors import TrainingError
from visiontune.runs.rundir import read_jsonl

SRC = Path(__file__).resolve().parents[2] / "src"


def launch(cfg_path: Path, *args: str) -> subprocess.Popen[str]:
    """`visiontune train CFG --nproc 2 ARGS` in a child process, as a user types it."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}:{ROOT}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "visiontune", "train", str(cfg_path), "--nproc", "2", *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def train_two_ranks(cfg: Config, tmp: Path, *args: str, expect: int = 0) -> Path:
    path = tmp / f"{cfg.name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    proc = launch(path, *args)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == expect, out[-3000:]
    return cfg.run_dir


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_complete(run_dir / "checkpoints") / WEIGHTS))


def assert_same_training(two: Path, one: Path) -> None:
    steps_two, steps_one = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one]
    for a, b in zip(steps_two, steps_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["samples_per_s"] > 0
    wa, wb = weights(two), weights(one)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 train images (3 global batches of 8), 11 val images (shards of 5 and 6)."""
    root = tmp_path_factory.mktemp("ddp_images")
    make_imagefolder(root / "train", {"a": 8, "b": 8, "c": 8}, seed=0)
    make_imagefolder(root / "val", {"a": 4, "b": 4, "c": 3}, seed=1)
    return root


def classify_config(images: Path, out: Path, micro: int, **train: object) -> Config:
    return tiny_config(
        images, out,
        train={"micro_batch_size": micro, "global_batch_size": 8, "max_steps": 6,
               "max_grad_norm": None, "log_every": 1, **train},
        optim={"lr": 1e-3}, eval={"every_steps": 3}, checkpoint={"every_steps": 3},
    )  # fmt: skip


@pytest.fixture(scope="module")
def classify_two(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp_classify")
    return train_two_ranks(classify_config(images, tmp / "two", micro=2), tmp)


def test_two_ranks_classify_equal_one_rank_at_twice_the_micro_batch(
    classify_two: Path, images: Path, tmp_path: Path
) -> None:
    one = api.train(classify_config(images, tmp_path, micro=4)).run_dir
    assert_same_training(classify_two, one)
    # evaluation gathered the whole split before computing: QWK/AUC/accuracy over 11 images,
    # not a mean of the two ranks' 5- and 6-image values
    evals_two, evals_one = read_jsonl(classify_two / "eval.jsonl"), read_jsonl(one / "eval.jsonl")
    assert len(evals_two) == len(evals_one) == 2
    for a, b in zip(evals_two, evals_one, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    # per-sample predictions of every val image, in the split's order (rank 0 wrote them)
    table_two = json.loads((classify_two / "evals/step-00000006.json").read_text())["samples"]
    table_one = json.loads((one / "evals/step-00000006.json").read_text())["samples"]
    assert len(table_two["ids"]) == 11 and table_two["ids"] == table_one["ids"]
    # rank 0 alone wrote the run directory: one line per step, one checkpoint per save
    assert len(read_jsonl(classify_two / "metrics.jsonl")) == 6
    checkpoint = ckpt.latest_complete(classify_two / "checkpoints")
    assert checkpoint is not None
    assert {"rng.pt", "rng-rank-1.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert (classify_two / "best" / "adapter_config.json").is_file()


def test_a_two_rank_checkpoint_resumes_on_one_rank_when_the_global_batch_is_held(
    classify_two: Path, images: Path, tmp_path: Path
) -> None:
    # 2 ranks x micro 2 x accum 2 = 8; on 1 rank global_batch_size=8 makes accum 4
    shutil.copytree(classify_two.parent, tmp_path / "copy")
    longer = classify_config(images, tmp_path / "copy", micro=2, max_steps=8)
    state = api.train(longer, resume=True).state
    assert state.step == 8
    reference = api.train(classify_config(images, tmp_path / "ref", micro=2, max_steps=8))
    for name, value in weights(reference.run_dir).items():
        torch.testing.assert_close(weights(longer.run_dir)[name], value, rtol=0, atol=2e-5)


def test_resume_on_another_world_size_without_a_fixed_global_batch_says_what_works(
    classify_two: Path, images: Path
) -> None:
    cfg = classify_config(images, classify_two.parent, micro=2, global_batch_size=None,
                          grad_accum_steps=2, max_steps=10)  # fmt: skip
    with pytest.raises(TrainingError, match=r"global batch was 8, now it would be 4.*"
                       r"train.global_batch_size=8"):  # fmt: skip
        api.train(cfg, resume=True)


def test_two_ranks_segment_equal_one_rank(tmp_path: Path) -> None:
    for split in ("train", "val"):
        crack_data(tmp_path / split, count=8)

    def config(out: Path, micro: int) -> Config:
        return load_config(
            ROOT / "examples/tiny/crack_sam_tiny.yaml",
            [f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}",
             f"output_dir={out}", f"train.micro_batch_size={micro}", "train.max_steps=3",
             "train.global_batch_size=4", "lora.dropout=0", "data.num_workers=0",
             "eval.every_steps=3"],
        )  # fmt: skip

    two = train_two_ranks(config(tmp_path / "two", 1), tmp_path)
    one = api.train(config(tmp_path / "one", 2)).run_dir
    assert_same_training(two, one)
    a, b = read_jsonl(two / "eval.jsonl")[-1], read_jsonl(one / "eval.jsonl")[-1]
    assert a["masks"] == b["masks"] == 8  # every mask of the split, scored once
    assert a["ciou"] == pytest.approx(b["ciou"], rel=1e-5)  # pixel sums over the whole split


def test_two_ranks_ground_equal_one_rank_with_token_counts_summed_over_ranks(
    tmp_path: Path,
) -> None:
    # a frozen vision tower (task.freeze_vision) with non-reentrant gradient checkpointing:
    # DDP must neither wait for frozen parameters nor see one marked ready twice
    data = _make_tiny().write_tiny_example(tmp_path / "gui")

    def config(out: Path, micro: int) -> Config:
        return load_config(
            GROUND_YAML,
            [f"data.train={data / 'train.jsonl'}", f"data.val={data / 'val.jsonl'}",
             f"task.processor={data / 'processor'}", f"output_dir={out}", "data.num_workers=0",
             f"train.micro_batch_size={micro}", "train.global_batch_size=6",
             "train.max_steps=3", "eval.every_steps=3", "model.gradient_checkpointing=true"],
        )  # fmt: skip

    two = train_two_ranks(config(tmp_path / "two", 3), tmp_path)
    one = api.train(config(tmp_path / "one", 6)).run_dir
    assert_same_training(two, one)


def test_a_signal_stops_both_ranks_together_and_the_resume_matches_the_uninterrupted_run(
    classify_two: Path, images: Path, tmp_path: Path
) -> None:
    cfg = classify_config(images, tmp_path, micro=2, max_steps=6)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    proc = launch(path, "train.log_every=1")
    metrics = cfg.run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # to the launcher, which passes it to every rank
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    stopped = ckpt.latest_complete(cfg.run_dir / "checkpoints")
    assert stopped is not None and int(stopped.name.split("-")[-1]) < 6
    train_two_ranks(cfg, tmp_path, "--resume")
    for name, value in weights(classify_two).items():
        torch.testing.assert_close(weights(cfg.run_dir)[name], value, rtol=0, atol=0)


def test_a_killed_rank_ends_the_other_with_a_message_naming_it(
    images: Path, tmp_path: Path
) -> None:
    cfg = classify_config(images, tmp_path, micro=2, max_steps=100_000, log_every=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    proc = launch(path)
    metrics = cfg.run_dir / "metrics.jsonl"
    while proc.poll() is None and not metrics.is_file():
        time.sleep(0.05)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    started = time.monotonic()
    out, _ = proc.communicate(timeout=90)
    assert time.monotonic() - started < 90
    assert proc.returncode not in (0, 75)
    assert "rank 1 failed first (killed by SIGKILL)" in out, out[-3000:]


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of the child of `launcher` that torchrun started as `rank`."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(pid)
    raise AssertionError(f"no rank {rank} under {launcher}")
