"""Stops that must leave a resumable checkpoint, and fp16 + LoRA that must not crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_config
from visiontune import api
from visiontune.engine import checkpoint as ckpt
from visiontune.engine import stop
from visiontune.engine.state import WEIGHTS
from visiontune.engine.stop import EXIT_RESUMABLE
from visiontune.errors import TrainingError
from visiontune.runs.rundir import read_jsonl


def test_fp16_base_lora_fp16_amp_with_clipping_trains(image_data: Path, tmp_path: Path) -> None:
    """The setup behind "Attempting to unscale FP16 gradients": fp16 base, LoRA, fp16 AMP."""
    cfg = tiny_config(
        image_data, tmp_path, model={"config": tiny_config(image_data, tmp_path).model.config,
                                     "dtype": "fp16"},
        precision="fp16", train={"max_steps": 8, "max_grad_norm": 0.5},
    )  # fmt: skip
    result = api.train(cfg)
    assert result.state.step == 8
    latest = ckpt.latest_complete(tmp_path / "tiny/checkpoints")
    assert (latest / "scaler.pt").is_file()
    assert ckpt.load_torch(latest / "scaler.pt")["scale"] > 0
    weights = load_file(str(latest / WEIGHTS))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    steps = read_jsonl(tmp_path / "tiny/metrics.jsonl")
    applied = [r for r in steps if r["update_applied"]]
    assert applied and all(0 < r["grad_norm"] < float("inf") for r in applied)


def test_time_limit_saves_and_exits_resumable_then_resume_finishes(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limit counts from the process start; each train() here stands for a fresh process.
    monkeypatch.setattr(stop, "process_started", time.monotonic)
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 10**6, "time_limit": "3s"})
    first = api.train(cfg)
    assert first.exit_code == EXIT_RESUMABLE
    assert first.summary["status"] == "time_limit"
    stopped_at = first.state.step
    assert 0 < stopped_at < 10**6
    latest = ckpt.latest_complete(tmp_path / "tiny/checkpoints")
    assert latest.name == f"step-{stopped_at:08d}"
    again = api.train(
        cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"max_steps": stopped_at + 2})}
        ),
        resume=True,
    )
    assert again.exit_code == 0 and again.state.step == stopped_at + 2


def test_sigusr1_stops_at_a_step_boundary_with_exit_75_and_resume_completes(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 2000})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    command = [sys.executable, "-m", "visiontune.cli", "train", str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "tiny/metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == EXIT_RESUMABLE, output
    summary = json.loads((tmp_path / "tiny/summary.json").read_text())
    assert summary["status"] == "signal:SIGUSR1"
    assert (
        ckpt.latest_complete(tmp_path / "tiny/checkpoints").name == f"step-{summary['steps']:08d}"
    )
    resumed = subprocess.run(
        [*command, "--resume", "train.max_steps=" + str(summary["steps"] + 1)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in (tmp_path / "tiny/train.log").read_text()
    assert json.loads((tmp_path / "tiny/summary.json").read_text())["steps"] == summary["steps"] + 1


def test_out_of_memory_names_the_keys_to_change(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The allocator's error (raised here by the model's forward, as a GPU would) becomes
    advice in config keys instead of a CUDA traceback."""
    from transformers import ViTForImageClassification

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ViTForImageClassification, "forward", exhausted)
    cfg = tiny_config(image_data, tmp_path, train={"micro_batch_size": 4, "grad_accum_steps": 2})
    with pytest.raises(TrainingError) as info:
        api.train(cfg)
    message = str(info.value)
    assert "out of memory at optimizer step 1 with micro_batch_size 4" in message
    assert "train.micro_batch_size=2 with train.grad_accum_steps=4" in message
    assert "model.gradient_checkpointing=true" in message
