"""Click grounding: LoRA SFT of Qwen2-VL / Qwen2.5-VL to answer "click the login button".

The model reads a screenshot and an instruction and answers a point in its own coordinate
system (see visiontune.models.coords). Training is plain next-token prediction on the
assistant's answer only; evaluation generates an answer, parses the click, maps it back to the
screenshot's pixels and scores it with ScreenSpot's click accuracy. The vision tower and its
projector stay frozen by default; LoRA goes on the language model's linear layers.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

from visiontune.config.schema import Config, GroundTaskConfig
from visiontune.data.conversations import (
    IMAGE_PLACEHOLDER,
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
from visiontune.models.load import build_config, load_model
from visiontune.models.lora import apply_lora, resolve_targets
from visiontune.models.qwen_vl import (
    ANSWER_END,
    IGNORE_INDEX,
    VisionChatProcessor,
    submodule_name,
)
from visiontune.task import Batch, LossOut, Metrics, Skipped, Splits
from visiontune.tasks.ground_data import GroundDataset, GroundSample, hold_out

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
        model_cfg = self.cfg.model
        if model_cfg.config is not None:
            return build_config(model_cfg.config)
        try:
            return AutoConfig.from_pretrained(
                model_cfg.name_or_path,
                revision=model_cfg.revision,
                trust_remote_code=model_cfg.trust_remote_code,
            )
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError([f"model.name_or_path: {first}"]) from None

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
                        "norm1000 or resized_pixels"
                    ]
                )
            system = known
        processor = self.processor
        return make_codec(system, processor.min_pixels, processor.max_pixels, processor.factor)

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
        samples = [self._prepare(c) for c in conversations]
        return self._drop_too_long(split, path, samples)

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
            return Batch({}, [], skipped)
        inputs = self.processor([s["text"] for s in good], [s["images"] for s in good])
        answer = self.processor.answer_mask(inputs["input_ids"])
        keep = answer & inputs["attention_mask"].bool()
        inputs["labels"] = torch.where(keep, inputs["input_ids"], IGNORE_INDEX)
        return Batch(inputs, [s["id"] for s in good], skipped, {"samples": good})

    # --- model ------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        model = load_model(AutoModelForImageTextToText, self.cfg.model)
        if self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        language = submodule_name(model, "language_model")
        vision = submodule_name(model, "visual")
        projector = f"{vision}.merger"
        heads = [projector] if self.options.train_projector else []
        lora = self.cfg.lora
        if lora.enabled:
            targets = resolve_targets(model, lora.targets, within=language)
            if not self.options.freeze_vision:
                targets += resolve_targets(
                    model, lora.targets, within=vision + ".", exclude=(projector,)
                )
            return apply_lora(model, lora.model_copy(update={"targets": targets}), heads)
        model = apply_lora(model, lora, heads)
        for name, param in model.named_parameters():
            if name.startswith(projector + "."):
                param.requires_grad_(self.options.train_projector)
            elif name.startswith(vision + "."):
                param.requires_grad_(not self.options.freeze_vision)
        return model

    def loss(self, model: nn.Module, batch: Batch) -> LossOut:
        """Sum of token losses over answer tokens, and how many there are.

        Logits are computed only at positions that predict a label (`logits_to_keep` with a
        boolean mask): a full-vocabulary logit tensor for a 1,500-token screenshot
        conversation would cost more memory than the LoRA itself. The call goes through the
        model's own forward, so PEFT and any distributed wrapper see it.
        """
        t = batch.tensors
        targets = t["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        predicts = torch.zeros_like(t["labels"], dtype=torch.bool)
        predicts[:, :-1] = keep
        logits = model(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            pixel_values=t.get("pixel_values"),
            image_grid_thw=t.get("image_grid_thw"),
            mm_token_type_ids=t["mm_token_type_ids"],
            use_cache=False,
            logits_to_keep=predicts,
        ).logits
        loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return LossOut(loss_sum, int(keep.sum()))

    # --- evaluation and prediction ----------------------------------------------------------

    def evaluate(self, model: nn.Module, loader: DataLoader) -> Metrics:
        device = next(model.parameters()).device
        loss_sum, count, skipped = 0.0, 0, 0
        outcomes: list[ClickOutcome] = []
        answers: list[dict[str, Any]] = []
        for batch in loader:
            skipped += len(batch.skipped)
            if not len(batch):
                continue
            out = self.loss(model, batch.to(device))
            loss_sum, count = loss_sum + float(out.loss_sum), count + int(out.count)
            targeted = [s for s in batch.extras["samples"] if s["target"] is not None]
            if not targeted:
                continue
            texts = self.generate(
                model, [s["prompt"] for s in targeted], [s["images"] for s in targeted]
            )
            for sample, text in zip(targeted, texts, strict=True):
                outcomes.append(self._outcome(sample, text))
                answers.append({"id": sample["id"], "answer": text, "point": outcomes[-1].point})
        scalars = {"loss": loss_sum / max(count, 1), "skipped": float(skipped)}
        if outcomes:
            scalars.update(click_metrics(outcomes))
        return Metrics(scalars, {"answers": answers})

    def _outcome(self, sample: dict[str, Any], text: str) -> ClickOutcome:
        size = sample["sizes"][0]
        parsed = parse_answer(text)
        point = self.codec.decode(parsed, size) if parsed is not None else None
        target = sample["target"]
        return ClickOutcome(sample["id"], point, size, target.box, target.point, target.type)

    def generate(
        self, model: nn.Module, prompts: list[str], images: list[list[Image.Image]]
    ) -> list[str]:
        """Greedy answers to rendered prompts, cut at the end-of-answer marker."""
        device = next(model.parameters()).device
        inputs = self.processor(prompts, images, padding_side="left")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        tokenizer = self.processor.tokenizer
        stops = [int(tokenizer.convert_tokens_to_ids(ANSWER_END)), *_eos_ids(model)]
        output = model.generate(
            **inputs,
            max_new_tokens=self.options.max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = []
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        return texts

    def predict(
        self, model: nn.Module, inputs: list[dict[str, Any]], out_dir: Path
    ) -> list[dict[str, Any]]:
        """For each `{"image": path, "text": instruction}`: the click, and a picture of it."""
        records = []
        for index, item in enumerate(inputs):
            path, instruction = Path(str(item.get("image", ""))), str(item.get("text") or "")
            if not instruction.strip():
                raise DataError(f"input {index} ({path}): empty instruction (give --prompt)")
            image = decode_image(path)
            prompt = self.options.prompt_template.format(instruction=instruction.strip())
            messages = [{"role": "user", "content": IMAGE_PLACEHOLDER + prompt}]
            if self.options.system_prompt:
                messages.insert(0, {"role": "system", "content": self.options.system_prompt})
            text = self.generate(model, [self.processor.render(messages, True)], [[image]])[0]
            parsed = parse_answer(text)
            point = self.codec.decode(parsed, image.size) if parsed is not None else None
            width, height = image.size
            outside = point is not None and not (0 <= point[0] <= width and 0 <= point[1] <= height)
            if outside:
                log.warning(
                    "%s: the answer %r lies outside the %dx%d image", path, text, width, height
                )
                point = None
            picture = out_dir / f"{path.stem}_click.png"
            draw_click(image, point).save(picture)
            x, y = (round(point[0], 1), round(point[1], 1)) if point else (None, None)
            record = {"image": str(path), "text": instruction, "answer": text, "outside": outside}
            record.update({"point": [x, y] if point else None, "x": x, "y": y})
            record["picture"] = str(picture)
            log.info("%s: %r -> %s", path, instruction, record["point"] or f"unparseable {text!r}")
            records.append(record)
        return records

    def export_files(self, out_dir: Path) -> None:
        """The processor files a merged export needs to be used on its own."""
        self.processor.save_pretrained(out_dir)

    def save_figures(self, metrics: Metrics, out_dir: Path) -> list[Path]:
        """Click accuracy overall and per type, as a bar chart."""
        names = sorted(k for k in metrics.scalars if k.startswith("click_accuracy"))
        if not names:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir.mkdir(parents=True, exist_ok=True)
        labels = [n.split(".", 1)[1] if "." in n else "all" for n in names]
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3))
        ax.bar(labels, [metrics.scalars[n] for n in names], color="#4c72b0")
        ax.set_ylim(0, 1)
        ax.set_ylabel("click accuracy")
        fig.tight_layout()
        path = out_dir / "click_accuracy.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]


def draw_click(image: Image.Image, point: tuple[float, float] | None) -> Image.Image:
    """A copy of the image with a ring and cross at the click (unchanged when None).

    Magenta inside a white halo stays visible on the red, blue and grey of most interfaces.
    """
    picture = image.copy()
    if point is None:
        return picture
    draw = ImageDraw.Draw(picture)
    radius = max(4, round(min(picture.size) * 0.02))
    x, y = point
    for colour, width, pad in (("white", 4, 1), ("magenta", 2, 0)):
        r = radius + pad
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
        draw.line((x - 2 * r, y, x + 2 * r, y), fill=colour, width=width // 2)
        draw.line((x, y - 2 * r, x, y + 2 * r), fill=colour, width=width // 2)
    return picture


def _eos_ids(model: nn.Module) -> list[int]:
    """End-of-sequence ids from the model's generation config (Qwen: <|endoftext|> too)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
