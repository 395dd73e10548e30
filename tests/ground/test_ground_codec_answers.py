"""Answers against the codec's range: out-of-range answers, dataset answers in the wrong
convention (finding 18), and targets read from answers (LLaMA-Factory conversations)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visiontune.metrics.grounding import ClickOutcome, click_metrics
from visiontune.models.coords import (
    CoordCodec,
    Norm1000Codec,
    ResizedPixelCodec,
    parse_answer,
    write_answer,
)

SCREEN = (1920, 1080)
# Qwen2.5-VL resizes 1920x1080 to 1316x728 with these limits (by hand in test_ground_coords.py)
RESIZED = ResizedPixelCodec(min_pixels=56 * 56, max_pixels=1280 * 28 * 28)
BOX = (900.0, 500.0, 1020.0, 580.0)  # centre (960, 540), the middle of the screen


def test_norm1000_range_is_0_to_1000_inclusive() -> None:
    codec = Norm1000Codec()
    # Qwen's docs say both 0-999 and 0-1000: both edges are answers, not errors
    assert codec.in_range((0, 0), SCREEN) and codec.in_range((1000, 1000), SCREEN)
    assert codec.in_range((999, 1000), SCREEN)
    assert not codec.in_range((1500, 20), SCREEN)
    assert not codec.in_range((1000.5, 0), SCREEN)
    assert not codec.in_range((-1, 500), SCREEN)


def test_resized_pixels_range_is_the_resized_image() -> None:
    assert RESIZED.in_range((1316, 728), SCREEN) and RESIZED.in_range((0, 0), SCREEN)
    assert not RESIZED.in_range((1317, 0), SCREEN)
    assert not RESIZED.in_range((0, 729), SCREEN)
    # a screenshot-pixel answer can exceed the resized image
    assert not RESIZED.in_range((1900, 100), SCREEN)


def test_an_out_of_range_answer_is_a_miss_at_the_worst_distance() -> None:
    """(1500, 20) on Qwen2-VL's grid decodes to x = 2880 on a 1920 px screen."""
    codec = Norm1000Codec()
    parsed = parse_answer("(1500, 20)")
    assert parsed is not None
    point = codec.decode(parsed, SCREEN)
    assert point == (2880.0, 21.6)
    m = click_metrics([ClickOutcome("a", point, SCREEN, BOX)])
    assert m["out_of_range"] == 1.0
    assert m["click_accuracy"] == 0.0
    assert m["distance"] == pytest.approx(math.sqrt(2))
    # the 1000 edge is in range: it decodes onto the image's edge, not outside it
    edge = codec.decode((1000, 1000), SCREEN)
    assert edge == (1920.0, 1080.0)
    assert click_metrics([ClickOutcome("b", edge, SCREEN, BOX)])["out_of_range"] == 0.0


@pytest.mark.parametrize(
    ("codec", "answer"),
    [
        (Norm1000Codec(), "(500,500)"),  # 960/1920*1000, 540/1080*1000
        (Norm1000Codec(), '{"point_2d": [499, 501]}'),  # one unit of slack: floor vs round
        (Norm1000Codec(), "(470, 536)"),  # inside the box: (469, 463)..(531, 537)
        (RESIZED, "(658,364)"),  # 960*1316/1920, 540*728/1080
        (RESIZED, "[630, 345, 690, 385]"),  # a box answer whose centre (660, 365) is inside
    ],
)
def test_answers_in_the_models_convention_agree(codec: CoordCodec, answer: str) -> None:
    assert codec.check_answer(answer, BOX, SCREEN) is None


def test_screenshot_pixel_answers_are_refused_with_the_expected_coordinates() -> None:
    """Finding 18: data in screenshot pixels trains one convention and scores another."""
    problem = Norm1000Codec().check_answer("(960,540)", BOX, SCREEN)
    assert problem is not None
    assert "image pixels" in problem and "norm1000" in problem and "(469, 463)" in problem
    # a point target gives the one expected answer
    problem = RESIZED.check_answer("(960,540)", (960.0, 540.0), SCREEN)
    assert problem is not None
    assert "image pixels" in problem and "resized_pixels" in problem and "(658, 364)" in problem


def test_wrong_and_out_of_range_and_unparseable_answers_are_refused() -> None:
    codec = Norm1000Codec()
    outside = codec.check_answer("(1500, 20)", (960.0, 540.0), SCREEN)
    assert outside is not None and "outside the norm1000 range" in outside
    assert "(500, 500)" in outside
    wrong = codec.check_answer("(100, 100)", (960.0, 540.0), SCREEN)
    assert wrong is not None and "misses the target" in wrong
    # two units off on y is more than the slack
    assert codec.check_answer("(500, 502)", (960.0, 540.0), SCREEN) is not None
    unparseable = codec.check_answer("the OK button", BOX, SCREEN)
    assert unparseable is not None and "holds no point" in unparseable


@pytest.mark.parametrize("codec", [Norm1000Codec(), RESIZED], ids=["norm1000", "resized"])
def test_target_from_answer_round_trips_written_answers(
    codec: CoordCodec,
) -> None:
    """A target written with the codec reads back within half a model unit, in pixels."""
    if isinstance(codec, ResizedPixelCodec):
        unit_x, unit_y = 1920 / 1316, 1080 / 728
    else:
        unit_x, unit_y = 1920 / 1000, 1080 / 1000
    for x in np.linspace(0, 1919, 13):
        for y in np.linspace(0, 1079, 7):
            answer = write_answer('{{"point_2d": [{x}, {y}]}}', codec.encode((x, y), SCREEN))
            back = codec.target_from_answer(answer, SCREEN)
            assert back is not None
            assert abs(back[0] - x) <= unit_x / 2 + 1e-9
            assert abs(back[1] - y) <= unit_y / 2 + 1e-9


def test_target_from_answer_by_hand() -> None:
    assert Norm1000Codec().target_from_answer("(250,750)", SCREEN) == (480.0, 810.0)
    assert Norm1000Codec().target_from_answer("(1000,1000)", SCREEN) == (1920.0, 1080.0)
    assert RESIZED.target_from_answer("(658,364)", SCREEN) == pytest.approx((960.0, 540.0))
    # no target rather than a point off the screen, or a guess from text
    assert Norm1000Codec().target_from_answer("(1500,20)", SCREEN) is None
    assert RESIZED.target_from_answer("(1317,10)", SCREEN) is None
    assert Norm1000Codec().target_from_answer("I cannot see it", SCREEN) is None
