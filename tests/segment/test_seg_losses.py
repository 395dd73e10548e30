"""Mask losses: per mask, over valid pixels, against hand values and torch's own BCE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from visiontune.losses import mask_bce, mask_dice, mask_focal

BIG = 30.0  # sigmoid(30) = 1 - 9e-14: a confident logit


def test_bce_is_a_per_mask_mean_over_valid_pixels() -> None:
    logits = torch.tensor([[[0.0, 2.0, -1.0, 5.0]], [[1.0, 1.0, 1.0, 1.0]]])
    targets = torch.tensor([[[1, 0, 0, 1]], [[1, 1, 1, 1]]]).bool()
    valid = torch.tensor([[[1, 1, 1, 0]], [[1, 0, 0, 0]]]).bool()
    per_mask = mask_bce(logits, targets, valid)
    first = F.binary_cross_entropy_with_logits(logits[0, 0, :3], targets[0, 0, :3].float())
    second = F.binary_cross_entropy_with_logits(logits[1, 0, :1], targets[1, 0, :1].float())
    assert per_mask.tolist() == pytest.approx([float(first), float(second)])


def test_dice_by_hand() -> None:
    targets = torch.tensor([[1, 1, 0, 0]]).bool()
    valid = torch.ones(1, 4, dtype=torch.bool)
    same = torch.tensor([[BIG, BIG, -BIG, -BIG]])
    disjoint = torch.tensor([[-BIG, -BIG, BIG, BIG]])
    # 1 - (2|P.T| + 1) / (|P| + |T| + 1): identical -> 1 - 5/5 = 0; disjoint -> 1 - 1/5.
    assert float(mask_dice(same, targets, valid)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(mask_dice(disjoint, targets, valid)[0]) == pytest.approx(0.8, abs=1e-6)
    empty = torch.zeros(1, 4, dtype=torch.bool)
    assert float(mask_dice(-BIG * torch.ones(1, 4), empty, valid)[0]) == pytest.approx(0.0)


def test_focal_reduces_to_bce_and_down_weights_easy_pixels() -> None:
    logits = torch.tensor([[3.0, -2.0, 0.5]])
    targets = torch.tensor([[1, 0, 0]]).bool()
    valid = torch.ones(1, 3, dtype=torch.bool)
    plain = mask_focal(logits, targets, valid, gamma=0.0, alpha=None)
    assert torch.allclose(plain, mask_bce(logits, targets, valid))
    # gamma = 2, alpha = 0.25 by hand for each pixel: alpha_t * (1 - p_t)^2 * CE.
    p = torch.sigmoid(logits)[0].tolist()
    expected = (
        0.25 * (1 - p[0]) ** 2 * -math.log(p[0])
        + 0.75 * p[1] ** 2 * -math.log(1 - p[1])
        + 0.75 * p[2] ** 2 * -math.log(1 - p[2])
    ) / 3
    assert float(mask_focal(logits, targets, valid)[0]) == pytest.approx(expected, rel=1e-5)
