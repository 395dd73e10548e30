"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL inputs: chat template, image tokens, assistant-only labels.

All three families share the image processor class (patch 14 with 2x2 merge for Qwen2/2.5-VL,
28 px per token; patch 16 with 2x2 merge for Qwen3-VL, 32 px per token: both read from the
checkpoint's preprocessor config), the `<|image_pad|>` expansion and ChatML.
transformers 5.x's `Qwen2VLProcessor` cannot be built without torchvision (its video processor
is a required part and exists only for the torchvision backend), and torchvision cannot be
installed next to a CPU-only torch wheel. So this module composes what the processor does from
parts that load everywhere: the tokenizer (`AutoTokenizer`), the image processor
(`AutoImageProcessor`, which falls back to the PIL backend), and the processor's chat template.
It expands each image placeholder into one token per merged patch and returns the
`mm_token_type_ids` the 5.x model needs for its multimodal rotary positions, exactly as the
processor would (a test compares both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin

from visiontune.data.conversations import IMAGE_PLACEHOLDER
from visiontune.errors import ConfigError

IGNORE_INDEX = -100
PROCESSOR_CLASSES = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
    "qwen3_5": "Qwen3VLProcessor",
    "qwen3_5_moe": "Qwen3VLProcessor",
}
IMAGE_TOKEN = "<|image_pad|>"
ANSWER_HEADER = "<|im_start|>assistant\n"
ANSWER_END = "<|im_end|>"


@dataclass
class VisionChatProcessor:
    """Tokenizer + image processor + chat template, with min/max pixels fixed at load time.

    Fixing min/max pixels here (not per call) is what keeps training, evaluation and
    prediction on the same resized images, and so on the same Qwen2.5-VL coordinates.
    """

    tokenizer: Any
    image_processor: Any
    chat_template: str
    processor_class: str

    @classmethod
    def load(
        cls,
        source: str,
        min_pixels: int,
        max_pixels: int,
        revision: str | None = None,
        trust_remote_code: bool = False,
        model_type: str = "qwen2_vl",
    ) -> VisionChatProcessor:
        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            image_processor = AutoImageProcessor.from_pretrained(
                source, min_pixels=min_pixels, max_pixels=max_pixels, **kwargs
            )
            processor_dict, _ = ProcessorMixin.get_processor_dict(source, **kwargs)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError([f"task.processor: cannot load {source!r}: {first}"]) from None
        template = processor_dict.get("chat_template") or tokenizer.chat_template
        if not template:
            raise ConfigError([f"task.processor: {source!r} has no chat template"])
        processor_class = processor_dict.get("processor_class") or PROCESSOR_CLASSES.get(
            model_type, "Qwen2VLProcessor"
        )
        processor = cls(tokenizer, image_processor, template, processor_class)
        processor.check_chatml()
        return processor

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    @property
    def factor(self) -> int:
        """Side multiple of resized images: patch size times merge size (28 for Qwen2/2.5-VL,
        32 for Qwen3-VL)."""
        return int(self.image_processor.patch_size) * self.merge_size

    @property
    def min_pixels(self) -> int:
        return int(self.image_processor.size.shortest_edge)

    @property
    def max_pixels(self) -> int:
        return int(self.image_processor.size.longest_edge)

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))

    def check_chatml(self) -> None:
        """Assistant labels are found by ChatML markers: refuse a template or tokenizer with
        which they would not select exactly the answer (labels would silently be wrong)."""
        answer = "(12,34)"
        text = self.render(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]
        )
        problem = None
        if ANSWER_HEADER not in text or ANSWER_END not in text:
            problem = "the chat template does not use ChatML markers"
        else:
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            labelled = self.tokenizer.decode(ids[0][self.answer_mask(ids)[0]])
            if labelled != answer + ANSWER_END:
                problem = f"the assistant header tokenises differently in context ({labelled!r})"
        if problem:
            raise ConfigError(
                [
                    f"task.processor: {problem}; the ground task expects ChatML "
                    f"({ANSWER_HEADER!r} ... {ANSWER_END!r}) as the Qwen-VL families use"
                ]
            )

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Messages with `<image>` placeholders -> the model's prompt text."""
        return self.tokenizer.apply_chat_template(
            chat_content(messages),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Tokens one image of (width, height) expands to at this processor's min/max pixels."""
        width, height = size
        patches = self.image_processor.get_number_of_image_patches(height, width, {})
        return int(patches) // self.merge_size**2

    def count_tokens(self, text: str, sizes: list[tuple[int, int]]) -> int:
        """Sequence length of a rendered conversation after image-token expansion."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) + sum(self.image_tokens(size) - 1 for size in sizes)

    def __call__(
        self, texts: list[str], images: list[list[Image.Image]], padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Batch tensors: input_ids, attention_mask, mm_token_type_ids, pixel_values, grid."""
        flat = [image for per_sample in images for image in per_sample]
        vision: dict[str, torch.Tensor] = {}
        expanded = list(texts)
        if flat:
            vision = dict(self.image_processor(flat, return_tensors="pt"))
            counts = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
            expanded = _expand(texts, counts)
        encoded = self.tokenizer(
            expanded,
            padding=True,
            padding_side=padding_side,
            add_special_tokens=False,
            return_tensors="pt",
        )
        input_ids = encoded["input_ids"]
        out = {
            "input_ids": input_ids,
            "attention_mask": encoded["attention_mask"],
            "mm_token_type_ids": (input_ids == self.image_token_id).long(),
        }
        out.update(vision)
        return out

    def answer_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True on assistant answer tokens and the `<|im_end|>` that closes each answer.

        Training on the closing marker teaches the model to stop; the header and everything
        the user or system said stay unlabelled.
        """
        header = self.tokenizer(ANSWER_HEADER, add_special_tokens=False)["input_ids"]
        end_id = int(self.tokenizer.convert_tokens_to_ids(ANSWER_END))
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, ids in enumerate(input_ids.tolist()):
            inside = False
            for pos in range(len(ids)):
                if inside:
                    mask[row, pos] = True
                    inside = ids[pos] != end_id
                elif pos + 1 >= len(header) and ids[pos + 1 - len(header) : pos + 1] == header:
                    inside = True
        return mask

    def save_pretrained(self, directory: Path) -> None:
        """Tokenizer, image processor, chat template and processor_config.json, so that
        `AutoProcessor.from_pretrained(directory)` works wherever torchvision is installed."""
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        self.image_processor.save_pretrained(str(directory))
        (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        config = {"processor_class": self.processor_class}
        (directory / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def chat_content(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """`<image>` placeholders -> the content lists chat templates expect."""
    out = []
    for message in messages:
        parts: list[dict[str, Any]] = []
        pieces = message["content"].split(IMAGE_PLACEHOLDER)
        for index, piece in enumerate(pieces):
            if index:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": message["role"], "content": parts})
    return out


def _expand(texts: list[str], counts: list[int]) -> list[str]:
    """Replace the i-th image token (over the whole batch) by counts[i] copies of it."""
    remaining = iter(counts)
    expanded = []
    for text in texts:
        pieces = text.split(IMAGE_TOKEN)
        out = pieces[0]
        for piece in pieces[1:]:
            out += IMAGE_TOKEN * next(remaining) + piece
        expanded.append(out)
    return expanded


def submodule_name(model: torch.nn.Module, attribute: str) -> str:
    """Dotted name (as in named_modules()) of `model.<attribute>` (`language_model`, `visual`).

    transformers moves these between versions (4.x `model.model` vs 5.x
    `model.model.language_model`); resolving by identity follows whatever the installed
    version builds.
    """
    target = getattr(model, attribute, None)
    if target is None:
        inner = getattr(model, "model", None)
        target = getattr(inner, attribute, None)
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ConfigError([f"model: {type(model).__name__} has no `{attribute}` submodule"])
