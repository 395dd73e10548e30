"""The segmentation example configs validate, and the tiny crack variant trains end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.segment.builders import ROOT, crack_data
from visiontune import api
from visiontune.config.load import load_config
from visiontune.config.schema import SegmentTaskConfig

EXAMPLES = [
    "examples/reasonseg_lisa.yaml",
    "examples/crack_sam_lora_light.yaml",
    "examples/tiny/reasonseg_tiny.yaml",
    "examples/tiny/crack_sam_tiny.yaml",
]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_configs_validate(name: str) -> None:
    cfg = load_config(ROOT / name)
    assert isinstance(cfg.task, SegmentTaskConfig)
    assert cfg.eval.metric == "giou"


def test_lisa_example_is_the_issue_setup() -> None:
    cfg = load_config(ROOT / "examples/reasonseg_lisa.yaml")
    task = cfg.task
    assert isinstance(task, SegmentTaskConfig) and task.text_model and task.vision_tower
    assert task.text_model.name_or_path == "meta-llama/Llama-3.2-1B-Instruct"
    assert task.vision_tower.name_or_path == "openai/clip-vit-base-patch16"
    assert cfg.model.name_or_path == "facebook/sam-vit-base"
    assert (task.loss.mask_weight, task.loss.dice_weight, task.loss.lm_weight) == (2.0, 0.5, 1.0)
    assert task.sam.lora_on == [] and task.sam.train_fully == ["mask_decoder"]


def test_tiny_crack_example_trains_with_box_prompts_per_instance(tmp_path: Path) -> None:
    for split in ("train", "val"):
        crack_data(tmp_path / split, count=4)
    cfg = load_config(
        ROOT / "examples/tiny/crack_sam_tiny.yaml",
        [
            f"data.train={tmp_path / 'train'}",
            f"data.val={tmp_path / 'val'}",
            f"output_dir={tmp_path / 'runs'}",
        ],
    )
    result = api.train(cfg)
    assert result.state.step == 6
    assert result.state.last_eval is not None
    for name in ("giou", "ciou", "dice", "boundary_f1"):
        assert 0.0 <= result.state.last_eval[name] <= 1.0
    assert (result.run_dir / "best" / "adapter_config.json").is_file()  # PEFT format
