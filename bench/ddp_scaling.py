"""DDP scaling on CPU with gloo: samples/s per process at 1 and 2 processes, and the share of a
step the gradient all-reduce takes.

    python bench/ddp_scaling.py [--steps 20] [--micro-batch 16] [--accum 2] [--threads 1]

The workload: a randomly initialised ViT (hidden 192, 6 layers, 224 px, patch 16) with LoRA
r=8 on every attention and MLP Linear plus a trained head, AdamW, fp32, synthetic pixels (no
data loading: this measures the step and its communication). Each rank runs visiontune's own
DDP pieces (`engine.distributed.wrap`, `gradient_sync` for every micro-batch but the last), so
what is timed is what `visiontune train --nproc N` runs. Per world size, each rank times
`--steps` optimizer steps after 3 warm-up steps, twice: as training runs (gradients
all-reduced in the window's last backward) and with every micro-batch under `no_sync()` (no
communication at all). The all-reduce share is 1 - (time without sync) / (time with sync),
on rank 0. Ideal scaling keeps samples/s per process constant from 1 to 2 processes; on one
machine both processes share its cores and memory bandwidth, so set `--threads` so that
world size x threads fits the cores.

What this cannot show: the GPU comparison of the issue (one GPU, `strategy: ddp` at world
size 1 against the plain loop, target within 3%) needs a CUDA device, which is not lent here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from transformers import ViTConfig, ViTForImageClassification

from visiontune.engine import distributed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
        image_size=224, patch_size=16, num_labels=5,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, modules_to_save=["classifier"])
    return get_peft_model(ViTForImageClassification(config), lora)


def timed_steps(model: torch.nn.Module, args: argparse.Namespace, sync: bool) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pixels = torch.randn(args.micro_batch, 3, 224, 224)
    labels = torch.randint(0, 5, (args.micro_batch,))
    times = []
    for step in range(3 + args.steps):
        started = time.perf_counter()
        for micro in range(args.accum):
            last = sync and micro == args.accum - 1
            with distributed.gradient_sync(model, last):
                out = model(pixel_values=pixels)
                torch.nn.functional.cross_entropy(out.logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 3:
            times.append(time.perf_counter() - started)
    return times


def rank_main(rank: int, world: int, args: argparse.Namespace, results: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29611 + world))  # fmt: skip
    torch.set_num_threads(args.threads)
    distributed.start()
    model = distributed.wrap(build())
    with_sync = statistics.median(timed_steps(model, args, sync=True))
    without = statistics.median(timed_steps(model, args, sync=False))
    if rank == 0:
        results[world] = (with_sync, without)
    distributed.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    results = mp.Manager().dict()
    for world in (1, 2):
        mp.spawn(rank_main, args=(world, args, results), nprocs=world, join=True)
    samples = args.micro_batch * args.accum
    print(f"ViT 192x6 + LoRA r=8, micro-batch {args.micro_batch} x accum {args.accum}, "
          f"{args.threads} thread(s) per process, gloo on {os.cpu_count()} CPU(s)")  # fmt: skip
    print(f"{'processes':>9} {'step s':>8} {'samples/s/process':>18} {'all-reduce share':>17}")
    for world, (with_sync, without) in sorted(results.items()):
        share = 1 - without / with_sync  # below 0: the all-reduce is within the step's noise
        print(f"{world:>9} {with_sync:>8.3f} {samples / with_sync:>18.1f} {share:>+16.1%}")
    one, two = results[1][0], results[2][0]
    print(f"scaling: 2 processes give {2 * one / two:.2f}x the samples/s of 1 (ideal 2.00x)")


if __name__ == "__main__":
    assert dist.is_available()
    main()
