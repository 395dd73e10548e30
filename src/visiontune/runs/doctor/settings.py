"""Config smells: settings that are legal but rarely what a LoRA user meant."""

from __future__ import annotations

import math

from visiontune.runs.doctor.evidence import Evidence, Finding

ALPHA_RANK = (0.5, 4.0)  # PEFT and the LoRA paper's practice: alpha = rank .. 2 * rank
LORA_LR = (1e-5, 5e-3)  # pretrained bases; far outside it LoRA either stalls or blows up


def lora_scale(evidence: Evidence) -> list[Finding]:
    rule = "LoRA alpha/rank"
    cfg = evidence.cfg
    if cfg is None or not cfg.lora.enabled:
        return [Finding(rule, "not checked", "no LoRA in this run")]
    ratio = cfg.lora.alpha / cfg.lora.rank
    text = f"lora.rank {cfg.lora.rank}, lora.alpha {cfg.lora.alpha:g}: updates scaled by {ratio:g}"
    if not ALPHA_RANK[0] <= ratio <= ALPHA_RANK[1]:
        return [Finding(
            rule, "warn",
            f"alpha/rank = {ratio:g} (usual {ALPHA_RANK[0]:g}-{ALPHA_RANK[1]:g}): it multiplies "
            f"the effective lr; set lora.alpha to {2 * cfg.lora.rank} (2 x rank)", text,
        )]  # fmt: skip
    return [Finding(rule, "ok", f"alpha/rank = {ratio:g}", text)]


def lora_learning_rate(evidence: Evidence) -> list[Finding]:
    rule = "LoRA learning rate"
    cfg = evidence.cfg
    if cfg is None or not cfg.lora.enabled:
        return [Finding(rule, "not checked", "no LoRA in this run")]
    if cfg.model.config is not None:
        return [Finding(rule, "not checked", "a randomly initialised base (model.config): "
                        "the usual LoRA learning rates are for pretrained bases")]  # fmt: skip
    lr = cfg.optim.lr
    text = (
        f"optim.lr {lr:g}; LoRA on pretrained bases usually trains at {LORA_LR[0]:g}-{LORA_LR[1]:g}"
    )
    if not LORA_LR[0] <= lr <= LORA_LR[1]:
        return [Finding(rule, "warn", f"optim.lr {lr:g} is unusual for LoRA", text)]
    return [Finding(rule, "ok", f"optim.lr {lr:g} is in the usual LoRA range", text)]


def warmup_length(evidence: Evidence) -> list[Finding]:
    rule = "warm-up length"
    cfg, total = evidence.cfg, evidence.total_steps
    if cfg is None or total is None:
        return [Finding(rule, "not checked", "needs config.yaml and the run's length in steps")]
    schedule = cfg.schedule
    warmup = (
        math.ceil(schedule.warmup_ratio * total)
        if schedule.warmup_ratio is not None
        else schedule.warmup_steps
    )
    text = f"warm-up {warmup} of {total} optimizer steps"
    if warmup >= total:
        return [Finding(rule, "warn", "warm-up is longer than the run: the peak lr "
                        f"{cfg.optim.lr:g} is never reached", text)]  # fmt: skip
    if warmup > total / 2:
        return [Finding(rule, "warn", f"warm-up takes {warmup / total:.0%} of the run: most "
                        "steps train below the peak lr", text)]  # fmt: skip
    return [Finding(rule, "ok", f"warm-up {warmup / total:.0%} of the run", text)]
