"""The ground task on a tiny random Qwen2-VL: inputs, labels, loss, LoRA placement, limits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen2VLProcessor

from visiontune.config.schema import Config
from visiontune.data.images import decode_image
from visiontune.engine.runner import Runner
from visiontune.errors import ConfigError, DataError
from visiontune.models.coords import ResizedPixelCodec
from visiontune.models.lora import unwrap
from visiontune.models.qwen_vl import VisionChatProcessor
from visiontune.task import Skipped
from visiontune.tasks.ground import GroundTask

TINY_QWEN25_VL = {
    "model_type": "qwen2_5_vl",
    "image_token_id": 5,
    "video_token_id": 6,
    "vision_start_token_id": 3,
    "vision_end_token_id": 4,
    "text_config": {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]},
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
    "vision_config": {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "window_size": 56,
        "fullatt_block_indexes": [0],
    },
}


def _reference_processor(ours: VisionChatProcessor) -> Qwen2VLProcessor:
    """transformers' own Qwen2VLProcessor around the same tokenizer and image processor.

    Its constructor insists on a torchvision video processor, which cannot be installed here,
    so the instance is assembled attribute by attribute; its __call__ is the library's code.
    """
    ref = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    ref.tokenizer, ref.image_processor = ours.tokenizer, ours.image_processor
    ref.chat_template = ours.chat_template
    ref.image_token, ref.video_token = "<|image_pad|>", "<|video_pad|>"
    ref.image_token_id = ours.image_token_id
    ref.video_token_id = ours.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return ref


def test_inputs_match_transformers_processor(
    processor: VisionChatProcessor, tiny_data: Path
) -> None:
    images = [decode_image(tiny_data / "screens" / f"screen_{i}.png") for i in range(2)]
    images[1] = images[1].resize((60, 140))  # a second size: different token counts
    texts = [
        processor.render([{"role": "user", "content": "<image>click the red button"}], True),
        processor.render(
            [
                {"role": "user", "content": "<image>where?"},
                {"role": "assistant", "content": "(1,2)"},
            ]
        ),
    ]
    ours = processor(texts, [[images[0]], [images[1]]])
    theirs = _reference_processor(processor)(
        text=texts, images=images, padding=True, return_tensors="pt"
    )
    assert set(ours) == {
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
    }
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def _task(ground_config: Callable[..., Config], tmp_path: Path, *overrides: str) -> GroundTask:
    return GroundTask(ground_config(tmp_path, *overrides))


def test_labels_cover_only_the_answer_and_its_end(
    ground_config: Callable[..., Config], tmp_path: Path
) -> None:
    task = _task(ground_config, tmp_path)
    train = task.datasets().train
    batch = task.collate([train[0], train[1]])
    labels = batch.inputs["labels"]
    tokenizer = task.processor.tokenizer
    # screen_0's box is [43, 62, 63, 74] on a 112x84 screen: centre (53, 68);
    # Qwen2-VL answers round(53/112*1000) = 473, round(68/84*1000) = 810
    first = tokenizer.decode(batch.inputs["input_ids"][0][labels[0] != -100])
    assert first == "(473,810)<|im_end|>"
    for row in range(2):
        labelled = labels[row][labels[row] != -100]
        assert labelled[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert (labels[row][batch.inputs["attention_mask"][row] == 0] == -100).all()


def test_loss_sum_over_count_is_transformers_mean_loss(
    ground_config: Callable[..., Config], tmp_path: Path
) -> None:
    task = _task(ground_config, tmp_path)
    train = task.datasets().train
    model = task.adapter()
    batch = task.collate([train[i] for i in range(3)])
    out = task.loss(model(**batch.inputs), batch)
    labels = batch.inputs["labels"]
    assert out.count == int((labels != -100).sum())
    reference = unwrap(model.model)(**batch.inputs).loss  # HF: mean over label tokens
    assert (out.loss_sum / out.count).item() == pytest.approx(reference.item(), rel=1e-5)


def _conversations(tiny_data: Path, out: Path, answers: list[str]) -> Path:
    records = [
        {
            "messages": [
                {"role": "user", "content": "<image>click the red button"},
                {"role": "assistant", "content": answer},
            ],
            "images": [str(tiny_data / "screens" / f"screen_{i}.png")],
        }
        for i, answer in enumerate(answers)
    ]
    path = out / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_accumulation_window_normalises_over_all_answer_tokens(
    ground_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    """Two micro-batches with a short and a long answer: sum/total == one batch's mean."""
    answers = ["(7", "(123,456) ok (9)"]
    data = _conversations(tiny_data, tmp_path, answers)
    task = _task(
        ground_config, tmp_path, "data.format=conversations", f"data.train={data}", "data.val=null"
    )
    train = task.datasets().train
    model = task.adapter()
    params = [p for p in model.parameters() if p.requires_grad]
    small, large = task.collate([train[0]]), task.collate([train[1]])
    both = task.collate([train[0], train[1]])

    window = [task.loss(model(**micro.inputs), micro) for micro in (small, large)]
    total = sum(int(w.count) for w in window)
    tokenizer = task.processor.tokenizer
    answer_tokens = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers]
    assert [int(w.count) for w in window] == answer_tokens  # answer tokens + <|im_end|>
    assert answer_tokens[1] > 4 * answer_tokens[0]
    (sum(w.loss_sum for w in window) / total).backward()
    accumulated = [p.grad.clone() for p in params]
    windowed = sum(float(w.loss_sum) for w in window) / total
    mean_of_means = sum(float(w.loss_sum) / int(w.count) for w in window) / 2
    model.zero_grad()

    reference = unwrap(model.model)(**both.inputs).loss  # one batch, HF mean over its tokens
    reference.backward()
    assert windowed == pytest.approx(reference.item(), rel=1e-5)
    assert abs(mean_of_means - reference.item()) > 1e-3  # the bug this guards against
    for got, want in zip(accumulated, (p.grad for p in params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def _trainable(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_goes_on_the_language_model_and_vision_stays_frozen(
    ground_config: Callable[..., Config], tmp_path: Path
) -> None:
    model = _task(ground_config, tmp_path).adapter()
    trainable = _trainable(model)
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".visual." in n)

    projector = _task(ground_config, tmp_path, "task.train_projector=true").adapter()
    assert any(".visual.merger." in n and "modules_to_save" in n for n in _trainable(projector))

    vision = _task(ground_config, tmp_path, "task.freeze_vision=false").adapter()
    in_vision = [n for n in _trainable(vision) if ".visual." in n]
    assert in_vision and all("lora_" in n and ".merger." not in n for n in in_vision)


def test_full_finetune_still_freezes_vision(
    ground_config: Callable[..., Config], tmp_path: Path
) -> None:
    model = _task(ground_config, tmp_path, "lora.enabled=false").adapter()
    trainable = _trainable(model)
    assert any("language_model" in n for n in trainable)
    assert not any(".visual." in n for n in trainable)


def test_too_long_conversations_are_skipped_and_counted_or_refused(
    ground_config: Callable[..., Config], tmp_path: Path
) -> None:
    lengths = _task(ground_config, tmp_path).datasets().train.lengths
    limit = min(lengths)
    longer = sum(1 for n in lengths if n > limit)
    assert 0 < longer < len(lengths)
    task = _task(ground_config, tmp_path, f"task.max_length={limit}")
    train = task.datasets().train
    assert len(train) == len(lengths) - longer
    assert len(task.too_long_skipped["train"]) == longer
    strict = _task(ground_config, tmp_path, f"task.max_length={limit}", "task.too_long=error")
    with pytest.raises(DataError, match=f"longer than {limit} tokens after image expansion"):
        strict.datasets()


def test_click_accuracy_needs_boxes_to_score(
    ground_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    data = _conversations(tiny_data, tmp_path, ["(1,2)"])
    task = _task(
        ground_config,
        tmp_path,
        "data.format=conversations",
        f"data.train={data}",
        f"data.val={data}",
    )
    with pytest.raises(
        ConfigError, match="eval.metric: click_accuracy needs val samples with a `bbox`"
    ):
        task.datasets()


def test_qwen25_vl_answers_in_resized_pixels_and_trains(
    ground_config: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = ground_config(tmp_path)
    raw: dict[str, Any] = cfg.model_dump(mode="json")
    raw["model"]["config"] = TINY_QWEN25_VL
    task = GroundTask(Config.model_validate(raw))
    assert isinstance(task.codec, ResizedPixelCodec)
    train = task.datasets().train
    batch = task.collate([train[0], train[1]])
    labels = batch.inputs["labels"]
    # 112x84 is already a multiple of 28 inside [min, max] pixels: the centre (53, 68) stays
    answer = task.processor.tokenizer.decode(batch.inputs["input_ids"][0][labels[0] != -100])
    assert answer == "(53,68)<|im_end|>"
    model = task.adapter()
    out = task.loss(model(**batch.inputs), batch)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and out.count == int((labels != -100).sum())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients(
    ground_config: Callable[..., Config], tmp_path: Path
) -> None:
    grads = []
    for checkpointing in ("false", "true"):
        torch.manual_seed(0)
        task = _task(ground_config, tmp_path, f"model.gradient_checkpointing={checkpointing}")
        train = task.datasets().train
        model = task.adapter()
        model.train()
        batch = task.collate([train[0], train[1]])
        out = task.loss(model(**batch.inputs), batch)
        out.loss_sum.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert unwrap(model.model).is_gradient_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_examples_validate(tiny_data: Path) -> None:
    from visiontune.config.load import load_config

    examples = Path(__file__).parents[2] / "examples" / "gui_click"
    data = [f"data.train={tiny_data / 'train.jsonl'}", f"data.val={tiny_data / 'val.jsonl'}"]
    big = load_config(examples / "gui_click_qwen25vl_3b.yaml", data)
    assert big.task.type == "ground" and big.lora.rank == 16 and big.lora.targets == "all-linear"
    assert big.model.gradient_checkpointing and big.model.dtype == "bf16"
    assert big.precision == "auto" and big.eval.metric == "click_accuracy"
    assert big.task.max_pixels == 1280 * 28 * 28
    tiny = load_config(examples / "gui_click_tiny.yaml", data)
    assert tiny.model.config is not None and tiny.model.config["model_type"] == "qwen2_vl"


def test_predict_refuses_an_empty_instruction(
    ground_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    task = _task(ground_config, tmp_path)
    runner = Runner(task.cfg, task.adapter())
    image = str(tiny_data / "screens" / "screen_0.png")
    with pytest.raises(DataError, match="empty instruction"):
        runner.predict(task, [{"image": image, "text": "  "}], tmp_path)
    with pytest.raises(DataError, match="image file not found"):
        runner.predict(task, [{"image": str(tmp_path / "gone.png"), "text": "ok"}], tmp_path)


def test_a_template_without_chatml_markers_is_refused(processor: VisionChatProcessor) -> None:
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'][0]['text'] }}\n{% endfor %}"
    other = VisionChatProcessor(processor.tokenizer, processor.image_processor, plain, "X")
    with pytest.raises(ConfigError, match="does not use ChatML markers"):
        other.check_chatml()


def test_an_image_broken_after_the_check_is_a_counted_skip(
    ground_config: Callable[..., Config], tiny_data: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy, ignore=shutil.ignore_patterns("processor"))
    task = _task(ground_config, tmp_path, f"data.train={copy / 'train.jsonl'}", "data.val=null")
    train = task.datasets().train
    (copy / "screens" / "screen_1.png").write_bytes(b"truncated")
    skipped = train[1]
    assert isinstance(skipped, Skipped) and "screen_1.png" in skipped.reason
    batch = task.collate([train[0], skipped, train[2]])
    assert len(batch) == 2 and batch.skipped == [skipped]
    assert batch.inputs["input_ids"].shape[0] == 2
