"""`visiontune config check` decodes every image a split lists and names each bad file."""

from __future__ import annotations

from pathlib import Path

import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import make_imagefolder, tiny_config
from visiontune.cli import app

runner = CliRunner()


def config_file(tmp_path: Path, root: Path) -> Path:
    cfg = tiny_config(root, tmp_path / "runs")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_truncated_empty_and_non_image_files_fail_the_check_together(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_imagefolder(root / "train", {"a": 3, "b": 3})
    make_imagefolder(root / "val", {"a": 1, "b": 1}, seed=1)
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    truncated = root / "train" / "a" / "cut.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    empty = root / "train" / "b" / "empty.png"
    empty.write_bytes(b"")
    text = root / "val" / "b" / "notes.png"
    text.write_text("this is a text file, not a picture\n")
    result = runner.invoke(app, ["config", "check", str(config_file(tmp_path, root))])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "OK" not in result.output
    assert "has 3 unreadable image(s)" in result.output
    listed = [line[4:] for line in result.output.splitlines() if line.startswith("  - ")]
    assert [line.split(": ", 1)[0] for line in listed] == [str(truncated), str(empty), str(text)]
    assert all("cannot decode image" in line for line in listed)


def test_a_large_clean_set_passes_with_plain_progress_lines(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_imagefolder(root / "train", {"a": 60, "b": 60}, size=8)
    make_imagefolder(root / "val", {"a": 2, "b": 2}, size=8, seed=1)
    result = runner.invoke(app, ["config", "check", str(config_file(tmp_path, root))])
    assert result.exit_code == 0, result.output
    assert "train: 120 samples, val: 4 samples; 124 image files decoded" in result.output
    progress = [line for line in result.output.splitlines() if line.startswith("decoded ")]
    # one line per tenth of the set (stdout is not a terminal under the test runner)
    assert progress[0] == "decoded 13/124 images" and progress[-1] == "decoded 124/124 images"
    assert len(progress) == 10
