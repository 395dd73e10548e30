"""The loop's promises, checked through real training of a tiny ViT with LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from visiontune import api
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.loop import Loop
from visiontune.engine.runner import Runner
from visiontune.engine.state import WEIGHTS
from visiontune.errors import TrainingError
from visiontune.runs.rundir import RunDir, read_jsonl


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_complete(run_dir / "checkpoints") / WEIGHTS))


def test_accumulation_equals_one_big_batch_with_a_short_last_batch(
    image_data: Path, tmp_path: Path
) -> None:
    # 23 samples: micro-batches of 2 -> 11 of 2 and one of 1; windows of 3 -> 6+6+6+5 samples,
    # the last window holding unequal micro-batches. GA=1 at batch 6 sees the same windows.
    common = {"epochs": 1, "max_steps": None, "seed": 0, "max_grad_norm": None}
    small = tiny_config(
        image_data, tmp_path / "a", train={**common, "micro_batch_size": 2, "grad_accum_steps": 3}
    )
    big = tiny_config(
        image_data, tmp_path / "b", train={**common, "micro_batch_size": 6, "grad_accum_steps": 1}
    )
    api.train(small)
    api.train(big)
    steps_small = read_jsonl(tmp_path / "a/tiny/metrics.jsonl")
    steps_big = read_jsonl(tmp_path / "b/tiny/metrics.jsonl")
    assert len(steps_small) == len(steps_big) == 4
    for a, b in zip(steps_small, steps_big, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa, wb = final_weights(tmp_path / "a/tiny"), final_weights(tmp_path / "b/tiny")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)


def test_overfit_batches_drives_loss_to_zero(image_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        image_data, tmp_path, train={"overfit_batches": 1, "max_steps": 30, "micro_batch_size": 4},
        optim={"lr": 0.03, "weight_decay": 0.0},
    )  # fmt: skip
    api.train(cfg)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "tiny/metrics.jsonl")]
    assert losses[0] > 0.5
    assert losses[-1] < 0.01


def start_loop(cfg, resume: bool = False) -> Loop:
    """What api.train does before `loop.run()`, so a test can stop at an exact step."""
    run = RunDir.prepare(cfg.run_dir, resume=resume, overwrite=False)
    api.seed_everything(cfg.train.seed)
    task = api.make_task(cfg)
    splits = task.datasets()
    adapter = api.build_adapter(task, cfg, run)
    return Loop(cfg, task, Runner(cfg, adapter), splits, run)


def test_resume_mid_epoch_with_accumulation_is_bit_exact(image_data: Path, tmp_path: Path) -> None:
    # 23 samples, micro 3 -> 8 micro-batches, GA 2 -> 4 steps per epoch; stopping after step 5
    # is mid-epoch (epoch 1, micro-batch 2). Dropout and augmentation exercise the RNG.
    sections = dict(
        train={"micro_batch_size": 3, "grad_accum_steps": 2, "max_steps": 12, "seed": 3},
        lora={"rank": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"},
        schedule={"type": "cosine", "warmup_steps": 3},
        eval={"every_steps": 4, "patience": 5},
        checkpoint={"every_steps": 100},
        data={"augment": {"train": {"hflip": 0.5, "rotation": 10}}},
    )
    whole = tiny_config(image_data, tmp_path / "whole", **sections)
    api.train(whole)

    parted = whole.model_copy(update={"output_dir": tmp_path / "parted"})
    first = start_loop(parted)
    for _ in range(5):
        first.optimizer_step()
        first.after_step()
    first.save_checkpoint()
    assert (first.state.epoch, first.state.batch_in_epoch) == (1, 2)

    second = start_loop(parted, resume=True)
    second.resume_from(ckpt.latest_complete(second.rundir.checkpoints))
    second.run()

    wa, wb = final_weights(tmp_path / "whole/tiny"), final_weights(tmp_path / "parted/tiny")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    steps_whole = read_jsonl(tmp_path / "whole/tiny/metrics.jsonl")
    steps_parted = read_jsonl(tmp_path / "parted/tiny/metrics.jsonl")
    assert [r["loss"] for r in steps_whole] == [r["loss"] for r in steps_parted]
    assert read_jsonl(tmp_path / "whole/tiny/eval.jsonl") == read_jsonl(
        tmp_path / "parted/tiny/eval.jsonl"
    )


def test_nan_loss_is_reported_with_step_and_samples(image_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(image_data, tmp_path, optim={"lr": 1e30, "weight_decay": 0.0},
                      train={"max_steps": 20, "max_grad_norm": None})  # fmt: skip
    with pytest.raises(
        TrainingError, match=r"loss is not finite at optimizer step \d+ .*samples \["
    ):
        api.train(cfg)


def test_existing_run_dir_is_never_overwritten(image_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 2})
    api.train(cfg)
    from visiontune.errors import VisiontuneError

    with pytest.raises(VisiontuneError, match="already exists"):
        api.train(cfg)
    api.train(cfg, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("tiny.replaced-")]
    assert len(aside) == 1 and (aside[0] / "summary.json").is_file()
    summary = json.loads((tmp_path / "tiny/summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2


def test_resume_refuses_a_changed_data_order_and_warns_on_other_changes(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 2})
    api.train(cfg)
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 3})})
    assert api.train(longer, resume=True).state.step == 3
    log = (tmp_path / "tiny/train.log").read_text()
    assert "changed setting, applied: train.max_steps (2 -> 3)" in log
    smaller = longer.model_copy(
        update={"train": longer.train.model_copy(update={"micro_batch_size": 2, "max_steps": 5})}
    )
    with pytest.raises(
        TrainingError, match=r"order differ.*train.micro_batch_size \(4 -> 2\).*init_from"
    ):
        api.train(smaller, resume=True)
