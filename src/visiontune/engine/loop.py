"""THE training loop: one for every task, read top to bottom in `Loop.run`.

An optimizer step consumes one accumulation window of `grad_accum_steps` micro-batches. Each
micro-batch contributes its loss *sum*; after the window the gradients are divided by the
number of items in the whole window, so GA=k at micro-batch b equals GA=1 at batch k*b even
when micro-batches differ in size. At an epoch end a partial window is stepped with what it
holds (normalised by its own count), so every sample is seen once per epoch and an epoch is
ceil(batches / grad_accum_steps) optimizer steps. Every interval counts optimizer steps.

Loss sums, item counts and the finite-loss check stay on the device through the window: the
host reads them once per optimizer step, so the backward is queued while the forward runs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from visiontune.config.load import config_hash, dump_yaml, load_config
from visiontune.config.schema import Config, parse_duration
from visiontune.engine import checkpoint as ckpt
from visiontune.engine import distributed, fsdp
from visiontune.engine import state as st
from visiontune.engine.loader import TrainLoader
from visiontune.engine.optim import build_optimizer, build_scheduler
from visiontune.engine.order import DataOrder, sample_lengths, train_indices
from visiontune.engine.plan.forecast import TrainForecast
from visiontune.engine.rank_window import RankWindow
from visiontune.engine.runner import Runner, peak_memory_mb
from visiontune.engine.state import TrainState
from visiontune.engine.stop import EarlyStopping, StopRequest
from visiontune.errors import TrainingError
from visiontune.metrics.acceptance import judge
from visiontune.runs.budget import over_budget
from visiontune.runs.eval_noise import save_eval_samples
from visiontune.runs.progress import TrainProgress
from visiontune.runs.remote import RemoteRun
from visiontune.runs.rundir import LOGGER, RunDir
from visiontune.runs.trackers import Trackers
from visiontune.task import Batch, Metrics, Splits, Task, augmented, resolved_config

log = logging.getLogger(LOGGER)


class Loop:
    def __init__(
        self,
        cfg: Config,
        task: Task,
        runner: Runner,
        splits: Splits,
        run: RunDir,
        stop: StopRequest | None = None,
        tracker: Trackers | None = None,
    ) -> None:
        self.cfg, self.task, self.runner, self.splits, self.rundir = cfg, task, runner, splits, run
        self.device = runner.device
        # before the optimizer: FSDP replaces the parameters with sharded ones
        runner.model = distributed.wrap(runner.adapter, cfg)
        self.params = [p for p in runner.adapter.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(runner.adapter, cfg.optim)
        self.order = DataOrder(
            train_indices(len(splits.train), cfg.train.max_samples, cfg.train.seed),
            cfg.train.micro_batch_size,
            cfg.train.seed,
            cfg.train.overfit_batches,
            lengths=sample_lengths(splits.train) if cfg.train.group_by_length else None,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
        )
        self.main = distributed.is_main()  # rank 0 alone writes into the run directory
        self.updates_per_epoch = math.ceil(
            self.order.batches_per_epoch / cfg.train.grad_accum_steps
        )
        self.total_steps = cfg.train.max_steps or math.ceil(
            cfg.train.epochs * self.updates_per_epoch  # type: ignore[operator]
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps)
        self.state = TrainState()
        limit = parse_duration(cfg.train.time_limit) if cfg.train.time_limit else None
        self.stop = stop or StopRequest(limit)
        self.forecast = TrainForecast(cfg, self.total_steps, self.stop)
        self._owns_stop = stop is None  # a caller's StopRequest covers set-up and the end too
        self.early = EarlyStopping(
            cfg.eval.mode, cfg.eval.patience, cfg.eval.min_delta, cfg.train.min_steps
        )
        self.tracker = tracker if self.main else None  # opened and closed by the run's owner
        self.remote = RemoteRun.for_config(cfg) if self.main else None
        self._batches: Iterator[Batch] | None = None
        self._loader: TrainLoader | None = None  # built at the first batch, after any resume
        self._step_seconds = 0.0
        self._save_seconds = 0.0
        self._eval_seconds = 0.0
        self._saved_step: int | None = None
        self._window_skips = 0
        self.ranks = RankWindow(self.order)

    # ---- the story -------------------------------------------------------------------------

    def run(self) -> TrainState:
        log.info(
            "training %d optimizer steps (%d per epoch: %d micro-batches of %d, accumulation %d)"
            " on %s in %s",
            self.total_steps, self.updates_per_epoch, self.order.batches_per_epoch,
            self.cfg.train.micro_batch_size, self.cfg.train.grad_accum_steps,
            self.device, self.runner.precision.name,
        )  # fmt: skip
        if self._owns_stop:
            self.stop.install()
        self.runner.train_mode()  # once: evaluation restores it, and it walks every module
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
                        advice = self.runner.out_of_memory_advice(
                            self.state.step + 1, self._saved_step
                        )
                        raise TrainingError(advice) from None
                    progress.update(
                        self.state.step, record["loss"], record["lr"], record["samples_per_s"]
                    )
                    self.forecast.observe(
                        self.state.step, record["step_time_s"], self.eval_dataset() is not None
                    )
                    if self.after_step():
                        break
            if self.state.stop_reason is None:
                # a signal after the last step: save and exit resumable; the next job finishes
                self.state.stop_reason = self.stop.requested() or "completed"
            if not self.state.stop_reason.startswith(("signal", "time_limit")):
                self.finish()
                if self.stop.requested():
                    log.warning(
                        "%s arrived during the final evaluation or save; the run is complete",
                        self.stop.requested(),
                    )
            elif self._saved_step != self.state.step:
                self.save_checkpoint()
        finally:
            if self._owns_stop:
                self.stop.uninstall()
        return self.state

    def optimizer_step(self) -> dict[str, Any]:
        """One update from one accumulation window; returns the metrics.jsonl record."""
        started = time.perf_counter()
        window = self.next_window()
        precision = self.runner.precision
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        parts: dict[str, torch.Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        divisor: torch.Tensor | None = None
        micro_means: list[torch.Tensor] = []  # sampling noise for `visiontune doctor`
        for position, (micro, weight) in enumerate(window):
            # DDP all-reduces gradients only in the backward of the window's last micro-batch
            with distributed.gradient_sync(self.runner.model, position == len(window) - 1):
                out = self.task.loss(self.runner.forward(micro), micro)
                items = torch.as_tensor(out.count, device=self.device, dtype=torch.float32)
                items = items * weight
                # One divisor for the whole window (the same on every rank) keeps gradient
                # magnitudes mean-like (fp16 headroom); the exact count is applied below.
                if divisor is None:
                    divisor = distributed.window_divisor(items, len(window))
                precision.backward(out.loss_sum * weight / divisor)
            loss_sum += out.loss_sum.detach().float() * weight
            count += items
            micro_means.append(out.loss_sum.detach().float() / items.clamp(min=1))
            finite &= torch.isfinite(out.loss_sum.detach())
            for name, value in out.parts.items():
                parts[name] = parts.get(name, 0.0) + value.detach().float() * weight
        # summed over ranks: every rank steps, logs and stops on corrupt samples alike
        samples = sum(len(m) for m, weight in window if weight)
        skips, self._window_skips = self._window_skips, 0
        totals = distributed.window_totals(count, loss_sum, finite, samples, skips, parts)
        count, loss_sum, finite, samples = (
            totals.count, totals.loss_sum, totals.finite, totals.samples
        )  # fmt: skip
        self.state.skipped_samples += totals.skips
        self.check_skips(0)
        if not bool(finite):
            terms = [name for name, value in parts.items() if not bool(torch.isfinite(value))]
            raise TrainingError(
                f"loss is not finite at optimizer step {self.state.step + 1} (epoch "
                f"{self.state.epoch}{', terms ' + ', '.join(terms) if terms else ''}), in a "
                "window with samples "
                f"{[i for m, _ in window for i in m.ids][:8]}; try a lower optim.lr, precision "
                "bf16/fp32, or train.detect_anomaly: true"
            )
        precision.unscale(self.optimizer)
        assert divisor is not None
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:  # DDP averaged over ranks: times world size, over the count of all ranks
            world = distributed.world_size()
            torch._foreach_mul_(grads, divisor * world / count.clamp(min=1))
        max_norm = self.cfg.train.max_grad_norm or math.inf
        grad_norm = fsdp.total_norm(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        applied = precision.step(self.optimizer)
        if applied:  # an fp16 overflow skips the update, and so does not advance the schedule
            self.scheduler.step()
            self.state.updates_applied += 1
        else:
            log.warning(
                "step %d: fp16 overflow (gradient norm %s), update skipped and loss scale "
                "lowered (%d of %d updates applied so far)",
                self.state.step + 1, grad_norm, self.state.updates_applied, self.state.step + 1,
            )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.samples_seen += samples
        seconds = time.perf_counter() - started
        self._step_seconds = (
            seconds if self.state.step == 1 else 0.9 * self._step_seconds + 0.1 * seconds
        )
        items = max(float(count), 1.0)
        record = {
            "step": self.state.step,
            "epoch": round(self.state.step / self.updates_per_epoch, 4),
            "loss": loss_sum.item() / items,
            "micro_losses": torch.stack(micro_means).tolist(),  # one read for the window
            **{f"loss.{name}": float(value) / items for name, value in parts.items()},
            "lr": lr,
            "grad_norm": grad_norm,
            "clipped": bool(grad_norm > max_norm),
            "update_applied": applied,
            "samples_per_s": samples / seconds,
            "step_time_s": seconds,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if self.main:
            self.rundir.append_jsonl(self.rundir.metrics, record)
        if self.tracker:
            scalars = {k: v for k, v in record.items() if k != "micro_losses"}
            self.tracker.log(self.state.step, scalars, "train")
        return record

    def after_step(self) -> bool:
        """Decide whether to stop, else evaluate and save as due; True ends the loop.

        A signal or the time limit is looked at first: a job asked to stop saves and exits
        instead of running an evaluation that may outlast its grace period. The time-limit
        margin covers the next step, a save, and an evaluation when one is due next step.
        """
        step = self.state.step
        every_eval = self.cfg.eval.every_steps
        eval_due = bool(every_eval) and step % every_eval == 0  # type: ignore[operator]
        eval_next = bool(every_eval) and (step + 1) % every_eval == 0  # type: ignore[operator]
        margin = 2 * self._step_seconds + self._save_seconds
        reason = self.stop.reason(margin, self._eval_seconds * (int(eval_due) + int(eval_next)))
        reason = reason or over_budget(self.cfg, self.rundir.root, margin)
        reason = distributed.agree_stop(reason)
        if reason is None:
            if eval_due:
                self.evaluate()
            every_save = self.cfg.checkpoint.every_steps
            if every_save and step % every_save == 0:
                self.save_checkpoint()
            if self.early.should_stop(self.state.evals_without_improvement, step):
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

    def next_window(self) -> list[tuple[Batch, float]]:
        """The window's micro-batches with their loss weights (0: see engine/rank_window.py)."""
        window: list[tuple[Batch, float]] = []
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
            weight = self.ranks.weight(self.state.epoch, self.state.batch_in_epoch)
            self.state.batch_in_epoch += 1
            if weight:
                self.count_skipped(batch)
            if len(batch):
                micro = self.ranks.keep(augmented(self.task, batch.to(self.device)))
                window.append((micro, weight))
            elif distributed.active():
                window.append((self.ranks.replay(), 0.0))
        return window

    def epoch_batches(self) -> Iterator[Batch]:
        """The current epoch's batches from the saved position, read by the run's workers."""
        if self._loader is None:
            self._loader = TrainLoader(
                self.splits.train, self.order, self.task.collate, self.cfg.data, self.device
            )
        return self._loader.epoch(self.state.epoch, self.state.batch_in_epoch)

    def count_skipped(self, batch: Batch) -> None:
        for skipped in batch.skipped:
            self._window_skips += 1
            log.warning("skipped sample %s: %s", skipped.sample_id, skipped.reason)
        if not distributed.active():  # ranks check the agreed count after the window
            self.check_skips(self._window_skips)

    def check_skips(self, pending: int) -> None:
        skipped = self.state.skipped_samples + pending
        if skipped > self.cfg.data.max_bad_samples:
            raise TrainingError(
                f"{skipped} samples could not be loaded, more than "
                f"data.max_bad_samples={self.cfg.data.max_bad_samples}; see {self.rundir.log}"
            )

    def eval_dataset(self) -> Dataset | None:
        return self.splits.get(self.cfg.eval.split)

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self) -> Metrics | None:
        """Score the eval split; a selection metric missing this time counts as no improvement
        (an early model may not answer parseably yet), never as a reason to kill the run."""
        dataset = self.eval_dataset()
        if dataset is None:
            return None
        started = time.monotonic()
        metrics = self.runner.evaluate(self.task, dataset)
        self._eval_seconds = time.monotonic() - started
        scalars = metrics.scalars
        name = self.cfg.eval.metric
        self.state.acceptance = judge(self.cfg.acceptance, scalars)
        value = scalars.get(name)
        if value is None or not math.isfinite(value):
            log.warning(
                "eval at step %d: eval.metric %r is missing or not finite (metrics: %s); "
                "counted as no improvement",
                self.state.step, name, sorted(scalars),
            )  # fmt: skip
            self.state.evals_without_improvement += 1
        elif self.early.improved(value, self.state.best_metric):
            self.state.best_metric, self.state.best_step = value, self.state.step
            self.state.evals_without_improvement = 0
            self.save_best()
            if self.main:
                self.task.save_figures(metrics, self.rundir.figures)
        else:
            self.state.evals_without_improvement += 1
        self.state.last_eval = {"step": self.state.step, **scalars}
        if self.main:
            self.rundir.append_jsonl(self.rundir.evals, {"step": self.state.step, **scalars})
            save_eval_samples(self.rundir, self.state.step, metrics.tables)  # intervals, later
        if self.tracker:
            self.tracker.log(self.state.step, scalars, "eval")
        shown = ", ".join(f"{k} {v:.4f}" for k, v in list(scalars.items())[:6])
        log.info("eval at step %d: %s", self.state.step, shown)
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------

    def write_weights(
        self, directory: Path, model_card: bool, tensors: dict[str, torch.Tensor] | None
    ) -> None:
        st.write_weights(
            self.runner.adapter, directory, self.cfg.model.name_or_path, model_card, tensors
        )
        (directory / "config.yaml").write_text(dump_yaml(self.cfg))

    def save_best(self) -> None:
        tensors = fsdp.full_weights(self.runner.model)  # FSDP: gathered whole onto rank 0
        if not self.main:
            return
        ckpt.write_atomically(
            self.rundir.best,
            lambda directory: self.write_weights(directory, True, tensors),
            {"step": self.state.step},
        )
        if self.remote:
            self.remote.push_best(self.rundir.best)

    def fingerprint(self, world_size: int | None = None) -> dict[str, Any]:
        """Of the data order as `world_size` ranks see it (default: this run's)."""
        keys = getattr(self.splits.train, "keys", None)
        if keys is None:
            raise TrainingError("the train dataset has no sample keys to fingerprint")
        classes = resolved_config(self.task, self.cfg).data.classes
        order = self.order if world_size is None else self.order.on(0, world_size)
        return st.fingerprint(self.runner.adapter, order, list(keys), classes)

    def save_checkpoint(self) -> Path:
        """Rank 0 writes the weights and states (replicated under DDP) with every rank's RNG
        state, manifest last; the other ranks wait at a barrier until it is complete."""
        self.state.world_size = distributed.world_size()
        rngs = distributed.gather(ckpt.rng_state())
        path = self.rundir.checkpoints / f"{ckpt.STEP_PREFIX}{self.state.step:08d}"
        tensors = fsdp.full_weights(self.runner.model)
        shards = fsdp.save_shards(self.runner.model, self.optimizer, path)

        def fill(directory: Path) -> None:
            self.write_weights(directory, False, tensors)
            if shards:  # FSDP: every rank's part of the weights and optimizer state
                fsdp.move_shards(shards, directory)
            else:
                ckpt.save_torch(self.optimizer.state_dict(), directory / "optimizer.pt")
            ckpt.save_torch(self.scheduler.state_dict(), directory / "scheduler.pt")
            scaler = self.runner.precision.scaler
            if scaler is not None:
                ckpt.save_torch(scaler.state_dict(), directory / "scaler.pt")
            for rank, rng in enumerate(rngs):
                ckpt.save_torch(rng, directory / distributed.rng_file(rank))
            (directory / "train_state.json").write_text(json.dumps(asdict(self.state), indent=2))
            (directory / st.FINGERPRINT).write_text(json.dumps(self.fingerprint(), indent=2))

        started = time.monotonic()
        meta = {"step": self.state.step, "config_hash": config_hash(self.cfg)}
        if self.main:
            ckpt.write_atomically(path, fill, meta)
            keep = (
                {self.state.best_step}
                if self.cfg.checkpoint.keep_best and self.state.best_step
                else set()
            )
            ckpt.prune(self.rundir.checkpoints, self.cfg.checkpoint.keep_last, keep)
            if self.remote:
                self.remote.push_checkpoint(path, self.rundir, self.cfg.checkpoint.keep_last, keep)
        distributed.barrier("waiting for rank 0 to finish the checkpoint")
        self._saved_step = self.state.step
        self._save_seconds = time.monotonic() - started
        log.info("saved checkpoint %s (%.1fs)", path, self._save_seconds)
        return path

    def resume_from(self, directory: Path) -> None:
        """Restore weights, optimizer, scheduler, scaler, RNG and the train state; apply the
        config's optimizer settings; drop log records of the lost steps after the checkpoint."""
        before = load_config(directory / "config.yaml")
        saved = TrainState(**json.loads((directory / "train_state.json").read_text()))
        st.check_resumable(directory, self.fingerprint(saved.world_size), before, self.cfg)
        if fsdp.sharded(self.runner.model):  # from the shards of any number of ranks
            fsdp.load_shards(self.runner.adapter, self.optimizer, directory)
        else:
            fsdp.refuse_shards(directory)
            st.load_weights(self.runner.adapter, directory)
            self.optimizer.load_state_dict(ckpt.load_torch(directory / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch(directory / "scheduler.pt"))
        st.apply_optimizer_settings(
            self.optimizer, self.scheduler, self.cfg, st.config_changes(before, self.cfg)
        )
        scaler = self.runner.precision.scaler
        if scaler is not None and (directory / "scaler.pt").is_file():
            scaler.load_state_dict(ckpt.load_torch(directory / "scaler.pt"))
        rng = directory / distributed.rng_file(distributed.rank())
        if rng.is_file():
            ckpt.set_rng_state(ckpt.load_torch(rng))
        else:
            log.warning("%s has no RNG state for rank %d: it starts a fresh stream",
                        directory, distributed.rank())  # fmt: skip
        saved.stop_reason = None
        saved.batch_in_epoch = distributed.resume_position(saved, before, self.cfg, self.order)
        self.state = saved
        self._saved_step = saved.step
        if self.main:
            st.reconcile_best(self.rundir, self.state)
        log.info(
            "resumed from %s: step %d, epoch %d, micro-batch %d of the epoch",
            directory, saved.step, saved.epoch, saved.batch_in_epoch,
        )  # fmt: skip
