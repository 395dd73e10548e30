"""Segmentation metrics against hand-computed values and torchmetrics."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import BinaryJaccardIndex

from visiontune.metrics.segmentation import IGNORE, SegmentationMeter, iou, score_mask


def square(size: int, rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[rows, cols] = 1
    return mask


def test_identical_masks_score_one() -> None:
    target = square(4, slice(1, 3), slice(1, 3))
    score = score_mask(target.bool(), target)
    assert (score.iou, score.dice, score.boundary_f1) == (1.0, 1.0, 1.0)


def test_disjoint_masks_score_zero() -> None:
    pred = square(6, slice(0, 2), slice(0, 2))
    target = square(6, slice(4, 6), slice(4, 6))
    score = score_mask(pred.bool(), target, tolerance=0)
    assert (score.intersection, score.union) == (0, 8)
    assert (score.iou, score.dice, score.boundary_f1) == (0.0, 0.0, 0.0)


def test_empty_prediction_of_empty_target_is_perfect() -> None:
    empty = torch.zeros(5, 5, dtype=torch.uint8)
    meter = SegmentationMeter()
    meter.update(empty.bool(), empty)
    assert meter.compute() == {
        "giou": 1.0,
        "ciou": 1.0,
        "dice": 1.0,
        "boundary_f1": 1.0,
        "masks": 1.0,
    }


def test_ignore_pixels_leave_prediction_and_target() -> None:
    target = torch.tensor([[1, 1, 0, 0, IGNORE, IGNORE]], dtype=torch.uint8)
    pred = torch.tensor([[1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    score = score_mask(pred, target)
    # Valid pixels: the first four. I = 1, U = 2 (without the ignore rule U would be 4).
    assert (score.intersection, score.union) == (1, 2)
    assert score.iou == 0.5
    assert score.dice == pytest.approx(2 * 1 / (1 + 2))


def test_giou_and_ciou_differ_when_mask_sizes_differ() -> None:
    meter = SegmentationMeter()
    small = square(8, slice(0, 2), slice(0, 2))  # 4 pixels, predicted exactly
    large = square(8, slice(4, 7), slice(0, 4))  # 12 pixels, missed entirely
    meter.update(small.bool(), small)
    meter.update(torch.zeros(8, 8, dtype=torch.bool), large)
    result = meter.compute()
    assert result["giou"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["ciou"] == pytest.approx(4 / (4 + 12))
    assert result["dice"] == pytest.approx(0.5)


def test_boundary_f1_with_and_without_tolerance() -> None:
    target = square(5, slice(1, 4), slice(1, 4))  # ring of 8 boundary pixels
    pred = square(5, slice(1, 4), slice(2, 5))  # shifted right; touches the image edge
    # Prediction boundary (the image edge is no boundary): 7 pixels, 4 on the target ring.
    # Precision 4/7, recall 4/8 -> F1 = 8/15 at zero tolerance; every pixel matches at 1 px.
    assert score_mask(pred.bool(), target, tolerance=0).boundary_f1 == pytest.approx(8 / 15)
    assert score_mask(pred.bool(), target, tolerance=1).boundary_f1 == pytest.approx(1.0)


def test_values_stay_in_unit_interval_and_match_torchmetrics() -> None:
    generator = torch.Generator().manual_seed(0)
    meter = SegmentationMeter()
    reference = BinaryJaccardIndex(ignore_index=IGNORE)
    for _ in range(6):
        target = (torch.rand(16, 16, generator=generator) > 0.6).to(torch.uint8)
        target[torch.rand(16, 16, generator=generator) > 0.85] = IGNORE
        pred = torch.rand(16, 16, generator=generator) > 0.5
        score = meter.update(pred, target)
        single = BinaryJaccardIndex(ignore_index=IGNORE)(pred.long(), target.long())
        assert score.iou == pytest.approx(float(single), abs=1e-6)
        assert iou(pred, target) == pytest.approx(float(single), abs=1e-6)
        reference.update(pred.long(), target.long())
    result = meter.compute()
    assert result["ciou"] == pytest.approx(float(reference.compute()), abs=1e-6)
    for name in ("giou", "ciou", "dice", "boundary_f1"):
        assert 0.0 <= result[name] <= 1.0
