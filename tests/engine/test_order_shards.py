"""Per-rank shards of the seeded data order, and the global batch a config resolves to."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from visiontune.cli import app
from visiontune.engine.order import DataOrder


def test_two_ranks_together_see_the_micro_batches_one_rank_sees_at_twice_the_size() -> None:
    indices = list(range(10, 33))  # 23 samples: batches of 8, 8 and a short one of 7
    one = DataOrder(indices, 8, seed=3)
    ranks = [DataOrder(indices, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == one.batches_per_epoch == 3
    for epoch in (0, 1):
        expected = list(one.epoch_batches(epoch))
        shards = [list(order.epoch_batches(epoch)) for order in ranks]
        assert [a + b for a, b in zip(*shards, strict=True)] == expected
        assert [len(b) for b in shards[1]] == [4, 4, 3]
        # resuming at micro-batch 2 hands each rank its slice of the third global batch
        assert [list(order.epoch_batches(epoch, 2)) for order in ranks] == [
            [expected[2][:4]],
            [expected[2][4:]],
        ]


def test_a_rank_with_nothing_left_in_the_short_last_batch_gets_zero_weight_padding() -> None:
    indices = list(range(9))  # global batches of 2 x 4 = 8: the last holds 1 sample
    rank1 = DataOrder(indices, 4, seed=0, rank=1, world_size=2)
    rank0 = DataOrder(indices, 4, seed=0, rank=0, world_size=2)
    last0, last1 = list(rank0.epoch_batches(0))[-1], list(rank1.epoch_batches(0))[-1]
    assert len(last0) == 1 and last1 == last0  # a real sample to run, at weight 0
    assert rank1.padded_batches(0) == {1} and rank0.padded_batches(0) == set()


def test_config_show_prints_the_global_batch_and_refuses_a_world_size_that_does_not_divide(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {config: {model_type: vit}}\ndata: {train: /x}\n"
        "train: {micro_batch_size: 4, max_steps: 1, global_batch_size: 32}\n"
    )
    shown = CliRunner().invoke(app, ["config", "show", str(config), "--nproc", "2"])
    assert shown.exit_code == 0, shown.output
    assert "grad_accum_steps: 4" in shown.output
    assert shown.output.strip().splitlines()[-1] == (
        "# global batch: micro_batch_size 4 x grad_accum_steps 4 x world size 2 = 32; "
        "train.global_batch_size=32 is held fixed: grad_accum_steps follows the world size"
    )
    refused = CliRunner().invoke(app, ["config", "show", str(config), "--nproc", "3"])
    assert refused.exit_code == 2
    assert "train.global_batch_size: 32 is not divisible by micro_batch_size 4 x world size 3" in (
        refused.output
    )
    assert "world sizes that divide it: [1, 2, 4, 8]" in refused.output


@pytest.mark.parametrize("world", [1, 2])
def test_without_a_global_batch_the_accumulation_is_held_and_the_batch_grows(
    tmp_path: Path, world: int
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {config: {model_type: vit}}\ndata: {train: /x}\n"
        "train: {micro_batch_size: 4, grad_accum_steps: 3, max_steps: 1}\n"
    )
    shown = CliRunner().invoke(app, ["config", "show", str(config), "--nproc", str(world)])
    assert f"x world size {world} = {12 * world}; grad_accum_steps is held fixed" in shown.output
