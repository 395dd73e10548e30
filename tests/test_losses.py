"""Losses against hand-computed values and against PyTorch's cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from visiontune.config.schema import LossConfig
from visiontune.errors import ConfigError
from visiontune.losses import (
    balanced_class_weights,
    class_weights,
    classification_loss,
    cross_entropy,
    focal,
)

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-1.0, 3.0, 0.0]])
TARGETS = torch.tensor([0, 2, 0])


def test_focal_with_gamma_zero_is_cross_entropy_with_weights_and_smoothing() -> None:
    weight = torch.tensor([1.0, 2.0, 0.5])
    expected = F.cross_entropy(
        LOGITS, TARGETS, weight=weight, reduction="none", label_smoothing=0.1
    )
    got = focal(LOGITS, TARGETS, gamma=0.0, weight=weight, label_smoothing=0.1)
    assert torch.allclose(got, expected)
    assert torch.allclose(cross_entropy(LOGITS, TARGETS, weight, 0.1), expected)


def test_focal_hand_computed() -> None:
    # two classes, logits (0, ln 3): p = (1/4, 3/4)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    targets = torch.tensor([1, 0])
    got = focal(logits, targets, gamma=2.0, alpha=0.25)
    expected = [0.25 * (1 / 4) ** 2 * -math.log(3 / 4), 0.25 * (3 / 4) ** 2 * -math.log(1 / 4)]
    assert torch.allclose(got, torch.tensor(expected))


def test_cross_entropy_hand_computed_with_class_weight() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])
    got = cross_entropy(logits, torch.tensor([0]), weight=torch.tensor([2.0, 1.0]))
    assert got.item() == pytest.approx(2.0 * math.log(4.0))


def test_balanced_weights_follow_the_sklearn_convention() -> None:
    # 6 items, 3 classes, counts (3, 2, 1) -> 6 / (3 * count); an absent class weighs 0
    weights = balanced_class_weights([0, 0, 0, 1, 1, 2], 4)
    assert torch.allclose(weights, torch.tensor([6 / 12, 6 / 8, 6 / 4, 0.0]))


def test_class_weight_list_must_match_the_class_count() -> None:
    assert class_weights(None, [0], 2) is None
    assert class_weights([1.0, 3.0], [], 2).tolist() == [1.0, 3.0]
    with pytest.raises(ConfigError, match="task.loss.class_weights: 3 weights given for 2"):
        class_weights([1.0, 2.0, 3.0], [], 2)


def test_configured_loss_is_per_item_and_fp32_under_bf16_logits() -> None:
    cfg = LossConfig(type="focal", focal_gamma=1.0)
    per_item = classification_loss(cfg, LOGITS.bfloat16(), TARGETS, None)
    assert per_item.shape == (3,) and per_item.dtype == torch.float32
    p = LOGITS.bfloat16().float().softmax(-1)[torch.arange(3), TARGETS]
    assert torch.allclose(per_item, (1 - p) * -p.log())
