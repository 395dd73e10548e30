"""Click metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from visiontune.metrics.grounding import ClickOutcome, click_hit, click_metrics

BOX = (0.0, 0.0, 10.0, 10.0)
OUTCOMES = [
    # inside: distance to the centre (5, 5) is 0
    ClickOutcome("a", (5.0, 5.0), (100, 100), BOX, type="text"),
    # on the corner: edges are inclusive; distance hypot(5/100, 5/100)
    ClickOutcome("b", (10.0, 10.0), (100, 100), BOX, type="text"),
    # just outside the right edge; distance 5.01/100
    ClickOutcome("c", (10.01, 5.0), (100, 100), BOX, type="icon"),
    # unparseable: a miss that stays in the denominator, at the worst distance sqrt(2)
    ClickOutcome("d", None, (100, 100), BOX, type="icon"),
    # point target (no box): distance only, 10 px of a 100 px wide image
    ClickOutcome("e", (60.0, 50.0), (100, 200), target_point=(50.0, 50.0)),
]


def test_click_hit_is_edge_inclusive() -> None:
    assert click_hit((0, 0), BOX) and click_hit((10, 10), BOX) and click_hit((10, 0), BOX)
    assert not click_hit((10.001, 5), BOX) and not click_hit((5, -0.001), BOX)


def test_click_metrics_by_hand() -> None:
    m = click_metrics(OUTCOMES)
    corner = math.hypot(0.05, 0.05)
    assert m["click_accuracy"] == pytest.approx(2 / 4)
    assert m["unparseable"] == 1.0
    assert m["unparseable_rate"] == pytest.approx(1 / 5)
    assert m["samples"] == 5.0
    assert m["distance"] == pytest.approx((0 + corner + 0.0501 + math.sqrt(2) + 0.1) / 5)
    assert m["click_accuracy.text"] == 1.0
    assert m["distance.text"] == pytest.approx(corner / 2)
    assert m["click_accuracy.icon"] == 0.0
    assert m["distance.icon"] == pytest.approx((0.0501 + math.sqrt(2)) / 2)
    assert m["samples.text"] == 2.0 and m["samples.icon"] == 2.0


def test_all_unparseable_scores_the_worst_not_missing() -> None:
    """eval.metric: distance must exist at an evaluation where nothing parsed (finding 7)."""
    m = click_metrics(
        [ClickOutcome("x", None, (10, 10), BOX), ClickOutcome("y", None, (10, 10), BOX)]
    )
    assert m["click_accuracy"] == 0.0
    assert m["unparseable"] == 2.0 and m["unparseable_rate"] == 1.0
    assert m["distance"] == pytest.approx(math.sqrt(2))


def test_unparseable_answers_stay_in_the_distance_denominator() -> None:
    """A model that answers gibberish when unsure must not get a better (lower) distance."""
    size = (200, 100)
    outcomes = [
        # hit: 20 px right of the centre (100, 50) of a 200 px wide image -> 0.1
        ClickOutcome("hit", (120.0, 50.0), size, (80.0, 30.0, 120.0, 70.0)),
        ClickOutcome("gibberish", None, size, (80.0, 30.0, 120.0, 70.0)),
        # miss: 30 px below the centre of a 100 px high image -> 0.3
        ClickOutcome("miss", (100.0, 80.0), size, (90.0, 40.0, 110.0, 60.0)),
    ]
    m = click_metrics(outcomes)
    assert m["distance"] == pytest.approx((0.1 + 1.41421356 + 0.3) / 3)
    assert m["click_accuracy"] == pytest.approx(1 / 3)
    assert m["unparseable"] == 1.0 and m["unparseable_rate"] == pytest.approx(1 / 3)
    # averaging over parseable answers only would have given (0.1 + 0.3) / 2 = 0.2
    assert m["distance"] > 0.2


def test_point_targets_only_have_no_accuracy() -> None:
    m = click_metrics([ClickOutcome("p", (3.0, 4.0), (10, 10), target_point=(0.0, 0.0))])
    assert "click_accuracy" not in m
    assert m["distance"] == pytest.approx(0.5)  # hypot(0.3, 0.4)


def test_answers_outside_the_image_are_counted_and_scored_like_unparseable() -> None:
    """A decoded point outside the image came from an answer outside the codec's range."""
    size, box = (1000, 500), (400.0, 200.0, 600.0, 300.0)  # centre (500, 250)
    m = click_metrics(
        [
            ClickOutcome("centre", (500.0, 250.0), size, box),  # hit, distance 0
            ClickOutcome("right", (1500.0, 250.0), size, box),  # out: miss, sqrt(2)
            ClickOutcome("negative", (-10.0, 250.0), size, box),  # out: miss, sqrt(2)
            # the bottom-right corner is still inside the image: hypot(500/1000, 250/500)
            ClickOutcome("corner", (1000.0, 500.0), size, box),
        ]
    )
    assert m["out_of_range"] == 2.0
    assert m["unparseable"] == 0.0
    assert m["click_accuracy"] == pytest.approx(1 / 4)
    assert m["distance"] == pytest.approx((0 + 1.41421356 * 2 + 0.70710678) / 4)


def test_an_out_of_range_point_inside_a_box_past_the_image_edge_is_a_miss() -> None:
    """Accuracy does not rely on boxes lying inside the image: out of range is a miss."""
    m = click_metrics([ClickOutcome("a", (105.0, 5.0), (100, 100), (90.0, 0.0, 110.0, 10.0))])
    assert m["click_accuracy"] == 0.0 and m["out_of_range"] == 1.0
