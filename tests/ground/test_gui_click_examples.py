"""The real-model GUI-click examples load and say what their comments promise: the 8 GB ones
put a 4-bit base under fp32 LoRA with checkpointing, the SLURM one is the user's own setup.
Their memory figures are arithmetic from the architecture; the weight part is recomputed here
from a meta-device model of the same shape (no download, no allocation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText

from visiontune.config.load import load_config
from visiontune.config.schema import parse_duration

EXAMPLES = Path(__file__).parents[2] / "examples" / "gui_click"
GiB = 2**30


@pytest.fixture
def data(tiny_data: Path) -> list[str]:
    return [f"data.train={tiny_data / 'train.jsonl'}", f"data.val={tiny_data / 'val.jsonl'}"]


@pytest.mark.parametrize("name", ["gui_click_qwen3vl_4b_8gb", "gui_click_qwen25vl_3b"])
def test_8gb_examples_use_a_4bit_base(name: str, data: list[str]) -> None:
    cfg = load_config(EXAMPLES / f"{name}.yaml", data)
    quant = cfg.model.quantization
    assert quant is not None and quant.bits == 4 and quant.type == "nf4" and quant.double_quant
    assert quant.compute_dtype == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.lora.enabled and cfg.train.micro_batch_size == 1
    assert parse_duration(cfg.train.time_limit or "") < 8 * 3600


def test_qwen3vl_4b_example_caps_images_at_1024_tokens_of_32_px(data: list[str]) -> None:
    cfg = load_config(EXAMPLES / "gui_click_qwen3vl_4b_8gb.yaml", data)
    assert cfg.task.max_pixels == 1024 * 32 * 32
    assert cfg.optim.name == "adamw_8bit" and cfg.precision == "bf16"


def test_slurm_example_is_the_users_llamafactory_setup(data: list[str]) -> None:
    overrides = [data[0], "data.val=null"]
    cfg = load_config(EXAMPLES / "gui_click_qwen3vl_8b_slurm.yaml", overrides)
    assert cfg.model.name_or_path == "Qwen/Qwen3-VL-8B-Instruct" and cfg.model.quantization is None
    assert (cfg.lora.rank, cfg.lora.alpha) == (32, 64)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.epochs) == (4, 2, 1)
    assert cfg.checkpoint.every_steps == 200
    assert parse_duration(cfg.train.time_limit or "") < 8 * 3600


QWEN3_ROPE = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}


@pytest.mark.parametrize(
    ("text", "vision", "tied", "total", "four_bit_gib"),
    [
        # Qwen3-VL-4B: hidden 2560, 36 layers, MLP 9728; vision 24 x 1024
        ((2560, 36, 9728, 32), (24, 1024, 4096, [5, 11, 17]), True, 4.438e9, 2.68),
        # Qwen3-VL-8B: hidden 4096, 36 layers, MLP 12288; vision 27 x 1152
        ((4096, 36, 12288, 32), (27, 1152, 4304, [8, 16, 24]), False, 8.767e9, 5.94),
    ],
)
def test_the_examples_weight_arithmetic(
    text: tuple[int, int, int, int],
    vision: tuple[int, int, int, list[int]],
    tied: bool,
    total: float,
    four_bit_gib: float,
) -> None:
    """Parameter count and 4-bit weight memory as the example comments state them: Linear
    weights at 4.127 bits (NF4 plus double-quantized scales), everything else bf16."""
    hidden, layers, mlp, heads = text
    depth, width, vision_mlp, deepstack = vision
    config = AutoConfig.for_model(
        "qwen3_vl",
        tie_word_embeddings=tied,
        text_config={
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "intermediate_size": mlp,
            "num_attention_heads": heads,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": tied,
            "rope_parameters": {**QWEN3_ROPE, "rope_theta": 5e6},
        },
        vision_config={
            "depth": depth,
            "hidden_size": width,
            "intermediate_size": vision_mlp,
            "num_heads": 16,
            "out_hidden_size": hidden,
            "deepstack_visual_indexes": deepstack,
        },
    )
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.endswith("lm_head")
    )
    assert params == pytest.approx(total, rel=1e-3)
    weights = (linear * 4.127 / 8 + (params - linear) * 2) / GiB
    assert weights == pytest.approx(four_bit_gib, abs=0.01)
