"""Segmentation datasets: labelme/ReasonSeg, COCO (polygons, RLE), mask folders, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.segment.builders import segment_config, tiny_text_model
from visiontune.data.coco import AnnotationMasks, check_rle, read_coco_split
from visiontune.data.labelme import LabelMap, read_labelme_split
from visiontune.data.masks import read_mask_folder
from visiontune.data.segmentation import IGNORE, Frame, SampleOptions, SegmentationDataset
from visiontune.errors import DataError
from visiontune.task import Skipped
from visiontune.tasks.segment import SegmentTask


def write_pair(folder: Path, name: str, record: Any, size: tuple[int, int] = (20, 10)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(folder / f"{name}.png")
    path = folder / f"{name}.json"
    path.write_text(record if isinstance(record, str) else json.dumps(record), encoding="utf-8")
    return path


def shape(label: str, points: list[list[Any]]) -> dict[str, Any]:
    return {"label": label, "points": points, "shape_type": "polygon", "group_id": None}


def read(folder: Path, need_text: bool = True) -> tuple[list[Any], list[str]]:
    problems: list[str] = []
    return read_labelme_split("data.train", folder, LabelMap(), need_text, problems), problems


def test_labelme_fills_largest_first_ignore_255_and_skips_flags(tmp_path: Path) -> None:
    record = {
        "text": ["the small box"],
        "is_sentence": False,
        "shapes": [
            shape("target", [[2, 2], [4, 2], [4, 4], [2, 4]]),  # small, listed first
            shape("ignore", [[0, 0], [9, 0], [9, 9], [0, 9]]),  # large, must not cover it
            shape("flag", [[0, 0], [1, 0], [1, 1]]),
        ],
    }
    write_pair(tmp_path, "a", record)
    records, problems = read(tmp_path)
    assert problems == []
    (mask,) = records[0].masks.render(20, 10, merge=True)
    assert mask.shape == (10, 20)
    assert (mask[2:5, 2:5] == 1).all()
    assert mask[0, 0] == IGNORE and mask[7, 7] == IGNORE
    assert (mask[:, 10:] == 0).all()
    assert records[0].texts == ["the small box"]


def test_labelme_cp1252_fallback_and_clipped_points(tmp_path: Path, caplog: Any) -> None:
    text = (
        '{"text": ["the caf\xe9 sign"], "shapes": [{"label": "target", '
        '"points": [[-5, 0], [30, 0], [30, 5]]}]}'
    )
    folder = tmp_path / "split"
    folder.mkdir()
    Image.new("RGB", (20, 10)).save(folder / "b.png")
    (folder / "b.json").write_bytes(text.encode("cp1252"))
    with caplog.at_level(logging.WARNING):
        records, problems = read(folder)
    assert problems == []
    assert records[0].texts == ["the caf\xe9 sign"]
    assert "clipped 3 polygon point(s)" in caplog.text and "b.json (3)" in caplog.text


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ('{"text": ["x"], "shapes": [', "corrupt JSON"),
        (
            {"text": ["x"], "shapes": [shape("cat", [[0, 0], [1, 0], [1, 1]])]},
            "unknown label 'cat'",
        ),
        ({"text": [], "shapes": []}, "`text` is empty"),
        ({"text": ["x"], "shapes": [shape("target", [[0, "a"], [1, 0], [1, 1]])]}, "numbers"),
        ({"text": ["x"], "shapes": [shape("target", [[0, 0], [1, 0]])]}, "at least 3 points"),
    ],
)
def test_labelme_bad_input_names_the_file(tmp_path: Path, record: Any, message: str) -> None:
    path = write_pair(tmp_path, "bad", record)
    _, problems = read(tmp_path)
    assert len(problems) == 1
    assert message in problems[0] and str(path) in problems[0]


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    cfg_data = {"format": "reasonseg", "train": str(tmp_path)}
    write_pair(tmp_path, "a", '{"broken')
    write_pair(tmp_path, "b", {"text": [], "shapes": []})
    (tmp_path / "c.json").write_text(json.dumps({"text": ["x"], "shapes": []}))
    task = SegmentTask(
        segment_config(cfg_data, {"prompt": "text", "text_model": tiny_text_model()})
    )
    with pytest.raises(DataError) as err:
        task.datasets()
    text = str(err.value)
    assert "3 problem(s)" in text
    assert "a.json: corrupt JSON" in text and "b.json: `text` is empty" in text
    assert "c.json: no image next to it" in text


def test_all_ignore_mask_is_a_named_skip(tmp_path: Path) -> None:
    write_pair(
        tmp_path,
        "x",
        {"text": ["t"], "shapes": [shape("ignore", [[0, 0], [20, 0], [20, 10], [0, 10]])]},
    )
    records, _ = read(tmp_path)
    options = SampleOptions(
        merge=True, prompt="none", num_points=1, clip_spec=None, seed=0, train=False
    )
    dataset = SegmentationDataset(records, Frame(32, (0.5,) * 3, (0.5,) * 3), options)
    sample = dataset[0]
    assert isinstance(sample, Skipped)
    assert sample.sample_id == "x" and "entirely ignore" in sample.reason


def test_frame_resizes_longest_side_and_pads(tmp_path: Path) -> None:
    write_pair(
        tmp_path,
        "r",
        {"text": ["t"], "shapes": [shape("target", [[0, 0], [19, 0], [19, 9], [0, 9]])]},
    )
    records, _ = read(tmp_path)
    options = SampleOptions(
        merge=True, prompt="box", num_points=2, clip_spec=None, seed=0, train=False
    )
    sample = SegmentationDataset(records, Frame(32, (0.5,) * 3, (0.5,) * 3), options)[0]
    assert sample["pixel_values"].shape == (3, 32, 32)
    assert sample["valid_hw"] == (16, 32)
    assert sample["masks"].shape == (1, 32, 32) and not sample["masks"][0, 16:].any()
    assert sample["eval_masks"].shape == (1, 10, 20)
    assert sample["boxes"].tolist() == [[0.0, 0.0, 31.0, 15.0]]
    assert sample["points"].shape == (1, 2, 2)


# --- COCO -------------------------------------------------------------------------------------


def rle_instance(size: tuple[int, int], counts: str | list[int]) -> np.ndarray:
    """One RLE decoded through the COCO reader's masks (checked as the reader checks it)."""
    assert check_rle({"size": list(size), "counts": counts}, *size) is None
    (mask,) = AnnotationMasks([{"size": list(size), "counts": counts}]).render(
        size[1], size[0], merge=False
    )
    return mask


def test_rle_string_decoding_matches_hand_encoded_counts() -> None:
    # pycocotools' rleToString: each count in 5-bit groups + 48 (0x20 = more groups follow,
    # 0x10 in the last group = negative); from the 4th count on, the difference to the count
    # two before is written. Strings below are encoded by hand with those rules; masks are
    # one column, so the runs read straight down.
    def column(runs: list[int]) -> list[list[int]]:
        values = [i % 2 for i, run in enumerate(runs) for _ in range(run)]
        return [[v] for v in values]

    assert rle_instance((7, 1), "322").tolist() == column([3, 2, 2])
    assert rle_instance((14, 1), "3252").tolist() == column([3, 2, 5, 4])  # 4th: 4 - 2 = 2
    assert rle_instance((100, 1), "T3").tolist() == column([100])  # 4 | 0x20 ('T'), then 3
    # 2 - 10 = -8: group 24 = 8 | 0x10 ('H')
    assert rle_instance((28, 1), "<:4H").tolist() == column([12, 10, 4, 2])


def test_rle_decodes_column_major_like_coco() -> None:
    # 3 x 2 mask, runs: 1 background, 3 foreground, 2 background, read down the columns.
    mask = rle_instance((3, 2), [1, 3, 2])
    assert mask.tolist() == [[0, 1], [1, 0], [1, 0]]
    assert rle_instance((3, 2), "132").tolist() == mask.tolist()


@pytest.mark.parametrize(
    ("counts", "problem"),
    [
        ("13", "runs cover fewer than the 6 pixels"),  # pycocotools alone leaves 2 pixels unset
        ("", "runs cover fewer than the 6 pixels"),
        ("1322", "malformed or its runs cover more than 6 pixels"),
        ("T", "malformed"),  # ends inside a count
        ("~~", "malformed"),
        ("13é", "ASCII string"),
        ([1, 2], "RLE runs cover 3 pixels, not 6"),
        ([1, -2, 7], "non-negative integers"),
        ([1.5, 2, 2.5], "non-negative integers"),  # pycocotools would truncate them
    ],
)
def test_bad_rle_is_refused_before_pycocotools_decodes_it(counts: Any, problem: str) -> None:
    found = check_rle({"size": [3, 2], "counts": counts}, 3, 2)
    assert found is not None and problem in found


def write_coco(
    tmp_path: Path, annotations: list[dict[str, Any]], size: tuple[int, int] = (4, 3)
) -> Path:
    Image.new("RGB", size).save(tmp_path / "img.png")
    coco = {
        "images": [{"id": 1, "file_name": "img.png", "width": size[0], "height": size[1]}],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "crack"}],
    }
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_polygons_and_rle_merge_or_per_instance(tmp_path: Path) -> None:
    rle = {"size": [3, 4], "counts": [9, 3]}  # last column
    # COCO vertices are pixel corners: the square [0, 2] x [0, 3] is the first two columns
    polygon = [[0, 0, 2, 0, 2, 3, 0, 3]]
    write_coco(tmp_path, [
        {"image_id": 1, "category_id": 7, "segmentation": polygon},
        {"image_id": 1, "category_id": 7, "segmentation": rle},
    ])  # fmt: skip
    problems: list[str] = []
    (per,) = read_coco_split("data.train", tmp_path, False, False, problems)
    instances = per.masks.render(4, 3, merge=False)
    assert problems == [] and len(instances) == 2
    assert instances[0][:, :2].all() and not instances[0][:, 2:].any()
    assert instances[1][:, 3].all() and not instances[1][:, :3].any()
    (merged,) = per.masks.render(4, 3, merge=True)
    assert merged.tolist() == [[1, 1, 0, 1]] * 3
    (by_name,) = read_coco_split("data.train", tmp_path, True, True, problems)
    assert by_name.texts == ["crack"]


def test_coco_bad_segmentations_are_named(tmp_path: Path) -> None:
    path = write_coco(tmp_path, [
        {"image_id": 1, "segmentation": {"size": [5, 5], "counts": [25]}},
        {"image_id": 1, "segmentation": [[0, 0, 1, 1]]},
        {"image_id": 2, "segmentation": [[0, 0, 1, 0, 1, 1]]},
        {"image_id": 1, "segmentation": [[0, 0, 1e12, 0, 1e12, 1e12]]},  # crashes pycocotools
        {"image_id": 1, "segmentation": {"size": [3, 4], "counts": "1"}},
    ])  # fmt: skip
    problems: list[str] = []
    read_coco_split("data.train", path, True, False, problems)
    assert len(problems) == 5
    assert f"{path}: annotations[0]: RLE mask size 5x5 differs from image 4x3" == problems[0]
    assert "annotations[1]: a polygon needs at least 3" in problems[1]
    assert "annotations[2]: image_id 2 is not in `images`" in problems[2]
    assert "annotations[3]: polygon point (1000000000000.0, 0) lies far outside" in problems[3]
    assert "annotations[4]: RLE string's runs cover fewer than the 12 pixels" in problems[4]


# --- mask folders -----------------------------------------------------------------------------


def test_mask_folder_binary_ignore_and_instances(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (4, 2)).save(tmp_path / "images" / "c.jpg")
    values = np.array([[0, 255, 255, 7], [0, 0, 9, 9]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "masks" / "c.png")
    problems: list[str] = []
    (record,) = read_mask_folder("data.train", tmp_path, "images", "masks", 7, problems)
    (merged,) = record.masks.render(4, 2, merge=True)
    assert merged.tolist() == [[0, 1, 1, IGNORE], [0, 0, 1, 1]]
    instances = record.masks.render(4, 2, merge=False)
    assert [m.tolist() for m in instances] == [
        [[0, 0, 0, IGNORE], [0, 0, 1, 1]],
        [[0, 1, 1, IGNORE], [0, 0, 0, 0]],
    ]


def test_mask_folder_size_mismatch_and_missing_mask(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (4, 2)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (4, 2)).save(tmp_path / "images" / "b.png")
    Image.new("L", (5, 2)).save(tmp_path / "masks" / "a.png")
    problems: list[str] = []
    assert read_mask_folder("data.train", tmp_path, "images", "masks", None, problems) == []
    assert "masks/a.png is 5x2 but image" in problems[0] and "is 4x2" in problems[0]
    assert "no mask" in problems[1] and "b.png" in problems[1]


def test_labelme_instances_by_group_id_share_ignore_regions(tmp_path: Path) -> None:
    first = {**shape("target", [[0, 0], [3, 0], [3, 3], [0, 3]]), "group_id": 1}
    second = {**shape("target", [[10, 0], [13, 0], [13, 3], [10, 3]]), "group_id": 2}
    part = {**shape("target", [[15, 5], [18, 5], [18, 8], [15, 8]]), "group_id": 2}
    hole = shape("ignore", [[5, 5], [8, 5], [8, 8], [5, 8]])
    write_pair(tmp_path, "g", {"text": ["t"], "shapes": [first, second, part, hole]})
    records, _ = read(tmp_path)
    one, two = records[0].masks.render(20, 10, merge=False)
    assert one[1, 1] == 1 and one[1, 11] == 0 and one[6, 16] == 0 and one[6, 6] == IGNORE
    assert two[1, 1] == 0 and two[1, 11] == 1 and two[6, 16] == 1 and two[6, 6] == IGNORE
