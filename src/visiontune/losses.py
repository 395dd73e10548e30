"""Loss functions that return one loss per item (reduction none).

Tasks sum these and report the item count, so the engine can normalise over a whole
accumulation window; a per-batch mean would weight a short last batch wrongly. Class weights
therefore scale items and the sum is divided by the number of items, not by the sum of the
weights as `F.cross_entropy(reduction="mean")` would do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from visiontune.config.schema import LossConfig
from visiontune.errors import ConfigError


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-item cross-entropy, computed in fp32 whatever the autocast dtype of the logits."""
    return F.cross_entropy(
        logits.float(), targets, weight=weight, reduction="none", label_smoothing=label_smoothing
    )


def focal(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-item focal loss: alpha * (1 - p_t) ** gamma * CE (Lin et al., 2017).

    The modulating factor shrinks the loss of confidently right items so that rare, hard
    grades keep driving the gradient. With gamma = 0 and no alpha it is exactly cross-entropy
    (including class weights and label smoothing). For several classes `alpha` is one constant
    factor for every item; per-class balance is what `class_weights` is for.
    """
    ce = cross_entropy(logits, targets, weight, label_smoothing)
    log_p = F.log_softmax(logits.float(), dim=-1)
    p_target = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()
    loss = (1.0 - p_target).clamp(min=0.0).pow(gamma) * ce
    return loss * alpha if alpha is not None else loss


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """n_samples / (n_classes * count_c), the scikit-learn "balanced" convention.

    A class with no training item gets weight 0: it cannot occur as a target, and an infinite
    weight would poison the loss if it ever did.
    """
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes)
    counts = counts[:num_classes].double()
    total = counts.sum()
    weights = torch.where(counts > 0, total / (num_classes * counts.clamp(min=1)), 0.0)
    return weights.float()


def class_weights(
    spec: Sequence[float] | Literal["balanced"] | None,
    labels: Sequence[int],
    num_classes: int,
) -> torch.Tensor | None:
    """The configured `task.loss.class_weights` as a tensor, checked against the class count."""
    if spec is None:
        return None
    if spec == "balanced":
        return balanced_class_weights(labels, num_classes)
    if len(spec) != num_classes:
        raise ConfigError(
            [
                f"task.loss.class_weights: {len(spec)} weights given for {num_classes} classes; "
                "give one weight per class (in data.classes order) or 'balanced'"
            ]
        )
    return torch.tensor(list(spec), dtype=torch.float32)


def classification_loss(
    cfg: LossConfig, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Per-item loss of the configured type (`task.loss`)."""
    if weight is not None:
        weight = weight.to(logits.device)
    if cfg.type == "focal":
        return focal(logits, targets, cfg.focal_gamma, cfg.focal_alpha, weight, cfg.label_smoothing)
    return cross_entropy(logits, targets, weight, cfg.label_smoothing)


def _masked_mean(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over each mask's valid pixels; a mask without valid pixels contributes 0."""
    weight = valid.flatten(1).float()
    return (per_pixel.flatten(1) * weight).sum(1) / weight.sum(1).clamp(min=1.0)


def mask_bce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-mask binary cross-entropy over valid pixels, for (M, H, W) logits and 0/1 targets.

    Averaging within each mask (not over all pixels of the batch) makes every mask count the
    same, as LISA does, so one large mask cannot drown a thin crack.
    """
    per_pixel = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), reduction="none"
    )
    return _masked_mean(per_pixel, valid)


def mask_focal(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
) -> torch.Tensor:
    """Per-mask sigmoid focal loss (Lin et al., 2017) over valid pixels.

    alpha weights foreground pixels (1 - alpha the background), the RetinaNet/SAM convention;
    gamma = 0 and alpha = None give `mask_bce` exactly.
    """
    logits, targets = logits.float(), targets.float()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = torch.sigmoid(logits)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _masked_mean(loss, valid)


def mask_dice(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """Per-mask soft Dice loss, 1 - (2|P.T| + s) / (|P| + |T| + s), over valid pixels.

    The smoothing term makes an empty target with an empty prediction a loss of 0 rather
    than 0/0, and keeps the gradient finite on tiny masks.
    """
    weight = valid.flatten(1).float()
    prob = torch.sigmoid(logits.float()).flatten(1) * weight
    truth = targets.float().flatten(1) * weight
    overlap = 2 * (prob * truth).sum(1) + smooth
    return 1 - overlap / (prob.sum(1) + truth.sum(1) + smooth)
