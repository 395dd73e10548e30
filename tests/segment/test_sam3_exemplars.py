"""SAM 3 box exemplars: packed as Sam3Processor packs them, seen by the model, trained with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visiontune import api
from visiontune.config.load import load_config
from visiontune.data.synthetic_cracks import generate
from visiontune.errors import VisiontuneError
from visiontune.models.roi_align import roi_align
from visiontune.models.sam3 import Sam3Adapter, box_prompts
from visiontune.tasks.segment_sam3 import Sam3SegmentTask, given_boxes

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/tiny/crack_sam3_tiny.yaml"


def test_boxes_are_packed_centre_size_with_padding_labels() -> None:
    packed = box_prompts(
        [torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 0.5]]), torch.zeros(0, 4)],
        [torch.tensor([1, 0]), torch.zeros(0)],
    )
    expected = torch.tensor([[[0.3, 0.4, 0.4, 0.4], [0.5, 0.25, 1.0, 0.5]], [[0.0] * 4] * 2])
    assert torch.allclose(packed["input_boxes"], expected)
    assert packed["input_boxes_labels"].tolist() == [[1, 0], [-10, -10]]
    assert box_prompts([torch.zeros(0, 4)] * 2) == {}


def test_predict_boxes_are_pixels_and_bad_ones_are_named() -> None:
    item = {"image": "a.png", "boxes": [[10, 20, 30, 60]], "box_labels": [0]}
    packed = given_boxes(item, width=100, height=200, rows=2)
    assert torch.allclose(packed["input_boxes"][1, 0], torch.tensor([0.2, 0.2, 0.2, 0.2]))
    assert packed["input_boxes_labels"].tolist() == [[0], [0]]
    with pytest.raises(VisiontuneError, match=r"a.png: boxes: \[30, 20, 10, 60\] is not"):
        given_boxes({"image": "a.png", "boxes": [[30, 20, 10, 60]]}, 100, 200, 1)


def test_the_model_sees_the_exemplars() -> None:
    cfg = load_config(TINY, ["data.train=."])
    adapter = Sam3Adapter(cfg, "off", None).eval()
    torch.manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(2, 3, 112, 112),
        "input_ids": torch.randint(0, 64, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    boxes = [torch.tensor([[0.1, 0.1, 0.4, 0.3]]), torch.tensor([[0.5, 0.5, 0.9, 0.9]])]
    with torch.no_grad():
        plain = adapter(**inputs)
        positive = adapter(**inputs, **box_prompts(boxes))
        negative = adapter(**inputs, **box_prompts(boxes, [torch.tensor([0])] * 2))
    for name in ("pred_logits", "pred_masks", "semantic_seg"):
        assert not torch.allclose(plain[name], positive[name], rtol=1e-2, atol=0), name
        assert torch.isfinite(positive[name]).all()
    assert not torch.allclose(positive["pred_logits"], negative["pred_logits"], atol=1e-4)


def test_training_with_exemplars_feeds_ground_truth_boxes(tmp_path: Path) -> None:
    """The run also turns on the auxiliary decoder-layer losses (one short run for both)."""
    data = generate(tmp_path / "data", count=2, size=64, widths=(6, 7))
    cfg = load_config(
        TINY,
        [
            f"data.train={data / 'train'}",
            f"data.val={data / 'train'}",
            f"output_dir={tmp_path / 'runs'}",
            "task.sam3.exemplars=1",
            "task.sam3.loss.aux=true",
            "train.max_steps=2",
            "eval.every_steps=2",
        ],
    )
    task = Sam3SegmentTask(cfg)
    splits = task.datasets()
    sample = splits.train[0]
    batch = task.collate([sample, splits.train[1]])
    assert batch.inputs["input_boxes"].shape == (2, 1, 4)
    x1, y1, x2, y2 = sample["exemplar_boxes"][0].tolist()
    assert sample["exemplar_boxes"][0].tolist() in sample["boxes"].tolist()
    centre = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    assert torch.allclose(batch.inputs["input_boxes"][0, 0], torch.tensor(centre))
    assert "input_boxes" not in task.collate([splits.val[0]]).inputs  # evaluation: text only
    result = api.train(cfg)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(r["loss.aux_class"] > 0 for r in records)


def test_roi_align_averages_bilinear_samples_as_torchvision_defines() -> None:
    """On a ramp f(y, x) = x + 10 y a bilinear sample is exact, so each bin's mean is the
    ramp at the bin centre; past the map's edge samples clamp, and beyond one pixel count 0."""
    ramp = (torch.arange(8.0)[None, :] + 10 * torch.arange(6.0)[:, None])[None, None]
    (inner,) = roi_align(ramp, [torch.tensor([[1.0, 1.0, 5.0, 3.0]])], 2)
    # bins x in [1, 3], [3, 5] (centres 2, 4), y in [1, 2], [2, 3] (centres 1.5, 2.5)
    assert torch.allclose(inner[0], torch.tensor([[17.0, 19.0], [27.0, 29.0]]))
    (edge,) = roi_align(ramp, [torch.tensor([[6.0, 0.0, 10.0, 2.0]])], 1)
    # 4 x 2 samples: x = 6.5, 7.5 (clamped to 7), 8.5, 9.5 (beyond width 8: 0); y = 0.5, 1.5
    inside = [(x, y) for x in (6.5, 7.0) for y in (0.5, 1.5)]
    assert torch.allclose(edge[0], torch.tensor([[sum(x + 10 * y for x, y in inside) / 8]]))


def test_cli_boxes_are_four_numbers() -> None:
    import typer

    from visiontune.cli import parse_box

    assert parse_box("10,20.5,30,60") == [10.0, 20.5, 30.0, 60.0]
    for bad in ("10,20,30", "a,b,c,d"):
        with pytest.raises(typer.BadParameter, match="x1,y1,x2,y2"):
            parse_box(bad)
