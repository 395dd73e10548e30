"""Conversation data for vision-language fine-tuning, checked before the first step.

Two on-disk formats, JSON (a list of records) or JSONL (one record per line):

- `conversations`: LLaMA-Factory's multimodal format. `messages` is a list of
  `{"role": "system"|"user"|"assistant", "content": "..."}` (ShareGPT's `conversations` with
  `from`/`value` is accepted too) with one `<image>` placeholder per entry of `images`. A
  record may add a `bbox` or `point` (and `type`) on its first image for evaluation to score.
- `grounding`: one click per record: `image`, `instruction`, a target `bbox` (pixels,
  `[x1, y1, x2, y2]`, or `[x, y, w, h]` with `task.box_format: xywh` as ScreenSpot writes it)
  or `point` (`[x, y]`), and an optional `type` (text, icon) for a per-type breakdown.
  ScreenSpot's `img_filename` and `data_type` keys are read as `image` and `type`.

Image paths are relative to the data file's folder unless absolute. Every structural problem
(a missing image, a placeholder/image count mismatch, a box outside its image, an empty
instruction) is collected over the whole file and raised once as a DataError naming each
sample, so a user fixes them in one round rather than one crash per run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from visiontune.data.images import open_image, upright_size
from visiontune.errors import DataError, ImageError, located

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user"}

Point = tuple[float, float]
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ClickTarget:
    """Where a grounding sample should be clicked, in original-image pixels."""

    box: Box | None = None
    point: Point | None = None
    type: str | None = None

    @property
    def click(self) -> Point:
        """The point a model is trained to answer: the box centre, or the point itself."""
        if self.box is not None:
            return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2
        assert self.point is not None
        return self.point


@dataclass
class Conversation:
    """One training sample: messages with `<image>` placeholders and the images they stand for.

    Grounding samples carry `target` and an `instruction`; their assistant answer is written
    later by the task, because the answer's coordinates depend on the model family.
    """

    sample_id: str
    messages: list[dict[str, str]]
    images: list[Path]
    target: ClickTarget | None = None
    instruction: str | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)


def _records(path: Path) -> list[tuple[str, dict[str, Any] | _Problem]]:
    """(sample name, record or its problem) pairs from a JSON list or a JSONL file, in order.

    The name is `file:line` (JSONL) or `file[index]` (JSON), plus the record's `id` when it has
    one: a sample id that does not change when the data moves, which error messages complete
    to the full path. A line that is not valid JSON is kept
    as its problem rather than raised, so it cannot hide the problems of the lines after it.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        raw = [
            (f"{path.name}:{number}", _parse_json(line))
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    else:
        loaded = _parse_json(text)
        if isinstance(loaded, _Problem):
            raise DataError(located(path, str(loaded)))
        if not isinstance(loaded, list):
            raise DataError(located(path, "expected a JSON list of records (or a .jsonl file)"))
        raw = [(f"{path.name}[{index}]", record) for index, record in enumerate(loaded)]
    if not raw:
        raise DataError(located(path, "no records"))
    return [(_named(name, record), _as_object(record)) for name, record in raw]


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return _Problem(f"not valid JSON: {err}")


def _named(name: str, record: Any) -> str:
    return f"{name} (id {record['id']})" if isinstance(record, dict) and "id" in record else name


def _as_object(record: Any) -> dict[str, Any] | _Problem:
    if isinstance(record, dict | _Problem):
        return record
    return _Problem(f"a record must be a JSON object, got {type(record).__name__}")


def load_conversations(
    path: Path, box_format: Literal["xyxy", "xywh"] = "xyxy"
) -> list[Conversation]:
    """Read LLaMA-Factory multimodal records and check them (DataError listing all problems).

    A record may also carry a `bbox` or `point` (pixels of its first image) and a `type`:
    LLaMA-Factory ignores them, and evaluation uses them to score the generated clicks.
    """
    return _load(path, _conversation, box_format)


def load_grounding(path: Path, box_format: Literal["xyxy", "xywh"] = "xyxy") -> list[Conversation]:
    """Read grounding records and check them (DataError listing all problems)."""
    return _load(path, _grounding, box_format)


def _load(
    path: Path,
    parse: Callable[[str, dict[str, Any], Path, Literal["xyxy", "xywh"]], Conversation],
    box_format: Literal["xyxy", "xywh"],
) -> list[Conversation]:
    """Parse every record, collecting each record's problem instead of stopping at the first."""
    samples: list[tuple[int, Conversation]] = []
    problems: list[tuple[int, str]] = []
    for position, (name, record) in enumerate(_records(path)):
        if isinstance(record, _Problem):
            problems.append((position, _located(path, name, str(record))))
            continue
        try:
            samples.append((position, parse(name, record, path.parent, box_format)))
        except _Problem as problem:
            problems.append((position, _located(path, name, str(problem))))
    return _checked(samples, problems, path)


def _located(path: Path, name: str, problem: str) -> str:
    """`<path>:<line> (id ...): <problem>`: the sample's name with the file's full path."""
    return f"{path.parent / name}: {problem}"


class _Problem(Exception):
    """A problem with one record; collected, then reported together."""


def _conversation(
    name: str, record: dict[str, Any], root: Path, box_format: Literal["xyxy", "xywh"]
) -> Conversation:
    messages = _messages(record)
    images = record.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise _Problem("`images` must be a list of paths")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(images):
        raise _Problem(
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the messages but "
            f"{len(images)} image(s) in `images`; they must match one to one"
        )
    _check_turns(messages)
    target = _target(record, box_format) if "bbox" in record or "point" in record else None
    if target is not None and not images:
        raise _Problem("a `bbox` or `point` needs an image to lie in")
    return Conversation(name, messages, [_resolve(root, i) for i in images], target)


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        raw, role_key, text_key = record["messages"], "role", "content"
    elif "conversations" in record:
        raw, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise _Problem("no `messages` (or ShareGPT `conversations`) list")
    if not isinstance(raw, list) or not raw:
        raise _Problem("`messages` must be a non-empty list")
    messages = []
    for turn in raw:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise _Problem(f"every message needs a `{role_key}` and a text `{text_key}`")
        role = SHAREGPT_ROLES.get(turn.get(role_key, ""), turn.get(role_key))
        if role not in ROLES:
            raise _Problem(f"unknown role {turn.get(role_key)!r}; use system, user or assistant")
        messages.append({"role": role, "content": turn[text_key]})
    return messages


def _check_turns(messages: list[dict[str, str]]) -> None:
    """System first (optional), then user/assistant alternating, ending with an answer."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if [m["role"] for m in turns] != expected[: len(turns)] or len(turns) % 2:
        raise _Problem("messages must alternate user/assistant after an optional system message")
    for turn in turns:
        text = turn["content"].replace(IMAGE_PLACEHOLDER, "").strip()
        if not text and turn["role"] == "user":
            raise _Problem("empty instruction: a user message holds no text")
        if not text:
            raise _Problem("empty answer: an assistant message holds no text")


def _grounding(
    name: str, record: dict[str, Any], root: Path, box_format: Literal["xyxy", "xywh"]
) -> Conversation:
    image = record.get("image", record.get("img_filename"))
    if not isinstance(image, str) or not image:
        raise _Problem("no `image` path")
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise _Problem("empty instruction")
    target = _target(record, box_format)
    messages = [{"role": "user", "content": IMAGE_PLACEHOLDER + instruction.strip()}]
    return Conversation(name, messages, [_resolve(root, image)], target, instruction.strip())


def _target(record: dict[str, Any], box_format: Literal["xyxy", "xywh"]) -> ClickTarget:
    kind = record.get("type", record.get("data_type"))
    target = ClickTarget(
        box=_box(record["bbox"], box_format) if "bbox" in record else None,
        point=_numbers(record["point"], 2, "point") if "point" in record else None,
        type=str(kind) if kind is not None else None,
    )
    if (target.box is None) == (target.point is None):
        raise _Problem("give exactly one target: `bbox` or `point`")
    return target


def _box(value: Any, box_format: Literal["xyxy", "xywh"]) -> Box:
    a, b, c, d = _numbers(value, 4, "bbox")
    box = (a, b, a + c, b + d) if box_format == "xywh" else (a, b, c, d)
    if box[2] < box[0] or box[3] < box[1]:
        raise _Problem(f"bbox {value} has x2 < x1 or y2 < y1 (box_format {box_format})")
    return box


def _numbers(value: Any, count: int, key: str) -> Any:
    if (
        not isinstance(value, list | tuple)
        or len(value) != count
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise _Problem(f"`{key}` must be a list of {count} numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _resolve(root: Path, image: str) -> Path:
    path = Path(image).expanduser()
    return path if path.is_absolute() else root / path


def _checked(
    samples: list[tuple[int, Conversation]], problems: list[tuple[int, str]], path: Path
) -> list[Conversation]:
    """Decode every image once (exists, decodes, target inside) and raise all problems at once,
    in file order whatever step found them."""
    unique = sorted({image for _, sample in samples for image in sample.images})
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        probed = dict(zip(unique, pool.map(_probe_or_error, unique), strict=True))
    for position, sample in samples:
        results = [probed[image] for image in sample.images]
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            problems.extend((position, _located(path, sample.sample_id, e)) for e in errors)
            continue
        sample.sizes = [r for r in results if not isinstance(r, str)]
        if sample.target is not None:
            problem = target_outside(sample.target, sample.sizes[0])
            if problem:
                problems.append((position, _located(path, sample.sample_id, problem)))
    if problems:
        in_order = [problem for _, problem in sorted(problems, key=lambda p: p[0])]
        raise DataError.listing(in_order, str(path), noun="bad sample(s)")
    return [sample for _, sample in samples]


def _probe_or_error(path: Path) -> tuple[int, int] | str:
    """The size, or the problem worded for a sample line (`<sample>: <problem>: <image>`)."""
    try:
        return probe_image(path)
    except ImageError as err:
        return f"{err.problem}: {err.path}"


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) of the upright image, after decoding all of its pixels once.

    A full decode (not PIL's `verify()`, which skips JPEG data) is the only check that catches
    a truncated file; images shared by several samples are decoded once, in threads, since
    PIL's decoders release the GIL.
    """
    with open_image(path) as img:
        img.load()
    return upright_size(path)


def target_outside(target: ClickTarget, size: tuple[int, int]) -> str | None:
    """A message when the target leaves the image (edges count as inside), else None."""
    width, height = size
    if target.box is not None:
        x1, y1, x2, y2 = target.box
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            return f"bbox {list(target.box)} lies outside the {width}x{height} image"
    if target.point is not None:
        x, y = target.point
        if not (0 <= x <= width and 0 <= y <= height):
            return f"point {list(target.point)} lies outside the {width}x{height} image"
    return None
