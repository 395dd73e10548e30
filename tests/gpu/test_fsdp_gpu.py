"""`train.strategy: fsdp` on one CUDA device in bf16 (`make gpu-test`): the bf16
MixedPrecisionPolicy (parameters gathered and computed in bf16, gradients reduced in fp32)
trains like fp32 within bf16 tolerance, and its `best/` loads in a single process.

Skipped without CUDA. NCCL needs one GPU per rank, so this runs 1 rank (`--nproc 1`); the
2-rank behaviour is covered on CPU with gloo in tests/engine/test_fsdp.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import make_imagefolder
from tests.engine.test_fsdp import finish, fsdp_config, launch
from visiontune import api
from visiontune.cli import app
from visiontune.runs.rundir import read_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_fsdp_in_bf16_on_one_gpu_trains_like_fp32(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "data/train", {"a": 8, "b": 8, "c": 8}, seed=0)
    make_imagefolder(tmp_path / "data/val", {"a": 4, "b": 4, "c": 3}, seed=1)
    bf16 = fsdp_config(tmp_path / "data", tmp_path / "bf16", micro=8).model_copy(
        update={"precision": "bf16"}
    )
    out = finish(launch(bf16, 1))
    assert "gathered in torch.bfloat16" in out, out[-3000:]
    fp32 = api.train(fsdp_config(tmp_path / "data", tmp_path / "fp32", micro=8, strategy="ddp"))
    for a, b in zip(read_jsonl(bf16.run_dir / "metrics.jsonl"),
                    read_jsonl(fp32.run_dir / "metrics.jsonl"), strict=True):  # fmt: skip
        assert a["loss"] == pytest.approx(b["loss"], rel=3e-2)
    evaluated = CliRunner().invoke(app, ["eval", str(bf16.run_dir)])
    assert evaluated.exit_code == 0, evaluated.output
