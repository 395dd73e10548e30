"""One GPU, a few minutes (`make gpu-test`): every task's tiny model trained in bf16 and in
fp16 (GradScaler, fp16 base + LoRA + clipping), then evaluated and used for prediction through
the same precision policy, resumed exactly, and its peak memory printed.

Skipped without CUDA; CI has none. The figures printed here are what an issue note quotes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tests.segment.builders import TINY_YAML
from visiontune import api
from visiontune.config.load import dump_yaml, load_config
from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.state import WEIGHTS

DEVICE = os.environ.get("VISIONTUNE_TEST_DEVICE", "cuda")
"""`cpu` runs these same checks on a CPU (slowly), to try the path where no GPU is lent."""

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]

PRECISIONS = {
    "bf16": ["precision=bf16", "model.dtype=bf16"],
    "fp16": ["precision=fp16", "model.dtype=fp16"],
}


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with dotted overrides, through the same loader a config file goes through."""
    path = Path(str(cfg.output_dir)) / f"{cfg.name}-{len(overrides)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(cfg))
    return load_config(path, overrides)


def task_config(
    name: str, out: Path, image_data: Path, synthetic: Path, ground_config: Callable[..., Config]
) -> Config:
    common = [f"train.device={DEVICE}", "train.max_steps=4", "checkpoint.every_steps=2"]
    if name == "classify":
        base = tiny_config(image_data, out, train={"max_grad_norm": 1.0})
    elif name == "segment":
        data = [f"data.train={synthetic / 'train'}", f"data.val={synthetic / 'val'}"]
        base = load_config(TINY_YAML, [*data, f"output_dir={out}", "train.max_grad_norm=1.0"])
    else:
        base = ground_config(out, "train.max_grad_norm=1.0")
    return with_overrides(base, common)


def predict_inputs(name: str, cfg: Config) -> list[dict[str, str]]:
    val = Path(str(cfg.data.val))
    if name == "classify":
        return [{"image": str(next(val.rglob("*.png")))}]
    if name == "segment":
        return [{"image": str(val / "0000.png"), "text": "the red circle"}]
    sample = json.loads(val.read_text().splitlines()[0])
    return [{"image": str(val.parent / sample["image"]), "text": "click the button"}]


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", ["classify", "segment", "ground"])
def test_train_eval_predict_resume_on_one_gpu(
    name: str,
    precision: str,
    image_data: Path,
    synthetic: Path,
    ground_config: Callable[..., Config],
    tmp_path: Path,
) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    base = task_config(name, tmp_path / "straight", image_data, synthetic, ground_config)
    cfg = with_overrides(base, PRECISIONS[precision])
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    straight = api.train(cfg)
    assert straight.exit_code == 0 and straight.summary["status"] == "completed"
    assert straight.summary["updates_applied"] >= 1
    metrics, _ = api.evaluate(straight.run_dir)
    assert all(v == v for v in metrics.scalars.values())  # no NaN
    records = api.predict(straight.run_dir, predict_inputs(name, cfg), tmp_path / "predictions")
    assert len(records) == 1 and "error" not in records[0]

    split = with_overrides(cfg, [f"output_dir={tmp_path / 'split'}", "train.max_steps=2"])
    api.train(split)
    resumed = api.train(with_overrides(split, ["train.max_steps=4"]), resume=True)
    assert resumed.state.step == 4
    a = load_file(str(ckpt.latest_complete(straight.run_dir / "checkpoints") / WEIGHTS))
    b = load_file(str(ckpt.latest_complete(resumed.run_dir / "checkpoints") / WEIGHTS))
    # Atomic adds in CUDA backward kernels are not deterministic: equal to a stated tolerance.
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-3, atol=1e-5)
    peak = straight.summary["peak_memory_mb"]
    print(f"\n{name} {precision}: peak {peak:.1f} MB, eval {metrics.scalars}")
