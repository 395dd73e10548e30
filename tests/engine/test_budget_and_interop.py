"""Early stopping and fractional epochs; best/ is a real PEFT adapter for a hub-style base."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForImageClassification

from tests.conftest import TINY_VIT, tiny_config
from visiontune import api
from visiontune.engine.order import train_indices


def test_early_stopping_waits_for_min_steps(image_data: Path, tmp_path: Path) -> None:
    # lr ~ 0: the metric never improves after the first evaluation
    cfg = tiny_config(
        image_data, tmp_path, optim={"lr": 1e-12, "weight_decay": 0.0},
        train={"max_steps": 50, "min_steps": 4}, eval={"every_steps": 1, "patience": 2},
    )  # fmt: skip
    result = api.train(cfg)
    assert result.summary["status"] == "early_stopped"
    assert result.state.step == 4  # patience ran out at step 3, but min_steps is 4
    assert result.summary["best"]["step"] == 1


def test_fractional_epochs_count_optimizer_steps(image_data: Path, tmp_path: Path) -> None:
    # 23 samples / micro 2 = 12 micro-batches; GA 4 -> 3 steps per epoch; 1.5 epochs -> 5 steps
    cfg = tiny_config(
        image_data, tmp_path,
        train={"max_steps": None, "epochs": 1.5, "micro_batch_size": 2, "grad_accum_steps": 4},
    )  # fmt: skip
    assert api.train(cfg).state.step == 5


def test_max_samples_is_a_seeded_subset() -> None:
    picked = train_indices(100, 10, seed=1)
    assert len(set(picked)) == 10 and picked == train_indices(100, 10, seed=1)
    assert picked != train_indices(100, 10, seed=2)
    assert train_indices(5, None, seed=0) == [0, 1, 2, 3, 4]


def test_best_is_a_peft_adapter_for_the_base_model(image_data: Path, tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    config = AutoConfig.for_model(**TINY_VIT)
    AutoModelForImageClassification.from_config(config).save_pretrained(base_dir)
    cfg = tiny_config(
        image_data, tmp_path / "runs", model={"name_or_path": str(base_dir), "config": None},
        train={"max_steps": 3},
    )  # fmt: skip
    api.train(cfg)
    best = tmp_path / "runs/tiny/best"
    adapter_config = json.loads((best / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)

    base = AutoModelForImageClassification.from_pretrained(
        base_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    plain = PeftModel.from_pretrained(base, best).eval()
    ours = api.load_run(tmp_path / "runs/tiny").runner.adapter
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            plain(pixel_values=pixels).logits, ours(pixel_values=pixels)["logits"]
        )
