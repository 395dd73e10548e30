"""`train.strategy: fsdp` on CPU with gloo: 2 real ranks started by `visiontune train --nproc 2`,
each holding half of every transformer block of a tiny LoRA ViT (frozen base, trainable LoRA
and head in the same FSDP units).

The reference is one process at twice the micro-batch, trained in-process: the same reference
that tests/engine/test_distributed.py holds 2-rank DDP to, at the same fp32 tolerance (losses
and gradient norms rel 1e-5, weights after AdamW steps atol 2e-5: the ranks' gradients are
summed in another order than one process sums a batch). So 2-rank FSDP equals 2-rank DDP
within that tolerance without paying for a third multi-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers import ViTConfig, ViTModel
from typer.testing import CliRunner

from tests.conftest import TINY_VIT, make_imagefolder, tiny_config
from visiontune import api
from visiontune.cli import app
from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.fsdp import blocks
from visiontune.engine.state import WEIGHTS
from visiontune.errors import ConfigError, TrainingError
from visiontune.runs.rundir import read_jsonl

SRC = Path(__file__).resolve().parents[2] / "src"


def launch(cfg: Config, nproc: int, *args: str) -> subprocess.Popen[str]:
    """`visiontune train CFG --nproc N ARGS` in a child process, as a user types it."""
    path = Path(str(cfg.output_dir)) / f"{cfg.name}-{nproc}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "visiontune", "train", str(path), "--nproc", str(nproc)]
    return subprocess.Popen(
        [*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen[str], expect: int = 0) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == expect, out[-3000:]
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_complete(run_dir / "checkpoints") / WEIGHTS))


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 train images (3 global batches of 8), 11 val images: shards of 5 and 6, which at an
    eval batch of 5 are 1 and 2 forwards, so rank 0 pads one forward to keep in step."""
    root = tmp_path_factory.mktemp("fsdp_images")
    make_imagefolder(root / "train", {"a": 8, "b": 8, "c": 8}, seed=0)
    make_imagefolder(root / "val", {"a": 4, "b": 4, "c": 3}, seed=1)
    return root


def fsdp_config(images: Path, out: Path, micro: int = 2, strategy: str = "fsdp") -> Config:
    return tiny_config(
        images, out,
        train={"micro_batch_size": micro, "global_batch_size": 8, "max_steps": 6,
               "max_grad_norm": 1.0, "log_every": 1, "strategy": strategy},
        optim={"lr": 1e-3}, eval={"every_steps": 3, "batch_size": 5},
        checkpoint={"every_steps": 2},
    )  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_two(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = fsdp_config(images, tmp_path_factory.mktemp("fsdp_two"))
    out = finish(launch(cfg, 2))
    assert "FSDP2: 2 blocks sharded over 2 ranks, gathered in the parameters' dtype" in out
    return cfg.run_dir


def test_two_fsdp_ranks_train_as_one_process_at_twice_the_micro_batch(
    fsdp_two: Path, images: Path, tmp_path: Path
) -> None:
    one = api.train(fsdp_config(images, tmp_path, micro=4, strategy="ddp")).run_dir
    steps_two, steps_one = read_jsonl(fsdp_two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one] == list(range(1, 7))
    for a, b in zip(steps_two, steps_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # of sharded grads
    assert_close_weights(weights(fsdp_two), weights(one))
    # the evaluation gathered all 11 images although the ranks ran 1 and 2 real forwards
    for a, b in zip(read_jsonl(fsdp_two / "eval.jsonl"), read_jsonl(one / "eval.jsonl"),
                    strict=True):  # fmt: skip
        assert a["accuracy"] == pytest.approx(b["accuracy"])
        assert a["quadratic_kappa"] == pytest.approx(b["quadratic_kappa"], abs=1e-6)
    # a checkpoint holds one shard per rank, every one listed in the manifest written last
    checkpoint = ckpt.latest_complete(fsdp_two / "checkpoints")
    assert checkpoint is not None
    listed = json.loads((checkpoint / ckpt.MANIFEST).read_text())["files"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", WEIGHTS} <= listed.keys()
    assert "optimizer.pt" not in listed
    damaged = shutil.copytree(checkpoint, tmp_path / checkpoint.name)
    (damaged / "__1_0.distcp").unlink()  # a lost shard: not a complete checkpoint
    assert "__1_0.distcp is missing" in str(ckpt.verify(damaged))


def test_best_is_a_standard_adapter_that_single_process_eval_loads(fsdp_two: Path) -> None:
    best = fsdp_two / "best"
    assert json.loads((best / "adapter_config.json").read_text())["peft_type"] == "LORA"
    adapter = load_file(str(best / "adapter_model.safetensors"))
    assert any("lora_A" in name for name in adapter)
    assert all(t.shape.numel() > 0 for t in adapter.values())  # whole tensors, not shards
    evaluated = CliRunner().invoke(app, ["eval", str(fsdp_two)])
    assert evaluated.exit_code == 0, evaluated.output
    saved = json.loads((fsdp_two / "eval-val-best/metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(read_jsonl(fsdp_two / "eval.jsonl")[-1]["accuracy"])


def test_a_two_rank_fsdp_run_stopped_by_a_signal_resumes_on_one_rank(
    fsdp_two: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = fsdp_config(images, tmp_path)
    proc = launch(cfg, 2)
    metrics = cfg.run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # to the launcher, which passes it to every rank
    finish(proc, expect=75)
    stopped = ckpt.latest_complete(cfg.run_dir / "checkpoints")
    assert stopped is not None and int(stopped.name.split("-")[-1]) < 6
    # global_batch_size 8 is held: grad_accum_steps becomes 4 on one rank; DCP reads the two
    # ranks' shards into one. The one rank runs in this process, in the environment torchrun
    # gives a rank (`--nproc 1` starts the same; the README runs it), which saves the ~8 s a
    # process spends importing torch and transformers.
    for name, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(name, value)  # fmt: skip
    assert api.train(cfg, resume=True).state.step == 6
    assert read_jsonl(cfg.run_dir / "metrics.jsonl")[-1]["step"] == 6
    assert_close_weights(weights(cfg.run_dir), weights(fsdp_two))


def test_fsdp_without_several_processes_says_how_to_launch(images: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.strategy: fsdp .* --nproc N"):
        api.train(fsdp_config(images, tmp_path))


def test_blocks_are_the_layers_of_module_lists_deepest_first() -> None:
    vit = ViTModel(ViTConfig(**{k: v for k, v in TINY_VIT.items() if k != "model_type"}))
    assert blocks(vit) == list(reversed(vit.layers))  # ViTLayer x 2, not the MLPs

    class InnerLayer(nn.Linear):
        pass

    class OuterBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.ModuleList([InnerLayer(2, 2)])

    outer = nn.ModuleList([OuterBlock(), nn.Linear(2, 2)])  # a plain Linear is no block
    found = blocks(nn.Sequential(outer))
    # fully_shard wraps nested units before the units that contain them
    assert found == [outer[0].inner[0], outer[0]]


def test_a_sharded_checkpoint_resumed_without_fsdp_says_what_works(
    fsdp_two: Path, images: Path, tmp_path: Path
) -> None:
    shutil.copytree(fsdp_two.parent, tmp_path / "copy")
    cfg = fsdp_config(images, tmp_path / "copy", strategy="ddp").model_copy(deep=True)
    cfg.train.max_steps = 8
    with pytest.raises(TrainingError, match=r"written by train.strategy: fsdp .* --nproc N"):
        api.train(cfg, resume=True)
