"""The SAR -> optical example as users run it (its own model, its five-term loss), kept short:
trained on crops of four real tiles, it beats the mean-image baseline on the held-out fifth,
and its own untrained start (flat mid-grey, which already beats that baseline here). Both
reference PSNRs are recomputed with numpy and scikit-image from the tiles themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.metrics import peak_signal_noise_ratio

from tests.translate.tiles import NAMES, copy_tiles
from visiontune import api
from visiontune.config.load import load_config
from visiontune.engine.runner import Runner

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sar_to_optical"
HELD_OUT = "433D_629L_3_1"  # examples/sar_to_optical/prepare_tiles.py's default


def test_the_example_beats_the_mean_image_baseline_on_the_held_out_tile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    root = copy_tiles(tmp_path / "tiles", val=HELD_OUT)
    overrides = [
        f"data.train={root / 'train'}", f"data.val={root / 'val'}", f"output_dir={tmp_path}",
        "train.max_steps=20", "eval.every_steps=20", "checkpoint.every_steps=null",
    ]  # fmt: skip
    cfg = load_config(EXAMPLE / "s1_to_rgb.yaml", overrides)
    result = api.train(cfg)
    final = json.loads((result.run_dir / "eval.jsonl").read_text().splitlines()[-1])
    task = api.make_task(cfg)
    untrained = Runner(cfg, task.adapter()).evaluate(task, task.datasets().val).scalars["psnr"]

    train = [n for n in NAMES if n != HELD_OUT]
    rgb = [tifffile.imread(root / "train" / "S2RGB" / f"{n}.tif") / 255.0 for n in train]
    target = tifffile.imread(root / "val" / "S2RGB" / f"{HELD_OUT}.tif") / 255.0
    baseline = peak_signal_noise_ratio(target, np.mean(rgb, axis=0), data_range=1.0)
    assert final["baseline_psnr"] == pytest.approx(baseline, abs=1e-4)
    # the model starts from flat mid-grey, which already beats the mean image on this tile;
    # training must add to that, not only keep it
    grey = peak_signal_noise_ratio(target, np.full_like(target, 0.5), data_range=1.0)
    assert untrained == pytest.approx(grey, abs=1e-4)
    assert final["psnr"] > untrained + 0.2 > final["baseline_psnr"]
    assert (result.run_dir / "figures" / f"translate_{HELD_OUT}.png").is_file()
