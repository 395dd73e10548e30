"""End to end on a CPU: train text-prompted segmentation on synthetic ReasonSeg data, then
evaluate the saved run and predict masks for a new query."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.segment.builders import TINY_YAML
from visiontune import api
from visiontune.config.load import load_config
from visiontune.engine.runner import Runner
from visiontune.runs.rundir import read_jsonl
from visiontune.tasks.segment import SegmentTask


def test_short_training_beats_untrained_then_eval_and_predict(
    synthetic: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        TINY_YAML,
        [
            f"data.train={synthetic / 'train'}",
            f"data.val={synthetic / 'val'}",
            f"output_dir={tmp_path / 'runs'}",
        ],
    )
    task = SegmentTask(cfg)
    untrained = Runner(cfg, task.adapter()).evaluate(task, task.datasets().val).scalars["giou"]

    result = api.train(cfg)
    spec = cfg.task.loss
    for record in read_jsonl(result.run_dir / "metrics.jsonl"):  # the loss parts are logged
        parts = spec.mask_weight * record["loss.mask_loss"]
        parts += spec.dice_weight * record["loss.dice_loss"]
        parts += spec.lm_weight * record.get("loss.lm_loss", 0.0)
        assert record["loss"] == pytest.approx(parts, rel=1e-4)
    trained = result.state.best_metric
    assert trained is not None
    assert trained >= untrained + 0.1, (untrained, trained)
    assert 0.0 <= untrained <= 1.0 and trained <= 1.0

    metrics, out = api.evaluate(result.run_dir)
    assert metrics.scalars["giou"] == pytest.approx(trained, abs=1e-6)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["giou"] == pytest.approx(trained, abs=1e-6) and saved["tables"]["per_mask"]
    assert (out / "segment_examples.png").is_file()

    image = synthetic / "val" / "0000.png"
    records = api.predict(
        result.run_dir, [{"image": str(image), "text": "the red circle"}], tmp_path / "pred"
    )
    with Image.open(records[0]["mask"]) as mask, Image.open(image) as original:
        assert mask.size == original.size and mask.mode == "L"
    assert Path(records[0]["overlay"]).is_file()
    assert 0.0 <= records[0]["foreground_fraction"] <= 1.0
