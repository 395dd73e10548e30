"""What fits a memory budget: the largest micro-batch, and what makes micro-batch 1 fit.

Every answer is a measurement in its own process (`probe.measure`), never a rule of thumb:
the effective batch stays the config's (micro-batch x accumulation), so a smaller micro-batch
changes the memory and the speed, not the training.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from visiontune.config.schema import Config
from visiontune.engine.plan.probe import Probe, measure

Say = Callable[[str], None]


def divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def micro_batch_overrides(micro: int, effective: int) -> list[str]:
    return [f"train.micro_batch_size={micro}", f"train.grad_accum_steps={effective // micro}"]


def search_micro_batch(
    cfg: Config, steps: int, budget_mb: float, first: Probe, say: Say
) -> list[Probe]:
    """Micro-batches that divide the effective batch, doubling up from the configured one
    while it fits, or halving down to 1 while it does not; every one measured."""
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    sizes = divisors(effective)
    tried = [first]
    current = first
    going_up = first.fits
    while True:
        if going_up:
            bigger = [d for d in sizes if d >= 2 * current.micro_batch_size]
            nxt = bigger[0] if bigger else None
        else:
            smaller = [d for d in sizes if d <= current.micro_batch_size // 2]
            nxt = smaller[-1] if smaller else None
        if nxt is None:
            return tried
        say(f"measuring micro-batch {nxt} (accumulation {effective // nxt}) ...")
        current = measure(cfg, steps, micro_batch_overrides(nxt, effective), budget_mb)
        tried.append(current)
        if current.fits != going_up:
            return tried


def largest_fitting(tried: list[Probe]) -> Probe | None:
    fitting = [p for p in tried if p.fits]
    return max(fitting, key=lambda p: p.micro_batch_size) if fitting else None


def memory_savers(cfg: Config) -> list[tuple[str, list[str]]]:
    """The config changes that can lower memory for this config, each a list of overrides."""
    savers: list[tuple[str, list[str]]] = []
    if not cfg.model.gradient_checkpointing:
        savers.append(("gradient checkpointing", ["model.gradient_checkpointing=true"]))
    if cfg.precision != "bf16" or cfg.model.dtype != "bf16":
        savers.append(("bf16 base and autocast", ["precision=bf16", "model.dtype=bf16"]))
    task = cfg.task
    size = cfg.data.preprocess.size
    if task.type == "classify" and size is not None and size >= 32:
        savers.append((f"image size {size // 2}", [f"data.preprocess.size={size // 2}"]))
    if task.type == "ground":
        pixels = max(28 * 28, task.max_pixels // 2)
        changes = [f"task.max_pixels={pixels}", f"task.min_pixels={min(task.min_pixels, pixels)}"]
        savers.append((f"max_pixels {pixels}", changes))
        if not task.freeze_vision:
            savers.append(("freeze the vision tower", ["task.freeze_vision=true"]))
    if task.type == "segment" and task.vision_tower is not None:
        savers.append(("no CLIP vision tower", ["task.vision_tower=null"]))
    if four_bit_note(cfg) is None:
        savers.append(("4-bit base (QLoRA)", ["model.quantization.bits=4"]))
    return savers


def four_bit_note(cfg: Config) -> str | None:
    """Why a 4-bit base is not among the measured savers, or None when it is."""
    if cfg.model.quantization is not None:
        return None if cfg.model.quantization.bits == 8 else "4-bit base: already configured"
    if cfg.task.type != "ground" or cfg.model.config is not None:
        return (
            "4-bit base: not measured; model.quantization loads a pretrained ground-task "
            "(vision-language) base only"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        return "4-bit base: not measured; bitsandbytes is not installed (visiontune[quant])"
    return None


def what_makes_it_fit(
    cfg: Config, steps: int, budget_mb: float, say: Say
) -> list[tuple[str, Probe]]:
    """Each memory saver alone at micro-batch 1, then all of them together, measured."""
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    at_one = micro_batch_overrides(1, effective)
    savers = memory_savers(cfg)
    if len(savers) > 1:
        savers.append(("all of the above", [o for _, items in savers for o in items]))
    found = []
    for name, items in savers:
        say(f"measuring micro-batch 1 with {name} ...")
        found.append((name, measure(cfg, steps, [*at_one, *items], budget_mb)))
    return found


def compare(
    cfg: Config, steps: int, key: str, values: list[str], budget_mb: float | None, say: Say
) -> list[Probe]:
    """The same measurement at each value of one key (`lora.rank=16,32,64`)."""
    found = []
    for value in values:
        say(f"measuring {key}={value} ...")
        found.append(measure(cfg, steps, [f"{key}={value}"], budget_mb))
    return found
