"""A weighted sum of named loss terms: built-ins by name, the user's functions by dotted path.

`task.losses: [{name: l1, weight: 1.0}, {fn: "pkg.mod:sar_edge", weight: 0.5, args: {...}}]`.
Every term returns one loss per item (shape [N]); the total is the weighted sum, and each term
is reported twice in `LossOut.parts` (raw, and weighted as it enters the total), so
metrics.jsonl and the curves show which term moves and which dominates. A term that returns
the wrong shape is named with what it returned; one that returns NaN is named by the engine
(it lists the non-finite parts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from visiontune.config.translate import LossTermConfig
from visiontune.errors import ConfigError, TrainingError
from visiontune.task import Batch, LossOut, Outputs
from visiontune.user_code import import_callable

TermFn = Callable[[Outputs, Batch], torch.Tensor]
_RANGED = {"ssim", "ms_ssim"}
"""Built-ins whose constants depend on the target's value range."""


@dataclass
class LossTerm:
    """One term: its name in the logs, its weight, and `fn(outputs, batch) -> [N]`."""

    name: str
    weight: float
    fn: TermFn
    origin: str


def image_term(loss: Callable[..., torch.Tensor]) -> TermFn:
    """A built-in image loss `(prediction, target, valid) -> [N]` as a term of the batch."""

    def term(outputs: Outputs, batch: Batch) -> torch.Tensor:
        return loss(outputs["prediction"], batch.targets["target"], batch.targets["valid"])

    return term


def user_term(fn: Callable[..., torch.Tensor], args: dict[str, Any]) -> TermFn:
    def term(outputs: Outputs, batch: Batch) -> torch.Tensor:
        return fn(outputs, batch, **args)

    return term


def build_terms(configs: list[LossTermConfig], data_range: float = 1.0) -> list[LossTerm]:
    """Resolve every term up front, so a bad name or import fails before step 1; SSIM-type
    built-ins get the target's `data_range`."""
    terms: list[LossTerm] = []
    problems: list[str] = []
    for i, spec in enumerate(configs):
        key = f"task.losses[{i}]"
        if spec.name is not None:
            from visiontune.image_losses import IMAGE_LOSSES

            if spec.name not in IMAGE_LOSSES:
                hint = " (pip install 'visiontune[lpips]')" if spec.name == "lpips" else ""
                known = sorted(IMAGE_LOSSES)
                problems.append(f"{key}.name: unknown loss {spec.name!r}{hint}; built-ins: {known}")
                continue
            loss = IMAGE_LOSSES[spec.name]
            if spec.name in _RANGED:
                loss = functools.partial(loss, data_range=data_range)
            terms.append(LossTerm(spec.term, spec.weight, image_term(loss), key))
        else:
            assert spec.fn is not None
            fn = import_callable(spec.fn, f"{key}.fn")
            terms.append(LossTerm(spec.term, spec.weight, user_term(fn, spec.args), spec.fn))
    if problems:
        raise ConfigError(problems)
    return terms


def weighted_loss(terms: list[LossTerm], outputs: Outputs, batch: Batch) -> LossOut:
    """Sum over items of the weighted terms, with every term's raw and weighted sums."""
    items = len(batch)
    total: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = {}
    for term in terms:
        per_item = term.fn(outputs, batch)
        if not isinstance(per_item, torch.Tensor) or per_item.shape != (items,):
            got = tuple(per_item.shape) if isinstance(per_item, torch.Tensor) else type(per_item)
            raise TrainingError(
                f"loss term {term.name!r} ({term.origin}) returned {got}; a loss term returns "
                f"one value per item of the batch, a tensor of shape ({items},)"
            )
        weighted = term.weight * per_item.float()
        parts[term.name] = per_item.detach().float().sum()
        parts[f"{term.name}.weighted"] = weighted.detach().sum()
        total = weighted if total is None else total + weighted
    assert total is not None
    return LossOut(total.sum(), items, parts)
