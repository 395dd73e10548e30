"""Is training input-bound? The input pipeline alone vs the training step, in one run.

    python bench/input_pipeline.py [--images 96] [--size 224] [--batch-size 16] [--epochs 3]
        [--workers 0 1 2] [--train-steps 12] [--layers 4] [--hidden 192]

1. Real JPEGs: scikit-learn's two sample photographs (china.jpg, flower.jpg) cut into
   `--images` seeded random square crops, each resized to 768 px and saved as a JPEG (quality
   90) in an image folder under a temporary directory: the size of a typical fundus or
   screenshot source image.
2. The input pipeline alone, for every `--workers` count and cache (none, disk, memory):
   visiontune's own dataset and `TrainLoader` (decode, pad, resize to `--size`, kornia
   augmentation of hflip + resized crop + colour jitter, normalise, collate), `--epochs` epochs
   in the training order. The first epoch fills the cache, so images/s are reported for it and
   for the later ones separately. Augmentation runs where `data.augment_on: device` puts it:
   on the collated batch (here on the CPU, as the loop would on its device).
2b. Where augmentation runs, memory cache, later epochs: per sample in the workers
   (`augment_on: workers`) vs one batched kornia call after collate (`augment_on: device`).
3. The training step on synthetic inputs of the same shape: visiontune's own `Loop.optimizer_step`
   (forward, loss, backward, clip, AdamW, its bookkeeping) fed one random batch over and over,
   for a random-init ViT (`--layers`, `--hidden`, patch 16) with LoRA r=8 on every Linear, fp32.
4. The same loop trained from disk (auto workers, no cache vs the memory cache), epochs after
   the first: on a machine with few cores the workers compete with the step for them.

The last lines compare: pipeline images/s / step images/s above 1 means the step is the
bottleneck; below 1 means training is input-bound, and by how much.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from visiontune import api
from visiontune.config.schema import Config
from visiontune.engine.loader import TrainLoader, resolve_num_workers
from visiontune.engine.loop import Loop
from visiontune.engine.order import DataOrder
from visiontune.engine.runner import Runner
from visiontune.runs.rundir import RunDir

AUGMENT = {"hflip": 0.5, "resized_crop": [0.7, 1.0], "color_jitter": 0.2}


def write_jpegs(root: Path, count: int, side: int = 768, seed: int = 0) -> Path:
    """`count` 768 px JPEG crops of scikit-learn's two photographs, one class per photograph."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    for i in range(count):
        name = photos.filenames[i % 2]
        image = photos.images[i % 2]
        height, width = image.shape[:2]
        crop = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
        top = int(rng.integers(0, height - crop + 1))
        left = int(rng.integers(0, width - crop + 1))
        pixels = Image.fromarray(image[top : top + crop, left : left + crop])
        folder = root / Path(name).stem
        folder.mkdir(parents=True, exist_ok=True)
        pixels.resize((side, side), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return root


def config(args: argparse.Namespace, root: Path, out: Path, name: str, **data: Any) -> Config:
    vit = {"model_type": "vit", "image_size": args.size, "patch_size": 16,
           "hidden_size": args.hidden, "num_hidden_layers": args.layers,
           "num_attention_heads": max(1, args.hidden // 64),
           "intermediate_size": 4 * args.hidden}  # fmt: skip
    return Config.model_validate({
        "name": name, "output_dir": str(out), "model": {"config": vit},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
        "data": {"train": str(root), "augment": {"train": AUGMENT},
                 "preprocess": {"size": args.size, "mean": [0.5] * 3, "std": [0.5] * 3}, **data},
        "train": {"micro_batch_size": args.batch_size, "max_steps": 10**6, "log_every": 10**6},
        "eval": {"every_steps": None}, "checkpoint": {"every_steps": None},
    })  # fmt: skip


def pipeline_rates(args: argparse.Namespace, cfg: Config) -> tuple[float, float]:
    """Images/s of the first epoch and of the later ones, the input pipeline alone."""
    task = api.make_task(cfg)
    dataset = task.datasets().train
    order = DataOrder(list(range(len(dataset))), args.batch_size, seed=0)
    loader = TrainLoader(dataset, order, task.collate, cfg.data, torch.device("cpu"))
    task.augment(next(loader.epoch(0)))  # imports kornia and builds it outside the timing
    seconds = []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        count = sum(len(task.augment(batch)) for batch in loader.epoch(epoch))
        seconds.append(time.perf_counter() - started)
    later = sum(seconds[1:]) / max(1, len(seconds) - 1)
    return count / seconds[0], count / later


def start_loop(cfg: Config) -> Loop:
    run = RunDir.prepare(cfg.run_dir, resume=False, overwrite=True)
    api.seed_everything(cfg.train.seed)
    task = api.make_task(cfg)
    splits = task.datasets()
    return Loop(cfg, task, Runner(cfg, api.build_adapter(task, cfg, run)), splits, run)


def synthetic_step_rate(args: argparse.Namespace, cfg: Config) -> float:
    """Images/s of `Loop.optimizer_step` fed one random batch of the pipeline's shape."""
    loop = start_loop(cfg)
    samples = [
        {"pixel_values": torch.randn(3, args.size, args.size), "label": i % 2, "id": f"s{i}"}
        for i in range(args.batch_size)
    ]
    loop._batches = itertools.repeat(loop.task.collate(samples))
    timed = []
    for step in range(args.train_steps + 2):
        loop.state.batch_in_epoch = 0  # never an epoch end: the data never leaves the batch
        started = time.perf_counter()
        loop.optimizer_step()
        if step >= 2:
            timed.append(time.perf_counter() - started)
    return args.batch_size * len(timed) / sum(timed)


def disk_step_rate(args: argparse.Namespace, cfg: Config) -> float:
    """Images/s of `Loop.optimizer_step` reading the JPEGs, after a first (cache-filling) epoch."""
    loop = start_loop(cfg)
    for _ in range(loop.updates_per_epoch):
        loop.optimizer_step()
    started, images = time.perf_counter(), 0
    for _ in range(args.train_steps):
        loop.optimizer_step()
        images += args.batch_size
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vt-bench-input-") as tmp:
        root = write_jpegs(Path(tmp) / "jpegs", args.images)
        out = Path(tmp) / "runs"
        print(f"{args.images} JPEGs of 768 px -> {args.size} px, batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
              f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(f"{'workers':>7} {'cache':>6} {'epoch 1 img/s':>14} {'later img/s':>12}")
        best = 0.0
        for workers in args.workers:
            for cache in ("none", "disk", "memory"):
                data = {"num_workers": workers, "cache": cache,
                        "cache_dir": str(Path(tmp) / f"cache-{workers}")}  # fmt: skip
                first, later = pipeline_rates(args, config(args, root, out, "pipe", **data))
                best = max(best, later)
                print(f"{workers:>7} {cache:>6} {first:>14.1f} {later:>12.1f}")
        print(f"{'workers':>7} {'augment on':>10} {'later img/s':>12}  (memory cache)")
        for workers in args.workers:
            rates = {}
            for where in ("workers", "device"):
                data = {"num_workers": workers, "cache": "memory", "augment_on": where}
                rates[where] = pipeline_rates(args, config(args, root, out, "aug", **data))[1]
                print(f"{workers:>7} {where:>10} {rates[where]:>12.1f}")
            print(f"{'':>7} batched / per sample = {rates['device'] / rates['workers']:.2f}")
        step = synthetic_step_rate(args, config(args, root, out, "synthetic", num_workers=0))
        print(f"training step on synthetic inputs: {step:.1f} img/s "
              f"(ViT {args.layers}x{args.hidden}, LoRA r=8, fp32, CPU)")  # fmt: skip
        auto = resolve_num_workers("auto")
        for cache in ("none", "memory"):
            cfg = config(args, root, out, f"disk-{cache}", num_workers="auto", cache=cache)
            rate = disk_step_rate(args, cfg)
            print(f"training from disk, {auto} worker(s), cache {cache}: {rate:.1f} img/s = "
                  f"{rate / step:.2f} x synthetic")  # fmt: skip
        verdict = "input-bound" if best < step else "step-bound (the input keeps up)"
        print(f"best pipeline / step = {best / step:.2f}: {verdict}; load "
              f"{os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
