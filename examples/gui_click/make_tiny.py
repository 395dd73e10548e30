"""Write the tiny click-grounding example: a processor built locally and synthetic screens.

No download: the tokenizer is a small byte-level BPE trained here (digits split one per token,
as Qwen's are) with Qwen2-VL's special tokens and chat template, the image processor is
transformers' Qwen2-VL one with tiny min/max pixels, and each "screenshot" is a light canvas
with three coloured buttons, one of which an instruction names. Writes, under OUT:

    processor/            tokenizer, image processor, chat template (AutoTokenizer-loadable)
    processor_qwen3_vl/   the same for Qwen3-VL (16 px patches, its chat template)
    screens/*.png         the screenshots
    train.jsonl           grounding records: image, instruction, bbox, type
    val.jsonl             the same screens (the tiny example overfits them on purpose)

Usage: python examples/gui_click/make_tiny.py [OUT]   (default .demo-data/gui_click)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|box_start|>",
    "<|box_end|>",
]
# Qwen2-VL's chat template (as in its chat_template.json), video branch omitted.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL's chat template has the same ChatML turns and vision markers but no default system
# message (tool and reasoning branches omitted here).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Image processor settings per family: Qwen2-VL 14 px patches (28 px per merged token, CLIP
# normalisation); Qwen3-VL 16 px patches (32 px per merged token, mean = std = 0.5).
FAMILIES = {
    "qwen2_vl": (CHAT_TEMPLATE, {"patch_size": 14}, "Qwen2VLProcessor"),
    "qwen3_vl": (
        QWEN3_VL_CHAT_TEMPLATE,
        {"patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "Qwen3VLProcessor",
    ),
}
COLOURS = {"red": (220, 50, 50), "green": (40, 170, 60), "blue": (50, 80, 220)}
SCREEN = (112, 84)  # width, height: 12 image tokens at max_pixels 112*112


def write_processor(out: Path, family: str = "qwen2_vl") -> Path:
    """A byte-level BPE tokenizer + the family's image processor and chat template -> `out`."""
    template, image_settings, processor_class = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [
        "system user assistant You are a helpful assistant.",
        "click the red green blue button icon text (123,456) [7,8,9,0]",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=template,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    images = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, merge_size=2, **image_settings
    )
    images.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    config = json.dumps({"processor_class": processor_class})
    (out / "processor_config.json").write_text(config + "\n")
    return out


def write_screens(out: Path, count: int = 6, seed: int = 0) -> list[dict[str, object]]:
    """`count` screens with three non-overlapping buttons; one record per screen."""
    rng = random.Random(seed)
    (out / "screens").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, object]] = []
    for index in range(count):
        canvas = Image.new("RGB", SCREEN, (235, 235, 240))
        draw = ImageDraw.Draw(canvas)
        boxes = _place_buttons(rng)
        for colour, box in zip(COLOURS.values(), boxes, strict=True):
            draw.rectangle(box, fill=colour)
        name = list(COLOURS)[index % len(COLOURS)]
        box = boxes[list(COLOURS).index(name)]
        kind = "icon" if index % 2 else "text"
        path = out / "screens" / f"screen_{index}.png"
        canvas.save(path)
        records.append(
            {
                "id": f"screen_{index}",
                "image": f"screens/{path.name}",
                "instruction": f"click the {name} {'icon' if kind == 'icon' else 'button'}",
                "bbox": list(box),
                "type": kind,
            }
        )
    return records


def _place_buttons(rng: random.Random) -> list[tuple[int, int, int, int]]:
    """Three 20x12 buttons in distinct cells of a 3x2 grid, jittered inside their cell."""
    cells = rng.sample([(c, r) for c in range(3) for r in range(2)], 3)
    boxes = []
    for column, row in cells:
        x = column * 37 + rng.randint(2, 14)
        y = row * 42 + rng.randint(4, 26)
        boxes.append((x, y, x + 20, y + 12))
    return boxes


def write_tiny_example(out: Path, count: int = 6) -> Path:
    write_processor(out / "processor")
    write_processor(out / "processor_qwen3_vl", "qwen3_vl")
    records = write_screens(out, count)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (out / "train.jsonl").write_text(lines)
    (out / "val.jsonl").write_text(lines)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo-data/gui_click")
    print(f"wrote the tiny click-grounding example to {write_tiny_example(target)}")
