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
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("visiontune", "minimal", "trainer")


def vit(image: int, patch: int, hidden: int, layers: int, heads: int, mlp: int) -> dict[str, Any]:
    """An inline transformers ViT config (no download)."""
    return {
        "model_type": "vit",
        "image_size": image,
        "patch_size": patch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
    }


MODELS = {
    "small": vit(32, 4, 96, 4, 4, 192),  # the demo's ViT: per-step framework overhead shows
    "base": vit(64, 8, 192, 6, 6, 768),  # wider, deeper, 64 px: closer to a real fine-tune
}
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0}
OPTIM = {"lr": 1e-3, "weight_decay": 0.01}
MAX_GRAD_NORM = 1.0
SEED = 0
LOG_EVERY = 10
MEAN_STD = 0.5


@dataclass(frozen=True)
class Workload:
    """What every variant runs; passed to the subprocesses on their command line."""

    data: Path
    model_size: str
    batch_size: int
    warmup: int
    steps: int
    threads: int

    @property
    def image_size(self) -> int:
        return int(MODELS[self.model_size]["image_size"])

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


@dataclass
class Result:
    variant: str
    samples_per_s: float
    samples_per_cpu_s: float
    peak_rss_train_mb: float
    peak_rss_process_mb: float
    trainable_params: int
    threads_seen: int


# ---- measurement shared by all variants --------------------------------------------------


class StepClock:
    """Timestamps every optimizer step of any optimizer, whichever framework calls it.

    One global hook in all three variants means one definition of "a step's time": from the
    end of one update to the end of the next, with everything in between. CPU time (all
    threads of the process) is recorded beside wall time: on a machine other jobs share, it
    is the steadier of the two, since waiting for a core costs wall time but no CPU time.
    """

    def __init__(self, workload: Workload) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.workload = workload
        self.times: list[tuple[float, float]] = []
        self.peak_rss_train_mb = 0.0
        self.threads_seen = 0
        register_optimizer_step_post_hook(self._on_step)

    def _on_step(self, *_: Any) -> None:
        import torch

        self.times.append((time.perf_counter(), time.process_time()))
        if len(self.times) == self.workload.total_steps:
            self.peak_rss_train_mb = peak_rss_mb()
            self.threads_seen = torch.get_num_threads()

    def rates(self, num_samples: int) -> tuple[float, float]:
        """Samples per wall-clock second and per CPU second over the timed steps."""
        w = self.workload
        if len(self.times) != w.total_steps:
            raise RuntimeError(f"expected {w.total_steps} optimizer steps, saw {len(self.times)}")
        (wall_end, cpu_end), (wall_start, cpu_start) = self.times[-1], self.times[w.warmup - 1]
        samples = window_samples(num_samples, w.batch_size, w.warmup, w.total_steps)
        return samples / (wall_end - wall_start), samples / (cpu_end - cpu_start)


def window_samples(num_samples: int, batch_size: int, first: int, last: int) -> int:
    """Samples consumed by optimizer steps first+1..last when every epoch is ceil(n/b)
    batches and its last batch holds the remainder (all three variants batch this way)."""
    per_epoch = math.ceil(num_samples / batch_size)
    last_size = num_samples - (per_epoch - 1) * batch_size
    return sum(
        last_size if (step - 1) % per_epoch == per_epoch - 1 else batch_size
        for step in range(first + 1, last + 1)
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the model and data the two baselines share ------------------------------------------


def baseline_model(workload: Workload, num_labels: int) -> Any:
    """The ViT with LoRA on every encoder Linear (names read from the model), head trained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(SEED)
    values = dict(MODELS[workload.model_size])
    config = AutoConfig.for_model(values.pop("model_type"), **values, num_labels=num_labels)
    model = AutoModelForImageClassification.from_config(config)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.startswith("classifier")
    ]
    peft_cfg = LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=targets,
        modules_to_save=["classifier"],
    )
    return get_peft_model(model, peft_cfg)


def folder_dataset(root: Path, size: int) -> Any:
    """A plain image-folder dataset: what someone writing their own loop would write."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import Dataset

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [
        (path, k) for k, name in enumerate(classes) for path in sorted((root / name).iterdir())
    ]

    class FolderDataset(Dataset):
        num_labels = len(classes)

        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, index: int) -> dict[str, Any]:
            path, label = items[index]
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(rgb, dtype=np.float32) / 255.0
            pixels = (torch.from_numpy(array).permute(2, 0, 1) - MEAN_STD) / MEAN_STD
            return {"pixel_values": pixels, "labels": label}

    return FolderDataset()


def trainable_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def decay_groups(model: Any) -> list[dict[str, Any]]:
    """Weight decay on matrices only, as visiontune and Trainer both do."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": OPTIM["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


# ---- the three variants (each runs in its own subprocess) --------------------------------


def run_visiontune(workload: Workload, scratch: Path) -> int:
    from visiontune.api import train
    from visiontune.config.schema import Config

    cfg = Config.model_validate(
        {
            "name": "bench",
            "output_dir": str(scratch / "runs"),
            "model": {"config": MODELS[workload.model_size]},
            "lora": {**LORA, "targets": "all-linear"},
            # Inline models default to their image_size and mean = std = 0.5, as folder_dataset.
            "data": {"train": str(workload.data / "train")},
            "train": {
                "micro_batch_size": workload.batch_size,
                "max_steps": workload.total_steps,
                "seed": SEED,
                "log_every": LOG_EVERY,
                "max_grad_norm": MAX_GRAD_NORM,
                "device": "cpu",
            },
            "optim": OPTIM,
            "schedule": {"type": "constant"},
        }
    )
    result = train(cfg)
    expected = window_samples(count_images(workload), workload.batch_size, 0, workload.total_steps)
    if result.summary["samples_seen"] != expected:
        raise RuntimeError(
            f"visiontune saw {result.summary['samples_seen']} samples, the batching model of "
            f"window_samples expects {expected}: samples/s would be miscounted"
        )
    return int(result.summary["trainable_params"])


def count_images(workload: Workload) -> int:
    """Training images in the folder all three variants read."""
    root = workload.data / "train"
    return sum(1 for folder in root.iterdir() for _ in folder.iterdir())


def run_minimal(workload: Workload, scratch: Path) -> int:
    import torch
    from torch.utils.data import DataLoader

    dataset = folder_dataset(workload.data / "train", workload.image_size)
    model = baseline_model(workload, dataset.num_labels)
    model.train()
    optimizer = torch.optim.AdamW(decay_groups(model), lr=OPTIM["lr"])
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(SEED)
    loader = DataLoader(dataset, batch_size=workload.batch_size, shuffle=True, generator=generator)
    epochs = (batch for _ in itertools.count() for batch in loader)
    for batch in itertools.islice(epochs, workload.total_steps):
        loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return trainable_count(model)


def run_trainer(workload: Workload, scratch: Path) -> int:
    from transformers import Trainer, TrainingArguments, default_data_collator

    dataset = folder_dataset(workload.data / "train", workload.image_size)
    model = baseline_model(workload, dataset.num_labels)
    args = TrainingArguments(
        output_dir=str(scratch / "trainer"),
        per_device_train_batch_size=workload.batch_size,
        max_steps=workload.total_steps,
        learning_rate=OPTIM["lr"],
        weight_decay=OPTIM["weight_decay"],
        optim="adamw_torch",
        lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM,
        logging_strategy="steps",
        logging_steps=LOG_EVERY,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=SEED,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=default_data_collator
    )
    trainer.train()
    return trainable_count(model)


RUNNERS = {"visiontune": run_visiontune, "minimal": run_minimal, "trainer": run_trainer}


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
