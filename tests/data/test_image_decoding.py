"""Decoding edge cases every loader shares: decompression bombs, 16-bit greyscale, EXIF size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data.test_imagefolder import SPEC, config, make_folder
from visiontune.data.conversations import load_grounding
from visiontune.data.imagefolder import build_splits
from visiontune.data.images import decode_image
from visiontune.data.labelme import LabelMap, read_labelme_split
from visiontune.errors import DataError
from visiontune.task import Skipped

BOMB_LIMIT = 100  # pixels; a 40x40 image (1,600 > 2 x 100) is then a decompression bomb


@pytest.fixture
def small_bomb_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's guard lowered so a tiny image trips it (a real bomb would need gigabytes)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)


def bomb(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (90, 90, 90)).save(path)
    return path


def labelme_pair(folder: Path, name: str, image: Image.Image, suffix: str = ".png") -> Path:
    """A labelme JSON with one target polygon over the bottom-left of a portrait picture."""
    folder.mkdir(parents=True, exist_ok=True)
    points = [[2, 24], [10, 24], [10, 29], [2, 29]]
    shapes = [{"label": "target", "points": points, "shape_type": "polygon"}]
    (folder / f"{name}.json").write_text(json.dumps({"text": ["the box"], "shapes": shapes}))
    return folder / f"{name}{suffix}"


def test_bomb_in_an_image_folder_is_a_named_counted_skip(
    tmp_path: Path, small_bomb_limit: None
) -> None:
    train = make_folder(tmp_path / "train", {"a": 1})  # 20x20 = 400 pixels: a warning only
    Image.new("RGB", (8, 8)).save(train / "a" / "a_0.png")
    big = bomb(train / "a" / "huge.png")
    _, splits = build_splits(config(tmp_path, train=str(train)), SPEC)
    samples = [splits.train[i] for i in range(len(splits.train))]
    skipped = [s for s in samples if isinstance(s, Skipped)]
    assert [s.sample_id for s in skipped] == ["a/huge.png"]
    assert str(big) in skipped[0].reason and "decompression bomb" in skipped[0].reason
    with pytest.raises(DataError, match="huge.png: refused as a decompression bomb"):
        decode_image(big)


def test_bomb_in_labelme_data_is_a_named_problem(tmp_path: Path, small_bomb_limit: None) -> None:
    image = labelme_pair(tmp_path, "x", Image.new("RGB", (1, 1)))
    bomb(image)
    problems: list[str] = []
    records = read_labelme_split("data.train", tmp_path, LabelMap(), True, problems)
    assert records == []
    assert len(problems) == 1
    assert problems[0].startswith(f"{image}: refused as a decompression bomb")


def test_bomb_in_grounding_data_is_a_named_bad_sample(
    tmp_path: Path, small_bomb_limit: None
) -> None:
    bomb(tmp_path / "big.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    records = [
        {"image": "ok.png", "instruction": "a", "point": [1, 1]},
        {"image": "big.png", "instruction": "b", "point": [1, 1]},
    ]
    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError) as err:
        load_grounding(data)
    text = str(err.value)
    assert "1 bad sample(s)" in text
    assert "g.jsonl:2: refused as a decompression bomb" in text
    assert text.rstrip().endswith(str(tmp_path / "big.png"))


@pytest.mark.parametrize(("dtype", "suffix"), [(np.uint16, ".png"), (np.int32, ".tif")])
def test_sixteen_bit_greyscale_is_scaled_by_its_bit_depth(
    tmp_path: Path, dtype: type, suffix: str
) -> None:
    """A 16-bit PNG opens as mode I;16, a 32-bit integer TIFF of the same values as mode I."""
    values = np.array([[0, 1, 128, 257], [1000, 32768, 65280, 65535]])
    path = tmp_path / f"grey16{suffix}"
    Image.fromarray(values.astype(dtype)).save(path)
    assert Image.open(path).mode == ("I;16" if dtype is np.uint16 else "I")
    decoded = np.asarray(decode_image(path))
    # v * 255 / 65535, rounded: 257 -> 1, 1000 -> 3.9 -> 4, 32768 -> 127.5 -> 128, 65280 -> 254
    expected = [[0, 0, 0, 1], [4, 128, 254, 255]]
    assert decoded.shape == (2, 4, 3)
    for channel in range(3):
        assert decoded[..., channel].tolist() == expected


def test_labelme_polygons_live_in_the_exif_upright_frame(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30x20 landscape, displayed 20x30 portrait
    image = labelme_pair(tmp_path, "p", Image.new("RGB", (1, 1)), suffix=".jpg")
    Image.new("RGB", (30, 20), (120, 120, 120)).save(image, exif=exif)
    problems: list[str] = []
    (record,) = read_labelme_split("data.train", tmp_path, LabelMap(), True, problems)
    assert problems == []
    assert (record.width, record.height) == decode_image(image).size == (20, 30)
    (mask,) = record.masks.render(record.width, record.height, merge=True)
    assert mask.shape == (30, 20)
    assert (mask[24:30, 2:11] == 1).all()  # the polygon spans rows 24-29, columns 2-10
    assert int(mask.sum()) == 6 * 9
