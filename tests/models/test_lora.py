"""LoRA targets come from the model's own module names; the trainable report is honest."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModelForImageClassification

from tests.conftest import TINY_VIT
from visiontune.config.schema import LoraConfig
from visiontune.errors import ConfigError
from visiontune.models.lora import (
    apply_lora,
    check_trainable_share,
    resolve_targets,
    trainable_report,
)


def tiny_vit():
    return AutoModelForImageClassification.from_config(
        AutoConfig.for_model(**TINY_VIT, num_labels=3)
    )


def test_presets_resolve_against_transformers_5_vit_names() -> None:
    model = tiny_vit()
    qv = resolve_targets(model, "qv")
    assert qv == [f"vit.layers.{i}.attention.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert len(resolve_targets(model, "attention")) == 8  # q, k, v, o in two layers
    assert "classifier" in resolve_targets(model, "all-linear")
    assert "classifier" not in resolve_targets(model, "all-linear", exclude=("classifier",))
    assert resolve_targets(model, "re:layers\\.1\\..*fc1") == ["vit.layers.1.mlp.fc1"]
    with pytest.raises(ConfigError, match=r"matches no Linear layer.*'q_proj'"):
        resolve_targets(model, ["query", "value"])  # the transformers 4.x names
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_targets(model, "everything")


def test_report_counts_the_trained_head_once_and_warns_when_implausible() -> None:
    model = apply_lora(tiny_vit(), LoraConfig(rank=2, targets="qv"), heads=["classifier"])
    rows = {r.component: r for r in trainable_report(model)}
    assert rows["classifier"].trainable == rows["classifier"].total == 32 * 3 + 3
    lora_params = 4 * 2 * (32 + 32)  # four adapted layers, rank 2, A and B of a 32x32 layer
    assert rows["vit"].trainable == lora_params
    assert check_trainable_share(list(rows.values()), lora_enabled=True) is None

    most = ["vit.embeddings", "vit.layers.0"]
    whole = apply_lora(tiny_vit(), LoraConfig(rank=2, targets="qv", modules_to_save=most), [])
    warning = check_trainable_share(trainable_report(whole), lora_enabled=True, min_params=0)
    assert warning is not None and "implausible for LoRA" in warning
    # a tiny demo model is exempt: at a few thousand parameters the share means nothing
    assert check_trainable_share(trainable_report(whole), lora_enabled=True) is None

    frozen = tiny_vit().requires_grad_(False)
    assert "no parameter is trainable" in check_trainable_share(trainable_report(frozen), True)
