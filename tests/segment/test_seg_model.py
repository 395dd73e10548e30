"""SAM and the text-prompted segmenter: prompts reach the decoder, [SEG] offset, LoRA layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.segment.builders import ROOT, segment_config, tiny_sam
from visiontune.errors import ConfigError
from visiontune.models.lora import unwrap
from visiontune.models.sam import SamAdapter
from visiontune.models.text_seg import TextSegAdapter
from visiontune.tasks.segment import SegmentTask

TOKENIZER = str(ROOT / "examples" / "tiny" / "tokenizer")
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64,
    "max_position_embeddings": 128,
}  # fmt: skip


def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (48, 32), (200, 30, 30)).save(path)
    return path


def text_task(tmp_path: Path, text_model: dict[str, Any], **task: Any) -> SegmentTask:
    cfg = segment_config(
        {"format": "reasonseg", "train": str(tmp_path)},
        {"prompt": "text", "text_model": text_model, **task},
    )
    return SegmentTask(cfg)


def mask_logits(task: SegmentTask, model: torch.nn.Module, path: Path, text: str) -> torch.Tensor:
    batch = task._predict_batch(0, {"image": str(path), "text": text})
    with torch.no_grad():
        return model(**batch.inputs)["mask_logits"]


def test_changing_the_text_changes_the_mask(tmp_path: Path, minilm_dir: Path) -> None:
    task = text_task(tmp_path, {"name_or_path": str(minilm_dir)})
    model = task.adapter().eval()
    path = image(tmp_path)
    red = mask_logits(task, model, path, "the red circle")
    again = mask_logits(task, model, path, "the red circle")
    square = mask_logits(task, model, path, "the blue square left of the triangle")
    assert torch.equal(red, again)
    # An untrained decoder's logits are small; the change must be large relative to them.
    assert (red - square).abs().max() > 0.05 * red.abs().max()


@pytest.mark.parametrize(("tower_size", "tokens"), [(32, 16), (48, 36)])
def test_seg_hidden_state_offset_counts_the_actual_visual_tokens(
    tmp_path: Path, tower_size: int, tokens: int
) -> None:
    tower = {
        "config": {
            "model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": tower_size,
            "patch_size": 8,
        }
    }  # fmt: skip
    task = text_task(tmp_path, {"config": TINY_LLAMA, "tokenizer": TOKENIZER}, vision_tower=tower)
    model = task.adapter().eval()
    assert isinstance(model, TextSegAdapter)
    batch = task._predict_batch(0, {"image": str(image(tmp_path)), "text": "the red circle"})
    seen: list[torch.Tensor] = []
    model.seg_projector.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = model(**batch.inputs)
        hidden, *_ = model._text_states(
            batch.inputs["input_ids"], batch.inputs["attention_mask"], None,
            batch.inputs["clip_pixel_values"],
        )  # fmt: skip
    assert out["visual_tokens"] == tokens  # CLS dropped: (size / patch)^2 patch tokens
    seg_index = int(batch.inputs["seg_index"][0])
    seg_id = task.queries.seg_id
    assert int(batch.inputs["input_ids"][0, seg_index]) == seg_id
    # A causal LM predicts [SEG] at the position before it, shifted by the visual tokens.
    assert torch.equal(seen[0][0], hidden[0, seg_index - 1 + tokens])


def test_answer_loss_equals_transformers_causal_lm_loss(tmp_path: Path) -> None:
    task = text_task(tmp_path, {"config": TINY_LLAMA, "tokenizer": TOKENIZER})
    model = task.adapter().eval()
    enc = task.queries.encode(["the red circle left of the square"], ["q"])
    with torch.no_grad():
        hidden, labels, mask, _ = model._text_states(
            enc["input_ids"], enc["attention_mask"], enc["labels"], None
        )
        ours = model._answer_loss(hidden, labels)
        lm = unwrap(model.text_model)
        reference = lm(input_ids=enc["input_ids"], attention_mask=mask, labels=enc["labels"]).loss
    assert ours.shape == (1,)
    assert float(ours[0]) == pytest.approx(float(reference), rel=1e-5)
    answer = enc["labels"][0][enc["labels"][0] != -100].tolist()
    assert task.queries.seg_id in answer  # [SEG] is among the supervised answer tokens


def test_long_query_is_truncated_with_a_named_warning(tmp_path: Path, caplog: Any) -> None:
    task = text_task(tmp_path, {"config": TINY_LLAMA, "tokenizer": TOKENIZER, "max_length": 12})
    with caplog.at_level(logging.WARNING):
        enc = task.queries.encode(["the red circle " * 10], ["sample-7"])
    assert enc["input_ids"].shape[1] == 12
    assert "sample-7: query of 30 tokens truncated" in caplog.text
    assert int(enc["input_ids"][0, int(enc["seg_index"][0])]) == task.queries.seg_id


def lora_task(tmp_path: Path, lora_on: list[str], **task: Any) -> SegmentTask:
    cfg = segment_config(
        {"format": "reasonseg", "train": str(tmp_path)},
        {"prompt": "box", "sam": {"lora_on": lora_on}, **task},
    )
    return SegmentTask(cfg)


def test_sam_lora_per_component_and_frozen_encoder_by_default(tmp_path: Path) -> None:
    model = lora_task(tmp_path, ["mask_decoder"]).adapter()
    assert isinstance(model, SamAdapter)
    rows = {row.component: row.trainable for row in model.trainable_rows()}
    assert rows["sam.image_encoder"] == 0 and rows["sam.mask_decoder"] > 0
    assert model.cache is not None  # frozen encoder: its embeddings are cached
    both = lora_task(tmp_path, ["image_encoder", "mask_decoder"], cache="auto").adapter()
    assert isinstance(both, SamAdapter)
    names = [n for n, p in both.named_parameters() if p.requires_grad]
    assert any("vision_encoder" in n and "qkv.lora_A" in n for n in names)
    assert any("mask_decoder" in n and "q_proj.lora_A" in n for n in names)
    assert both.cache is None  # a trainable encoder's output changes every step
    with pytest.raises(ConfigError, match="task.cache: memory needs a frozen SAM image encoder"):
        lora_task(tmp_path, ["image_encoder"], cache="memory").adapter()


def test_sam_loads_from_a_save_pretrained_directory(tmp_path: Path) -> None:
    built = lora_task(tmp_path, ["mask_decoder"]).adapter()
    assert isinstance(built, SamAdapter)
    built.sam.save_pretrained(tmp_path / "sam")
    cfg = segment_config(
        {"format": "reasonseg", "train": str(tmp_path)},
        {"prompt": "points"},
        model={"name_or_path": str(tmp_path / "sam")},
    )
    loaded = SegmentTask(cfg).adapter()
    assert isinstance(loaded, SamAdapter)
    before = built.sam.state_dict()
    after = loaded.sam.state_dict()
    key = "vision_encoder.layers.0.attn.qkv.weight"
    assert key in after and torch.equal(before[key], after[key])


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"prompt": "text"}, "prompt: text needs task.text_model"),
        ({"instances": "per_instance"}, "per_instance needs box or points prompts"),
        ({"cache": "disk"}, "cache: disk needs task.cache_dir"),
    ],
)
def test_inconsistent_segment_options_are_config_errors(task: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        segment_config({"format": "reasonseg", "train": "."}, task)


def test_tiny_sam_config_is_the_example_one() -> None:
    assert tiny_sam()["vision_config"]["image_size"] == 64
