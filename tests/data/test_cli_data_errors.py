"""Data errors through the command line: one format (`<path>[:line]: problem`), exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import tiny_config
from tests.ground.conftest import TINY_YAML as GROUND_YAML
from tests.ground.conftest import _make_tiny
from tests.segment.builders import segment_config
from visiontune.cli import app

runner = CliRunner()


def check(config: Path, *overrides: str) -> tuple[int, list[str]]:
    """Exit code and the listed problems (`  - ` lines) of `visiontune config check`."""
    result = runner.invoke(app, ["config", "check", str(config), *overrides])
    assert "Traceback" not in result.output
    problems = [line[4:] for line in result.output.splitlines() if line.startswith("  - ")]
    return result.exit_code, problems


def write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def segment_yaml(tmp_path: Path, data: dict[str, Any]) -> Path:
    cfg = segment_config(data, {"prompt": "box"}, output_dir=str(tmp_path / "runs"))
    return write_yaml(tmp_path / "seg.yaml", cfg.model_dump(mode="json"))


def test_csv_contradiction(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for name in "ab":
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{name}.png")
    csv = tmp_path / "train.csv"
    csv.write_text("id_code,diagnosis\na,0\nb,1\na,1\n")
    data = {"format": "csv", "train": str(csv), "val": None, "val_fraction": 0.0}
    data["csv"] = {"image_pattern": "img/{image}.png"}
    cfg = tiny_config(tmp_path, tmp_path / "runs", data=data)
    code, problems = check(write_yaml(tmp_path / "c.yaml", cfg.model_dump(mode="json")))
    assert code == 2
    assert problems == [
        f"{csv}:4: id 'a' is labelled '1' here but '0' at line 2; one image cannot have two labels"
    ]


def test_labelme_unknown_label(tmp_path: Path) -> None:
    split = tmp_path / "train"
    split.mkdir()
    Image.new("RGB", (20, 10)).save(split / "x.png")
    shape = {"label": "cat", "points": [[0, 0], [5, 0], [5, 5]], "shape_type": "polygon"}
    (split / "x.json").write_text(json.dumps({"text": ["t"], "shapes": [shape]}))
    code, problems = check(segment_yaml(tmp_path, {"format": "labelme", "train": str(split)}))
    assert code == 2
    assert problems == [
        f"{split / 'x.json'}: shapes[0]: unknown label 'cat'; "
        "known labels: ['target', 'ignore', 'flag']"
    ]


def test_mask_folder_missing_mask_and_size_mismatch(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (6, 4)).save(tmp_path / "images" / f"{name}.png")
    Image.new("L", (6, 4)).save(tmp_path / "masks" / "a.png")
    Image.new("L", (5, 4)).save(tmp_path / "masks" / "c.png")
    data = {"format": "mask_folder", "train": str(tmp_path)}
    code, problems = check(segment_yaml(tmp_path, data))
    assert code == 2
    images, masks = tmp_path / "images", tmp_path / "masks"
    assert problems == [
        f"{images / 'b.png'}: no mask for it (looked for {masks / 'b.png'})",
        f"{images / 'c.png'}: mask {masks / 'c.png'} is 5x4 but image is 6x4",
    ]


def test_coco_missing_image(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 1, "file_name": "gone.png", "width": 4, "height": 3}],
        "annotations": [],
        "categories": [{"id": 1, "name": "crack"}],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco))
    code, problems = check(segment_yaml(tmp_path, {"format": "coco", "train": str(path)}))
    assert code == 2
    assert problems == [f"{tmp_path / 'gone.png'}: image file not found (image id 1 of {path})"]


@pytest.fixture(scope="module")
def ground_processor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("processor")
    _make_tiny().write_processor(out)
    return out


def test_grounding_bad_lines(tmp_path: Path, ground_processor: Path) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "instruction": "ok", "point": [1, 1]})
    path = tmp_path / "g.jsonl"
    path.write_text(f"{good}\n{{oops\n{good}\n")
    overrides = [f"data.train={path}", f"task.processor={ground_processor}"]
    code, problems = check(GROUND_YAML, *overrides, "data.val=null", "data.val_fraction=0")
    assert code == 2
    assert problems == [
        f"{path}:2: not valid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)"
    ]
