"""`train.strategy: fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) inside the one loop.

For a model whose frozen base does not fit one GPU: every transformer block is its own FSDP
unit, so a rank holds 1/world of every block and all-gathers one block at a time inside the
forward and backward. Frozen and trainable (LoRA) parameters share a unit; FSDP2 keeps
`requires_grad` per parameter and reduce-scatters only the trainable gradients, averaged over
ranks exactly as DDP's all-reduce is (so the loop's loss scaling is the same for both).

What differs from DDP, and lives here as small hooks the loop and runner call:

- `shard`: the wrapping, with a bf16 MixedPrecisionPolicy when the run's precision is bf16,
  and the adapter's `generate` registered as a forward (it must all-gather the root unit too);
- `full_weights`: the trainable tensors gathered to rank 0 (a collective), from which rank 0
  writes trainable.safetensors and the standard PEFT adapter files of `best/` and checkpoints;
- `save_shards` / `load_shards`: the trainable weights and the optimizer state written by every
  rank with `torch.distributed.checkpoint` (one file per rank plus `.metadata`), loadable on
  any number of ranks;
- `eval_forwards` / `pad_forwards`: every rank runs the same number of evaluation forwards,
  since each forward all-gathers parameters together with the other ranks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.state import checkpoint_tensors
from visiontune.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

BLOCK_SUFFIXES = ("Layer", "Block")
"""Class-name endings of transformer blocks in transformers (ViTLayer, Qwen2DecoderLayer,
SamVisionLayer, Siglip2EncoderLayer, Qwen3VLVisionBlock...)."""

METADATA = ".metadata"
"""The file torch.distributed.checkpoint writes last, beside one `__<rank>_0.distcp` per rank."""


def sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: children of an `nn.ModuleList` whose class name ends in Layer or
    Block. A model keeps its repeated blocks in a ModuleList (encoder.layer, model.layers,
    visual.blocks), and sharding at that granularity is what bounds the memory of an
    all-gather to one block. The list is deepest first, as fully_shard needs nested units
    wrapped before the units that contain them."""
    found = [
        child
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        for child in module
        if type(child).__name__.endswith(BLOCK_SUFFIXES)
    ]
    return list(reversed(found))


def shard(adapter: nn.Module, cfg: Config) -> nn.Module:
    """`fully_shard` on every block, then on the adapter (the unit of everything else)."""
    units = blocks(adapter)
    if not units:
        raise ConfigError(
            [
                f"train.strategy: fsdp found no transformer blocks in "
                f"{cfg.model.name_or_path or 'the model'} (children of a ModuleList whose class "
                f"name ends in {' or '.join(BLOCK_SUFFIXES)}); use train.strategy: ddp"
            ]
        )
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if cfg.precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(adapter, mp_policy=policy)
    if hasattr(adapter, "generate"):  # evaluation of generative tasks calls it, not forward
        register_fsdp_forward_method(adapter, "generate")
    log.info(
        "FSDP2: %d blocks sharded over %d ranks, gathered in %s",
        len(units), dist.get_world_size(), policy.param_dtype or "the parameters' dtype",
    )  # fmt: skip
    return adapter


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP's `no_sync`: gradients of all but a window's last micro-batch stay unsharded and
    accumulate locally; the last one reduce-scatters the sum."""
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(sync)


def total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_ of sharded gradients returns a DTensor; its value is the full norm."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


# ---- weights and checkpoints -------------------------------------------------------------


def full_weights(adapter: nn.Module) -> dict[str, torch.Tensor] | None:
    """The checkpoint tensors (`state.checkpoint_tensors`: trainable parameters and their
    modules' buffers) gathered whole onto rank 0's CPU; every rank calls it. None without
    FSDP; an empty dict on the other ranks. Frozen parameters are never gathered: they are
    the part that does not fit."""
    if not sharded(adapter):
        return None
    wanted = set(checkpoint_tensors(adapter))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(adapter, options=options)
    return {name: tensor.contiguous() for name, tensor in state.items() if name in wanted}


def _options() -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=True)


def save_shards(adapter: nn.Module, optimizer: torch.optim.Optimizer, final: Path) -> Path | None:
    """Every rank writes its shard of the trainable weights and optimizer state into a staging
    directory beside `final`; returns it once every rank has finished (DCP's save ends with
    rank 0 writing `.metadata` after gathering every rank's write results). None without FSDP.

    The staging name is a `.tmp-` leftover to `checkpoint.clean_stale` and `prune`, so a save
    killed here leaves nothing that looks like a checkpoint. Rank 0 then moves the files into
    the checkpoint it writes with `write_atomically`, whose manifest, written last, lists every
    shard: a checkpoint missing a rank's shard fails `verify` like any damaged one.
    """
    if not sharded(adapter):
        return None
    name = [f"{ckpt.TMP_PREFIX}{final.name}-shards-{os.getpid()}-{time.time_ns()}"]
    dist.broadcast_object_list(name, src=0)
    staging = final.parent / name[0]
    model_state, optim_state = get_state_dict(adapter, optimizer, options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=staging)
    dist.barrier()
    return staging


def move_shards(staging: Path, directory: Path) -> None:
    """Rank 0, inside `write_atomically`'s fill: the shards into the checkpoint being written."""
    expected = {f"__{rank}_0.distcp" for rank in range(dist.get_world_size())} | {METADATA}
    present = {p.name for p in staging.iterdir()}
    if not expected <= present:
        raise TrainingError(
            f"{staging} lacks {sorted(expected - present)} after every rank saved its shard"
        )
    for path in staging.iterdir():
        path.rename(directory / path.name)
    staging.rmdir()


def has_shards(directory: Path) -> bool:
    return (directory / METADATA).is_file()


def load_shards(adapter: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Trainable weights and optimizer state from the shards of any number of ranks: DCP reads
    the slices this rank's shards cover from whichever files hold them."""
    if not has_shards(directory):
        raise TrainingError(
            f"{directory} was written by train.strategy: ddp (no {METADATA}); resume it with "
            "train.strategy: ddp"
        )
    model_state, optim_state = get_state_dict(adapter, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    # not strict: the frozen parameters are absent by design (dcp.load above already failed
    # on any trainable tensor the checkpoint lacks)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(
        adapter,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=options,
    )


def refuse_shards(directory: Path) -> None:
    """A sharded checkpoint resumed without FSDP: its optimizer state is not in optimizer.pt."""
    if has_shards(directory):
        raise TrainingError(
            f"{directory} was written by train.strategy: fsdp (sharded optimizer state); resume "
            "it with train.strategy: fsdp under torchrun or --nproc N (any N)"
        )


# ---- evaluation in lockstep ----------------------------------------------------------------


def eval_forwards(model: nn.Module, split_size: int, batch_size: int) -> int:
    """The number of evaluation forwards every rank runs: that of the largest shard (shards
    are contiguous slices, as `distributed.shard` cuts them). 0 without FSDP."""
    if not sharded(model):
        return 0
    world = dist.get_world_size()
    sizes = [split_size * (r + 1) // world - split_size * r // world for r in range(world)]
    if min(sizes) == 0:
        raise TrainingError(
            f"the eval split has {split_size} samples, fewer than the {world} ranks: every "
            "rank needs at least one under train.strategy: fsdp"
        )
    return max(-(-size // batch_size) for size in sizes)


def pad_forwards(count: int, batch: Any, forward: Callable[[Any], Any]) -> None:
    """`count` forwards of `batch` whose outputs are dropped: they take this rank's part in
    the other ranks' all-gathers (a shorter shard, or batches whose samples failed to load)."""
    if count and batch is None:
        raise TrainingError("no eval sample of this rank could be loaded under fsdp")
    for _ in range(count):
        forward(batch)
