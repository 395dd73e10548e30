"""One owner of device and precision for training, evaluation and prediction.

Every call into the model goes through `Runner.forward` (or `Runner.generate`), under the one
autocast policy the config resolves to. So `predict` of a bf16-base run computes exactly what
`eval` computes, and a distributed wrapper inserted around the adapter sees every forward.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from visiontune.config.schema import Config
from visiontune.engine import distributed, fsdp
from visiontune.engine.loader import eval_loader
from visiontune.engine.precision import Precision, resolve_device
from visiontune.task import Batch, Metrics, ModelAdapter, Outputs, Task


class Runner:
    """The adapter on its device, with the precision policy, for train, eval and predict."""

    def __init__(self, cfg: Config, adapter: ModelAdapter) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.adapter = adapter.to(self.device)
        self.model: nn.Module = self.adapter
        """What forward calls: the adapter, or a distributed wrapper around it."""
        self.precision = Precision(cfg.precision, self.device, cfg.model.dtype)
        self.precision.check_trainables(self.adapter)

    def forward(self, batch: Batch) -> Outputs:
        """The adapter's forward under autocast (gradients as the caller's context says)."""
        with self.precision.autocast():
            return self.model(**batch.inputs) if batch.inputs else {}

    def generate(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Generation runs on the unwrapped adapter: a DDP wrapper has no `generate`."""
        moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.no_grad(), self.precision.autocast():
            return self.adapter.generate(**moved)

    def infer(self, task: Task, batch: Batch) -> Outputs:
        """Forward (and generation, for generative tasks) of one batch without gradients."""
        batch = batch.to(self.device)
        with torch.no_grad():
            outputs = dict(self.forward(batch))
        hook = getattr(task, "generation_inputs", None)
        generation = hook(batch) if callable(hook) else None
        if generation is not None:
            outputs["generated"] = self.generate(generation)
        return outputs

    def train_mode(self) -> None:
        """Train mode, except running-statistics norms of frozen parts (BatchNorm of a frozen
        CNN backbone): updating them at micro-batch size 2 drifts a base nobody trains."""
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()

    def out_of_memory_advice(self, step: int, saved_step: int | None) -> str:
        """What to change after an out-of-memory error at `step`, in the config's own keys."""
        train = self.cfg.train
        advice = [
            f"train.micro_batch_size={max(1, train.micro_batch_size // 2)} with "
            f"train.grad_accum_steps={train.grad_accum_steps * 2} (the same effective batch)"
        ]
        if not self.cfg.model.gradient_checkpointing:
            advice.append("model.gradient_checkpointing=true")
        if self.precision.name == "fp32":
            advice.append("precision=bf16 (or fp16) and model.dtype=bf16")
        resume = f"; then --resume from step {saved_step}" if saved_step else ""
        return (
            f"out of memory at optimizer step {step} with micro_batch_size "
            f"{train.micro_batch_size} (peak {peak_memory_mb(self.device):.0f} MB); try "
            + ", ".join(advice)
            + resume
        )

    def evaluate(self, task: Task, dataset: Dataset) -> Metrics:
        """The task's metrics over a whole split, in eval mode, without gradients.

        The loader gets its own generator: creating its iterator would otherwise draw from the
        global RNG, and the evaluation cadence would change the training trajectory.
        """
        batch_size = self.cfg.eval.batch_size or self.cfg.train.micro_batch_size
        lockstep = fsdp.eval_forwards(self.model, len(dataset), batch_size)  # type: ignore[arg-type]
        dataset = distributed.shard(dataset)  # this rank's slice; the meters are gathered
        loader = eval_loader(dataset, batch_size, task.collate, self.cfg.data, self.device)
        was_training = self.model.training
        self.model.eval()
        meter = task.meter()
        last = None
        try:
            for batch in loader:
                outputs = self.infer(task, batch) if len(batch) else {}
                if len(batch):
                    lockstep, last = lockstep - 1, batch
                meter.update(outputs, batch)
            fsdp.pad_forwards(max(lockstep, 0), last, lambda b: self.infer(task, b))
            return distributed.gather_meter(meter).compute()
        finally:
            if was_training:
                self.train_mode()

    def predict(
        self, task: Task, inputs: list[dict[str, Any]], out_dir: Path
    ) -> list[dict[str, Any]]:
        """One record per input, in input order; pictures under out_dir."""
        self.model.eval()
        out_dir.mkdir(parents=True, exist_ok=True)
        records: list[dict[str, Any]] = []
        for batch in task.prediction_batches(inputs):
            outputs = self.infer(task, batch) if len(batch) else {}
            records.extend(task.predictions(outputs, batch, out_dir))
        return records


def peak_memory_mb(device: torch.device) -> float:
    """High-water mark: CUDA's max allocated, or VmHWM on the CPU. Not ru_maxrss: Linux carries
    it over from the process that started this one (across fork and exec), e.g. a notebook's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = _proc_status_kb("VmHWM")
    return (kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def current_memory_mb(device: torch.device) -> float:
    """Memory held now: CUDA tensors, or the resident set (VmRSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_kb("VmRSS") / 1024


def _proc_status_kb(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0
