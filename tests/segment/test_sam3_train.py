"""The tiny SAM 3 twin trained end to end: it learns its images, logs every loss term, predicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune import api
from visiontune.config.load import load_config
from visiontune.data.synthetic_cracks import generate
from visiontune.tasks.segment_sam3 import Sam3SegmentTask
from visiontune.tasks.set_loss import TERMS

ROOT = Path(__file__).resolve().parents[2]


def untrained_map_50(cfg) -> float:  # noqa: ANN001  (a Config)
    """AP50 of the same seeded model before any step, over the same images."""
    task = Sam3SegmentTask(cfg)
    data = task.datasets().train
    adapter = task.adapter().eval()
    meter = task.meter()
    with torch.no_grad():
        batch = task.collate([data[i] for i in range(len(data))])
        meter.update(adapter(**batch.inputs), batch)
    return meter.compute().scalars["map_50"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, Path]:
    root = tmp_path_factory.mktemp("sam3")
    data = generate(root / "data", count=4, size=64, widths=(6, 7))
    cfg = load_config(
        ROOT / "examples/tiny/crack_sam3_tiny.yaml",
        [
            f"data.train={data / 'train'}",
            f"data.val={data / 'train'}",
            f"output_dir={root / 'runs'}",
        ],
    )
    before = untrained_map_50(cfg)
    result = api.train(cfg)
    return result.run_dir, before, data / "train"


def test_training_clearly_beats_the_untrained_model(trained: tuple[Path, float, Path]) -> None:
    run_dir, before, _ = trained
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    after = evals[-1]["map_50"]
    assert before < 0.05
    assert after > before + 0.1, (before, after)
    assert 0.0 <= evals[-1]["iou"] <= 1.0 and evals[-1]["count_error"] >= 0.0


def test_every_loss_term_is_logged_per_instance(trained: tuple[Path, float, Path]) -> None:
    run_dir, _, _ = trained
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    parts = sum(first[f"loss.{name}"] for name in TERMS)
    assert abs(parts - first["loss"]) < 1e-4 * abs(first["loss"])


def test_predict_writes_instances_and_a_colour_per_instance(
    trained: tuple[Path, float, Path], tmp_path: Path
) -> None:
    run_dir, _, images = trained
    image = sorted((images / "images").glob("*.png"))[0]
    out = tmp_path / "pred"
    out.mkdir()
    records = api.predict(run_dir, [{"image": str(image), "score_threshold": 0.0}], out)
    (record,) = records
    assert record["text"] == "crack" and record["count"] == len(record["instances"]) == 16
    first = record["instances"][0]
    mask = np.asarray(Image.open(first["mask"]))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    assert len(first["box"]) == 4 and 0.0 <= first["score"] <= 1.0
    overlay = np.asarray(Image.open(record["overlay"]))
    assert overlay.shape == (64, 64, 3)
