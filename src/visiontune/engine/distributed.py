"""Data-parallel training on `torch.distributed`, launched by torchrun: the pieces the one loop
calls, never a loop of its own.

A process started by torchrun (or `visiontune train --nproc N`, which runs torchrun's launcher)
finds RANK/WORLD_SIZE in its environment and joins the process group here. Everything below is
a no-op in a plain single process, so the loop reads the same either way:

- `wrap`: the adapter inside DistributedDataParallel (see its docstring for the frozen-tower
  settings);
- `gradient_sync`: DDP's `no_sync()` for every micro-batch of a window but the last;
- `all_sum`: one all-reduce of the window's loss sum, item count, skips and finite check;
- `agree_stop`: THE place where ranks agree to stop (signal, time limit, budget) at an
  optimizer-step boundary, so they save together and exit together;
- `shard` and `gather_meter`: each rank evaluates a contiguous slice of the split and the
  metric inputs (predictions, pixel counts) are gathered before any metric is computed.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from visiontune.config.schema import Config, TrainConfig
from visiontune.engine import fsdp
from visiontune.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective waits for a rank that stopped answering (torchrun ends the others
much sooner when a rank's process dies)."""


def launched() -> bool:
    """True in a process torchrun started (it sets RANK, WORLD_SIZE, MASTER_ADDR...)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start() -> None:
    """Join torchrun's process group: NCCL with one GPU per local rank, else gloo (CPU)."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    log.info("rank %d of %d joined the %s process group", rank(), world_size(), backend)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 alone writes logs, metrics, the ledger, pictures, best/ and checkpoints."""
    return rank() == 0


def planned_world_size() -> int:
    """The world size of this launch, before the process group exists (config show)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---- the global batch -----------------------------------------------------------------------


def global_batch_line(train: TrainConfig, world: int) -> str:
    """What `config show` prints: the product, and which factor a new world size changes."""
    total = global_batch(train, world)
    held = (
        f"train.global_batch_size={train.global_batch_size} is held fixed: grad_accum_steps "
        "follows the world size"
        if train.global_batch_size
        else "grad_accum_steps is held fixed: the global batch grows with the world size "
        "(set train.global_batch_size to hold it fixed)"
    )
    return (
        f"global batch: micro_batch_size {train.micro_batch_size} x grad_accum_steps "
        f"{train.grad_accum_steps} x world size {world} = {total}; {held}"
    )


def global_batch(train: TrainConfig, world: int) -> int:
    return train.global_batch_size or train.micro_batch_size * train.grad_accum_steps * world


def resolve_batch(cfg: Config, world: int) -> Config:
    """The config with grad_accum_steps derived from train.global_batch_size when that is set.

    Raises a ConfigError before training when the world size does not divide it."""
    train = cfg.train
    if not train.global_batch_size:
        return cfg
    per_step = train.micro_batch_size * world
    if train.global_batch_size % per_step:
        global_batch, micro = train.global_batch_size, train.micro_batch_size
        per_rank = global_batch // micro
        fits = [n for n in range(1, 65) if global_batch % (micro * n) == 0]
        hint = f"world sizes that divide it: {fits}" if fits else "no world size divides it"
        raise ConfigError(
            [
                f"train.global_batch_size: {train.global_batch_size} is not divisible by "
                f"micro_batch_size {train.micro_batch_size} x world size {world} = {per_step} "
                f"({hint}; {per_rank} micro-batches per step); change train.micro_batch_size "
                "or the number of ranks"
            ]
        )
    accum = train.global_batch_size // per_step
    return cfg.model_copy(update={"train": train.model_copy(update={"grad_accum_steps": accum})})


# ---- training ---------------------------------------------------------------------------------


def wrap(adapter: nn.Module, cfg: Config | None = None) -> nn.Module:
    """The adapter inside DDP, sharded by FSDP2 under `train.strategy: fsdp` (engine/fsdp.py),
    or itself in a single process.

    `find_unused_parameters=True`: a trainable parameter without a gradient in some step (LoRA
    on a vision tower when a batch holds no image, a head a task does not call every step)
    would otherwise end the next step with "Expected to have finished reduction"; DDP then
    marks such parameters ready with a zero gradient instead of waiting for them. Frozen
    parameters (requires_grad False) are not registered with DDP at all. `static_graph` is not
    used: it assumes the same parameters take part in every step, which a batch without an
    image breaks. Gradient checkpointing is non-reentrant (models/load.py), so no parameter is
    "marked as ready twice". `broadcast_buffers=False`: no trained module has running
    statistics, and a buffer broadcast in every forward would tie evaluation, whose shards
    differ in length across ranks, to a collective.
    """
    strategy = cfg.train.strategy if cfg is not None else "ddp"
    if strategy == "fsdp":
        if not active():
            raise ConfigError(
                [
                    "train.strategy: fsdp shards the model over several processes: run "
                    "`visiontune train CFG --nproc N` or under torchrun (N may be 1)"
                ]
            )
        return fsdp.shard(adapter, cfg)  # type: ignore[arg-type]
    if not active():
        return adapter
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    parameters = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False}  # torch >= 2.13; the buffers still sync at init
        if "forward_sync_buffers" in parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        adapter, device_ids=device_ids, find_unused_parameters=True, **no_buffer_sync
    )


def gradient_sync(model: nn.Module, sync: bool) -> Any:
    """DDP's no_sync() unless `sync`: gradients are all-reduced once per window, at its last
    micro-batch's backward (FSDP: reduce-scattered then)."""
    if fsdp.sharded(model):
        fsdp.set_gradient_sync(model, sync)
        return nullcontext()
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return nullcontext()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over ranks (in place); every rank calls it at the same point."""
    if active():
        with collective("summing the step's loss and item counts"):
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def window_divisor(items: torch.Tensor, micro_batches: int) -> torch.Tensor:
    """The loss divisor of a window: its first micro-batch's item count times its length, the
    largest over ranks (one divisor for all, or DDP's average could not be undone)."""
    if not active():
        return items.clamp(min=1) * micro_batches
    largest = items.detach().clamp(min=1).reshape(1).double()
    with collective("agreeing on the window's loss scale"):
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return (largest[0] * micro_batches).to(items.dtype)


@dataclass
class WindowTotals:
    count: torch.Tensor
    loss_sum: torch.Tensor
    finite: torch.Tensor
    samples: int
    skips: int


def window_totals(
    count: torch.Tensor,
    loss_sum: torch.Tensor,
    finite: torch.Tensor,
    samples: int,
    skips: int,
    parts: dict[str, torch.Tensor],
) -> WindowTotals:
    """A window's totals over every rank in one all-reduce; `parts` are summed in place."""
    if not active():
        return WindowTotals(count, loss_sum, finite, samples, skips)
    names = sorted(parts)
    device = count.device
    scalars = [count, loss_sum, (~finite).float(), torch.tensor(float(samples)),
               torch.tensor(float(skips))]  # fmt: skip
    values = [v.to(device).float() for v in scalars + [parts[n] for n in names]]
    totals = all_sum(torch.stack(values))
    for k, name in enumerate(names):
        parts[name] = totals[len(scalars) + k]
    return WindowTotals(totals[0], totals[1], totals[2] == 0, int(totals[3]), int(totals[4]))


def rng_file(rank: int) -> str:
    """rng.pt for rank 0 (as a single process writes it), rng-rank-N.pt for the others."""
    return "rng.pt" if rank == 0 else f"rng-rank-{rank}.pt"


def agree_stop(reason: str | None) -> str | None:
    """The stop reason every rank acts on at this optimizer-step boundary: the first rank's
    that has one (a signal may reach only some ranks, a time limit run out on one first).

    One small all-reduce of a flag per step; the reasons are exchanged only when one is set.
    The SLURM path relies on this: USR1 to any rank makes every rank save and exit 75."""
    if not active():
        return reason
    flag = torch.tensor([0.0 if reason is None else 1.0], device=_collective_device())
    with collective("agreeing whether to stop"):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return None
        reasons: list[str | None] = [None] * world_size()
        dist.all_gather_object(reasons, reason)
    return next(r for r in reasons if r is not None)


def gather(value: Any) -> list[Any]:
    """`value` of every rank, in rank order (picklable objects)."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    with collective("gathering"):
        dist.all_gather_object(gathered, value)
    return gathered


def barrier(why: str) -> None:
    if active():
        with collective(why):
            dist.barrier()


@contextmanager
def collective(what: str) -> Iterator[None]:
    """A collective that fails because a rank is gone ends this rank with a message saying so
    (torchrun names the rank that died), not with a backend traceback."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as err:
        raise TrainingError(
            f"rank {rank()}: lost the other ranks while {what} ({str(err).splitlines()[0]}); "
            "another rank failed or was killed: its error is above"
        ) from err


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_rank_stream(seed: int) -> None:
    """Its own RNG stream per rank (dropout differs across ranks as across micro-batches);
    rank 0 keeps the single-process stream."""
    if rank() > 0:
        torch.manual_seed(seed * 1_000_003 + rank())


# ---- evaluation -------------------------------------------------------------------------------


def shard(dataset: Dataset) -> Dataset:
    """This rank's contiguous slice of an evaluation split: gathered in rank order, the slices
    put every sample back in the split's order."""
    if not active():
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    begin, end = n * rank() // world_size(), n * (rank() + 1) // world_size()
    return Subset(dataset, range(begin, end))


def gather_meter(meter: Any) -> Any:
    """Fold every rank's accumulated metric inputs into `meter` before it computes.

    A meter names what it accumulates in `gathered`: lists are concatenated in rank order,
    numbers summed, and objects with their own `gathered` merged field by field. A meter that
    names nothing cannot be merged and is refused rather than computed per rank."""
    if not active():
        return meter
    fields = getattr(meter, "gathered", None)
    if fields is None:
        raise TrainingError(f"{type(meter).__name__} does not say what to gather across ranks")
    states = gather(_state(meter))
    _merge(meter, states)
    return meter


def _state(meter: Any) -> dict[str, Any]:
    return {
        name: _state(value) if hasattr(value, "gathered") else value
        for name in meter.gathered
        for value in [getattr(meter, name)]
    }


def _merge(meter: Any, states: list[dict[str, Any]]) -> None:
    for name in meter.gathered:
        current = getattr(meter, name)
        parts = [state[name] for state in states]
        if hasattr(current, "gathered"):
            _merge(current, parts)
        elif isinstance(current, list):
            setattr(meter, name, [item for part in parts for item in part])
        else:
            setattr(meter, name, sum(parts))


# ---- resume on another world size -----------------------------------------------------------


def resume_position(saved: Any, before: Config, now: Config, order: Any) -> int:
    """The epoch position (micro-batches, each one global batch) to continue from.

    The data order is a function of (seed, epoch) alone, so a checkpoint written by W ranks
    continues on W' ranks when the samples consumed so far fill whole global batches of the
    new shape and the global batch of an optimizer step is unchanged; otherwise the run would
    silently train on other batches, and this refuses, saying what would work.
    """
    old_world, new_world = saved.world_size, world_size()
    if old_world == new_world:
        return int(saved.batch_in_epoch)
    micro = now.train.micro_batch_size
    old_global = global_batch(before.train, old_world)
    new_global = global_batch(now.train, new_world)
    where = f"cannot resume a checkpoint of {old_world} rank(s) on {new_world}"
    if old_global != new_global:
        raise TrainingError(
            f"{where}: its global batch was {old_global}, now it would be {new_global}. Set "
            f"train.global_batch_size={old_global} to hold it fixed (grad_accum_steps then "
            f"follows the world size), or resume on {old_world} rank(s)"
        )
    old_order = order.on(0, old_world)
    if saved.batch_in_epoch >= old_order.batches_per_epoch:
        return order.batches_per_epoch
    consumed = saved.batch_in_epoch * micro * old_world
    if order.lengths is not None or order.limit_batches or consumed % (micro * new_world):
        raise TrainingError(
            f"{where}: it stopped {consumed} samples into epoch {saved.epoch}, which is not a "
            f"whole number of the new {micro} x {new_world}-sample batches (or the order groups "
            f"by length); resume on {old_world} rank(s), or on a world size that divides "
            f"{consumed // micro} micro-batches"
        )
    log.warning("resuming a %d-rank checkpoint on %d ranks", old_world, new_world)
    return consumed // (micro * new_world)
