"""The workload and the three ways of running it (see classify_throughput.py, which runs each
in its own subprocess and compares them): visiontune, a minimal hand-written loop, Trainer."""

from __future__ import annotations

import itertools
import math
import resource
import time
from dataclasses import dataclass
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
