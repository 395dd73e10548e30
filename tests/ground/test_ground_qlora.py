"""QLoRA on the ground task: a tiny random Qwen3-VL saved to disk, loaded with bitsandbytes in
4 or 8 bits on this CPU (bitsandbytes 0.50 runs its kernels there), LoRA adapters in fp32,
checkpointing that leaves the frozen vision tower out of autograd, the 8-bit optimizer, the
merged export (dequantized first) and the config errors before any weight is read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from visiontune import api
from visiontune.config.load import load_config
from visiontune.config.schema import Config, OptimConfig
from visiontune.engine.optim import build_optimizer
from visiontune.engine.runner import Runner
from visiontune.errors import ConfigError
from visiontune.export import export_merged
from visiontune.models.load import build_config
from visiontune.models.qwen_vl import VisionChatProcessor
from visiontune.tasks.ground import GroundTask

bnb = pytest.importorskip("bitsandbytes")

EXAMPLES = Path(__file__).parents[2] / "examples" / "gui_click"
QWEN3_YAML = EXAMPLES / "gui_click_qwen3vl_tiny.yaml"
FOUR_BIT = ["model.quantization.bits=4", "model.quantization.compute_dtype=bf16"]


@pytest.fixture(scope="module")
def qwen3_base(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """The tiny Qwen3-VL saved as a checkpoint directory, processor files beside it.

    Its vision width is raised from 32 to 64: bitsandbytes' CPU inference path packs 4-bit
    weights in blocks of 64 input features and fails on narrower layers (real models are far
    wider)."""
    cfg = load_config(QWEN3_YAML, [f"data.train={tiny_data / 'train.jsonl'}"])
    assert cfg.model.config is not None
    inline = {**cfg.model.config}
    inline["vision_config"] = {**inline["vision_config"], "hidden_size": 64}
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(build_config(inline))
    out = tmp_path_factory.mktemp("tiny_qwen3_vl")
    model.save_pretrained(str(out))
    processor = VisionChatProcessor.load(str(tiny_data / "processor_qwen3_vl"), 3136, 12544)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qlora_config(tiny_data: Path, qwen3_base: Path) -> Callable[..., Config]:
    def make(out: Path, *overrides: str) -> Config:
        paths = [
            f"data.train={tiny_data / 'train.jsonl'}",
            f"data.val={tiny_data / 'val.jsonl'}",
            "model.config=null",
            f"model.name_or_path={qwen3_base}",
            "task.processor=null",
            f"output_dir={out}",
            "train.device=cpu",
        ]
        return load_config(QWEN3_YAML, [*paths, *overrides])

    return make


def test_4bit_base_with_fp32_adapters_and_a_frozen_vision_tower(
    qlora_config: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = qlora_config(tmp_path, *FOUR_BIT, "model.gradient_checkpointing=true")
    task = GroundTask(cfg)
    runner = Runner(cfg, task.adapter())
    model = runner.adapter.model
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in quantized)
    assert all(n.startswith("base_model.model.lm_head") is False for n in quantized)
    four_bit = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
    assert four_bit.weight.quant_type == "nf4" and four_bit.compute_dtype == torch.bfloat16
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    patch_embed = next(m for n, m in model.named_modules() if n.endswith("visual.patch_embed"))
    seen: list[bool] = []
    hook = patch_embed.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    runner.train_mode()
    train = task.datasets().train
    batch = task.collate([train[0], train[1]])
    out = task.loss(runner.forward(batch), batch)
    hook.remove()
    assert seen == [False]
    out.loss_sum.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n and "language_model" in n for n in grads)


def test_8bit_base_loads_int8_linears(qlora_config: Callable[..., Config], tmp_path: Path) -> None:
    cfg = qlora_config(tmp_path, "model.quantization.bits=8")
    model = GroundTask(cfg).adapter().model
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    weight = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer")).weight
    assert weight.dtype == torch.int8


def test_qlora_trains_and_the_merged_export_is_dequantized_first(
    qlora_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run's logger owns the console (no propagation): what it says is read there."""
    cfg = qlora_config(
        tmp_path, *FOUR_BIT, "train.max_steps=6", "eval.every_steps=6", "optim.name=adamw_8bit"
    )
    result = api.train(cfg)
    assert result.summary["status"] == "completed"
    losses = [
        float(line.split('"loss": ')[1].split(",")[0])
        for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < losses[0]
    capsys.readouterr()
    out = export_merged(result.run_dir, tmp_path / "merged")
    assert "dequantizing it to torch.float32 before merging" in capsys.readouterr().out
    merged = load_file(str(out / "model.safetensors"))
    assert not any("absmax" in k or "quant_" in k for k in merged)  # a plain checkpoint
    # by hand: merged q_proj = dequantize_4bit(base) + B @ A * alpha / rank
    adapter = load_file(str(result.run_dir / "best" / "adapter_model.safetensors"))
    name = "model.language_model.layers.0.self_attn.q_proj"
    lora_a = adapter[f"base_model.model.{name}.lora_A.weight"]
    lora_b = adapter[f"base_model.model.{name}.lora_B.weight"]
    loaded = GroundTask(qlora_config(tmp_path / "again", *FOUR_BIT)).adapter().model
    base = next(m for n, m in loaded.named_modules() if n.endswith(name + ".base_layer"))
    dequant = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    expected = dequant.float() + (lora_b.float() @ lora_a.float()) * (32 / 16)
    got = merged[f"{name}.weight"].float()
    assert (lora_b.abs().sum() > 0) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_adamw_8bit_takes_the_adamw_first_step() -> None:
    """AdamW's first step is lr * g / (|g| + eps) (bias-corrected moments), a sign step in
    effect: bitsandbytes' 8-bit moments must give the same update to quantization error."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64)  # 8,192 weights: above bitsandbytes' 4,096 8-bit floor
    grad = torch.randn_like(layer.weight)
    before = layer.weight.detach().clone()
    optimizer = build_optimizer(layer, OptimConfig(name="adamw_8bit", lr=1e-2, weight_decay=0))
    assert type(optimizer).__name__ == "AdamW8bit"
    layer.weight.grad, layer.bias.grad = grad, torch.zeros_like(layer.bias)
    optimizer.step()
    assert optimizer.state[layer.weight]["state1"].dtype == torch.uint8
    expected = before - 1e-2 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.enabled=false"], "cannot be trained; enable lora"),
        (["train.device=mps"], "not on mps"),
    ],
)
def test_unusable_quantization_is_refused_before_loading(
    qlora_config: Callable[..., Config],
    tmp_path: Path,
    overrides: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = qlora_config(tmp_path, *FOUR_BIT, *overrides)
    loaded: list[str] = []
    monkeypatch.setattr(
        AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: loaded.append("x")
    )
    with pytest.raises(ConfigError, match=message):
        GroundTask(cfg).adapter()
    assert loaded == []


def test_quantization_config_errors(tiny_data: Path) -> None:
    data = [f"data.train={tiny_data / 'train.jsonl'}"]
    with pytest.raises(ConfigError, match="inline model.config has none"):
        load_config(QWEN3_YAML, [*data, "model.quantization.bits=4"])
    with pytest.raises(ConfigError, match="applies to bits: 4 only"):
        load_config(
            QWEN3_YAML,
            [
                *data,
                "model.config=null",
                "model.name_or_path=x",
                "model.quantization={bits: 8, type: fp4}",
            ],
        )


def test_adamw_8bit_state_survives_resume_bit_for_bit(tiny_data: Path, tmp_path: Path) -> None:
    """2 steps, stop, resume to 4 == 4 steps straight: the 8-bit moments and their scales are
    saved and restored (a reset optimizer would give different adapters)."""

    def run(out: Path, steps: int, resume: bool = False) -> Path:
        cfg = load_config(
            QWEN3_YAML,
            [
                f"data.train={tiny_data / 'train.jsonl'}",
                "data.val=null",
                "acceptance={}",
                f"task.processor={tiny_data / 'processor_qwen3_vl'}",
                f"output_dir={out}",
                f"train.max_steps={steps}",
                "optim.name=adamw_8bit",
                "checkpoint.every_steps=2",
                "eval.every_steps=null",
            ],
        )
        return api.train(cfg, resume=resume).run_dir

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, resume=True)
    want = load_file(str(straight / "checkpoints" / "step-00000004" / "adapter_model.safetensors"))
    got = load_file(str(resumed / "checkpoints" / "step-00000004" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_plan_measures_a_4bit_base_among_the_memory_savers(
    qlora_config: Callable[..., Config], tmp_path: Path
) -> None:
    from tests.conftest import tiny_config
    from visiontune.engine.plan.search import four_bit_note, memory_savers

    cfg = qlora_config(tmp_path)
    savers = dict(memory_savers(cfg))
    assert savers["4-bit base (QLoRA)"] == ["model.quantization.bits=4"]
    assert four_bit_note(cfg) is None
    four_bit = qlora_config(tmp_path, *savers["4-bit base (QLoRA)"])
    assert four_bit.model.quantization is not None and four_bit.model.quantization.bits == 4
    assert "4-bit base (QLoRA)" not in dict(memory_savers(four_bit))

    classify = tiny_config(tmp_path, tmp_path / "runs")
    assert "4-bit base (QLoRA)" not in dict(memory_savers(classify))
    assert "ground-task" in str(four_bit_note(classify))
