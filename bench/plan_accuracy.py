"""How close `visiontune plan` comes to the real run: predicted against measured peak memory
and step time, for two ViT sizes (random init, CPU or the device the config resolves to).

Each run is `visiontune train CFG train.plan=true` in its own process: the plan measures in a
fresh child process first, the run then trains, and summary.json holds both. The issue's
targets are a peak within +-15% and a step time within +-20%. Timings on a shared machine are
noisy, so each model runs `--repeats` times and the median and range of the ratios are printed,
with the load average around the runs and the threads / data workers both sides used.

    .venv/bin/python bench/plan_accuracy.py [--steps 30] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

MODELS = {
    "small": {"image_size": 32, "patch_size": 4, "hidden_size": 96, "num_hidden_layers": 4,
              "num_attention_heads": 4, "intermediate_size": 192},
    "base": {"image_size": 64, "patch_size": 8, "hidden_size": 192, "num_hidden_layers": 6,
             "num_attention_heads": 6, "intermediate_size": 768},
}  # fmt: skip


def write_images(root: Path, size: int, per_class: int = 40) -> None:
    rng = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{label}_{i}.png")


def run_one(name: str, steps: int, batch: int, work: Path) -> dict[str, Any]:
    model = MODELS[name]
    size = model["image_size"]
    data = work / f"data-{name}"
    if not data.is_dir():
        write_images(data, size)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    cfg = {
        "name": name,
        "output_dir": str(work / "runs"),
        "model": {"config": {"model_type": "vit", **model}},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
        "data": {"train": str(data), "preprocess": {"size": size, "mean": [0.5] * 3,
                                                    "std": [0.5] * 3}},
        "train": {"micro_batch_size": batch, "max_steps": steps, "log_every": steps},
        "schedule": {"type": "constant"},
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "visiontune.cli", "train", str(path), "train.plan=true"]
    subprocess.run(command, check=True, capture_output=True)
    return json.loads((work / "runs" / name / "summary.json").read_text())["plan"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'model':6s} {'peak ratio (range)':>20s}  {'step ratio (range)':>20s}  "
          f"{'step pred':>9s} {'measured':>9s}  threads/workers  load")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            rows, loads = [], [os.getloadavg()[0]]
            for _ in range(args.repeats):
                rows.append(run_one(name, args.steps, args.batch_size, Path(tmp)))
                loads.append(os.getloadavg()[0])
            peak = [r["peak_memory_ratio"] for r in rows]
            step = [r["step_time_ratio"] for r in rows]
            same = all(r["plan_settings"] == r["run_settings"] for r in rows)
            settings = rows[0]["run_settings"]
            print(
                f"{name:6s} {median(peak):6.2f} ({min(peak):.2f}-{max(peak):.2f}){'':6s}  "
                f"{median(step):6.2f} ({min(step):.2f}-{max(step):.2f}){'':6s}  "
                f"{median([r['predicted_step_time_s'] for r in rows]):8.3f}s "
                f"{median([r['measured_step_time_s'] for r in rows]):8.3f}s  "
                f"{settings['torch_threads']}/{settings['num_workers']}"
                f"{'' if same else ' (probe differed!)'}{'':10s}"
                f"{min(loads):.1f}-{max(loads):.1f}"
            )


def median(values: list[float]) -> float:
    return float(np.median(values))


if __name__ == "__main__":
    main()
