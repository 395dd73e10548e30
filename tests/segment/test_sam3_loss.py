"""The SAM 3 set-prediction loss: matching, hand-computed terms, per-instance normalisation."""

from __future__ import annotations

import math

import torch

from visiontune.config.tasks import Sam3LossConfig
from visiontune.data.instances import mask_boxes
from visiontune.tasks.set_loss import InstanceTargets, match, set_loss

FRAME = 16


def outputs_for(boxes: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """One prompt's outputs with the given query boxes and scores, blank masks."""
    queries = len(boxes)
    return {
        "pred_logits": logits[None],
        "pred_boxes": boxes[None],
        "pred_masks": torch.zeros(1, queries, FRAME // 4, FRAME // 4),
        "presence_logits": torch.zeros(1),
        "semantic_seg": None,
    }


def square(x: int, y: int, side: int) -> torch.Tensor:
    mask = torch.zeros(FRAME, FRAME, dtype=torch.bool)
    mask[y : y + side, x : x + side] = True
    return mask


def test_mask_boxes_cover_whole_pixels() -> None:
    masks = torch.stack([square(2, 3, 4), square(0, 15, 1)])
    expected = torch.tensor([[2, 3, 6, 7], [0, 15, 1, 16]], dtype=torch.float32) / FRAME
    assert torch.allclose(mask_boxes(masks), expected)


def test_matching_finds_the_queries_that_fit_each_target() -> None:
    truth = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.6, 0.5, 0.9, 0.8]])
    boxes = torch.full((8, 4), 0.0)
    boxes[:, 2:] = 0.05  # tiny boxes in a corner: fit no target
    boxes[5], boxes[2] = truth[0], truth[1]
    queries, targets = match(torch.zeros(8), boxes, None, truth, None, Sam3LossConfig())
    assert dict(zip(targets.tolist(), queries.tolist(), strict=True)) == {0: 5, 1: 2}


def test_terms_match_hand_computed_values() -> None:
    """One target predicted exactly by query 0: box terms are 0; class focal is the RetinaNet
    formula by hand over the two queries; presence is BCE(0 logit, 1) = ln 2."""
    truth = square(4, 4, 8)
    boxes = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.1, 0.1]])
    logits = torch.tensor([2.0, -1.0])
    spec = Sam3LossConfig(mask_focal_weight=0, dice_weight=0, semantic_weight=0)
    out = set_loss(outputs_for(boxes, logits), targets([truth]), spec)
    alpha, gamma = spec.focal_alpha, spec.focal_gamma
    p0, p1 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))
    positive = alpha * (1 - p0) ** gamma * -math.log(p0)
    negative = (1 - alpha) * p1**gamma * -math.log(1 - p1)
    assert math.isclose(
        float(out.parts["class"]), spec.class_weight * (positive + negative), rel_tol=1e-5
    )
    assert float(out.parts["box_l1"]) == 0.0
    assert abs(float(out.parts["giou"])) < 1e-6
    assert math.isclose(float(out.parts["presence"]), math.log(2), rel_tol=1e-6)
    assert out.count == 1


def targets(masks: list[torch.Tensor], owner: list[int] | None = None) -> InstanceTargets:
    stack = torch.stack(masks)
    own = torch.tensor(owner if owner is not None else [0] * len(masks))
    return InstanceTargets(stack, mask_boxes(stack), own)


def test_loss_per_instance_does_not_swing_with_the_instance_count() -> None:
    """Images with 1, 3 and 10 instances, every instance predicted equally badly: the summed
    loss grows with the count, the loss per instance (what the engine logs) stays put."""
    spec = Sam3LossConfig(class_weight=0, presence_weight=0, semantic_weight=0)
    per_instance, sums = [], []
    for count in (1, 3, 10):
        masks = [square(1 + (k % 5) * 3, 1 + (k // 5) * 8, 2) for k in range(count)]
        boxes = mask_boxes(torch.stack(masks)) + 0.05  # every box off by the same amount
        blank = torch.full((count, FRAME // 4, FRAME // 4), -1.0)
        outputs = outputs_for(boxes, torch.zeros(count))
        outputs["pred_masks"] = blank[None]
        out = set_loss(outputs, targets(masks), spec)
        sums.append(float(out.loss_sum))
        per_instance.append(float(out.loss_sum) / out.count)
    assert sums[2] / sums[0] > 9.0
    assert max(per_instance) - min(per_instance) < 1e-4 * max(per_instance)


def test_an_image_without_instances_is_a_negative_example() -> None:
    """No target: no box or mask term, every query pushed down, presence pushed to 0."""
    boxes = torch.tensor([[0.2, 0.2, 0.4, 0.4]] * 3)
    empty = InstanceTargets(
        torch.zeros(0, FRAME, FRAME, dtype=torch.bool), torch.zeros(0, 4), torch.zeros(0).long()
    )
    out = set_loss(outputs_for(boxes, torch.zeros(3)), empty, Sam3LossConfig())
    assert out.count == 0
    assert float(out.parts["box_l1"]) == 0.0 and float(out.parts["dice"]) == 0.0
    assert math.isclose(float(out.parts["presence"]), math.log(2), rel_tol=1e-6)
    assert float(out.parts["class"]) > 0


def test_ignore_pixels_count_nowhere_in_the_mask_and_semantic_terms() -> None:
    """A 4x4 target in a 16x16 frame, every logit 0 (p = 1/2) except a 3x16 ignore band
    where the prediction is wildly wrong (+5): with the band ignored the terms are the
    hand-computed ones over the 208 scored pixels, as if the band were not there."""
    truth = square(2, 2, 4)
    ignore = torch.zeros(FRAME, FRAME, dtype=torch.bool)
    ignore[10:13] = True
    logits = torch.where(ignore, 5.0, 0.0)
    outputs = outputs_for(mask_boxes(truth[None]), torch.zeros(1))
    outputs["pred_masks"] = logits[None, None]
    outputs["semantic_seg"] = logits[None]
    spec = Sam3LossConfig()
    stack = truth[None]
    scored = set_loss(
        outputs, InstanceTargets(stack, mask_boxes(stack), torch.tensor([0]), ignore[None]), spec
    )
    plain = set_loss(outputs, targets([truth]), spec)
    kept, on, alpha = FRAME * FRAME - 48, 16, spec.focal_alpha
    focal = (on * alpha + (kept - on) * (1 - alpha)) * 0.25 * math.log(2) / kept
    dice = 1 - (2 * 0.5 * on + 1) / (0.5 * kept + on + 1)
    assert math.isclose(float(scored.parts["mask_focal"]), 5 * focal, rel_tol=1e-5)
    assert math.isclose(float(scored.parts["dice"]), 5 * dice, rel_tol=1e-5)
    assert math.isclose(float(scored.parts["semantic"]), math.log(2) + dice, rel_tol=1e-5)
    assert float(plain.parts["mask_focal"]) > 2 * float(scored.parts["mask_focal"])


def test_ignore_pixels_count_nowhere_in_the_union_metrics() -> None:
    """Prediction = target plus a spill into the ignore band: IoU 1 with the band ignored."""
    from visiontune.metrics.instances import semantic_counts, semantic_metrics

    truth = square(2, 2, 4)
    ignore = torch.zeros(FRAME, FRAME, dtype=torch.bool)
    ignore[:, 8:] = True
    spill = truth.clone()
    spill[2:6, 8:12] = True
    scores = semantic_metrics(semantic_counts(spill, truth, 0, ignore))
    assert scores["iou"] == 1.0 and scores["boundary_f1"] == 1.0
    assert semantic_metrics(semantic_counts(spill, truth, 0))["iou"] == 0.5
