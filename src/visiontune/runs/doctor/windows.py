"""Which samples an optimizer step trained on, rebuilt from the seed: the data order is a
function of (seed, epoch, micro-batch size), so a spike can be traced to its samples without
the loop logging every id."""

from __future__ import annotations

from visiontune.runs.doctor.evidence import Evidence

SHOWN = 8


def window_samples(evidence: Evidence, step: int) -> list[str] | None:
    """Sample ids of optimizer step `step` (1-based), or None where the order cannot be
    rebuilt (no config or data, or a run resumed with other settings)."""
    cfg, splits, per_epoch = evidence.cfg, evidence.splits, evidence.updates_per_epoch
    keys = getattr(splits.train, "keys", None) if splits is not None else None
    if cfg is None or keys is None or per_epoch is None:
        return None
    from visiontune.engine.loop import train_indices
    from visiontune.engine.order import DataOrder

    train = cfg.train
    lengths = getattr(splits.train, "lengths", None) if train.group_by_length else None
    order = DataOrder(
        train_indices(len(splits.train), train.max_samples, train.seed),
        train.micro_batch_size, train.seed, train.overfit_batches,
        lengths=list(lengths) if lengths is not None else None,
    )  # fmt: skip
    epoch, update = divmod(step - 1, per_epoch)
    first = update * train.grad_accum_steps
    batches = list(order.epoch_batches(epoch, first))[: train.grad_accum_steps]
    ids = [str(keys[i]) for batch in batches for i in batch]
    return ids[:SHOWN] + ([f"... {len(ids) - SHOWN} more"] if len(ids) > SHOWN else [])
