"""Instance-segmentation metrics (mask AP/AR as COCO defines them) and union-mask metrics.

The AP numbers come from pycocotools' `COCOeval` itself (iouType "segm"), not from a
re-implementation: papers and leaderboards quote COCOeval, and torchmetrics'
`MeanAveragePrecision` needs torchvision, which the CPU torch wheel cannot load. Masks are
run-length encoded with `pycocotools.mask.encode`, so COCOeval's own mask IoU is used.

Conventions, decided here once:

- Every entry of `predictions`/`targets` is one image. Images are evaluated as COCO does:
  an image without targets still counts its predictions as false positives, and an image
  with neither targets nor predictions changes nothing.
- COCOeval keeps at most 100 predictions per image (highest scores first) for AP and
  `mar_100`; `mar_1`/`mar_10` keep 1 and 10.
- COCOeval writes -1 where a value is undefined (no target instance in the split, in that
  category or in that size range). We return NaN there, never a fake 0 and never -1, so a
  mean over runs or a "higher is better" comparison cannot silently absorb it.
- `semantic_counts` judges the union of all instances (thin cracks are better judged by
  pixels and edges than by per-instance matching); its ratios follow
  `visiontune.metrics.segmentation`: 1.0 when both prediction and target are empty.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visiontune.metrics.segmentation import boundary, dilate

# Names follow torchmetrics' MeanAveragePrecision, in the order of COCOeval.stats.
STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)

# Order of the values `semantic_counts` returns (and a split sums).
SEMANTIC_FIELDS = (
    "intersection",
    "union",
    "pred_pixels",
    "target_pixels",
    "pred_boundary",
    "pred_boundary_matched",
    "target_boundary",
    "target_boundary_matched",
)


def instance_metrics(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, float]:
    """Mask AP/AR of one category over a set of images, computed by COCOeval.

    `predictions[i]` is `{"masks": bool [N, H, W], "scores": float [N]}` and `targets[i]` is
    `{"masks": bool [M, H, W]}` for image i. Returns `map`, `map_50`, `map_75`, `mar_100` and
    the other COCO summary values (see `STAT_NAMES`); NaN where COCO leaves a value undefined.
    """
    _check_lengths(predictions, targets)
    images = [
        _image(i, preds, truth, None)
        for i, (preds, truth) in enumerate(zip(predictions, targets, strict=True))
    ]
    evaluator = _evaluate(images, ["object"])
    return _summary(evaluator)


def category_instance_metrics(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    categories: Sequence[str],
) -> dict[str, float]:
    """Like `instance_metrics` over several categories, plus `map/<name>` and `map_50/<name>`.

    Entries additionally carry `"labels"`: int64 [N] (predictions) / [M] (targets) indexing
    `categories`. A prediction is matched only to targets of its own category; the overall
    values average over the categories that have targets, as COCO does.
    """
    if not categories:
        raise ValueError("categories is empty: name at least one category")
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories repeat a name: {list(categories)}")
    _check_lengths(predictions, targets)
    images = [
        _image(i, preds, truth, len(categories))
        for i, (preds, truth) in enumerate(zip(predictions, targets, strict=True))
    ]
    evaluator = _evaluate(images, list(categories))
    values = _summary(evaluator)
    params = evaluator.params
    precision = evaluator.eval["precision"]  # [iou thresholds, recall points, K, areas, maxDets]
    at_50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    for k, name in enumerate(categories):
        curve = precision[:, :, k, 0, -1]  # area "all", the largest maxDets, as COCO's summary
        values[f"map/{name}"] = _mean_defined(curve)
        values[f"map_50/{name}"] = _mean_defined(curve[at_50])
    return values


def semantic_counts(
    pred: torch.Tensor, target: torch.Tensor, tolerance_px: int, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel and boundary counts of one union mask, int64 in `SEMANTIC_FIELDS` order.

    Counts (not ratios) so that a split sums them and `semantic_metrics` divides once: a
    per-image mean would let an image with a 20-pixel crack weigh as much as one with 2000.
    A boundary pixel matches when the other mask's boundary lies within `tolerance_px`
    (Chebyshev distance); a one-pixel crack is all boundary, so this is where a prediction
    one pixel off is told apart from one that misses the crack. Pixels in `ignore` count
    nowhere; boundaries are found on the whole masks, so an ignore region's edge is no boundary.
    """
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal [H, W]"
        )
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    guess, truth = pred.bool().cpu(), target.bool().cpu()
    guess_edge, truth_edge = boundary(guess), boundary(truth)
    if ignore is not None:
        valid = ~ignore.bool().cpu()
        guess, truth, guess_edge, truth_edge = (
            m & valid for m in (guess, truth, guess_edge, truth_edge)
        )
    counts = (
        guess & truth,
        guess | truth,
        guess,
        truth,
        guess_edge,
        guess_edge & dilate(truth_edge, tolerance_px),
        truth_edge,
        truth_edge & dilate(guess_edge, tolerance_px),
    )
    return torch.tensor([int(c.sum()) for c in counts], dtype=torch.int64)


def semantic_metrics(counts: torch.Tensor) -> dict[str, float]:
    """IoU, Dice and boundary F1 (with precision and recall) from summed `semantic_counts`."""
    if counts.shape != (len(SEMANTIC_FIELDS),):
        raise ValueError(
            f"counts must have shape ({len(SEMANTIC_FIELDS)},) as semantic_counts returns, "
            f"got {tuple(counts.shape)}"
        )
    c = dict(zip(SEMANTIC_FIELDS, (int(v) for v in counts.tolist()), strict=True))
    areas = c["pred_pixels"] + c["target_pixels"]
    precision = _ratio(c["pred_boundary_matched"], c["pred_boundary"])
    recall = _ratio(c["target_boundary_matched"], c["target_boundary"])
    if c["pred_boundary"] == 0 and c["target_boundary"] == 0:
        f1 = 1.0
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "iou": _ratio(c["intersection"], c["union"]),
        "dice": 2 * c["intersection"] / areas if areas else 1.0,
        "boundary_precision": precision,
        "boundary_recall": recall,
        "boundary_f1": f1,
    }


def count_error(pred_counts: Sequence[int], target_counts: Sequence[int]) -> float:
    """Mean absolute difference between predicted and true instance counts per image."""
    if len(pred_counts) != len(target_counts):
        raise ValueError(
            f"{len(pred_counts)} predicted counts but {len(target_counts)} target counts"
        )
    if not pred_counts:
        raise ValueError("no images: the instance-count error of nothing is undefined")
    total = sum(abs(int(p) - int(t)) for p, t in zip(pred_counts, target_counts, strict=True))
    return total / len(pred_counts)


def _ratio(part: int, whole: int) -> float:
    """part / whole, and 1.0 for 0 / 0 (nothing to find, nothing found)."""
    return part / whole if whole else 1.0


def _mean_defined(values: np.ndarray) -> float:
    """COCO's mean over entries other than -1 (its "undefined"), NaN when none is defined."""
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else math.nan


def _check_lengths(predictions: Sequence[Any], targets: Sequence[Any]) -> None:
    if len(predictions) != len(targets):
        raise ValueError(
            f"{len(predictions)} predictions but {len(targets)} targets: one entry per image each"
        )
    if not predictions:
        raise ValueError("no images to evaluate: predictions and targets are empty")


def _masks(where: str, entry: Mapping[str, torch.Tensor]) -> torch.Tensor:
    masks = entry.get("masks") if isinstance(entry, Mapping) else None
    if not isinstance(masks, torch.Tensor) or masks.ndim != 3:
        raise ValueError(f"{where}['masks'] must be a tensor [N, H, W]")
    if masks.dtype != torch.bool:
        raise ValueError(
            f"{where}['masks'] must be bool, got {masks.dtype}: threshold probabilities first "
            "(e.g. masks > 0.5)"
        )
    return masks.cpu()


def _labels(
    where: str, entry: Mapping[str, torch.Tensor], n: int, n_categories: int | None
) -> list[int]:
    """Category index per instance: all 0 with one category, else the checked `labels`
    (which an entry without instances may leave out)."""
    if n_categories is None or ("labels" not in entry and n == 0):
        return [0] * n
    labels = entry.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
        raise ValueError(f"{where}['labels'] must be an int tensor [{n}] (one per mask)")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{where}['labels'] must be integers, got {labels.dtype}")
    values = [int(v) for v in labels.tolist()]
    bad = [v for v in values if not 0 <= v < n_categories]
    if bad:
        raise ValueError(f"{where}['labels'] holds {bad[0]}, outside the {n_categories} categories")
    return values


def _image(
    index: int,
    prediction: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    n_categories: int | None,
) -> dict[str, Any]:
    """One image's checked masks, RLE-encoded, with labels and scores."""
    pred_masks = _masks(f"predictions[{index}]", prediction)
    true_masks = _masks(f"targets[{index}]", target)
    if pred_masks.shape[1:] != true_masks.shape[1:]:
        raise ValueError(
            f"predictions[{index}] masks are {tuple(pred_masks.shape[1:])} but targets[{index}] "
            f"masks are {tuple(true_masks.shape[1:])}: both must be [H, W] of the same image"
        )
    scores = prediction.get("scores")
    n = pred_masks.shape[0]
    if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
        raise ValueError(f"predictions[{index}]['scores'] must be a float tensor [{n}]")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"predictions[{index}]['scores'] holds NaN or infinite values")
    height, width = true_masks.shape[1:]
    return {
        "height": int(height),
        "width": int(width),
        "pred": _encode(pred_masks),
        "pred_labels": _labels(f"predictions[{index}]", prediction, n, n_categories),
        "scores": [float(s) for s in scores.tolist()],
        "true": _encode(true_masks),
        "true_labels": _labels(f"targets[{index}]", target, true_masks.shape[0], n_categories),
    }


def _encode(masks: torch.Tensor) -> list[dict[str, Any]]:
    """COCO RLEs of [N, H, W] masks (pycocotools wants Fortran-ordered uint8 [H, W, N])."""
    if masks.shape[0] == 0:
        return []
    array = np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))
    return mask_utils.encode(array)


def _coco(images: list[dict[str, Any]], categories: list[str], side: str) -> COCO:
    """An in-memory COCO object of one side ("true" or "pred") of every image."""
    annotations = []
    for image_id, image in enumerate(images, start=1):
        labels = image[f"{side}_labels"]
        for k, rle in enumerate(image[side]):
            annotation = {
                # ids from 1: COCOeval marks "unmatched" with id 0
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": labels[k] + 1,
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
            if side == "pred":
                annotation["score"] = image["scores"][k]
            annotations.append(annotation)
    coco = COCO()
    coco.dataset = {
        "images": [
            {"id": i, "height": image["height"], "width": image["width"]}
            for i, image in enumerate(images, start=1)
        ],
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(categories)],
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def _evaluate(images: list[dict[str, Any]], categories: list[str]) -> COCOeval:
    """COCOeval (segm) run to its summary, its printed tables swallowed."""
    evaluator = COCOeval(
        _coco(images, categories, "true"), _coco(images, categories, "pred"), "segm"
    )
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _summary(evaluator: COCOeval) -> dict[str, float]:
    return {
        name: (math.nan if value == -1 else float(value))
        for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)
    }
