"""How close `visiontune plan` comes to the real run: predicted against measured peak memory
and step time, for two ViT sizes (random init, CPU or the device the config resolves to).

Each run is `visiontune train CFG train.plan=true` in its own process: the plan measures in a
fresh child process first, the run then trains, and summary.json holds both. The issue's
targets are a peak within +-15% and a step time within +-20%.

    .venv/bin/python bench/plan_accuracy.py [--steps 30] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

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


def run_one(name: str, steps: int, batch: int, work: Path) -> dict[str, float]:
    model = MODELS[name]
    size = model["image_size"]
    data = work / f"data-{name}"
    write_images(data, size)
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
    args = parser.parse_args()
    print(f"{'model':6s} {'peak pred':>10s} {'measured':>9s} {'ratio':>6s}  "
          f"{'step pred':>9s} {'measured':>9s} {'ratio':>6s}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            p = run_one(name, args.steps, args.batch_size, Path(tmp))
            print(
                f"{name:6s} {p['predicted_peak_memory_mb']:8.0f}MB "
                f"{p['measured_peak_memory_mb']:7.0f}MB {p['peak_memory_ratio']:6.2f}  "
                f"{p['predicted_step_time_s']:8.3f}s {p['measured_step_time_s']:8.3f}s "
                f"{p['step_time_ratio']:6.2f}"
            )


if __name__ == "__main__":
    main()
