"""Throughput of one LoRA image-classification workload: visiontune vs a minimal loop vs Trainer.

    python bench/classify_throughput.py [--steps 60] [--warmup 5] [--batch-size 32]
        [--repeats 3] [--model-size small|base] [--threads 1] [--steady-malloc] [--verbose]

The workload (bench/README.md has the details and the latest figures): a randomly initialised
ViT from an inline transformers config, LoRA r=8 on every encoder Linear (names read from
`named_modules()`), the head fully trained, AdamW with weight decay on matrices only, constant
lr, clipping at norm 1.0, fp32, CPU, no accumulation; scikit-learn's digits written as PNGs
(examples/demo/make_digits.py) and decoded from disk on every access, in the main process.
Each variant runs in its own subprocess (so peak RSS is its own) with the same model config,
seed, LoRA targets, optimizer settings, batch size and `torch.set_num_threads`:

- visiontune: `visiontune.api.train(Config)`, no val split, no periodic eval or checkpoint;
- minimal: a hand-written DataLoader + forward/backward/clip/AdamW loop, no logging or checks;
- trainer: `transformers.Trainer`, `optim="adamw_torch"` (the same AdamW), no eval, no saving,
  `report_to="none"`, logging every 10 steps, the minimal loop's dataset, no workers.

Included in a timing: everything between the end of the last warm-up optimizer step and the
end of the last timed one, read by one global optimizer step hook in all variants: data
decoding and collation, forward, loss, backward, clipping, the update, and each framework's
own per-step work (visiontune: safe decode with EXIF handling, `Batch`, the NaN check,
window normalisation, the metrics.jsonl line; Trainer: its batch-sample counting, loss
tracking and logging). Excluded: imports, model construction, dataset indexing, the warm-up
steps, and all a framework does after its last step (visiontune's final checkpoint and
summary, Trainer's end-of-training metrics). Wall-clock and CPU time (all threads of the
process) are both recorded: on a machine other jobs share, CPU time is the steadier measure.
Peak RSS (`ru_maxrss`) is read at the last timed step ("train") and at exit ("process").
Repeats run interleaved and the table shows medians. `--steady-malloc` stops glibc from
returning activation memory to the OS between steps in every variant (see STEADY_MALLOC).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from classify_variants import (
    MODELS,
    REPO,
    RUNNERS,
    VARIANTS,
    Result,
    StepClock,
    Workload,
    count_images,
    peak_rss_mb,
)


def child(variant: str, workload: Workload, result_path: Path) -> None:
    """Run one variant in this (fresh) process and write its Result as JSON."""
    import torch

    torch.set_num_threads(workload.threads)
    clock = StepClock(workload)
    with tempfile.TemporaryDirectory(prefix=f"bench-{variant}-") as scratch:
        trainable = RUNNERS[variant](workload, Path(scratch))
    per_s, per_cpu_s = clock.rates(count_images(workload))
    result = Result(
        variant=variant,
        samples_per_s=per_s,
        samples_per_cpu_s=per_cpu_s,
        peak_rss_train_mb=clock.peak_rss_train_mb,
        peak_rss_process_mb=peak_rss_mb(),
        trainable_params=trainable,
        threads_seen=clock.threads_seen,
    )
    result_path.write_text(json.dumps(asdict(result)))


# ---- the parent: data, subprocesses, medians, the table ----------------------------------


def write_data(root: Path, size: int) -> Path:
    """scikit-learn's digits as an image folder, via the demo's own writer."""
    sys.path.insert(0, str(REPO / "examples" / "demo"))
    from make_digits import write_digits

    return write_digits(root, size=size)


# glibc hands freed activation buffers back to the OS and faults them in again on the next
# step (thousands of page faults per step, more or fewer depending on each process's heap
# history); these settings keep them in the heap, taking that noise out of the comparison.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def run_child(variant: str, workload: Workload, scratch: Path, args: argparse.Namespace) -> Result:
    result_path = scratch / f"{variant}-{time.monotonic_ns()}.json"
    spec = json.dumps({**asdict(workload), "data": str(workload.data)})
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, spec]
    command += ["--result", str(result_path)]
    threads = str(workload.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if args.steady_malloc:
        env.update(STEADY_MALLOC)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if args.verbose or done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"the {variant} variant failed (exit {done.returncode}); output above")
    return Result(**json.loads(result_path.read_text()))


def interleaved(repeats: int) -> list[str]:
    """Each repeat runs all variants, starting one later each time (load hits all alike)."""
    order: list[str] = []
    for r in range(repeats):
        k = r % len(VARIANTS)
        order.extend(VARIANTS[k:] + VARIANTS[:k])
    return order


def print_table(results: dict[str, list[Result]]) -> dict[str, dict[str, float]]:
    """Medians per variant; returns {"wall": {variant: samples/s}, "cpu": {...}}."""
    speed = {
        kind: {v: statistics.median(getattr(r, field) for r in rs) for v, rs in results.items()}
        for kind, field in (("wall", "samples_per_s"), ("cpu", "samples_per_cpu_s"))
    }
    print(
        f"{'':<11} {'---------- wall clock ----------':>45}  {'--------- CPU time ---------':>34}\n"
        f"{'variant':<11} {'samples/s':>10} {'(min-max)':>13} {'vs minimal':>10} "
        f"{'vs Trainer':>10}  {'samples/CPU-s':>13} {'vs minimal':>10} {'vs Trainer':>10}  "
        f"{'peak RSS MB':>11} {'(process)':>9}"
    )
    for variant, runs in results.items():
        wall, cpu = speed["wall"], speed["cpu"]
        speeds = [r.samples_per_s for r in runs]
        spread = f"{min(speeds):.1f}-{max(speeds):.1f}"
        rss = statistics.median(r.peak_rss_train_mb for r in runs)
        rss_process = statistics.median(r.peak_rss_process_mb for r in runs)
        print(
            f"{variant:<11} {wall[variant]:>10.1f} {spread:>13} "
            f"{wall[variant] / wall['minimal']:>9.3f}x {wall[variant] / wall['trainer']:>9.3f}x  "
            f"{cpu[variant]:>13.1f} "
            f"{cpu[variant] / cpu['minimal']:>9.3f}x {cpu[variant] / cpu['trainer']:>9.3f}x  "
            f"{rss:>11.0f} {rss_process:>9.0f}"
        )
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="the table shows medians")
    parser.add_argument("--model-size", choices=sorted(MODELS), default="small")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per variant (1: steady on a shared machine; more oversubscribe it)",
    )
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="keep freed memory in glibc's heap (no per-step page faults) in every variant",
    )
    parser.add_argument("--verbose", action="store_true", help="show each variant's output")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    if args.child:
        spec = json.loads(args.child[1])
        child(args.child[0], Workload(**{**spec, "data": Path(spec["data"])}), args.result)
        return
    with tempfile.TemporaryDirectory(prefix="bench-classify-") as scratch_dir:
        scratch = Path(scratch_dir)
        data = write_data(scratch / "digits", MODELS[args.model_size]["image_size"])
        work = Workload(
            data, args.model_size, args.batch_size, args.warmup, args.steps, args.threads
        )
        print(
            f"LoRA ViT ({args.model_size}) on {count_images(work)} digit images: batch "
            f"{work.batch_size}, {work.warmup} warm-up + {work.steps} timed optimizer steps, "
            f"{work.threads} torch thread(s), {args.repeats} repeat(s), {os.cpu_count()} CPUs, "
            f"{'steady' if args.steady_malloc else 'default'} glibc malloc"
        )
        load_before = os.getloadavg()
        results: dict[str, list[Result]] = {v: [] for v in VARIANTS}
        for variant in interleaved(args.repeats):
            result = run_child(variant, work, scratch, args)
            results[variant].append(result)
            print(
                f"  {variant:<11} {result.samples_per_s:8.1f} samples/s "
                f"{result.samples_per_cpu_s:8.1f} samples/CPU-s",
                flush=True,
            )
        load_after = os.getloadavg()
    print()
    speed = print_table(results)
    threads = {r.threads_seen for rs in results.values() for r in rs}
    trainable = {v: rs[0].trainable_params for v, rs in results.items()}
    print(f"\ntrainable parameters: {trainable}; torch threads in timed steps: {sorted(threads)}")
    print(
        "load average (1/5/15 min): before "
        + " ".join(f"{x:.2f}" for x in load_before)
        + ", after "
        + " ".join(f"{x:.2f}" for x in load_after)
    )
    for kind in ("wall", "cpu"):
        vs_minimal = speed[kind]["visiontune"] / speed[kind]["minimal"]
        vs_trainer = speed[kind]["visiontune"] / speed[kind]["trainer"]
        print(
            f"target ({kind}): visiontune >= 0.97x minimal ({vs_minimal:.3f}x: "
            f"{'met' if vs_minimal >= 0.97 else 'NOT met'}), >= 1.0x Trainer "
            f"({vs_trainer:.3f}x: {'met' if vs_trainer >= 1.0 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
