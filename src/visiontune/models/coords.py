"""Per-model click coordinates: the training target, parsing answers, mapping back to pixels.

Qwen2-VL answers in integers normalised to [0, 1000) of the image it was shown, Qwen3-VL on a
relative 0..1000 grid again; Qwen2.5-VL answers in absolute pixels of the *resized* image its
processor produced (sides multiples of 28, area within [min_pixels, max_pixels]). None is the
original screenshot's pixel grid, so every target we write and every answer we read goes
through one codec per model family. The resize rule is transformers' own `smart_resize`, so the
codec and the image processor cannot disagree about the resized size as long as both get the
same min/max pixels.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

Point = tuple[float, float]
Box = tuple[float, float, float, float]
CoordinateSystem = Literal["norm1000", "resized_pixels"]

FAMILY_COORDINATES: dict[str, CoordinateSystem] = {
    "qwen2_vl": "norm1000",
    "qwen2_5_vl": "resized_pixels",
    "qwen3_vl": "norm1000",
    "qwen3_vl_moe": "norm1000",
}
# Highest value a norm1000 target is written with. Qwen2-VL's grid is [0, 1000); Qwen3-VL's
# documentation describes a 0..1000 grid (and 0-999 in places): answers are read on 0..1000 for
# every family, and targets are written the way each family's own docs write them.
NORM1000_TOP: dict[str, int] = {"qwen2_vl": 999, "qwen3_vl": 1000, "qwen3_vl_moe": 1000}


class CoordCodec(ABC):
    """Converts between original-image pixels and the numbers a model reads and writes.

    Every codec maps its whole range onto the image exactly (range edges onto image edges), so
    a decoded point outside the image and an answer outside the range are the same thing.
    """

    system: ClassVar[CoordinateSystem]

    @abstractmethod
    def encode(self, point: Point, size: tuple[int, int]) -> tuple[int, int]:
        """Original-pixel point of an image of `size` (width, height) -> model integers."""

    @abstractmethod
    def decode(self, point: Point, size: tuple[int, int]) -> Point:
        """Model coordinates -> original-image pixels (any point: no range check)."""

    @abstractmethod
    def in_range(self, point: Point, size: tuple[int, int]) -> bool:
        """Whether model coordinates lie in the range the model answers in, edges included."""

    def target_from_answer(self, text: str, size: tuple[int, int]) -> Point | None:
        """The click an answer written in this model's convention means, in original pixels.

        For data whose only target is the assistant's answer (LLaMA-Factory conversations with
        no `bbox` or `point`). None when the answer holds no point or one outside the range:
        such a sample has no target to score against.
        """
        parsed = parse_answer(text)
        if parsed is None or not self.in_range(parsed, size):
            return None
        return self.decode(parsed, size)

    def check_answer(self, text: str, target: Point | Box, size: tuple[int, int]) -> str | None:
        """None when an answer written in a dataset clicks `target` in this model's convention;
        otherwise what is wrong, in words for a data error.

        `target` is a point or an (x1, y1, x2, y2) box in original-image pixels. Data written in
        another convention (most often screenshot pixels) would train one convention and be
        scored in another, so it must be refused before training. One model unit of slack per
        side allows writers that floor instead of rounding, or write 1000 for the right edge.
        """
        parsed = parse_answer(text)
        if parsed is None:
            return f"the answer {text!r} holds no point"
        box = target if len(target) == 4 else (*target, *target)
        low, high = self.encode(box[:2], size), self.encode(box[2:], size)
        if _within(parsed, (low[0] - 1, low[1] - 1, high[0] + 1, high[1] + 1)):
            return None
        shown, expected = f"({_number(parsed[0])}, {_number(parsed[1])})", _describe(low, high)
        if _within(parsed, (box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1)):
            return (
                f"the answer {shown} is the target in image pixels, but this model answers in "
                f"{self.system} coordinates: expected {expected}"
            )
        if not self.in_range(parsed, size):
            return f"the answer {shown} lies outside the {self.system} range: expected {expected}"
        return f"the answer {shown} misses the target: expected {expected} in {self.system}"


@dataclass(frozen=True)
class Norm1000Codec(CoordCodec):
    """Qwen2-VL and Qwen3-VL: x and y relative to the image's width and height, 0..1000.

    Targets are written in [0, top] (999 for Qwen2-VL, 1000 for Qwen3-VL); answers are accepted
    in [0, 1000] whatever `top` is, because Qwen's docs say both. Decoding multiplies by
    size/1000 (the convention the pre-trained model answers in), so a round trip is off by at
    most half a bin, size/2000 pixels.
    """

    system: ClassVar[CoordinateSystem] = "norm1000"
    top: int = 999

    def encode(self, point: Point, size: tuple[int, int]) -> tuple[int, int]:
        width, height = size
        return _bin(point[0] / width * 1000, self.top), _bin(point[1] / height * 1000, self.top)

    def decode(self, point: Point, size: tuple[int, int]) -> Point:
        width, height = size
        return point[0] * width / 1000, point[1] * height / 1000

    def in_range(self, point: Point, size: tuple[int, int]) -> bool:
        return 0 <= point[0] <= 1000 and 0 <= point[1] <= 1000


@dataclass(frozen=True)
class ResizedPixelCodec(CoordCodec):
    """Qwen2.5-VL: absolute pixels of the image after the processor's smart resize."""

    system: ClassVar[CoordinateSystem] = "resized_pixels"
    min_pixels: int
    max_pixels: int
    factor: int = 28

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) the image processor feeds the model for an image of `size`."""
        width, height = size
        new_height, new_width = smart_resize(
            height,
            width,
            factor=self.factor,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )
        return new_width, new_height

    def encode(self, point: Point, size: tuple[int, int]) -> tuple[int, int]:
        new_width, new_height = self.resized_size(size)
        # the right and bottom edges (x = width) are valid coordinates of the resized image
        x = _bin(point[0] * new_width / size[0], new_width)
        y = _bin(point[1] * new_height / size[1], new_height)
        return x, y

    def decode(self, point: Point, size: tuple[int, int]) -> Point:
        new_width, new_height = self.resized_size(size)
        return point[0] * size[0] / new_width, point[1] * size[1] / new_height

    def in_range(self, point: Point, size: tuple[int, int]) -> bool:
        new_width, new_height = self.resized_size(size)
        return 0 <= point[0] <= new_width and 0 <= point[1] <= new_height


def make_codec(
    system: CoordinateSystem,
    min_pixels: int,
    max_pixels: int,
    factor: int = 28,
    model_type: str = "qwen2_vl",
) -> CoordCodec:
    """The codec for `system`; `model_type` picks how a norm1000 target is written (its top)."""
    if system == "norm1000":
        return Norm1000Codec(top=NORM1000_TOP.get(model_type, 999))
    return ResizedPixelCodec(min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)


def coordinates_for(model_type: str) -> CoordinateSystem | None:
    """The coordinate system a model family was pre-trained with; None when we do not know."""
    return FAMILY_COORDINATES.get(model_type)


def _bin(value: float, top: int) -> int:
    """Round to the nearest integer inside [0, top]: a click on the right edge stays in range."""
    return min(max(int(math.floor(value + 0.5)), 0), top)


def write_answer(template: str, model_point: tuple[int, int]) -> str:
    """The assistant's training answer, e.g. template `({x},{y})` -> `(512,340)`."""
    return template.format(x=model_point[0], y=model_point[1])


_NUMBER = r"-?\d+(?:\.\d+)?"
_GROUP = re.compile(
    rf"[\(\[]\s*({_NUMBER})\s*,\s*({_NUMBER})\s*(?:,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*)?[\)\]]"
)
_PAIR_SEPARATOR = re.compile(r"\s*,?\s*$")
_ANY_NUMBER = re.compile(_NUMBER)


def parse_answer(text: str) -> Point | None:
    """The click a model's answer means, in model coordinates; None when it means none.

    Accepted: a point `(x, y)` or `[x, y]` (also inside JSON such as `{"point_2d": [x, y]}`),
    a box `[x1, y1, x2, y2]` or Qwen2-VL's `(x1,y1),(x2,y2)` whose centre is the click, and
    as a last resort a text holding exactly two numbers (`x=12 y=34`). The first bracketed
    group wins, so a trailing label such as `"label": "button 2"` cannot move the click.
    """
    groups = list(_GROUP.finditer(text))
    if groups:
        first = groups[0]
        numbers = [float(g) for g in first.groups() if g is not None]
        if len(numbers) == 4:
            return _centre((numbers[0], numbers[1], numbers[2], numbers[3]))
        if len(groups) > 1 and groups[1].group(3) is None:
            between = text[first.end() : groups[1].start()]
            if _PAIR_SEPARATOR.match(between):
                x2, y2 = float(groups[1].group(1)), float(groups[1].group(2))
                return _centre((numbers[0], numbers[1], x2, y2))
        return numbers[0], numbers[1]
    numbers = _ANY_NUMBER.findall(text)
    if len(numbers) == 2:
        return float(numbers[0]), float(numbers[1])
    return None


def _centre(box: Box) -> Point:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def box_centre(box: Box) -> Point:
    """Centre of an (x1, y1, x2, y2) box: the click a box target is trained as."""
    return _centre(box)


def _within(point: Point, box: Box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _describe(low: tuple[int, int], high: tuple[int, int]) -> str:
    if low == high:
        return f"about ({low[0]}, {low[1]})"
    return f"a point in ({low[0]}, {low[1]})..({high[0]}, {high[1]})"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)
