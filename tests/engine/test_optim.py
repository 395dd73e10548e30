import math

import pytest
import torch
from torch import nn

from visiontune.config.schema import OptimConfig, ScheduleConfig
from visiontune.engine.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_counts_optimizer_steps_and_cosine_reaches_min_lr() -> None:
    cfg = ScheduleConfig(type="cosine", warmup_steps=4, min_lr=0.1)
    base = 1.0
    factors = [lr_factor(s, cfg, total_steps=14, base_lr=base) for s in range(15)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # halfway through the 10 decay steps the cosine is at the midpoint between lr and min_lr
    assert factors[4 + 5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[14] == pytest.approx(0.1)


def test_linear_and_constant_and_warmup_ratio() -> None:
    linear = ScheduleConfig(type="linear", warmup_ratio=0.1)
    assert lr_factor(0, linear, 100, 1.0) == pytest.approx(0.1)
    assert lr_factor(55, linear, 100, 1.0) == pytest.approx(0.5)
    constant = ScheduleConfig(type="constant")
    assert lr_factor(99, constant, 100, 1.0) == 1.0


def test_scheduler_lr_follows_factor() -> None:
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=0.5))
    scheduler = build_scheduler(optimizer, ScheduleConfig(type="linear", warmup_steps=2), 6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.5, 0.375, 0.25, 0.125])


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    assert len(decayed) == 1
    assert [p.shape for p in decayed[0]["params"]] == [torch.Size([3, 3])]
