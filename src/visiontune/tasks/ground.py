"""Click grounding: LoRA SFT of Qwen2-VL / Qwen2.5-VL / Qwen3-VL to answer "click the login button".

The model reads a screenshot and an instruction and answers a point in its own coordinate
system (see visiontune.models.coords). Training is plain next-token prediction on the
assistant's answer only; evaluation generates an answer, parses the click, maps it back to the
screenshot's pixels and scores it with ScreenSpot's click accuracy. The vision tower and its
projector stay frozen by default; LoRA goes on the language model's linear layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from visiontune.config.schema import Config, GroundTaskConfig
from visiontune.data.conversations import (
    IMAGE_PLACEHOLDER,
    ClickTarget,
    Conversation,
    load_conversations,
    load_grounding,
)
from visiontune.data.images import decode_image
from visiontune.errors import ConfigError, DataError
from visiontune.metrics.grounding import ClickOutcome, click_metrics
from visiontune.models.coords import (
    CoordCodec,
    coordinates_for,
    make_codec,
    parse_answer,
    write_answer,
)
from visiontune.models.load import read_model_config
from visiontune.models.qwen_vl import ANSWER_END, IGNORE_INDEX, VisionChatProcessor
from visiontune.models.vlm import VisionLanguageAdapter
from visiontune.task import Batch, LossOut, Metrics, Outputs, Skipped, Splits
from visiontune.tasks.ground_data import GroundDataset, GroundSample, hold_out
from visiontune.tasks.ground_pictures import click_accuracy_chart, draw_click

log = logging.getLogger(__name__)

FORMATS = ("conversations", "grounding")


class GroundTask:
    """Implements visiontune.task.Task for click grounding with a generative VLM."""

    name = "ground"

    def __init__(self, cfg: Config) -> None:
        if not isinstance(cfg.task, GroundTaskConfig):
            raise ConfigError([f"task.type: GroundTask needs `ground`, got {cfg.task.type!r}"])
        if cfg.data.format not in FORMATS:
            raise ConfigError([f"data.format: the ground task reads {FORMATS}"])
        self.cfg = cfg
        self.options: GroundTaskConfig = cfg.task
        self.too_long_skipped: dict[str, list[str]] = {}

    # --- model family -----------------------------------------------------------------------

    @cached_property
    def model_config(self) -> PretrainedConfig:
        """The model's config, read without loading weights (family, context length)."""
        return read_model_config(self.cfg.model)

    @property
    def model_type(self) -> str:
        return str(self.model_config.model_type)

    @cached_property
    def processor(self) -> VisionChatProcessor:
        """Loaded once with the config's min/max pixels, shared by train, eval and predict."""
        source = self.options.processor or self.cfg.model.name_or_path
        if source is None:
            raise ConfigError(
                ["task.processor: required with model.config (no checkpoint to read it from)"]
            )
        return VisionChatProcessor.load(
            source,
            self.options.min_pixels,
            self.options.max_pixels,
            revision=None if self.options.processor else self.cfg.model.revision,
            trust_remote_code=self.cfg.model.trust_remote_code,
            model_type=self.model_type,
        )

    @property
    def codec(self) -> CoordCodec:
        system = self.options.coordinates
        if system == "auto":
            known = coordinates_for(self.model_type)
            if known is None:
                raise ConfigError(
                    [
                        f"task.coordinates: no default for model type {self.model_type!r}; set "
                        "norm1000 (Qwen2-VL, Qwen3-VL) or resized_pixels (Qwen2.5-VL)"
                    ]
                )
            system = known
        processor = self.processor
        return make_codec(
            system, processor.min_pixels, processor.max_pixels, processor.factor, self.model_type
        )

    def max_length(self) -> int:
        """Longest conversation allowed: task.max_length, else the model's context length."""
        if self.options.max_length is not None:
            return self.options.max_length
        return int(self.model_config.get_text_config().max_position_embeddings)

    # --- data -------------------------------------------------------------------------------

    def datasets(self) -> Splits:
        data = self.cfg.data
        train = self._split("train", data.train)
        val = self._split("val", data.val) if data.val else None
        test = self._split("test", data.test) if data.test else None
        if val is None and data.val_fraction > 0:
            train, val = hold_out(train, data.val_fraction, self.cfg.train.seed)
        if not train:
            raise DataError(f"{data.train}: no usable training samples")
        evaluated = {"val": val, "test": test}[self.cfg.eval.split]
        if evaluated is not None:
            self._check_eval_metric(evaluated)
        return Splits(
            GroundDataset(train),
            GroundDataset(val) if val is not None else None,
            GroundDataset(test) if test is not None else None,
        )

    def _split(self, split: str, path: Path) -> list[GroundSample]:
        if self.cfg.data.format == "grounding":
            conversations = load_grounding(path, self.options.box_format)
        else:
            conversations = load_conversations(path, self.options.box_format)
        if self.cfg.data.format == "conversations":
            conversations = self._answers_in_codec(path, conversations)
        samples = [self._prepare(c) for c in conversations]
        return self._drop_too_long(split, path, samples)

    def _answers_in_codec(
        self, path: Path, conversations: list[Conversation]
    ) -> list[Conversation]:
        """Conversation answers must be written in the model's coordinate convention.

        Data written in screenshot pixels (common in GUI sets) would train one convention and
        be scored in another, so a disagreement with a `bbox`/`point` target is an error naming
        every sample. An answer-only conversation gets its target parsed from the answer, so
        it is scored (distance; click accuracy needs a box).
        """
        problems, out = [], []
        for conversation in conversations:
            answer = conversation.messages[-1]["content"]
            size = conversation.sizes[0] if conversation.sizes else None
            target = conversation.target
            if target is not None and size is not None:
                spot = target.box if target.box is not None else target.point
                assert spot is not None
                problem = self.codec.check_answer(answer, spot, size)
                if problem:
                    problems.append(f"{conversation.sample_id}: {problem}")
            elif target is None and len(conversation.sizes) == 1 and size is not None:
                point = self.codec.target_from_answer(answer, size)
                if point is not None:
                    conversation = replace(conversation, target=ClickTarget(point=point))
            out.append(conversation)
        if problems:
            shown = "\n  ".join(problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(
                f"{path}: {len(problems)} answer(s) disagree with the {self.codec.system} "
                f"coordinates of {self.model_type} (see task.coordinates):\n  {shown}{more}"
            )
        return out

    def _prepare(self, conversation: Conversation) -> GroundSample:
        """Write the grounding answer in the model's coordinates and render the chat texts."""
        messages = list(conversation.messages)
        if conversation.instruction is not None:
            prompt = self.options.prompt_template.format(instruction=conversation.instruction)
            messages = [{"role": "user", "content": IMAGE_PLACEHOLDER + prompt}]
            assert conversation.target is not None
            click = self.codec.encode(conversation.target.click, conversation.sizes[0])
            messages.append(
                {"role": "assistant", "content": write_answer(self.options.answer_template, click)}
            )
        if self.options.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.options.system_prompt})
        text = self.processor.render(messages)
        return GroundSample(
            sample_id=conversation.sample_id,
            images=conversation.images,
            sizes=conversation.sizes,
            text=text,
            prompt=self.processor.render(messages[:-1], add_generation_prompt=True),
            target=conversation.target,
            length=self.processor.count_tokens(text, conversation.sizes),
        )

    def _drop_too_long(
        self, split: str, path: Path, samples: list[GroundSample]
    ) -> list[GroundSample]:
        limit = self.max_length()
        long = [s for s in samples if s.length > limit]
        if not long:
            return samples
        names = ", ".join(f"{s.sample_id} ({s.length} tokens)" for s in long[:5])
        if self.options.too_long == "error":
            raise DataError(
                f"{path}: {len(long)} conversation(s) longer than {limit} tokens after image "
                f"expansion, e.g. {names}; lower task.max_pixels, raise task.max_length, or set "
                "task.too_long: skip"
            )
        self.too_long_skipped[split] = [s.sample_id for s in long]
        log.warning(
            "%s: skipped %d of %d conversation(s) longer than %d tokens after image expansion "
            "(task.too_long: skip), e.g. %s",
            path, len(long), len(samples), limit, names,
        )  # fmt: skip
        return [s for s in samples if s.length <= limit]

    def _check_eval_metric(self, samples: list[GroundSample]) -> None:
        metric = self.cfg.eval.metric
        with_box = any(s.target is not None and s.target.box is not None for s in samples)
        with_target = any(s.target is not None for s in samples)
        if metric.startswith("click_accuracy") and not with_box:
            raise ConfigError(
                [
                    f"eval.metric: {metric} needs {self.cfg.eval.split} samples with a `bbox`; "
                    "use eval.metric: loss (or distance with point targets) and eval.mode: min"
                ]
            )
        if metric.startswith("distance") and not with_target:
            raise ConfigError(
                [f"eval.metric: {metric} needs samples with a `bbox` or `point` target"]
            )

    def collate(self, samples: list[Any]) -> Batch:
        skipped = [s for s in samples if isinstance(s, Skipped)]
        good = [s for s in samples if not isinstance(s, Skipped)]
        if not good:
            return Batch({}, [], skipped=skipped)
        inputs = self.processor([s["text"] for s in good], [s["images"] for s in good])
        answer = self.processor.answer_mask(inputs["input_ids"])
        keep = answer & inputs["attention_mask"].bool()
        inputs["labels"] = torch.where(keep, inputs["input_ids"], IGNORE_INDEX)
        targeted = [s for s in good if s["target"] is not None]
        extras = {"samples": targeted, "generate": [(s["prompt"], s["images"]) for s in targeted]}
        return Batch(inputs, [s["id"] for s in good], skipped=skipped, extras=extras)

    # --- model and loss ---------------------------------------------------------------------

    def adapter(self) -> VisionLanguageAdapter:
        return VisionLanguageAdapter(self.cfg, self.options)

    def loss(self, outputs: Outputs, batch: Batch) -> LossOut:
        """Sum of token losses over answer tokens, and how many there are."""
        targets = outputs["answer_targets"]
        loss_sum = F.cross_entropy(outputs["answer_logits"], targets, reduction="sum")
        return LossOut(loss_sum, targets.numel())

    # --- evaluation and prediction ----------------------------------------------------------

    def meter(self) -> GroundMeter:
        return GroundMeter(self)

    def generation_inputs(self, batch: Batch) -> dict[str, Any] | None:
        """Greedy-answer inputs for the batch's samples that have a target (eval) or for the
        user's instruction (predict): rendered prompts, left-padded."""
        prompts = batch.extras.get("generate")
        if not prompts:
            return None
        inputs: dict[str, Any] = self.processor(
            [p for p, _ in prompts], [images for _, images in prompts], padding_side="left"
        )
        tokenizer = self.processor.tokenizer
        inputs.update(
            max_new_tokens=self.options.max_new_tokens,
            stop_token_ids=[int(tokenizer.convert_tokens_to_ids(ANSWER_END))],
            pad_token_id=tokenizer.pad_token_id,
        )
        return inputs

    def answers(self, generated: torch.Tensor) -> list[str]:
        """Decoded answers (the adapter already cut each row at its first stop token)."""
        tokenizer = self.processor.tokenizer
        return [
            tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated.tolist()
        ]

    def outcome(self, sample: dict[str, Any], text: str) -> ClickOutcome:
        size = sample["sizes"][0]
        parsed = parse_answer(text)
        point = self.codec.decode(parsed, size) if parsed is not None else None
        target = sample["target"]
        return ClickOutcome(sample["id"], point, size, target.box, target.point, target.type)

    def outside_grid(self, sample: dict[str, Any], text: str) -> bool:
        """Whether an answer's point lies outside the codec's range (e.g. 1200 on a 0..1000
        grid): still scored (it misses every box), but counted so a drifting model shows."""
        parsed = parse_answer(text)
        return parsed is not None and not self.codec.in_range(parsed, sample["sizes"][0])

    def prediction_batches(self, inputs: list[dict[str, Any]]) -> Iterator[Batch]:
        """One generation per `{"image": path, "text": instruction}`."""
        for index, item in enumerate(inputs):
            path, instruction = Path(str(item.get("image", ""))), str(item.get("text") or "")
            if not instruction.strip():
                raise DataError(f"input {index} ({path}): empty instruction (give --prompt)")
            image = decode_image(path)
            prompt = self.options.prompt_template.format(instruction=instruction.strip())
            messages = [{"role": "user", "content": IMAGE_PLACEHOLDER + prompt}]
            if self.options.system_prompt:
                messages.insert(0, {"role": "system", "content": self.options.system_prompt})
            rendered = self.processor.render(messages, True)
            extras = {"path": path, "instruction": instruction, "image": image}
            extras["generate"] = [(rendered, [image])]
            yield Batch({}, [str(path)], extras=extras)

    def predictions(self, outputs: Outputs, batch: Batch, out_dir: Path) -> list[dict[str, Any]]:
        """The click, and a picture of it."""
        path, instruction, image = (batch.extras[k] for k in ("path", "instruction", "image"))
        text = self.answers(outputs["generated"])[0]
        parsed = parse_answer(text)
        point = self.codec.decode(parsed, image.size) if parsed is not None else None
        width, height = image.size
        outside = point is not None and not (0 <= point[0] <= width and 0 <= point[1] <= height)
        if outside:
            log.warning("%s: the answer %r lies outside the %dx%d image", path, text, width, height)
            point = None
        picture = out_dir / f"{path.stem}_click.png"
        draw_click(image, point).save(picture)
        x, y = (round(point[0], 1), round(point[1], 1)) if point else (None, None)
        record = {"image": str(path), "text": instruction, "answer": text, "outside": outside}
        record.update({"point": [x, y] if point else None, "x": x, "y": y})
        record["picture"] = str(picture)
        log.info("%s: %r -> %s", path, instruction, record["point"] or f"unparseable {text!r}")
        return [record]

    def export_files(self, out_dir: Path) -> None:
        """The processor files a merged export needs to be used on its own."""
        self.processor.save_pretrained(out_dir)

    def save_figures(self, metrics: Metrics, out_dir: Path) -> list[Path]:
        """Click accuracy overall and per type, as a bar chart."""
        return click_accuracy_chart(metrics.scalars, out_dir)


class GroundMeter:
    """Answer-token loss and click outcomes over the split (unparseable answers included)."""

    gathered = ("loss_sum", "count", "skipped", "outside_grid", "outcomes", "answers")
    """What evaluation gathers across ranks before computing (engine/distributed.py)."""

    def __init__(self, task: GroundTask) -> None:
        self.task = task
        self.loss_sum, self.count, self.skipped, self.outside_grid = 0.0, 0, 0, 0
        self.outcomes: list[ClickOutcome] = []
        self.answers: list[dict[str, Any]] = []

    def update(self, outputs: Outputs, batch: Batch) -> None:
        self.skipped += len(batch.skipped)
        if not len(batch):
            return
        out = self.task.loss(outputs, batch)
        self.loss_sum += float(out.loss_sum)
        self.count += int(out.count)
        if "generated" not in outputs:
            return
        texts = self.task.answers(outputs["generated"])
        for sample, text in zip(batch.extras["samples"], texts, strict=True):
            self.outcomes.append(self.task.outcome(sample, text))
            outside = self.task.outside_grid(sample, text)
            self.outside_grid += outside
            self.answers.append(
                {
                    "id": sample["id"],
                    "answer": text,
                    "point": self.outcomes[-1].point,
                    "outside_grid": outside,
                }
            )

    def compute(self) -> Metrics:
        scalars = {"loss": self.loss_sum / max(self.count, 1), "skipped": float(self.skipped)}
        scalars["outside_grid"] = float(self.outside_grid)
        if self.outcomes:
            scalars.update(click_metrics(self.outcomes))
        return Metrics(scalars, {"answers": self.answers})
