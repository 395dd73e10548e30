"""Qwen3-VL in the ground task: its processor (16 px patches, 2x2 merge), its 0..1000 grid, a
tiny random Qwen3-VL that overfits six screens, and the coordinate round trip of all three
Qwen families. The expected numbers are worked out by hand in each test."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from visiontune import api
from visiontune.config.load import load_config
from visiontune.config.schema import Config
from visiontune.engine.runner import Runner
from visiontune.errors import ConfigError
from visiontune.models.coords import Norm1000Codec, ResizedPixelCodec, make_codec, parse_answer
from visiontune.models.qwen_vl import VisionChatProcessor
from visiontune.tasks.ground import GroundTask

EXAMPLES = Path(__file__).parents[2] / "examples" / "gui_click"
QWEN3_YAML = EXAMPLES / "gui_click_qwen3vl_tiny.yaml"


@pytest.fixture(scope="module")
def qwen3_config(tiny_data: Path) -> Callable[..., Config]:
    def make(out: Path, *overrides: str) -> Config:
        paths = [
            f"data.train={tiny_data / 'train.jsonl'}",
            f"data.val={tiny_data / 'val.jsonl'}",
            f"task.processor={tiny_data / 'processor_qwen3_vl'}",
            f"output_dir={out}",
        ]
        return load_config(QWEN3_YAML, [*paths, *overrides])

    return make


def test_qwen3_processor_makes_32_pixel_tokens(tiny_data: Path) -> None:
    """A 112x84 screen at max_pixels 112*112: smart resize to multiples of 32 gives 128x96
    (12,288 px <= 12,544), i.e. 8x6 patches of 16 px and 4x3 = 12 merged tokens."""
    processor = VisionChatProcessor.load(
        str(tiny_data / "processor_qwen3_vl"), 56 * 56, 112 * 112, model_type="qwen3_vl"
    )
    assert processor.factor == 32 and processor.processor_class == "Qwen3VLProcessor"
    assert processor.image_tokens((112, 84)) == 12
    text = processor.render([{"role": "user", "content": "<image>click"}], True)
    assert not text.startswith("<|im_start|>system")  # Qwen3-VL adds no default system turn
    image = Image.open(tiny_data / "screens" / "screen_0.png").convert("RGB")
    inputs = processor([text], [[image]])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]]
    assert int(inputs["mm_token_type_ids"].sum()) == 12
    assert inputs["pixel_values"].shape == (48, 3 * 2 * 16 * 16)


def test_tiny_qwen3vl_overfits_to_full_click_accuracy(
    qwen3_config: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = qwen3_config(tmp_path, "train.max_steps=30", "eval.every_steps=30")
    result = api.train(cfg)
    last = result.summary["last_eval"]
    assert result.summary["status"] == "completed"
    assert last["click_accuracy"] == 1.0 and last["unparseable"] == 0.0
    assert last["outside_grid"] == 0.0
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").open()]
    assert losses[-1] < 0.1 * losses[0]


def test_qwen3_targets_are_written_on_the_0_to_1000_grid(
    qwen3_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    """The training answer of screen 0 is its bbox centre / size * 1000, rounded, by hand."""
    task = GroundTask(qwen3_config(tmp_path))
    sample = task.datasets().train.samples[0]
    record = json.loads((tiny_data / "train.jsonl").read_text().splitlines()[0])
    x1, y1, x2, y2 = record["bbox"]
    x = math.floor((x1 + x2) / 2 / 112 * 1000 + 0.5)
    y = math.floor((y1 + y2) / 2 / 84 * 1000 + 0.5)
    assert sample.text.endswith(f"<|im_start|>assistant\n({x},{y})<|im_end|>\n")
    assert isinstance(task.codec, Norm1000Codec) and task.codec.top == 1000


def test_answers_outside_the_grid_are_counted(
    qwen3_config: Callable[..., Config], tmp_path: Path
) -> None:
    task = GroundTask(qwen3_config(tmp_path))
    sample = {"sizes": [(112, 84)]}
    assert not task.outside_grid(sample, "(999,999)")
    assert not task.outside_grid(sample, "(1000,0)")  # 0..1000 accepted, as Qwen's docs say
    assert task.outside_grid(sample, "(1001,500)")
    assert task.outside_grid(sample, "(-3,500)")
    assert not task.outside_grid(sample, "no point")  # unparseable is counted elsewhere


@pytest.mark.parametrize(
    ("family", "top"), [("qwen2_vl", 999), ("qwen3_vl", 1000), ("qwen3_vl_moe", 1000)]
)
def test_norm1000_round_trip(family: str, top: int) -> None:
    codec = make_codec("norm1000", 56 * 56, 112 * 112, 32, family)
    size = (1920, 1080)
    assert codec.encode((1920, 1080), size) == (top, top)  # the bottom-right corner
    assert codec.encode((0, 0), size) == (0, 0)
    for point in [(0.0, 0.0), (960.0, 540.0), (1919.0, 1.0), (123.4, 1079.0)]:
        x, y = codec.decode(codec.encode(point, size), size)
        assert abs(x - point[0]) <= 1920 / 2000 and abs(y - point[1]) <= 1080 / 2000
    assert codec.in_range((1000, 1000), size) and not codec.in_range((1000.5, 0), size)


def test_resized_pixel_round_trip_for_qwen25vl() -> None:
    """1920x1080 at max_pixels 1280*28*28: smart resize (factor 28) keeps the aspect within
    the area: beta = sqrt(1920*1080 / 1003520) = 1.4337..., height floor(1080/beta/28)*28 = 728,
    width floor(1920/beta/28)*28 = 1316 (by hand)."""
    codec = ResizedPixelCodec(min_pixels=3136, max_pixels=1280 * 28 * 28)
    assert codec.resized_size((1920, 1080)) == (1316, 728)
    assert codec.encode((960, 540), (1920, 1080)) == (658, 364)
    for point in [(0.0, 0.0), (960.0, 540.0), (1919.0, 1079.0)]:
        x, y = codec.decode(codec.encode(point, (1920, 1080)), (1920, 1080))
        assert abs(x - point[0]) <= 1920 / 1316 / 2 + 1e-9
        assert abs(y - point[1]) <= 1080 / 728 / 2 + 1e-9


def test_both_documented_spellings_parse() -> None:
    assert parse_answer('{"point_2d": [999, 0]}') == (999.0, 0.0)
    assert parse_answer("(1000,1000)") == (1000.0, 1000.0)


def test_checkpointing_keeps_qwen3_vision_tower_and_deepstack_out_of_autograd(
    qwen3_config: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = qwen3_config(tmp_path, "model.gradient_checkpointing=true")
    task = GroundTask(cfg)
    train = task.datasets().train
    runner = Runner(cfg, task.adapter())
    modules = dict(runner.adapter.model.named_modules())
    watched = {
        key: next(m for n, m in modules.items() if n.endswith(f"visual.{key}"))
        for key in ("patch_embed", "merger", "deepstack_merger_list.0")
    }
    seen: dict[str, bool] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, i, o, key=key: seen.__setitem__(key, o.requires_grad)
        )
        for key, module in watched.items()
    ]
    runner.train_mode()
    batch = task.collate([train[0], train[1]])
    out = task.loss(runner.forward(batch), batch)
    for hook in hooks:
        hook.remove()
    assert seen == dict.fromkeys(watched, False)
    out.loss_sum.backward()
    trained = [n for n, p in runner.adapter.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n and "language_model" in n for n in trained)


def test_train_projector_trains_the_deepstack_mergers_too(
    qwen3_config: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = qwen3_config(tmp_path, "task.train_projector=true")
    model = GroundTask(cfg).adapter().model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert any("visual.merger.modules_to_save" in n for n in trainable)
    assert any("visual.deepstack_merger_list.0.modules_to_save" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_qwen35_goes_through_the_same_code_once_its_grid_is_named(
    qwen3_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Qwen3.5 (natively multimodal, hybrid linear attention) builds, trains and takes LoRA on
    both attention kinds through the same adapter; its coordinate grid is not documented where
    we could check it, so `task.coordinates` must be set."""
    cfg = qwen3_config(tmp_path)
    inline = {**(cfg.model.config or {}), "model_type": "qwen3_5"}
    inline["text_config"] = {**inline["text_config"], "num_hidden_layers": 4}
    inline["vision_config"] = {
        k: v for k, v in inline["vision_config"].items() if k != "deepstack_visual_indexes"
    }
    cfg.model.config = inline
    with pytest.raises(ConfigError, match="no default for model type 'qwen3_5'"):
        GroundTask(cfg).datasets()
    cfg.task.coordinates = "norm1000"
    task = GroundTask(cfg)
    train = task.datasets().train
    runner = Runner(cfg, task.adapter())
    lora = {n for n, _ in runner.adapter.model.named_parameters() if "lora_A" in n}
    assert any("linear_attn.in_proj_qkv" in n for n in lora)
    assert any("self_attn.q_proj" in n for n in lora)
    runner.train_mode()
    batch = task.collate([train[0], train[1]])
    out = task.loss(runner.forward(batch), batch)
    out.loss_sum.backward()
    assert out.count > 0 and torch.isfinite(out.loss_sum)
