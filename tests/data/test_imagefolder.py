"""Image-classification data: layouts, preprocessing, augmentation, and every bad-input case."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from visiontune.config.schema import Augment, Config
from visiontune.data.augment import Augmenter
from visiontune.data.imagefolder import build_splits
from visiontune.data.images import ImageSpec, decode_image, load_pixels, resolve_image_spec
from visiontune.errors import ConfigError, DataError
from visiontune.task import Skipped

SPEC = ImageSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
TINY_VIT = {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32}


def write_image(path: Path, colour: tuple[int, int, int] = (255, 255, 255), size=(20, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        for i in range(n):
            write_image(root / name / f"{name}_{i}.png", (40 * i % 255, 80, 120))
    return root


def make_csv(root: Path, rows: list[tuple[str, str]], header="id_code,diagnosis") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for image, _ in rows:
        write_image(root / "train_images" / f"{image}.png")
    path = root / "train.csv"
    path.write_text(header + "\n" + "".join(f"{i},{label}\n" for i, label in rows))
    return path


def aptos(path: Path) -> dict[str, Any]:
    """The data section for a CSV written by make_csv."""
    return {
        "format": "csv",
        "train": str(path),
        "csv": {"image_pattern": "train_images/{image}.png"},
    }


def config(tmp_path: Path, **data: Any) -> Config:
    return Config.model_validate(
        {
            "model": {"config": TINY_VIT},
            "data": data,
            "train": {"max_steps": 1, "seed": 3},
            "output_dir": str(tmp_path / "runs"),
        }
    )


def problems(tmp_path: Path, **data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build_splits(config(tmp_path, **data), SPEC)
    return str(info.value)


def test_imagefolder_classes_labels_and_samples(tmp_path: Path) -> None:
    train = make_folder(tmp_path / "train", {"cat": 2, "ant": 3})
    val = make_folder(tmp_path / "val", {"cat": 1, "ant": 1})
    classes, splits = build_splits(config(tmp_path, train=str(train), val=str(val)), SPEC)
    assert classes == ["ant", "cat"]
    assert splits.train.labels == [0, 0, 0, 1, 1]
    assert len(splits.val) == 2 and splits.test is None
    sample = splits.train[3]
    assert sample["id"] == "cat/cat_0.png" and sample["label"] == 1
    assert sample["pixel_values"].shape == (3, 16, 16)
    # colour (0, 80, 120) normalised with mean = std = 0.5
    expected = torch.tensor([0, 80, 120]) / 255 * 2 - 1
    assert torch.allclose(sample["pixel_values"][:, 8, 8], expected, atol=0.01)


def test_pad_to_square_keeps_aspect_and_exif_is_applied(tmp_path: Path) -> None:
    wide = write_image(tmp_path / "wide.png", (255, 255, 255), size=(40, 20))
    pixels = load_pixels(wide, SPEC)
    assert pixels[:, 0, 8].tolist() == [-1.0, -1.0, -1.0]  # black padding band on top
    assert torch.allclose(pixels[:, 8, 8], torch.ones(3))  # the white image in the middle
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (30, 10)).save(tmp_path / "rotated.jpg", exif=exif)
    assert decode_image(tmp_path / "rotated.jpg").size == (10, 30)


def test_csv_numeric_labels_sort_numerically_and_name_by_position(tmp_path: Path) -> None:
    rows = [("a", "10"), ("b", "2"), ("c", "0"), ("d", "2")]
    path = make_csv(tmp_path / "aptos", rows)
    data = {
        "format": "csv",
        "train": str(path),
        "csv": {"image_pattern": "train_images/{image}.png"},
    }
    classes, splits = build_splits(config(tmp_path, **data), SPEC)
    assert classes == ["0", "2", "10"]
    assert splits.train.labels == [2, 1, 0, 1]
    path = make_csv(tmp_path / "graded", [("a", "0"), ("b", "2"), ("c", "moderate")])
    named = {**data, "train": str(path), "classes": ["none", "mild", "moderate"]}
    classes, splits = build_splits(config(tmp_path, **named), SPEC)
    assert classes == ["none", "mild", "moderate"] and splits.train.labels == [0, 2, 2]


def test_val_fraction_is_stratified_seeded_and_disjoint(tmp_path: Path) -> None:
    train = make_folder(tmp_path / "train", {"a": 10, "b": 20})
    cfg = config(tmp_path, train=str(train), val_fraction=0.2)
    _, first = build_splits(cfg, SPEC)
    _, again = build_splits(cfg, SPEC)
    assert sorted(first.val.labels) == [0, 0] + [1] * 4
    assert len(first.train) == 24
    val_ids = {r.sample_id for r in first.val.records}
    assert val_ids == {r.sample_id for r in again.val.records}
    assert not val_ids & {r.sample_id for r in first.train.records}


def test_augmentation_is_deterministic_per_sample_and_leaves_global_rng(tmp_path: Path) -> None:
    train = make_folder(tmp_path / "train", {"a": 2})
    write_image(tmp_path / "train" / "a" / "grad.png", (10, 200, 90), size=(31, 17))
    augment = {"hflip": 0.5, "rotation": 30, "resized_crop": [0.5, 1.0], "color_jitter": 0.3}
    cfg = config(tmp_path, train=str(train), augment={"train": augment})
    _, splits = build_splits(cfg, SPEC)
    ds = splits.train
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    first = ds[2]["pixel_values"]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(ds[2]["pixel_values"], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["pixel_values"], first)
    unaugmented = load_pixels(tmp_path / "train" / "a" / "grad.png", SPEC)
    assert not torch.equal(first, unaugmented)
    assert not Augmenter(Augment(), 16, 0).active  # nothing configured: images untouched


def test_preprocess_resolution(tmp_path: Path) -> None:
    train = make_folder(tmp_path / "train", {"a": 1})
    assert resolve_image_spec(config(tmp_path, train=str(train))) == ImageSpec(
        32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    )
    override = {"size": 24, "mean": [0.1, 0.2, 0.3], "pad_to_square": False}
    spec = resolve_image_spec(config(tmp_path, train=str(train), preprocess=override))
    assert spec == ImageSpec(24, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), pad_to_square=False)


def test_corrupt_and_truncated_images_are_skipped_with_their_name(tmp_path: Path) -> None:
    train = make_folder(tmp_path / "train", {"a": 1})
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not an image at all")
    full = write_image(tmp_path / "full.png", (1, 2, 3), size=(64, 64)).read_bytes()
    (tmp_path / "train" / "a" / "cut.png").write_bytes(full[: len(full) // 2])
    _, splits = build_splits(config(tmp_path, train=str(train)), SPEC)
    samples = {
        s.sample_id: s for s in (splits.train[i] for i in range(3)) if isinstance(s, Skipped)
    }
    assert set(samples) == {"a/broken.png", "a/cut.png"}
    assert "broken.png" in samples["a/broken.png"].reason
    with pytest.raises(DataError, match="cut.png"):
        decode_image(tmp_path / "train" / "a" / "cut.png")


def test_missing_paths_are_named_absolutely_and_reported_together(tmp_path: Path) -> None:
    message = problems(tmp_path, train="nowhere/train", val=str(tmp_path / "nope"))
    assert "2 problem(s)" in message
    assert f"data.train: path does not exist: {Path('nowhere/train').resolve()}" in message
    assert f"data.val: path does not exist: {tmp_path / 'nope'}" in message


def test_no_class_folders_and_empty_class_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "flat" / "x.png")
    assert "no class folders" in problems(tmp_path, train=str(tmp_path / "flat"))
    train = make_folder(tmp_path / "train", {"a": 1})
    (train / "b").mkdir()
    message = problems(tmp_path, train=str(train))
    assert f"class folder {train / 'b'} holds no images" in message


def test_csv_missing_column_names_it_and_lists_the_columns(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "aptos", [("a", "0")], header="id_code,grade")
    message = problems(tmp_path, format="csv", train=str(path))
    assert "no column diagnosis (data.csv.label_column)" in message
    assert "['id_code', 'grade']" in message


def test_csv_missing_image_files_are_counted_and_named(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "aptos", [("a", "0"), ("b", "1"), ("c", "1")])
    (tmp_path / "aptos" / "train_images" / "b.png").unlink()
    (tmp_path / "aptos" / "train_images" / "c.png").unlink()
    data = {
        "format": "csv",
        "train": str(path),
        "csv": {"image_pattern": "train_images/{image}.png"},
    }
    message = problems(tmp_path, **data)
    assert "2 of 3 image files" in message
    assert "train_images/b.png" in message and "train_images/c.png" in message


def test_unknown_labels_name_the_row_and_the_folder(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "aptos", [("a", "0"), ("b", "7")])
    data = {"format": "csv", "train": str(path), "classes": ["none", "mild"]}
    assert f"{path}:3: '7'" in problems(tmp_path, **data)
    train = make_folder(tmp_path / "train", {"a": 1})
    val = make_folder(tmp_path / "val", {"a": 1, "zebra": 1})
    message = problems(tmp_path, train=str(train), val=str(val))
    assert "data.val: 1 label(s) not in the classes ['a']" in message and "zebra" in message


def test_empty_split(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "aptos", [])
    assert "data.train: split is empty" in problems(tmp_path, format="csv", train=str(path))
    train = make_folder(tmp_path / "train", {"a": 1})
    assert "holds out no image" in problems(tmp_path, train=str(train), val_fraction=0.3)


def test_csv_id_listed_twice_with_different_labels_names_both_lines(tmp_path: Path) -> None:
    rows = [("a", "0"), ("b", "1"), ("a", "2"), ("c", "1")]
    path = make_csv(tmp_path / "aptos", rows)
    message = problems(tmp_path, **aptos(path))
    assert "1 problem(s)" in message
    assert (
        f"{path}:4: id 'a' is labelled '2' here but '0' at line 2; one image cannot have two labels"
    ) in message


def test_csv_id_repeated_with_the_same_label_is_kept_once_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [("a", "0"), ("b", "1"), ("a", "0"), ("c", "1"), ("b", "1")]
    path = make_csv(tmp_path / "aptos", rows)
    with caplog.at_level(logging.WARNING):
        _, splits = build_splits(config(tmp_path, **aptos(path)), SPEC)
    assert [r.sample_id for r in splits.train.records] == ["a", "b", "c"]
    assert splits.train.labels == [0, 1, 1]
    assert "2 repeated row(s) with the same id and label kept once" in caplog.text
    assert "id 'a' at lines 2 and 4; id 'b' at lines 3 and 6" in caplog.text
