"""JSONL data with several bad lines: every one reported, in line order, in one error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from visiontune.data.conversations import load_conversations, load_grounding
from visiontune.errors import DataError


def problem_lines(error: DataError) -> list[str]:
    """The listed problems of an error message, one per `  - ` line."""
    return [line[4:] for line in str(error).splitlines() if line.startswith("  - ")]


def test_every_bad_grounding_line_is_reported_in_line_order(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    good = {"image": "a.png", "instruction": "ok", "point": [1, 1]}
    lines = [
        json.dumps(good),
        '{"image": "a.png", "instruction": ',  # cut short
        json.dumps({**good, "instruction": " "}),
        "{'image': 'a.png'}",  # Python, not JSON
        "[1, 2]",
        "",  # blank lines are allowed
        json.dumps({**good, "image": "gone.png"}),
        json.dumps({**good, "point": [50, 1]}),
    ]
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_grounding(path)
    assert str(err.value).startswith(f"{path} has 6 bad sample(s):")
    found = problem_lines(err.value)
    assert [p.split(": ", 1)[0] for p in found] == [f"{path}:{n}" for n in (2, 3, 4, 5, 7, 8)]
    assert found[0].startswith(f"{path}:2: not valid JSON: Expecting value")
    assert found[1] == f"{path}:3: empty instruction"
    assert found[2].startswith(f"{path}:4: not valid JSON: Expecting property name")
    assert found[3] == f"{path}:5: a record must be a JSON object, got list"
    assert found[4] == f"{path}:7: image file not found: {tmp_path / 'gone.png'}"
    assert found[5] == f"{path}:8: point [50.0, 1.0] lies outside the 40x30 image"


def test_every_bad_conversation_line_is_reported_in_line_order(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    turns = [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]
    good = {"messages": turns, "images": ["a.png"]}
    lines = [
        "not json at all",
        json.dumps(good),
        json.dumps({**good, "images": []}),
        '{"messages": [}',
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as err:
        load_conversations(path)
    found = problem_lines(err.value)
    assert len(found) == 3
    assert found[0].startswith(f"{path}:1: not valid JSON")
    assert found[1] == (
        f"{path}:3: 1 <image> placeholder(s) in the messages but 0 image(s) in `images`; "
        "they must match one to one"
    )
    assert found[2].startswith(f"{path}:4: not valid JSON")
