"""The runner and the loop's host reads: what eval names, what a step reads back."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_config
from tests.engine.test_loop import start_loop
from visiontune import api


def test_eval_names_the_latest_checkpoint_when_best_is_missing_or_damaged(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    run = api.train(cfg).run_dir
    _, out = api.evaluate(run)
    assert out.name == "eval-val-best"
    assert json.loads((out / "metrics.json").read_text())["weights"] == "best (step 4)"

    (run / "best" / "trainable.safetensors").write_bytes(b"damaged")
    _, out = api.evaluate(run)
    record = json.loads((out / "metrics.json").read_text())
    assert out.name == "eval-val-step-00000004"
    assert record["weights"] == "latest checkpoint step-00000004 (no usable best/)"


class HostReads:
    """Counts tensor-to-host reads (`.item()`, `float()`, `int()`, `bool()`) made by visiontune's
    own code: on a GPU each one waits for everything queued before it. (AdamW's own reads of its
    step counters are of CPU tensors and are not counted.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("item", "__float__", "__int__", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            self.count += f"{os.sep}visiontune{os.sep}" in caller
            return original(tensor, *args)

        return read


def test_host_reads_per_optimizer_step_do_not_grow_with_accumulation(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = []
    for accumulation in (1, 4):
        cfg = tiny_config(
            image_data, tmp_path / str(accumulation),
            train={"micro_batch_size": 2, "grad_accum_steps": accumulation, "max_steps": 2},
        )  # fmt: skip
        loop = start_loop(cfg)
        loop.optimizer_step()  # warm-up: first-step work (lazy imports, caches) is not counted
        window = loop.next_window()  # decoding reads pixels on the host: not what is counted
        with monkeypatch.context() as patch:
            patch.setattr(loop, "next_window", lambda window=window: window)
            counter = HostReads(patch)
            loop.optimizer_step()
        reads.append(counter.count)
    # no read per micro-batch: a window of 4 costs what a window of 1 costs, and that is the
    # step's few numbers for the log (finite check, window count, loss, grad norm, ...)
    assert reads[0] == reads[1], reads
    assert 0 < reads[0] <= 6, reads
