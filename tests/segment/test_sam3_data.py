"""SAM 3 instance targets: COCO / labelme group_id / mask folders, thin cracks, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from visiontune.config.tasks import SegmentTaskConfig
from visiontune.data.instances import (
    InstanceDataset,
    InstanceOptions,
    read_instances,
    resize_any,
    too_many_instances,
)
from visiontune.errors import DataError
from visiontune.task import Skipped


def options(**task: object) -> SegmentTaskConfig:
    return SegmentTaskConfig.model_validate({"type": "segment", **task})


def dataset(records: list, max_instances: int = 16, truncate: bool = False) -> InstanceDataset:
    opts = InstanceOptions(32, (0.5,) * 3, (0.5,) * 3, max_instances, truncate, {})
    return InstanceDataset(records, opts, None)


def mask_folder(root: Path, masks: list[np.ndarray]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, mask in enumerate(masks):
        h, w = mask.shape
        Image.new("RGB", (w, h), (120, 120, 120)).save(root / "images" / f"m{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"m{i}.png")
    return root


def test_a_one_pixel_crack_survives_shrinking_as_one_connected_line() -> None:
    """A 1 px diagonal crack in 400 x 400 shrunk to 112: "any" resizing keeps every part and
    one 8-connected line; nearest-neighbour sampling (PIL) loses most of it."""
    crack = np.zeros((400, 400), dtype=np.uint8)
    for x in range(20, 380):
        crack[(x * 7) // 10 + 30, x] = 1
    resized = resize_any(crack[None], 112)[0].numpy()
    _, parts = ndimage.label(resized, structure=np.ones((3, 3)))
    assert parts == 1
    columns = {int(x * 112 / 400) for x in range(20, 380)}
    assert set(np.flatnonzero(resized.any(0))) == columns
    nearest = np.asarray(Image.fromarray(crack * 255).resize((112, 112), Image.Resampling.NEAREST))
    assert (nearest > 0).sum() < 0.5 * resized.sum()


def test_mask_folder_instances_are_components_or_values(tmp_path: Path) -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:5, 2:8] = 255  # two separate blobs of the same value
    mask[12:15, 10:18] = 255
    mask[8, 0:3] = 7  # a third, other value
    root = mask_folder(tmp_path / "data", [mask])
    problems: list[str] = []
    by_component = read_instances(
        "mask_folder", "data.train", root, options(prompts={"crack": "crack"}), problems
    )
    values = options(prompts={"crack": "crack"}, sam3={"instances_from": "values"})
    by_value = read_instances("mask_folder", "data.train", root, values, problems)
    assert not problems
    assert len(by_component[0].masks.render(20, 20, False)) == 3
    assert len(by_value[0].masks.render(20, 20, False)) == 2
    assert by_component[0].category == "crack"


def test_mask_folder_needs_one_named_category(tmp_path: Path) -> None:
    root = mask_folder(tmp_path / "data", [np.ones((8, 8), dtype=np.uint8)])
    with pytest.raises(DataError, match=r"task.prompts: mask_folder data has one category"):
        read_instances("mask_folder", "data.train", root, options(), [])


def labelme_file(root: Path, shapes: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (90, 90, 90)).save(root / "a.png")
    (root / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "a.png"}))


def rect(x: int, group: int | None, label: str = "target") -> dict:
    points = [[x, 2], [x + 3, 2], [x + 3, 6], [x, 6]]
    return {"label": label, "points": points, "group_id": group, "shape_type": "polygon"}


def test_labelme_shapes_sharing_a_group_id_are_one_instance(tmp_path: Path) -> None:
    labelme_file(tmp_path / "lm", [rect(1, 1), rect(8, 1), rect(14, 2), rect(15, 3)])
    records = read_instances(
        "labelme", "data.train", tmp_path / "lm", options(prompts={"crack": "crack"}), []
    )
    sample = dataset(records)[0]
    assert not isinstance(sample, Skipped)
    assert len(sample["masks"]) == 3
    assert sample["eval_masks"][0].sum() > sample["eval_masks"][1].sum()  # two rects vs one
    overlap = sample["eval_masks"][1] & sample["eval_masks"][2]  # overlapping instances
    assert overlap.any() and not torch.equal(sample["eval_masks"][1], sample["eval_masks"][2])


def test_an_image_whose_instances_are_all_ignore_is_skipped(tmp_path: Path) -> None:
    labelme_file(tmp_path / "lm", [rect(1, None, "ignore"), rect(8, None, "ignore")])
    records = read_instances(
        "labelme", "data.train", tmp_path / "lm", options(prompts={"crack": "crack"}), []
    )
    sample = dataset(records)[0]
    assert isinstance(sample, Skipped) and "ignore" in sample.reason


def test_ignore_shapes_become_the_samples_ignore_region(tmp_path: Path) -> None:
    """A target rect at x 1..4 and an ignore rect at x 8..11 (rows 2..6) in a 20 x 20 image:
    the ignore region is exactly the ignore rect, at the original size and, at the 32 px
    frame, where any of it lies (x 12..19, y 3..11: pixel k covers [k * 20/32, (k+1) * 20/32))."""
    labelme_file(tmp_path / "lm", [rect(1, 1), rect(8, None, "ignore")])
    records = read_instances(
        "labelme", "data.train", tmp_path / "lm", options(prompts={"crack": "crack"}), []
    )
    sample = dataset(records)[0]
    assert not isinstance(sample, Skipped)
    full = sample["eval_ignore"]
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[2:7, 8:12] = True
    assert torch.equal(full, expected)
    frame = torch.zeros(32, 32, dtype=torch.bool)
    frame[3:12, 12:20] = True
    assert torch.equal(sample["ignore"], frame)
    assert not (sample["ignore"] & sample["masks"].any(0)).any()


def test_more_instances_than_queries_is_an_error_or_a_named_truncation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    for k in range(5):
        mask[1 + 4 * k, 1 : 3 + k] = 255  # five separate lines of growing length
    root = mask_folder(tmp_path / "data", [mask])
    records = read_instances(
        "mask_folder", "data.train", root, options(prompts={"crack": "crack"}), []
    )
    with pytest.raises(DataError, match=r"m0.png: 5 instances of 'crack' but the model has 3"):
        dataset(records, max_instances=3)[0]
    with caplog.at_level(logging.WARNING):
        sample = dataset(records, max_instances=3, truncate=True)[0]
    assert len(sample["masks"]) == 3
    assert sorted(int(m.sum()) for m in sample["eval_masks"]) == [4, 5, 6]  # the largest kept
    assert "m0.png" in caplog.text and "3 largest kept" in caplog.text


def coco_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 16), (100, 100, 100)).save(root / name)
    rle_mask = np.zeros((16, 20), dtype=np.uint8, order="F")
    rle_mask[10:14, 3:9] = 1
    rle = mask_utils.encode(rle_mask)
    rle["counts"] = rle["counts"].decode()
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 20, "height": 16},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 16},
        ],
        "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "spall"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": rle},
            {"id": 3, "image_id": 2, "category_id": 2, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        ],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


def test_coco_gives_every_image_and_category_with_negatives(tmp_path: Path) -> None:
    source = coco_dir(tmp_path / "coco")
    problems: list[str] = []
    records = read_instances("coco", "data.train", source, options(), problems)
    assert not problems
    counts = {r.sample_id: len(r.masks.render(20, 16, False)) for r in records}
    assert counts == {"a:crack": 2, "a:spall": 0, "b:crack": 0, "b:spall": 1}
    sample = dataset([r for r in records if r.sample_id == "a:crack"])[0]
    assert int(sample["eval_masks"][1].sum()) == 24  # the RLE instance, 4 x 6 pixels
    negative = dataset([r for r in records if r.sample_id == "b:crack"])[0]
    assert negative["masks"].shape == (0, 32, 32)


def test_coco_images_with_more_instances_than_queries_are_named_before_training(
    tmp_path: Path,
) -> None:
    source = coco_dir(tmp_path / "coco")
    records = read_instances("coco", "data.train", source, options(), [])
    (problem,) = too_many_instances(records, 1)
    assert problem.startswith(f"{tmp_path / 'coco' / 'a.png'}: 2 instances of 'crack'")
    assert too_many_instances(records, 2) == []


def test_a_coco_category_without_a_prompt_is_named(tmp_path: Path) -> None:
    source = coco_dir(tmp_path / "coco")
    problems: list[str] = []
    read_instances("coco", "data.train", source, options(prompts={"crack": "thin crack"}), problems)
    assert any("category 'spall' matches no prompt" in p and "ann.json" in p for p in problems)


def test_an_empty_instance_is_dropped_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A COCO polygon drawn entirely outside its image has no pixel: dropped, counted, named."""
    source = coco_dir(tmp_path / "coco")
    data = json.loads(source.read_text())
    outside = [25, 20, 30, 20, 30, 25]  # beyond the 20 x 16 image, not so far it is refused
    data["annotations"].append(
        {"id": 4, "image_id": 1, "category_id": 1, "segmentation": [outside]}
    )
    source.write_text(json.dumps(data))
    problems: list[str] = []
    records = read_instances("coco", "data.train", source, options(), problems)
    assert problems == []
    crack = dataset([r for r in records if r.sample_id == "a:crack"])
    with caplog.at_level(logging.WARNING):
        sample = crack[0]
    assert len(sample["masks"]) == 2 and crack.empty_instances == 1
    assert "a:crack: instance(s) [2] are empty" in caplog.text
