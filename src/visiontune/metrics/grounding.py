"""Click grounding metrics with ScreenSpot's conventions.

A click is correct when the predicted point lies inside the target box, edges included. An
answer we cannot parse is a miss that stays in the denominator (dropping it would reward a
model for answering gibberish when unsure) and is also counted on its own, because "the model
stopped answering in the trained format" and "the model clicks the wrong place" need different
fixes. The distance to the box centre is measured in coordinates normalised by the image's
width and height, so 0.1 means "a tenth of the screen away" on any resolution.

An unparseable answer also stays in the distance's denominator, at the worst distance two
points of the image can have, sqrt(2) (corner to opposite corner in normalised units).
Averaging over parseable answers only would let best-checkpoint selection (mode min) prefer a
model that answers gibberish whenever it is unsure, and would leave `distance` undefined at an
evaluation where nothing parsed, which `eval.metric: distance` cannot survive.

An answer outside the model's coordinate range (Qwen2-VL's (1500, 20) on its 0..1000 grid)
decodes to a point outside the image. It is scored like an unparseable answer (a miss at the
worst distance, not a distance of many screen widths that would swamp the mean) and counted as
`out_of_range`, because it means the model, or the data it learned from, uses another
coordinate convention.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

Point = tuple[float, float]
Box = tuple[float, float, float, float]

WORST_DISTANCE = math.sqrt(2)
"""Normalised distance scored for an answer without a usable point: the image's diagonal."""


@dataclass(frozen=True)
class ClickOutcome:
    """One evaluated sample, everything in original-image pixels.

    `point` is None when the answer was unparseable, and lies outside the image (0..width,
    0..height, edges included) when the answer was outside the codec's range: every codec maps
    its range onto exactly the image. `box` is None for point-only targets, which have a
    distance but no hit/miss.
    """

    sample_id: str
    point: Point | None
    size: tuple[int, int]
    box: Box | None = None
    target_point: Point | None = None
    type: str | None = None

    @property
    def target(self) -> Point | None:
        """Where the click should be: the box centre, or the target point."""
        if self.box is not None:
            return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2
        return self.target_point

    @property
    def usable(self) -> Point | None:
        """The point, when the answer gave one inside the image; None otherwise."""
        return None if self.point is None or self.out_of_range else self.point

    @property
    def out_of_range(self) -> bool:
        """A parsed answer outside the image, i.e. outside the codec's range."""
        if self.point is None:
            return False
        width, height = self.size
        return not (0 <= self.point[0] <= width and 0 <= self.point[1] <= height)


def click_hit(point: Point, box: Box) -> bool:
    """Inside the box, edges inclusive."""
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def normalised_distance(point: Point, target: Point, size: tuple[int, int]) -> float:
    """Euclidean distance after dividing x by the width and y by the height."""
    width, height = size
    return math.hypot((point[0] - target[0]) / width, (point[1] - target[1]) / height)


def click_metrics(outcomes: Iterable[ClickOutcome]) -> dict[str, float]:
    """click_accuracy, unparseable (count and rate), out_of_range, distance, also per type.

    Names: `click_accuracy`, `unparseable`, `unparseable_rate`, `out_of_range` (count),
    `distance`, `samples`, and
    `click_accuracy.<type>`, `distance.<type>`, `samples.<type>` for every type present.
    `distance` averages over every sample with a target, an unparseable answer counting as
    WORST_DISTANCE, as does one out of range; accuracy is reported only when some sample has
    a box.
    """
    items = list(outcomes)
    scalars = _summarise(items, "")
    by_type: dict[str, list[ClickOutcome]] = defaultdict(list)
    for item in items:
        if item.type is not None:
            by_type[item.type].append(item)
    for name in sorted(by_type):
        scalars.update(_summarise(by_type[name], f".{name}"))
    return scalars


def _summarise(items: list[ClickOutcome], suffix: str) -> dict[str, float]:
    with_box = [o for o in items if o.box is not None]
    hits = sum(1 for o in with_box if o.usable is not None and click_hit(o.usable, o.box))
    unparseable = sum(1 for o in items if o.point is None)
    out_of_range = sum(1 for o in items if o.out_of_range)
    distances = [_distance(o) for o in items if o.target is not None]
    out = {f"samples{suffix}": float(len(items))}
    if with_box:
        out[f"click_accuracy{suffix}"] = hits / len(with_box)
    if distances:
        out[f"distance{suffix}"] = sum(distances) / len(distances)
    if not suffix:
        out["unparseable"] = float(unparseable)
        out["unparseable_rate"] = unparseable / len(items) if items else 0.0
        out["out_of_range"] = float(out_of_range)
    return out


def _distance(outcome: ClickOutcome) -> float:
    """Normalised distance to the target; WORST_DISTANCE when there is no usable point."""
    assert outcome.target is not None
    if outcome.usable is None:
        return WORST_DISTANCE
    return normalised_distance(outcome.usable, outcome.target, outcome.size)
