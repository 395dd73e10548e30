"""Coordinate codecs: hand-computed targets, round trips, and agreement with the processor."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from visiontune.models.coords import (
    Norm1000Codec,
    ResizedPixelCodec,
    coordinates_for,
    make_codec,
    parse_answer,
    write_answer,
)

SIZES = [(1920, 1080), (375, 812), (100, 100), (2560, 1440)]
MAX_PIXELS = 1280 * 28 * 28


def test_qwen2_vl_targets_are_integers_in_0_1000() -> None:
    codec = Norm1000Codec()
    assert codec.encode((960, 540), (1920, 1080)) == (500, 500)
    assert codec.encode((0, 0), (1920, 1080)) == (0, 0)
    # the right/bottom edge would be 1000, outside [0, 1000): clamped to 999
    assert codec.encode((1920, 1080), (1920, 1080)) == (999, 999)
    assert codec.encode((192.9, 10.8), (1920, 1080)) == (100, 10)  # 100.47 -> 100, 10.0 -> 10
    assert codec.decode((500, 500), (1920, 1080)) == (960.0, 540.0)


def test_qwen25_vl_targets_are_pixels_of_the_resized_image() -> None:
    codec = ResizedPixelCodec(min_pixels=56 * 56, max_pixels=MAX_PIXELS)
    # by hand: 1080x1920 rounds to 1092x1932 = 2,109,744 px > 1,003,520, so scale by
    # beta = sqrt(1080*1920/1003520) = 1.43747: floor(1080/beta/28)*28 = 26*28 = 728 and
    # floor(1920/beta/28)*28 = 47*28 = 1316
    assert codec.resized_size((1920, 1080)) == (1316, 728)
    assert codec.encode((960, 540), (1920, 1080)) == (658, 364)
    assert codec.decode((658, 364), (1920, 1080)) == pytest.approx((960.0, 540.0))
    # a small image is scaled up to min_pixels; sides stay multiples of 28
    small = ResizedPixelCodec(min_pixels=100 * 28 * 28, max_pixels=MAX_PIXELS)
    width, height = small.resized_size((50, 40))
    assert width % 28 == 0 and height % 28 == 0 and width * height >= 100 * 28 * 28


@pytest.mark.parametrize("size", [(1920, 1080), (375, 812), (333, 77)])
def test_resized_size_matches_the_image_processor(size: tuple[int, int]) -> None:
    """The codec and transformers' Qwen2-VL image processor agree on the resized image."""
    codec = ResizedPixelCodec(min_pixels=56 * 56, max_pixels=MAX_PIXELS)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=MAX_PIXELS)
    image = Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8))
    _, grid_h, grid_w = processor([image], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert codec.resized_size(size) == (grid_w * 14, grid_h * 14)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_round_trip_stays_within_half_a_model_unit(family: str) -> None:
    system = coordinates_for(family)
    assert system is not None
    codec = make_codec(system, 56 * 56, MAX_PIXELS)
    for width, height in SIZES:
        if isinstance(codec, ResizedPixelCodec):
            new_w, new_h = codec.resized_size((width, height))
            unit_x, unit_y = width / new_w, height / new_h
        else:
            unit_x, unit_y = width / 1000, height / 1000
        xs = np.linspace(0, width * 0.999, 37)
        ys = np.linspace(0, height * 0.999, 23)
        for x, y in itertools.product(xs, ys):
            encoded = codec.encode((x, y), (width, height))
            assert all(isinstance(v, int) for v in encoded)
            back = codec.decode(encoded, (width, height))
            assert abs(back[0] - x) <= unit_x / 2 + 1e-9
            assert abs(back[1] - y) <= unit_y / 2 + 1e-9


def test_families_have_their_own_systems() -> None:
    assert coordinates_for("qwen2_vl") == "norm1000"
    assert coordinates_for("qwen2_5_vl") == "resized_pixels"
    assert coordinates_for("llava") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(512,340)", (512, 340)),
        ("[12, 34]", (12, 34)),
        ('{"point_2d": [100, 200], "label": "button 2"}', (100, 200)),
        ('[{"bbox_2d": [10, 20, 30, 40], "label": "ok"}]', (20, 30)),
        ("<|box_start|>(10,20),(30,40)<|box_end|>", (20, 30)),
        ("(10,20) and then (30,40)", (10, 20)),
        ("x=5 y=6.5", (5, 6.5)),
        ("click at (1.5, 2.5)", (1.5, 2.5)),
        ("the login button", None),
        ("1 2 3", None),
        ("", None),
    ],
)
def test_parse_answer(text: str, expected: tuple[float, float] | None) -> None:
    assert parse_answer(text) == expected


def test_written_answers_parse_back() -> None:
    for template in [
        "({x},{y})",
        '{{"point_2d": [{x}, {y}]}}',
        "<|box_start|>({x},{y})<|box_end|>",
    ]:
        assert parse_answer(write_answer(template, (123, 45))) == (123, 45)
