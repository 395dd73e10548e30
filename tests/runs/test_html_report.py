"""`visiontune report RUN` and `visiontune runs report`: self-contained pages, screenshotted
in headless Chromium when it is installed."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import tiny_config
from visiontune import api
from visiontune.cli import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def root(image_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "runs"
    for lr in (0.01, 0.05):
        cfg = tiny_config(
            image_data,
            out,
            name=f"lr-{lr}",
            optim={"lr": lr},
            train={"max_steps": 3, "seed": 0, "micro_batch_size": 4, "max_grad_norm": 0.01},
            acceptance={"accuracy": ">=0.30"},
        )
        api.train(cfg)
        api.evaluate(out / cfg.name)
    return out


def test_the_run_page_inlines_every_picture_and_gives_intervals(root: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(root / "lr-0.01")])
    assert result.exit_code == 0, result.output
    page = (root / "lr-0.01" / "report.html").read_text()
    assert 'src="' not in page.replace('src="data:image/png;base64,', "")  # nothing external
    pictures = re.findall(r'alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    names = {name for name, _ in pictures}
    assert {"training_curves.png", "metric_intervals.png"} <= names
    assert any("confusion" in name for name in names)
    for _, data in pictures:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    assert "95% interval" in page and "accuracy &gt;=0.30" in page


def test_the_root_page_has_the_table_the_best_run_and_the_log(root: Path) -> None:
    result = CliRunner().invoke(app, ["runs", "report", "--root", str(root)])
    assert result.exit_code == 0, result.output
    page = (root / "report.html").read_text()
    assert "<th>optim.lr</th>" in page and "Best run: lr-" in page
    assert "Attempts log" in page and "lr-0.05: completed" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_both_pages_render_in_headless_chromium(root: Path, tmp_path: Path) -> None:
    CliRunner().invoke(app, ["report", str(root / "lr-0.01")])
    CliRunner().invoke(app, ["runs", "report", "--root", str(root)])
    for page, shot in (
        (root / "lr-0.01" / "report.html", tmp_path / "run.png"),
        (root / "report.html", tmp_path / "root.png"),
    ):
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--screenshot={shot}", "--window-size=1200,1800", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        with Image.open(shot) as image:
            assert image.size == (1200, 1800)
            colours = image.convert("L").getextrema()
            assert colours[0] < 80 and colours[1] > 200  # text on a light page, not blank
