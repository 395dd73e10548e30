"""THE training loop: one for every task, read top to bottom in `Loop.run`.

An optimizer step consumes one accumulation window of `grad_accum_steps` micro-batches. Each
micro-batch contributes its loss *sum*; after the window the gradients are divided by the
number of items in the whole window, so GA=k at micro-batch b equals GA=1 at batch k*b even
when micro-batches differ in size. At an epoch end a partial window is stepped with what it
holds (normalised by its own count), so every sample is seen once per epoch and an epoch is
ceil(batches / grad_accum_steps) optimizer steps. Every interval counts optimizer steps.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from visiontune.config.load import config_hash, dump_yaml, flat_settings, load_config
from visiontune.config.schema import Config, parse_duration
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.optim import build_optimizer, build_scheduler
from visiontune.engine.order import DataOrder
from visiontune.engine.precision import Precision, resolve_device
from visiontune.engine.stop import EarlyStopping, StopRequest
from visiontune.errors import TrainingError
from visiontune.metrics.acceptance import judge
from visiontune.runs.progress import TrainProgress
from visiontune.runs.rundir import LOGGER, RunDir
from visiontune.runs.trackers import TensorBoard
from visiontune.task import Batch, Metrics, Splits, Task

log = logging.getLogger(LOGGER)


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    skipped_samples: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stop_reason: str | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    acceptance: dict[str, Any] = field(default_factory=dict)


class Loop:
    def __init__(
        self,
        cfg: Config,
        task: Task,
        model: nn.Module,
        splits: Splits,
        run: RunDir,
        started: float | None = None,
    ) -> None:
        self.cfg, self.task, self.splits, self.rundir = cfg, task, splits, run
        self.device = resolve_device(cfg.train.device)
        self.model = model.to(self.device)
        self.precision = Precision(cfg.precision, self.device)
        self.precision.check_trainables(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.order = DataOrder(
            train_indices(len(splits.train), cfg.train.max_samples, cfg.train.seed),
            cfg.train.micro_batch_size,
            cfg.train.seed,
            cfg.train.overfit_batches,
            lengths=sample_lengths(splits.train) if cfg.train.group_by_length else None,
        )
        self.updates_per_epoch = math.ceil(
            self.order.batches_per_epoch / cfg.train.grad_accum_steps
        )
        self.total_steps = cfg.train.max_steps or math.ceil(
            cfg.train.epochs * self.updates_per_epoch  # type: ignore[operator]
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps)
        self.state = TrainState()
        limit = parse_duration(cfg.train.time_limit) if cfg.train.time_limit else None
        self.stop = StopRequest(limit, started)
        self.early = EarlyStopping(
            cfg.eval.mode, cfg.eval.patience, cfg.eval.min_delta, cfg.train.min_steps
        )
        self.tracker = TensorBoard(run.root / "tensorboard") if cfg.tracking.tensorboard else None
        self._batches: Iterator[Batch] | None = None
        self._step_seconds = 0.0
        self._save_seconds = 0.0
        self._saved_step: int | None = None

    # ---- the story -------------------------------------------------------------------------

    def run(self) -> TrainState:
        log.info(
            "training %d optimizer steps (%d per epoch: %d micro-batches of %d, accumulation %d)"
            " on %s in %s",
            self.total_steps, self.updates_per_epoch, self.order.batches_per_epoch,
            self.cfg.train.micro_batch_size, self.cfg.train.grad_accum_steps,
            self.device, self.precision.name,
        )  # fmt: skip
        self.stop.install()
        self.model.train()  # once: evaluation restores it, and it walks every module
        anomaly = (
            torch.autograd.detect_anomaly() if self.cfg.train.detect_anomaly else nullcontext()
        )
        try:
            with (
                anomaly,
                TrainProgress(
                    self.total_steps, self.state.step, self.cfg.train.log_every
                ) as progress,
            ):
                while self.state.step < self.total_steps:
                    try:
                        record = self.optimizer_step()
                    except torch.OutOfMemoryError:
                        raise TrainingError(self.out_of_memory_advice()) from None
                    progress.update(
                        self.state.step, record["loss"], record["lr"], record["samples_per_s"]
                    )
                    if self.after_step():
                        break
            if self.state.stop_reason is None:
                self.state.stop_reason = "completed"
            if not self.state.stop_reason.startswith(("signal", "time_limit")):
                self.finish()
            elif self._saved_step != self.state.step:
                self.save_checkpoint()
        finally:
            self.stop.uninstall()
            if self.tracker:
                self.tracker.close()
        return self.state

    def optimizer_step(self) -> dict[str, Any]:
        """One update from one accumulation window; returns the metrics.jsonl record."""
        started = time.perf_counter()
        window = self.next_window()
        loss_sum = torch.zeros((), device=self.device)
        count = 0
        divisor = 0
        for micro in window:
            with self.precision.autocast():
                out = self.task.loss(self.model, micro)
            if not torch.isfinite(out.loss_sum):
                raise TrainingError(
                    f"loss is {out.loss_sum.item()} at optimizer step {self.state.step + 1} "
                    f"(epoch {self.state.epoch}), micro-batch with samples {micro.ids[:8]}; "
                    "try a lower optim.lr, precision bf16/fp32, or train.detect_anomaly: true"
                )
            # One divisor for the whole window keeps gradient magnitudes mean-like (fp16
            # headroom); the exact window count is applied below, once it is known.
            divisor = divisor or max(int(out.count), 1) * len(window)
            self.precision.backward(out.loss_sum / divisor)
            loss_sum += out.loss_sum.detach().float()
            count += int(out.count)
        self.precision.unscale(self.optimizer)
        for param in self.params:
            if param.grad is not None:
                param.grad.mul_(divisor / max(count, 1))
        max_norm = self.cfg.train.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        applied = self.precision.step(self.optimizer)
        if applied:  # an fp16 overflow skips the update, and so does not advance the schedule
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        samples = sum(len(m) for m in window)
        self.state.samples_seen += samples
        seconds = time.perf_counter() - started
        self._step_seconds = (
            seconds if self.state.step == 1 else 0.9 * self._step_seconds + 0.1 * seconds
        )
        record = {
            "step": self.state.step,
            "epoch": round(self.state.step / self.updates_per_epoch, 4),
            "loss": loss_sum.item() / max(count, 1),
            "lr": lr,
            "grad_norm": grad_norm,
            "clipped": bool(grad_norm > max_norm),
            "update_applied": applied,
            "samples_per_s": samples / seconds,
            "step_time_s": seconds,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        self.rundir.append_jsonl(self.rundir.metrics, record)
        if self.tracker:
            self.tracker.log(self.state.step, record, "train")
        return record

    def out_of_memory_advice(self) -> str:
        """What to change after an out-of-memory error, in the config's own keys."""
        train = self.cfg.train
        advice = [
            f"train.micro_batch_size={max(1, train.micro_batch_size // 2)} with "
            f"train.grad_accum_steps={train.grad_accum_steps * 2} (the same effective batch)"
        ]
        if not self.cfg.model.gradient_checkpointing:
            advice.append("model.gradient_checkpointing=true")
        if self.precision.name == "fp32":
            advice.append("precision=bf16 (or fp16) and model.dtype=bf16")
        resume = f"; then --resume from step {self._saved_step}" if self._saved_step else ""
        return (
            f"out of memory at optimizer step {self.state.step + 1} with micro_batch_size "
            f"{train.micro_batch_size} (peak {peak_memory_mb(self.device):.0f} MB); try "
            + ", ".join(advice)
            + resume
        )

    def after_step(self) -> bool:
        """Evaluate, save and decide whether to stop; True ends the loop."""
        step = self.state.step
        every_eval = self.cfg.eval.every_steps
        if every_eval and step % every_eval == 0:
            self.evaluate()
        every_save = self.cfg.checkpoint.every_steps
        if every_save and step % every_save == 0:
            self.save_checkpoint()
        reason = self.stop.reason(2 * self._step_seconds + self._save_seconds)
        if reason is None and self.early.should_stop(self.state.evals_without_improvement, step):
            reason = "early_stopped"
        if reason:
            self.state.stop_reason = reason
            log.warning("stopping at step %d: %s", step, reason)
        return reason is not None

    def finish(self) -> None:
        """Final evaluation and checkpoint (unless this step already had them)."""
        if self.state.last_eval.get("step") != self.state.step:
            self.evaluate()
        if self._saved_step != self.state.step:
            self.save_checkpoint()
        if self.eval_dataset() is None:
            self.save_best()

    # ---- data ------------------------------------------------------------------------------

    def next_window(self) -> list[Batch]:
        window: list[Batch] = []
        while len(window) < self.cfg.train.grad_accum_steps:
            if self.state.batch_in_epoch >= self.order.batches_per_epoch:
                if window:
                    break
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                self._batches = None
            if self._batches is None:
                self._batches = self.epoch_batches()
            batch = next(self._batches)
            self.state.batch_in_epoch += 1
            self.count_skipped(batch)
            if len(batch):
                window.append(batch.to(self.device))
        return window

    def epoch_batches(self) -> Iterator[Batch]:
        dataset = self.splits.train
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.state.epoch)
        loader = DataLoader(
            dataset,
            batch_sampler=list(
                self.order.epoch_batches(self.state.epoch, self.state.batch_in_epoch)
            ),
            collate_fn=self.task.collate,
            num_workers=self.cfg.data.num_workers,
            generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
        )
        return iter(loader)

    def count_skipped(self, batch: Batch) -> None:
        for skipped in batch.skipped:
            self.state.skipped_samples += 1
            log.warning("skipped sample %s: %s", skipped.sample_id, skipped.reason)
        if self.state.skipped_samples > self.cfg.data.max_bad_samples:
            raise TrainingError(
                f"{self.state.skipped_samples} samples could not be loaded, more than "
                f"data.max_bad_samples={self.cfg.data.max_bad_samples}; see {self.rundir.log}"
            )

    def eval_dataset(self) -> Dataset | None:
        return self.splits.get(self.cfg.eval.split)

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self) -> Metrics | None:
        dataset = self.eval_dataset()
        if dataset is None:
            return None
        metrics = run_evaluation(self.cfg, self.task, self.model, dataset, self.precision)
        scalars = metrics.scalars
        name = self.cfg.eval.metric
        if name not in scalars:
            raise TrainingError(
                f"eval.metric: {name!r} is not among this task's metrics {sorted(scalars)}"
            )
        self.state.acceptance = judge(self.cfg.acceptance, scalars)
        if self.early.improved(scalars[name], self.state.best_metric):
            self.state.best_metric, self.state.best_step = scalars[name], self.state.step
            self.state.evals_without_improvement = 0
            self.save_best()
            self.task.save_figures(metrics, self.rundir.figures)
        else:
            self.state.evals_without_improvement += 1
        self.state.last_eval = {"step": self.state.step, **scalars}
        self.rundir.append_jsonl(self.rundir.evals, {"step": self.state.step, **scalars})
        if self.tracker:
            self.tracker.log(self.state.step, scalars, "eval")
        shown = ", ".join(f"{k} {v:.4f}" for k, v in list(scalars.items())[:6])
        log.info("eval at step %d: %s", self.state.step, shown)
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------

    def save_best(self) -> None:
        def fill(directory: Path) -> None:
            ckpt.write_weights(self.model, directory, self.cfg.model.name_or_path)
            (directory / "config.yaml").write_text(dump_yaml(self.cfg))

        ckpt.write_atomically(self.rundir.best, fill, {"step": self.state.step})

    def save_checkpoint(self) -> Path:
        def fill(directory: Path) -> None:
            ckpt.write_weights(self.model, directory, self.cfg.model.name_or_path)
            ckpt.save_torch(self.optimizer.state_dict(), directory / "optimizer.pt")
            ckpt.save_torch(self.scheduler.state_dict(), directory / "scheduler.pt")
            if self.precision.scaler is not None:
                ckpt.save_torch(self.precision.scaler.state_dict(), directory / "scaler.pt")
            ckpt.save_torch(ckpt.rng_state(), directory / "rng.pt")
            (directory / "train_state.json").write_text(json.dumps(asdict(self.state), indent=2))
            (directory / "config.yaml").write_text(dump_yaml(self.cfg))

        started = time.monotonic()
        meta = {"step": self.state.step, "config_hash": config_hash(self.cfg)}
        path = self.rundir.checkpoints / f"{ckpt.STEP_PREFIX}{self.state.step:08d}"
        ckpt.write_atomically(path, fill, meta)
        keep = (
            {self.state.best_step}
            if self.cfg.checkpoint.keep_best and self.state.best_step
            else set()
        )
        ckpt.prune(self.rundir.checkpoints, self.cfg.checkpoint.keep_last, keep)
        self._saved_step = self.state.step
        self._save_seconds = time.monotonic() - started
        log.info("saved checkpoint %s (%.1fs)", path, self._save_seconds)
        return path

    def resume_from(self, directory: Path) -> None:
        """Restore weights, optimizer, scheduler, scaler, RNG and the train state."""
        changed = config_changes(load_config(directory / "config.yaml"), self.cfg)
        breaking = sorted(set(changed) & DATA_ORDER_KEYS)
        if breaking:
            raise TrainingError(
                f"cannot resume {directory} exactly: {', '.join(changed[k] for k in breaking)} "
                "changed, and the data position depends on it; start a new run from these "
                "weights with init_from instead"
            )
        for key in sorted(changed):
            log.warning("resuming with a changed setting: %s", changed[key])
        ckpt.load_weights(self.model, directory)
        self.optimizer.load_state_dict(ckpt.load_torch(directory / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch(directory / "scheduler.pt"))
        if self.precision.scaler is not None and (directory / "scaler.pt").is_file():
            self.precision.scaler.load_state_dict(ckpt.load_torch(directory / "scaler.pt"))
        ckpt.set_rng_state(ckpt.load_torch(directory / "rng.pt"))
        saved = TrainState(**json.loads((directory / "train_state.json").read_text()))
        saved.stop_reason = None
        self.state = saved
        self._saved_step = saved.step
        log.info(
            "resumed from %s: step %d, epoch %d, micro-batch %d of the epoch",
            directory, saved.step, saved.epoch, saved.batch_in_epoch,
        )  # fmt: skip


DATA_ORDER_KEYS = {
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.seed",
    "train.max_samples",
    "train.overfit_batches",
    "train.group_by_length",
    "data.train",
    "data.format",
    "data.val_fraction",
}
"""Settings whose change makes a saved data position meaningless."""


def config_changes(before: Config, after: Config) -> dict[str, str]:
    """Dotted key -> "key (old -> new)" for every leaf setting that differs."""
    old, new = flat_settings(before), flat_settings(after)
    return {
        key: f"{key} ({old.get(key)!r} -> {new.get(key)!r})"
        for key in old.keys() | new.keys()
        if old.get(key) != new.get(key)
    }


def run_evaluation(
    cfg: Config, task: Task, model: nn.Module, dataset: Dataset, precision: Precision
) -> Metrics:
    """Evaluate in eval mode, without gradients, under the training precision."""
    loader = DataLoader(
        dataset,
        batch_size=cfg.eval.batch_size or cfg.train.micro_batch_size,
        collate_fn=task.collate,
        num_workers=cfg.data.num_workers,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), precision.autocast():
            return task.evaluate(model, loader)
    finally:
        model.train(was_training)


def train_indices(num_samples: int, max_samples: int | None, seed: int) -> list[int]:
    """All indices, or a seeded random subset of `max_samples` of them."""
    if not max_samples or max_samples >= num_samples:
        return list(range(num_samples))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_samples, generator=generator)[:max_samples].tolist())


def sample_lengths(dataset: Dataset) -> list[int]:
    lengths = getattr(dataset, "lengths", None)
    if lengths is None:
        raise TrainingError(
            "train.group_by_length: this task's training data has no sample lengths"
        )
    return list(lengths)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
