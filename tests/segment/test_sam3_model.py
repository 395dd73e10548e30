"""The SAM 3 adapter: LoRA per component, trainable report, frozen-trunk cache, gated repos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from visiontune import api
from visiontune.config.load import load_config
from visiontune.errors import ConfigError
from visiontune.models.load import access_problem
from visiontune.models.sam3 import Sam3Adapter, load_sam3
from visiontune.tasks.segment_sam3 import Sam3SegmentTask

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/tiny/crack_sam3_tiny.yaml"


def tiny(*overrides: str):  # noqa: ANN201  (a Config)
    return load_config(TINY, ["data.train=.", *overrides])


def rows(adapter: Sam3Adapter) -> dict[str, tuple[int, int]]:
    return {r.component: (r.trainable, r.total) for r in adapter.trainable_rows()}


def test_segment_with_a_sam3_model_is_the_sam3_task() -> None:
    cfg = tiny()
    assert isinstance(api.make_task(cfg), Sam3SegmentTask)
    assert cfg.eval.metric == "map_50"


def test_lora_lands_only_in_the_listed_components() -> None:
    cfg = tiny(
        "lora.targets=attention",
        "task.sam3.lora_on=[detr_encoder, detr_decoder, mask_decoder]",
        "task.sam3.train_fully=[dot_product_scoring, text_projection]",
    )
    adapter = Sam3Adapter(cfg, "off", None)
    report = rows(adapter)
    for frozen in ("vision_encoder", "text_encoder", "geometry_encoder"):
        assert report[f"sam3.{frozen}"][0] == 0, frozen
    for tuned in ("detr_encoder", "detr_decoder", "mask_decoder"):
        assert 0 < report[f"sam3.{tuned}"][0] < report[f"sam3.{tuned}"][1], tuned
    for full in ("dot_product_scoring", "text_projection"):
        assert report[f"sam3.{full}"][0] == report[f"sam3.{full}"][1], full
    lora_layers = [n for n, _ in adapter.sam3.named_modules() if n.endswith("lora_A")]
    prefixes = ("detr_encoder.", "detr_decoder.", "mask_decoder.")
    assert lora_layers and all(n.startswith(prefixes) for n in lora_layers)


def test_vision_lora_and_per_component_targets() -> None:
    cfg = tiny(
        "task.sam3.lora_on=[vision_encoder, mask_decoder]",
        "task.sam3.train_fully=[]",
        "task.sam3.targets={vision_encoder: qv}",
    )
    adapter = Sam3Adapter(cfg, "auto", None)
    vision = [
        n
        for n, _ in adapter.sam3.named_modules()
        if n.startswith("vision_encoder") and n.endswith("lora_A")
    ]
    leaves = {n.split(".")[-2] for n in vision}
    assert leaves == {"q_proj", "v_proj"}
    assert adapter.cache is None  # a trainable vision encoder is never cached


def test_cached_trunk_gives_the_same_outputs_and_is_reused() -> None:
    adapter = Sam3Adapter(tiny(), "memory", None).eval()
    pixels = torch.randn(2, 3, 112, 112)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        plain = adapter(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        first = adapter(
            pixel_values=pixels, input_ids=ids, attention_mask=mask, cache_keys=["a", "b"]
        )
        again = adapter(
            pixel_values=pixels, input_ids=ids, attention_mask=mask, cache_keys=["a", "b"]
        )
    assert adapter.cache is not None and adapter.cache.misses == 2 and adapter.cache.hits == 2
    for name in ("pred_masks", "pred_boxes", "pred_logits", "presence_logits"):
        assert torch.allclose(plain[name], first[name], atol=1e-5)
        assert torch.equal(first[name], again[name])
    assert plain["pred_masks"].shape == (2, 16, 32, 32)


def test_a_gated_repo_without_access_names_the_repo_and_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(
            "You are trying to access a gated repo.\nMake sure to have access to it at "
            "https://huggingface.co/facebook/sam3.\n401 Client Error."
        )

    monkeypatch.setattr(AutoModel, "from_pretrained", refuse)
    cfg = load_config(
        TINY, ["data.train=.", "model.config=null", "model.name_or_path=facebook/sam3"]
    )
    with pytest.raises(ConfigError) as caught:
        load_sam3(cfg)
    text = str(caught.value)
    assert "'facebook/sam3' is a gated repository" in text and "HF_TOKEN" in text
    assert "https://huggingface.co/facebook/sam3" in text
    assert "cannot load 'x'" in access_problem("x", OSError("no such directory"))


@pytest.mark.parametrize(
    ("name", "vision_lora", "rank", "micro_batch"),
    [("crack_sam3_lora.yaml", True, 32, 1), ("crack_sam3_lora_light.yaml", False, 16, 2)],
)
def test_example_configs_are_the_issue_setups(
    name: str, vision_lora: bool, rank: int, micro_batch: int
) -> None:
    cfg = load_config(ROOT / "examples" / name)
    assert cfg.model.name_or_path == "facebook/sam3"
    assert cfg.eval.metric == "map_50"
    assert ("vision_encoder" in cfg.task.sam3.lora_on) is vision_lora
    assert (cfg.lora.rank, cfg.train.micro_batch_size) == (rank, micro_batch)
