"""`visiontune config import-llamafactory` on LLaMA-Factory's own Qwen2-VL LoRA SFT example and
the `mllm_demo` entry of its dataset_info.json (copied into tests/config/data/llamafactory)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from visiontune.cli import app
from visiontune.config.llamafactory import import_llamafactory
from visiontune.config.load import load_config
from visiontune.errors import ConfigError

FIXTURES = Path(__file__).parent / "data" / "llamafactory"
EXAMPLE = FIXTURES / "qwen2vl_lora_sft.yaml"
INFO = FIXTURES / "dataset_info.json"
MAPPED = {
    "model_name_or_path", "image_max_pixels", "trust_remote_code", "finetuning_type",
    "lora_rank", "lora_target", "dataset", "template", "cutoff_len", "max_samples",
    "dataloader_num_workers", "output_dir", "logging_steps", "save_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "num_train_epochs", "lr_scheduler_type", "warmup_ratio", "bf16",
}  # fmt: skip


def test_the_qwen2vl_lora_sft_example_maps_onto_the_ground_task() -> None:
    imported = import_llamafactory(EXAMPLE, INFO)
    cfg = imported.config
    assert cfg["model"] == {
        "name_or_path": "Qwen/Qwen2-VL-7B-Instruct",
        "trust_remote_code": True,
        "gradient_checkpointing": True,  # LLaMA-Factory's default
        "dtype": "bf16",
    }
    assert cfg["lora"] == {"enabled": True, "rank": 8, "alpha": 16, "targets": "all-linear"}
    assert cfg["data"] == {
        "format": "conversations",
        "train": str(FIXTURES / "mllm_demo.json"),
        "num_workers": 4,
    }
    assert cfg["task"] == {"type": "ground", "max_pixels": 262144, "max_length": 2048}
    assert cfg["train"] == {
        "max_samples": 1000,
        "micro_batch_size": 1,
        "grad_accum_steps": 8,
        "epochs": 3.0,
        "log_every": 10,
    }
    assert cfg["optim"]["lr"] == 1.0e-4
    assert cfg["schedule"] == {"type": "cosine", "warmup_ratio": 0.1}
    assert cfg["checkpoint"] == {"every_steps": 500} and cfg["precision"] == "bf16"
    assert (cfg["output_dir"], cfg["name"]) == ("saves/qwen2_vl-7b/lora", "sft")


def test_every_key_is_either_mapped_or_listed_with_a_reason() -> None:
    imported = import_llamafactory(EXAMPLE, INFO)
    keys = set(yaml.safe_load(EXAMPLE.read_text()))
    listed = {k for k in imported.unmapped if not k.startswith("dataset: ")}
    assert listed == keys - MAPPED
    assert all(reason for reason in imported.unmapped.values())
    # the two text-only datasets next to mllm_demo are named, with why they were left out
    assert "no `images` column" not in imported.unmapped["dataset: identity"]
    assert "alpaca" in imported.unmapped["dataset: identity"]
    assert "alpaca" in imported.unmapped["dataset: alpaca_en_demo"]


def test_the_written_config_loads_in_visiontune(tmp_path: Path) -> None:
    out = tmp_path / "imported.yaml"
    command = ["config", "import-llamafactory", str(EXAMPLE), "--dataset-info", str(INFO)]
    result = CliRunner().invoke(app, [*command, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "not mapped: ddp_timeout" in result.output
    text = out.read_text()
    assert text.startswith("# Imported from the LLaMA-Factory config")
    assert "#   overwrite_output_dir: visiontune never overwrites a run" in text
    cfg = load_config(out)
    assert cfg.task.type == "ground" and cfg.lora.rank == 8 and cfg.train.grad_accum_steps == 8
    again = CliRunner().invoke(app, [*command, "-o", str(out)])
    assert again.exit_code == 1 and "exists" in again.output
    assert out.read_text() == text


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("template", "llava", "'llava' is not a Qwen-VL template"),
        ("dataset", "mllm_demo,my_clicks", "'my_clicks' is not in dataset_info.json"),
    ],
)
def test_unknown_template_or_dataset_is_named(
    tmp_path: Path, key: str, value: str, named: str
) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw[key] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=named):
        import_llamafactory(bad, INFO)
    result = CliRunner().invoke(
        app, ["config", "import-llamafactory", str(bad), "--dataset-info", str(INFO)]
    )
    assert result.exit_code == 2 and named in result.output


def test_dataset_info_defaults_to_dataset_dir(tmp_path: Path) -> None:
    shutil.copy(INFO, tmp_path / "dataset_info.json")
    raw = {**yaml.safe_load(EXAMPLE.read_text()), "dataset_dir": str(tmp_path)}
    config = tmp_path / "lf.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert import_llamafactory(config).config["data"]["train"] == str(tmp_path / "mllm_demo.json")
    raw["dataset_dir"] = str(tmp_path / "nowhere")
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="pass --dataset-info"):
        import_llamafactory(config)
