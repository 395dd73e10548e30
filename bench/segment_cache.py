"""Speed-up of the frozen-trunk cache: SAM training epochs with and without cached embeddings.

    python bench/segment_cache.py [--preset vit-b|tiny] [--image-size 1024] [--images 16]
        [--epochs 3] [--batch-size 4] [--modes off,memory,disk] [--precision fp32|bf16]
        [--threads N]

The workload is the crack setup of examples/crack_sam_lora_light.yaml: SAM with LoRA on the
mask decoder only (image encoder frozen), ground-truth box prompts per instance, Dice + focal
loss, run through `visiontune.api.train` exactly as `visiontune train` runs it. The model is
built from an inline config with random weights (no download): `vit-b` is SAM ViT-B's
architecture (transformers' SamConfig defaults: 12 layers, width 768, 1024 px), `tiny` the
test model. Data are synthetic crack images (thin dark lines, one instance per line) written
as a mask folder. `--image-size` scales the input frame (a CPU cannot run ViT-B at 1024 px
quickly); the architecture is unchanged.

Each mode trains the same seeded run; per-epoch time is the sum of the engine's own
`step_time_s` (metrics.jsonl) over that epoch's optimizer steps. Epoch 1 fills the cache, so
the speed-up to report is the mean of epochs 2+ without cache over the same with it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from visiontune import api
from visiontune.config.schema import Config

TINY = {
    "vision_config": {
        "hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "patch_size": 8, "window_size": 4,
        "global_attn_indexes": [1], "mlp_dim": 64, "num_pos_feats": 16,
    },
    "prompt_encoder_config": {"hidden_size": 32, "patch_size": 8, "mask_input_channels": 8},
    "mask_decoder_config": {
        "hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "iou_head_hidden_dim": 32,
    },
}  # fmt: skip


def sam_config(preset: str, image_size: int) -> dict[str, Any]:
    """Inline SAM config; ViT-B is SamConfig's default architecture, resized to image_size."""
    parts = json.loads(json.dumps(TINY)) if preset == "tiny" else {
        "vision_config": {}, "prompt_encoder_config": {}, "mask_decoder_config": {}
    }  # fmt: skip
    parts["vision_config"]["image_size"] = image_size
    parts["prompt_encoder_config"]["image_size"] = image_size
    return {"model_type": "sam", **parts}


def write_cracks(root: Path, count: int, seed: int = 0) -> Path:
    """Images with 2-3 thin dark polylines each; mask PNG values are instance ids."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    height, width = 240, 320
    for i in range(count):
        pixels = rng.integers(150, 200, size=(height, width, 3), dtype=np.uint8)
        ids = np.zeros((height, width), dtype=np.uint8)
        for instance in range(1, rng.integers(2, 4) + 1):
            x = np.arange(width)
            y = (rng.uniform(20, height - 20) + 15 * np.sin(x / rng.uniform(20, 60))).astype(int)
            for dy in (0, 1):
                rows = np.clip(y + dy, 0, height - 1)
                pixels[rows, x] = 30
                ids[rows, x] = instance
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(ids).save(root / "masks" / f"{i:03d}.png")
    return root


def run(args: argparse.Namespace, mode: str, data: Path, out: Path) -> list[float]:
    """Train one mode; return seconds per epoch (sum of step_time_s per epoch)."""
    raw = {
        "name": f"cache-{mode}",
        "output_dir": str(out),
        "model": {"config": sam_config(args.preset, args.image_size), "dtype": args.dtype},
        "lora": {"rank": 8, "alpha": 16, "targets": "attention"},
        "data": {"format": "mask_folder", "train": str(data)},
        "task": {
            "type": "segment",
            "prompt": "box",
            "instances": "per_instance",
            "sam": {"lora_on": ["mask_decoder"]},
            "loss": {"mask_loss": "focal", "mask_weight": 2.0, "dice_weight": 1.0},
            "cache": mode,
            **({"cache_dir": str(out / "embedding-cache")} if mode == "disk" else {}),
        },
        "train": {
            "micro_batch_size": args.batch_size,
            "epochs": args.epochs,
            "seed": 0,
            "device": args.device,
            "log_every": 1000,
        },  # fmt: skip
        "precision": args.precision,
    }
    result = api.train(Config.model_validate(raw), overwrite=True)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if line.strip()]
    per_epoch = math.ceil(args.images / args.batch_size)
    epochs: dict[int, float] = {}
    for record in steps:
        if "step_time_s" in record:
            epoch = (record["step"] - 1) // per_epoch + 1
            epochs[epoch] = epochs.get(epoch, 0.0) + record["step_time_s"]
    return [epochs[e] for e in sorted(epochs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["vit-b", "tiny"], default="vit-b")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--modes", default="off,memory,disk")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: epoch 1 fills the cache")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_cracks(Path(tmp) / "cracks", args.images)
        results = {
            mode: run(args, mode, data, Path(tmp) / "runs") for mode in args.modes.split(",")
        }
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    print(
        f"\nSAM {args.preset} @ {args.image_size}px, {args.images} images, "
        f"batch {args.batch_size}, {args.epochs} epochs, {device}, {args.precision}"
    )
    print(f"{'cache':8} {'epoch 1 s':>10} {'epochs 2+ s/epoch':>18} {'speed-up 2+':>12}")
    baseline = statistics.mean(results["off"][1:]) if "off" in results else None
    summary = {}
    for mode, seconds in results.items():
        later = statistics.mean(seconds[1:])
        speedup = baseline / later if baseline else float("nan")
        summary[mode] = {"epoch_seconds": seconds, "later_mean_s": later, "speedup": speedup}
        print(f"{mode:8} {seconds[0]:10.2f} {later:18.2f} {speedup:11.2f}x")
    print(json.dumps({"args": vars(args), "device": device, "results": summary}))


if __name__ == "__main__":
    main()
