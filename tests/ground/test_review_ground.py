"""Regressions for the engine review of c1fb70d on the ground task (tiny random Qwen2-VL):
checkpointing through a frozen vision tower, bf16 predict with a trained projector, the
distance metric with unparseable answers, and conversation answers in the wrong convention.

Each test fails on c1fb70d (see /work/shared/reviews/engine-review.md, the finding named in
its docstring).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from visiontune import api
from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.runner import Runner
from visiontune.engine.state import WEIGHTS
from visiontune.errors import DataError
from visiontune.runs.rundir import read_jsonl
from visiontune.tasks.ground import GroundTask

SQRT2 = math.sqrt(2)


def _records(tiny_data: Path, split: str = "train") -> list[dict[str, Any]]:
    lines = (tiny_data / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _size(tiny_data: Path, record: dict[str, Any]) -> tuple[int, int]:
    with Image.open(tiny_data / record["image"]) as image:
        return image.size


def _norm1000(value: float, extent: int) -> int:
    """Qwen2-VL's convention, by hand: round(value / extent * 1000), kept in 0..999."""
    return min(max(int(math.floor(value / extent * 1000 + 0.5)), 0), 999)


# ---- finding 3: gradient checkpointing must not make the frozen vision tower record autograd --


def test_checkpointing_keeps_the_frozen_vision_tower_out_of_autograd(
    ground_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Finding 3: enable_input_require_grads hooked the vision tower's patch embedding too."""
    cfg = ground_config(tmp_path, "model.gradient_checkpointing=true")
    task = GroundTask(cfg)
    train = task.datasets().train
    runner = Runner(cfg, task.adapter())
    model = runner.adapter.model
    assert model.get_base_model().is_activation_checkpointing
    modules = dict(model.named_modules())
    merger = next(m for n, m in modules.items() if n.endswith("visual.merger"))
    patch_embed = next(m for n, m in modules.items() if n.endswith("visual.patch_embed"))
    assert not any(p.requires_grad for p in merger.parameters())  # frozen by default
    seen: dict[str, bool] = {}
    hooks = [
        merger.register_forward_hook(lambda m, i, o: seen.__setitem__("merger", o.requires_grad)),
        patch_embed.register_forward_hook(
            lambda m, i, o: seen.__setitem__("patch_embed", o.requires_grad)
        ),
    ]
    runner.train_mode()
    batch = task.collate([train[0], train[1]])
    out = task.loss(runner.forward(batch), batch)
    for hook in hooks:
        hook.remove()
    assert seen == {"merger": False, "patch_embed": False}
    out.loss_sum.backward()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, _ in lora)
    assert all(p.grad is not None for _, p in lora)
    lora_b = [p.grad for n, p in lora if "lora_B" in n]
    assert lora_b and all(float(g.abs().sum()) > 0 for g in lora_b)


# ---- finding 2 (ground): bf16 base, fp32 projector copy, predict under autocast -------------


def test_predict_with_a_trained_projector_on_a_bf16_base(
    ground_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    """Finding 2: without autocast the bf16 vision features met the fp32 merger copy."""
    cfg = ground_config(
        tmp_path / "runs",
        "task.train_projector=true",
        "model.dtype=bf16",
        "precision=auto",
        "train.max_steps=1",
        "eval.every_steps=null",
        "acceptance={}",
    )
    result = api.train(cfg)
    assert result.exit_code == 0 and result.state.step == 1
    latest = ckpt.latest_complete(result.run_dir / "checkpoints")
    assert latest is not None
    saved = load_file(str(latest / WEIGHTS))
    merger = [k for k in saved if "merger" in k]
    assert merger and all("modules_to_save" in k for k in merger)  # the projector trains
    assert all(saved[k].dtype == torch.float32 for k in merger)

    records = _records(tiny_data, "val")
    inputs = [{"image": str(tiny_data / r["image"]), "text": r["instruction"]} for r in records]
    out = api.predict(result.run_dir, inputs, tmp_path / "pred")
    assert [r["image"] for r in out] == [i["image"] for i in inputs]
    assert [r["text"] for r in out] == [i["text"] for i in inputs]
    for record, given in zip(out, records, strict=True):
        assert isinstance(record["answer"], str)
        assert Path(record["picture"]).is_file()
        if record["point"] is not None:
            width, height = _size(tiny_data, given)
            assert 0 <= record["x"] <= width and 0 <= record["y"] <= height


# ---- finding 7: eval.metric distance survives evaluations where nothing parses -------------


def _point_data(tiny_data: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        lines = []
        for record in _records(tiny_data, split):
            x1, y1, x2, y2 = record.pop("bbox")
            record["point"] = [(x1 + x2) / 2, (y1 + y2) / 2]
            record["image"] = str((tiny_data / record["image"]).resolve())
            lines.append(json.dumps(record) + "\n")
        (out / f"{split}.jsonl").write_text("".join(lines))
    return out


def test_distance_metric_scores_unparseable_answers_at_the_worst_distance(
    ground_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    """Finding 7: `distance` was missing when no answer parsed, and the run died."""
    points = _point_data(tiny_data, tmp_path / "points")
    cfg = ground_config(
        tmp_path / "runs",
        f"data.train={points / 'train.jsonl'}",
        f"data.val={points / 'val.jsonl'}",
        "eval.metric=distance",
        "eval.every_steps=1",
        "train.max_steps=2",
        "task.max_new_tokens=1",  # one token cannot hold "(x,y)": every answer is unparseable
        "acceptance={}",
    )
    result = api.train(cfg)
    assert result.exit_code == 0 and result.summary["status"] == "completed"
    evals = read_jsonl(result.run_dir / "eval.jsonl")
    samples = len(_records(tiny_data, "val"))
    assert [r["step"] for r in evals] == [1, 2]
    for record in evals:
        assert record["samples"] == samples and record["unparseable"] == samples
        assert record["distance"] == pytest.approx(SQRT2, abs=1e-9)
    resolved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert resolved["eval"]["metric"] == "distance" and resolved["eval"]["mode"] == "min"


# ---- finding 18: conversation answers must use the model's coordinate convention ------------


def _conversations(
    tiny_data: Path, path: Path, answer: Callable[[dict[str, Any]], str], with_bbox: bool
) -> Path:
    rows = []
    for record in _records(tiny_data):
        row: dict[str, Any] = {
            "id": record["id"],
            "messages": [
                {"role": "user", "content": "<image>" + record["instruction"]},
                {"role": "assistant", "content": answer(record)},
            ],
            "images": [str((tiny_data / record["image"]).resolve())],
        }
        if with_bbox:
            row["bbox"] = record["bbox"]
        rows.append(json.dumps(row) + "\n")
    path.write_text("".join(rows))
    return path


def _centre(record: dict[str, Any]) -> tuple[float, float]:
    x1, y1, x2, y2 = record["bbox"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def _norm_answer(tiny_data: Path) -> Callable[[dict[str, Any]], str]:
    def answer(record: dict[str, Any]) -> str:
        (x, y), (width, height) = _centre(record), _size(tiny_data, record)
        return f"({_norm1000(x, width)},{_norm1000(y, height)})"

    return answer


def _conversation_task(
    ground_config: Callable[..., Config], tmp_path: Path, data: Path, *overrides: str
) -> GroundTask:
    cfg = ground_config(
        tmp_path / "runs",
        "data.format=conversations",
        f"data.train={data}",
        f"data.val={data}",
        *overrides,
    )
    return GroundTask(cfg)


def test_conversation_answers_in_screenshot_pixels_are_refused_with_the_expected_point(
    ground_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    """Finding 18: pixel answers trained one convention and were scored in another."""

    def pixels(record: dict[str, Any]) -> str:
        x, y = _centre(record)
        return f"({round(x)},{round(y)})"

    data = _conversations(tiny_data, tmp_path / "pixels.jsonl", pixels, with_bbox=True)
    task = _conversation_task(ground_config, tmp_path, data)
    with pytest.raises(DataError) as caught:
        task.datasets()
    message = str(caught.value)
    records = _records(tiny_data)
    assert f"{len(records)} answer(s) disagree with the norm1000 coordinates" in message
    for record in records:
        width, height = _size(tiny_data, record)
        x1, y1, x2, y2 = record["bbox"]
        low = (_norm1000(x1, width), _norm1000(y1, height))
        high = (_norm1000(x2, width), _norm1000(y2, height))
        line = next(line for line in message.splitlines() if f"(id {record['id']})" in line)
        assert f"expected a point in ({low[0]}, {low[1]})..({high[0]}, {high[1]})" in line
        assert "image pixels" in line


def test_conversation_answers_in_the_models_convention_pass(
    ground_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    data = _conversations(
        tiny_data, tmp_path / "norm.jsonl", _norm_answer(tiny_data), with_bbox=True
    )
    splits = _conversation_task(ground_config, tmp_path, data).datasets()
    assert len(splits.train) == len(_records(tiny_data))


def test_answer_only_conversations_get_a_target_and_a_distance(
    ground_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    """Finding 18: an answer-only conversation had no target, so it was never scored."""
    data = _conversations(
        tiny_data, tmp_path / "answers.jsonl", _norm_answer(tiny_data), with_bbox=False
    )
    task = _conversation_task(ground_config, tmp_path, data, "eval.metric=distance")
    val = task.datasets().val
    records = _records(tiny_data)
    assert val is not None and len(val) == len(records)
    targets = {}
    for i, record in enumerate(records):
        sample = val[i]
        width, height = _size(tiny_data, record)
        x, y = _centre(record)
        # The answer's norm1000 point mapped back to pixels: value * size / 1000.
        want = (_norm1000(x, width) * width / 1000, _norm1000(y, height) * height / 1000)
        assert sample["target"] is not None and sample["target"].box is None
        assert sample["target"].point == pytest.approx(want)
        targets[sample["id"]] = (want, (width, height))

    metrics = Runner(task.cfg, task.adapter()).evaluate(task, val)
    assert metrics.scalars["samples"] == len(records)
    answers = metrics.tables["answers"]
    assert sorted(a["id"] for a in answers) == sorted(targets)
    distances = []
    for answer in answers:
        (tx, ty), (width, height) = targets[answer["id"]]
        point = answer["point"]
        inside = point is not None and 0 <= point[0] <= width and 0 <= point[1] <= height
        distances.append(
            math.hypot((point[0] - tx) / width, (point[1] - ty) / height) if inside else SQRT2
        )
    assert metrics.scalars["distance"] == pytest.approx(sum(distances) / len(distances))
