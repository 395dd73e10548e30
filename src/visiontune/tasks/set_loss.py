"""DETR-style set-prediction loss for SAM 3: Hungarian matching, then per-term sums.

SAM 3 answers a prompt with Q query slots, unordered. Each target instance is assigned to one
query by `scipy.optimize.linear_sum_assignment` on a cost of classification + box L1 + box
GIoU (+ mask Dice); matched queries learn their box (L1 + GIoU) and mask (sigmoid focal +
Dice, at the target's full frame, so a one-pixel crack is not averaged away at the decoder's
1/4 resolution), every query learns whether it is matched (sigmoid focal), every prompt learns
whether anything is there at all (presence, BCE) and its union mask (semantic, BCE + Dice).
`ignore` pixels are left out of the mask and semantic terms (not of the matching cost).

The box GIoU, Dice and focal formulas are transformers' own DETR-family ones
(`transformers.loss.loss_for_object_detection`), called with a normaliser of 1 so that they
return *sums*: the engine divides by the number of target instances in the whole
accumulation window (`LossOut.count`), so an image with ten cracks weighs ten times one with
one crack and the logged loss is a loss per instance that does not swing with the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from transformers.loss.loss_for_object_detection import (
    dice_loss,
    generalized_box_iou,
    sigmoid_focal_loss,
)

from visiontune.config.tasks import Sam3LossConfig
from visiontune.task import LossOut, Outputs

TERMS = ("class", "box_l1", "giou", "mask_focal", "dice", "presence", "semantic")
AUX_TERMS = ("aux_class", "aux_box_l1", "aux_giou")  # with `aux`: the earlier decoder layers


@dataclass
class InstanceTargets:
    """Target instances of a micro-batch: masks at the input frame and their boxes.

    `masks` [M, S, S] bool over all rows, `boxes` [M, 4] (x1, y1, x2, y2 in [0, 1]),
    `owner` [M] the batch row each instance belongs to, `ignore` [B, S, S] bool the pixels of
    each row that no mask term scores (none when absent).
    """

    masks: torch.Tensor
    boxes: torch.Tensor
    owner: torch.Tensor
    ignore: torch.Tensor | None = None

    def scored(self, row: int) -> torch.Tensor:
        """Flat indices of the row's pixels that the mask and semantic terms score."""
        size = self.masks.shape[-2] * self.masks.shape[-1]
        if self.ignore is None:
            return torch.arange(size, device=self.masks.device)
        return (~self.ignore[row].reshape(-1)).nonzero()[:, 0]

    def of(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.owner == row
        return self.masks[keep], self.boxes[keep]


def match(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor | None,
    target_boxes: torch.Tensor,
    target_masks: torch.Tensor | None,
    spec: Sam3LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query index, target index) pairs of the cheapest assignment, for one prompt.

    The class cost is the focal-loss difference of Deformable DETR (cost of calling the query
    positive minus that of calling it negative); masks enter only with `match_mask` > 0.
    """
    with torch.no_grad():
        prob = logits.sigmoid()[:, None]
        alpha, gamma = spec.focal_alpha, spec.focal_gamma
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        cost = spec.match_class * (positive - negative)
        cost = cost + spec.match_box_l1 * torch.cdist(boxes, target_boxes, p=1)
        cost = cost - spec.match_giou * generalized_box_iou(boxes, target_boxes)
        if spec.match_mask > 0 and masks is not None and target_masks is not None:
            pred = masks.flatten(1).sigmoid()
            truth = target_masks.flatten(1).float()
            overlap = 2 * pred @ truth.T
            total = pred.sum(1)[:, None] + truth.sum(1)[None, :]
            cost = cost + spec.match_mask * (1 - (overlap + 1) / (total + 1))
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def set_loss(outputs: Outputs, targets: InstanceTargets, spec: Sam3LossConfig) -> LossOut:
    """Every term summed over the micro-batch, weighted by `spec`; count = target instances."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    rows, queries = logits.shape
    frame = targets.masks.shape[-2:]
    sums = {name: logits.new_zeros(()) for name in TERMS}
    labels = torch.zeros_like(logits)
    for row in range(rows):
        truth_masks, truth_boxes = targets.of(row)
        scored = targets.scored(row)
        if len(truth_masks) > queries:
            raise ValueError(f"{len(truth_masks)} instances but only {queries} queries")
        if len(truth_masks):
            small = _resized(truth_masks.float(), outputs["pred_masks"].shape[-2:])
            q, t = match(
                logits[row], boxes[row], outputs["pred_masks"][row], truth_boxes, small, spec
            )
            labels[row, q] = 1.0
            pred_boxes, goal = boxes[row, q], truth_boxes[t]
            sums["box_l1"] = sums["box_l1"] + (pred_boxes - goal).abs().sum()
            giou = torch.diag(generalized_box_iou(pred_boxes, goal))
            sums["giou"] = sums["giou"] + (1 - giou).sum()
            pred = _resized(outputs["pred_masks"][row, q], frame).flatten(1)[:, scored]
            truth = truth_masks[t].flatten(1).float()[:, scored]
            sums["mask_focal"] = sums["mask_focal"] + sigmoid_focal_loss(
                pred, truth, 1, spec.focal_alpha, spec.focal_gamma
            )
            sums["dice"] = sums["dice"] + dice_loss(pred, truth, 1)
        semantic = outputs.get("semantic_seg")
        if semantic is not None and spec.semantic_weight > 0:
            union = truth_masks.any(0) if len(truth_masks) else truth_masks.new_zeros(frame)
            sums["semantic"] = sums["semantic"] + _semantic(semantic[row], union, scored)
    sums["class"] = sigmoid_focal_loss(
        logits.reshape(-1, 1), labels.reshape(-1, 1), 1, spec.focal_alpha, spec.focal_gamma
    )
    present = (targets.owner[None, :] == torch.arange(rows, device=logits.device)[:, None]).any(1)
    sums["presence"] = F.binary_cross_entropy_with_logits(
        outputs["presence_logits"], present.float(), reduction="sum"
    )
    weights = {
        "class": spec.class_weight,
        "box_l1": spec.box_l1_weight,
        "giou": spec.giou_weight,
        "mask_focal": spec.mask_focal_weight,
        "dice": spec.dice_weight,
        "presence": spec.presence_weight,
        "semantic": spec.semantic_weight,
    }
    weighted = {name: weights[name] * sums[name] for name in TERMS}
    if spec.aux and "aux_logits" in outputs:
        aux = aux_terms(outputs["aux_logits"], outputs["aux_boxes"], targets, spec)
        weighted.update({f"aux_{name}": weights[name] * aux[name] for name in aux})
    total = sum(weighted.values(), logits.new_zeros(()))
    parts = {name: value.detach() for name, value in weighted.items()}
    return LossOut(total, int(len(targets.owner)), parts)


def aux_terms(
    layer_logits: torch.Tensor,
    layer_boxes: torch.Tensor,
    targets: InstanceTargets,
    spec: Sam3LossConfig,
) -> dict[str, torch.Tensor]:
    """Class focal, box L1 and GIoU sums of the earlier decoder layers ([L, B, Q] logits,
    [L, B, Q, 4] boxes), each layer matched on its own as DETR's auxiliary losses are."""
    sums = {name: layer_logits.new_zeros(()) for name in ("class", "box_l1", "giou")}
    for logits, boxes in zip(layer_logits, layer_boxes, strict=True):
        labels = torch.zeros_like(logits)
        for row in range(len(logits)):
            _, truth_boxes = targets.of(row)
            if len(truth_boxes):
                q, t = match(logits[row], boxes[row], None, truth_boxes, None, spec)
                labels[row, q] = 1.0
                pred, goal = boxes[row, q], truth_boxes[t]
                sums["box_l1"] = sums["box_l1"] + (pred - goal).abs().sum()
                giou = torch.diag(generalized_box_iou(pred, goal))
                sums["giou"] = sums["giou"] + (1 - giou).sum()
        sums["class"] = sums["class"] + sigmoid_focal_loss(
            logits.reshape(-1, 1), labels.reshape(-1, 1), 1, spec.focal_alpha, spec.focal_gamma
        )
    return sums


def _resized(masks: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="bilinear")[:, 0]


def _semantic(logits: torch.Tensor, union: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per-pixel BCE (mean) + Dice of the union mask over the `scored` pixels (flat indices)
    of the target's frame."""
    full = _resized(logits[None], union.shape)[0].reshape(-1)[scored]
    truth = union.float().reshape(-1)[scored]
    bce = F.binary_cross_entropy_with_logits(full, truth)
    return bce + dice_loss(full[None], truth[None], 1)
