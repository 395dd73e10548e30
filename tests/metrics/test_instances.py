"""Instance and union-mask metrics against pycocotools' COCOeval run directly and hand counts."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visiontune.metrics.instances import (
    STAT_NAMES,
    category_instance_metrics,
    count_error,
    instance_metrics,
    semantic_counts,
    semantic_metrics,
)

H, W = 16, 20


def rect(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def stack(*masks: torch.Tensor) -> torch.Tensor:
    return torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool)


def pred(masks: list[torch.Tensor], scores: list[float], labels: list[int] | None = None):
    entry = {"masks": stack(*masks), "scores": torch.tensor(scores, dtype=torch.float32)}
    if labels is not None:
        entry["labels"] = torch.tensor(labels, dtype=torch.int64)
    return entry


def truth(masks: list[torch.Tensor], labels: list[int] | None = None):
    entry = {"masks": stack(*masks)}
    if labels is not None:
        entry["labels"] = torch.tensor(labels, dtype=torch.int64)
    return entry


def hand_built_case(with_labels: bool):
    """Several images: overlapping instances, an image without targets, an unmatched
    prediction, a target nobody finds, an empty image; labels 0/1 when `with_labels`."""
    lab = (lambda *v: list(v)) if with_labels else (lambda *v: None)
    predictions = [
        pred(
            [rect(0, 6, 0, 8), rect(3, 9, 4, 12), rect(12, 16, 15, 20)],
            [0.9, 0.6, 0.8],
            lab(0, 0, 1),
        ),
        pred([rect(5, 10, 5, 10)], [0.7], lab(1)),  # no targets in this image
        pred([], []),  # a target nobody finds
        pred([], []),  # nothing at all
        pred(
            [rect(0, 16, 0, 3), rect(0, 15, 2, 4), rect(1, 16, 10, 12), rect(8, 9, 0, 20)],
            [0.95, 0.5, 0.85, 0.3],
            lab(1, 1, 0, 1),
        ),
    ]
    targets = [
        truth([rect(0, 6, 1, 8), rect(2, 9, 5, 12)], lab(0, 0)),  # overlapping instances
        truth([], lab()),
        truth([rect(4, 8, 4, 8)], lab(1)),
        truth([], lab()),
        truth([rect(0, 16, 0, 3), rect(0, 16, 2, 4), rect(0, 16, 10, 12)], lab(1, 1, 0)),
    ]
    return predictions, targets


def coco_reference(predictions, targets, categories: list[str], tmp_path: Path) -> COCOeval:
    """COCOeval the way its own README uses it: a ground-truth JSON file and loadRes."""
    images, annotations, results = [], [], []
    for image_id, (p, t) in enumerate(zip(predictions, targets, strict=True), start=10):
        images.append({"id": image_id, "height": H, "width": W, "file_name": f"{image_id}.png"})
        t_labels = t.get("labels", torch.zeros(len(t["masks"]), dtype=torch.int64))
        for mask, label in zip(t["masks"], t_labels.tolist(), strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            area = float(mask_utils.area(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 7,
                    "segmentation": rle,
                    "area": area,
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        p_labels = p.get("labels", torch.zeros(len(p["masks"]), dtype=torch.int64))
        for mask, score, label in zip(
            p["masks"], p["scores"].tolist(), p_labels.tolist(), strict=True
        ):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label + 7,
                    "segmentation": rle,
                    "score": score,
                }
            )
    path = tmp_path / "gt.json"
    cats = [{"id": k + 7, "name": name} for k, name in enumerate(categories)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        evaluator = COCOeval(gt, gt.loadRes(results), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_equal_to_cocoeval_run_directly(tmp_path: Path) -> None:
    predictions, targets = hand_built_case(with_labels=False)
    ours = instance_metrics(predictions, targets)
    reference = coco_reference(predictions, targets, ["crack"], tmp_path).stats
    for name, value in zip(STAT_NAMES, reference, strict=True):
        if value == -1:
            assert math.isnan(ours[name]), name
        else:
            assert ours[name] == pytest.approx(float(value), abs=1e-6), name
    # the case is not degenerate: some values lie strictly between 0 and 1
    assert 0 < ours["map"] < ours["map_50"] < 1
    assert 0 < ours["mar_100"] < 1


def test_hand_computed_ap() -> None:
    """Two targets; scores 0.9 (exact), 0.8 (false positive), 0.7 (IoU 4/6 with target B).

    At IoU thresholds 0.50-0.65 ranked hits are TP, FP, TP: the interpolated precision is 1 up
    to recall 0.5 (51 of COCO's 101 recall points) and 2/3 after (50 points), AP = 253/303.
    From 0.70 on, the third is a false positive too: AP = 51/101 and recall 0.5.
    """
    a = rect(0, 4, 0, 4)
    b = rect(8, 10, 0, 3)  # 6 pixels
    predictions = [
        pred([a, rect(12, 16, 12, 16), rect(8, 10, 0, 2)], [0.9, 0.8, 0.7]),  # last: 4 of b's 6
        pred([], []),
    ]
    targets = [truth([a, b]), truth([])]
    m = instance_metrics(predictions, targets)
    low, high = 253 / 303, 51 / 101
    assert m["map_50"] == pytest.approx(low, abs=1e-9)
    assert m["map_75"] == pytest.approx(high, abs=1e-9)
    assert m["map"] == pytest.approx((4 * low + 6 * high) / 10, abs=1e-9)
    assert m["mar_100"] == pytest.approx((4 * 1.0 + 6 * 0.5) / 10, abs=1e-9)
    assert m["mar_1"] == pytest.approx(0.5, abs=1e-9)  # only the top prediction counts


def test_no_targets_anywhere_gives_nan_not_zero() -> None:
    m = instance_metrics([pred([rect(0, 3, 0, 3)], [0.5])], [truth([])])
    assert all(math.isnan(v) for v in m.values())


def test_a_false_positive_on_an_empty_image_lowers_ap_and_an_empty_image_does_not() -> None:
    base_p, base_t = [pred([rect(0, 4, 0, 4)], [0.5])], [truth([rect(0, 4, 0, 4)])]
    assert instance_metrics(base_p, base_t)["map"] == pytest.approx(1.0)
    empty = instance_metrics([*base_p, pred([], [])], [*base_t, truth([])])
    assert empty["map"] == pytest.approx(1.0)
    # a higher-scored false positive on an image without targets: precision 1/2 at recall 1
    fp = instance_metrics([*base_p, pred([rect(0, 2, 0, 2)], [0.9])], [*base_t, truth([])])
    assert fp["map"] == pytest.approx(0.5)


def test_per_category_values_match_cocoeval_per_category(tmp_path: Path) -> None:
    predictions, targets = hand_built_case(with_labels=True)
    categories = ["crack", "spall"]
    ours = category_instance_metrics(predictions, targets, categories)
    both = coco_reference(predictions, targets, categories, tmp_path)
    assert ours["map"] == pytest.approx(float(both.stats[0]), abs=1e-6)
    assert ours["map_50"] == pytest.approx(float(both.stats[1]), abs=1e-6)
    assert ours["mar_100"] == pytest.approx(float(both.stats[8]), abs=1e-6)
    for k, name in enumerate(categories):
        # COCOeval restricted to one category is the independent per-category value
        with contextlib.redirect_stdout(io.StringIO()):
            one = COCOeval(both.cocoGt, both.cocoDt, "segm")
            one.params.catIds = [k + 7]
            one.evaluate()
            one.accumulate()
            one.summarize()
        assert ours[f"map/{name}"] == pytest.approx(float(one.stats[0]), abs=1e-6), name
        assert ours[f"map_50/{name}"] == pytest.approx(float(one.stats[1]), abs=1e-6), name
    assert ours["map/crack"] != pytest.approx(ours["map/spall"])


def test_per_category_hand_values_and_a_category_without_targets() -> None:
    """crack: one exact hit -> AP 1. spall: the prediction is labelled crack, so the spall
    target is missed -> AP 0; a crack prediction on the spall target is a crack false positive
    ranked below the hit, so crack stays 1. "hole" has no target: NaN."""
    a, b = rect(0, 4, 0, 4), rect(8, 12, 8, 12)
    predictions = [pred([a, b], [0.9, 0.8], [0, 0])]
    targets = [truth([a, b], [0, 1])]
    m = category_instance_metrics(predictions, targets, ["crack", "spall", "hole"])
    assert m["map/crack"] == pytest.approx(1.0)
    assert m["map_50/spall"] == pytest.approx(0.0)
    assert math.isnan(m["map/hole"]) and math.isnan(m["map_50/hole"])
    assert m["map"] == pytest.approx(0.5)  # mean over the categories that have targets


def test_bad_input_is_named() -> None:
    good_p, good_t = [pred([rect(0, 4, 0, 4)], [0.5])], [truth([rect(0, 4, 0, 4)])]
    with pytest.raises(ValueError, match="1 predictions but 2 targets"):
        instance_metrics(good_p, [*good_t, truth([])])
    with pytest.raises(ValueError, match=r"predictions\[0\]\['masks'\] must be bool"):
        instance_metrics(
            [{"masks": stack(rect(0, 4, 0, 4)).float(), "scores": torch.ones(1)}], good_t
        )
    with pytest.raises(
        ValueError, match=r"predictions\[0\]\['scores'\] must be a float tensor \[1\]"
    ):
        instance_metrics([{"masks": stack(rect(0, 4, 0, 4)), "scores": torch.ones(2)}], good_t)
    with pytest.raises(ValueError, match=r"targets\[0\] masks are \(8, 8\)"):
        instance_metrics(good_p, [{"masks": torch.zeros(1, 8, 8, dtype=torch.bool)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] holds 2, outside the 2"):
        category_instance_metrics(
            [pred([rect(0, 4, 0, 4)], [0.5], [0])], [truth([rect(0, 4, 0, 4)], [2])], ["a", "b"]
        )


def line(column: int, rows: range) -> torch.Tensor:
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[list(rows), column] = True
    return mask


def test_boundary_f1_of_a_one_pixel_line_shifted_by_one_pixel() -> None:
    """Target: column 3, rows 0-7 (8 pixels, all boundary). Prediction: column 4, rows 0-5.

    Tolerance 0: no boundary pixel lies on the other's, F1 = 0.
    Tolerance 1: all 6 predicted pixels are within 1 px of the target (precision 6/6); target
    rows 0-6 are within 1 px of a predicted pixel, row 7 is not (recall 7/8);
    F1 = 2 * 1 * 7/8 / (1 + 7/8) = 14/15.
    """
    target, prediction = line(3, range(8)), line(4, range(6))
    exact = semantic_counts(prediction, target, tolerance_px=0)
    assert exact.tolist() == [0, 14, 6, 8, 6, 0, 8, 0]
    assert semantic_metrics(exact)["boundary_f1"] == 0.0
    loose = semantic_counts(prediction, target, tolerance_px=1)
    assert loose.tolist() == [0, 14, 6, 8, 6, 6, 8, 7]
    m = semantic_metrics(loose)
    assert m["boundary_precision"] == pytest.approx(1.0)
    assert m["boundary_recall"] == pytest.approx(7 / 8)
    assert m["boundary_f1"] == pytest.approx(14 / 15)
    assert m["iou"] == 0.0 and m["dice"] == 0.0


def test_semantic_counts_sum_over_a_split() -> None:
    """Image 1: prediction = target (9 px). Image 2: 4-px target, nothing predicted.
    Summed: I = 9, U = 13, Dice = 18 / 22; a per-image mean of IoU would say 0.5."""
    square = rect(0, 3, 0, 3)
    first = semantic_counts(square, square, 1)
    second = semantic_counts(torch.zeros(H, W, dtype=torch.bool), rect(5, 7, 5, 7), 1)
    m = semantic_metrics(first + second)
    assert m["iou"] == pytest.approx(9 / 13)
    assert m["dice"] == pytest.approx(18 / 22)
    assert semantic_metrics(semantic_counts(rect(0, 0, 0, 0), rect(0, 0, 0, 0), 1)) == {
        "iou": 1.0,
        "dice": 1.0,
        "boundary_precision": 1.0,
        "boundary_recall": 1.0,
        "boundary_f1": 1.0,
    }


def test_count_error() -> None:
    assert count_error([1, 3, 10], [1, 5, 7]) == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="2 predicted counts but 1"):
        count_error([1, 2], [1])
