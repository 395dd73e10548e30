"""Mask metrics with the conventions of the reasoning-segmentation literature (LISA).

Every metric here is a ratio of pixel counts, so it lies in [0, 1] by construction; a negative
"gIoU" means the box metric *generalized* IoU was reported by mistake. Pixels labelled 255
(`IGNORE`) leave both the prediction and the target before anything is counted.

- IoU of one mask: intersection / union, and 1.0 when the union is empty (the model correctly
  predicted nothing where there is nothing).
- gIoU: the mean of per-mask IoU, so every mask weighs the same whatever its size.
- cIoU: summed intersection over summed union, so large masks dominate.
- Dice of one mask: 2 * intersection / (|pred| + |target|), 1.0 when both are empty.
- Boundary F1: precision and recall of boundary pixels that lie within `tolerance` pixels
  (Chebyshev distance) of the other mask's boundary; thin structures such as cracks are judged
  by where their edges are rather than by their (tiny) area.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

IGNORE = 255


@dataclass(frozen=True)
class MaskScore:
    """Pixel counts and boundary F1 of one predicted mask against its target."""

    intersection: int
    union: int
    pred_area: int
    target_area: int
    boundary_f1: float

    @property
    def iou(self) -> float:
        return self.intersection / self.union if self.union else 1.0

    @property
    def dice(self) -> float:
        total = self.pred_area + self.target_area
        return 2 * self.intersection / total if total else 1.0


def score_mask(pred: torch.Tensor, target: torch.Tensor, tolerance: int = 2) -> MaskScore:
    """Score a boolean prediction (H, W) against a target (H, W) of 0, 1 and IGNORE."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    valid = target != IGNORE
    truth = (target != 0) & valid
    guess = pred.bool() & valid
    intersection = int((guess & truth).sum())
    union = int((guess | truth).sum())
    return MaskScore(
        intersection=intersection,
        union=union,
        pred_area=int(guess.sum()),
        target_area=int(truth.sum()),
        boundary_f1=boundary_f1(pred.bool(), (target != 0) & valid, valid, tolerance),
    )


def iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Foreground IoU of one mask, ignore pixels excluded, 1.0 when both are empty."""
    return score_mask(pred, target, tolerance=0).iou


def boundary(mask: torch.Tensor) -> torch.Tensor:
    """Foreground pixels with a background 4- or 8-neighbour; the image edge is not a boundary."""
    if not mask.any():
        return mask.clone()
    background = (~mask).float()[None, None]
    touches = F.max_pool2d(background, kernel_size=3, stride=1, padding=1)[0, 0] > 0
    return mask & touches


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels within `radius` (Chebyshev distance) of a set pixel."""
    if radius <= 0:
        return mask.clone()
    kernel = 2 * radius + 1
    grown = F.max_pool2d(mask.float()[None, None], kernel_size=kernel, stride=1, padding=radius)
    return grown[0, 0] > 0


def boundary_f1(
    pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor, tolerance: int
) -> float:
    """F1 of boundary pixels matched within `tolerance`; boundary pixels in ignore regions drop.

    Both empty -> 1.0 (nothing to find, nothing found); exactly one empty -> 0.0.
    """
    pred_edge = boundary(pred) & valid
    true_edge = boundary(truth) & valid
    n_pred, n_true = int(pred_edge.sum()), int(true_edge.sum())
    if n_pred == 0 and n_true == 0:
        return 1.0
    if n_pred == 0 or n_true == 0:
        return 0.0
    precision = int((pred_edge & dilate(true_edge, tolerance)).sum()) / n_pred
    recall = int((true_edge & dilate(pred_edge, tolerance)).sum()) / n_true
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


@dataclass
class SegmentationMeter:
    """Accumulates per-mask scores over an evaluation and reports gIoU, cIoU, Dice, boundary F1.

    Masks are scored one by one (at their own resolution) because gIoU is a mean over masks:
    accumulating pixel counts alone could only give cIoU.
    """

    gathered: ClassVar[tuple[str, ...]] = ("scores", "mask_ids")
    """What evaluation gathers across ranks before computing (engine/distributed.py)."""

    tolerance: int = 2
    scores: list[MaskScore] = field(default_factory=list)
    mask_ids: list[str] = field(default_factory=list)

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask_id: str = "") -> MaskScore:
        score = score_mask(pred.cpu(), target.cpu(), self.tolerance)
        self.scores.append(score)
        self.mask_ids.append(mask_id)
        return score

    def compute(self) -> dict[str, float]:
        if not self.scores:
            raise ValueError("no masks were scored: the evaluation split produced no masks")
        n = len(self.scores)
        union = sum(s.union for s in self.scores)
        intersection = sum(s.intersection for s in self.scores)
        return {
            "giou": sum(s.iou for s in self.scores) / n,
            "ciou": intersection / union if union else 1.0,
            "dice": sum(s.dice for s in self.scores) / n,
            "boundary_f1": sum(s.boundary_f1 for s in self.scores) / n,
            "masks": float(n),
        }

    def per_mask(self) -> list[dict[str, float | str]]:
        """One row per mask: the table a user sorts to find the worst predictions."""
        return [
            {"mask": mid, "iou": s.iou, "dice": s.dice, "boundary_f1": s.boundary_f1}
            for mid, s in zip(self.mask_ids, self.scores, strict=True)
        ]
