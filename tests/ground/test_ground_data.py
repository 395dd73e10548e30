"""Conversation and grounding files: both formats read, every bad input named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from visiontune.data.conversations import load_conversations, load_grounding
from visiontune.errors import DataError


def _png(path: Path, size: tuple[int, int] = (40, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 200, 200)).save(path)
    return path.name


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_grounding_reads_boxes_points_and_screenspot_keys(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    data = _jsonl(
        tmp_path / "g.jsonl",
        [
            {"image": "a.png", "instruction": " click ok ", "bbox": [1, 2, 11, 12], "type": "text"},
            {"image": "a.png", "instruction": "menu", "point": [5, 6]},
        ],
    )
    first, second = load_grounding(data)
    assert first.target.box == (1, 2, 11, 12) and first.target.type == "text"
    assert first.instruction == "click ok" and first.sizes == [(40, 30)]
    assert first.target.click == (6, 7)
    assert second.target.point == (5, 6) and second.target.box is None
    # ScreenSpot: img_filename, data_type and boxes as x, y, w, h
    screenspot = tmp_path / "screenspot.json"
    record = {
        "img_filename": "a.png",
        "instruction": "x",
        "bbox": [10, 5, 20, 10],
        "data_type": "icon",
    }
    screenspot.write_text(json.dumps([record]))
    (sample,) = load_grounding(screenspot, box_format="xywh")
    assert sample.target.box == (10, 5, 30, 15) and sample.target.type == "icon"


def test_llamafactory_and_sharegpt_conversations(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    records = [
        {
            "messages": [
                {"role": "system", "content": "You click."},
                {"role": "user", "content": "<image>Where is OK?"},
                {"role": "assistant", "content": "(100,200)"},
            ],
            "images": ["img/a.png"],
            "bbox": [0, 0, 10, 10],
        },
        {
            "conversations": [
                {"from": "human", "value": "<image>Where?"},
                {"from": "gpt", "value": "(1,2)"},
            ],
            "images": ["img/a.png"],
        },
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    first, second = load_conversations(data)
    assert first.images == [tmp_path / "img" / "a.png"]
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    assert first.target is not None and first.target.box == (0, 0, 10, 10)
    assert second.messages[1] == {"role": "assistant", "content": "(1,2)"}
    assert second.target is None


def test_every_bad_grounding_sample_is_named_at_once(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = [
        {"id": "ok", "image": "a.png", "instruction": "fine", "bbox": [0, 0, 40, 30]},
        {"id": "missing", "image": "gone.png", "instruction": "x", "bbox": [0, 0, 1, 1]},
        {"id": "outside", "image": "a.png", "instruction": "x", "bbox": [30, 20, 41, 25]},
        {"id": "empty", "image": "a.png", "instruction": "  ", "bbox": [0, 0, 1, 1]},
        {"id": "corrupt", "image": "broken.png", "instruction": "x", "bbox": [0, 0, 1, 1]},
        {"id": "shape", "image": "a.png", "instruction": "x", "bbox": [0, 0, 1]},
        {"id": "both", "image": "a.png", "instruction": "x", "bbox": [0, 0, 1, 1], "point": [0, 0]},
        {"id": "flipped", "image": "a.png", "instruction": "x", "bbox": [5, 5, 1, 1]},
        {"id": "far", "image": "a.png", "instruction": "x", "point": [41, 3]},
    ]
    with pytest.raises(DataError) as err:
        load_grounding(_jsonl(tmp_path / "g.jsonl", records))
    text = str(err.value)
    assert "8 bad sample(s)" in text
    assert "g.jsonl:2 (id missing): image file not found" in text
    assert "(id outside): bbox [30.0, 20.0, 41.0, 25.0] lies outside the 40x30 image" in text
    assert "(id empty): empty instruction" in text
    assert "(id corrupt): cannot decode image" in text
    assert "(id shape): `bbox` must be a list of 4 numbers" in text
    assert "(id both): give exactly one target" in text
    assert "(id flipped): bbox" in text and "x2 < x1" in text
    assert "(id far): point [41.0, 3.0] lies outside" in text
    assert "(id ok)" not in text


def test_every_bad_conversation_is_named_at_once(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")

    def conv(user: str, answer: str = "(1,2)", images: list[str] | None = None) -> dict[str, Any]:
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return {"messages": turns, "images": ["a.png"] if images is None else images}

    records = [
        conv("<image>fine"),
        conv("<image><image>two placeholders"),
        conv("no placeholder"),
        conv("<image>"),
        conv("<image>q", answer=" "),
        {"messages": [{"role": "user", "content": "<image>q"}], "images": ["a.png"]},
        {"messages": [{"role": "robot", "content": "<image>q"}], "images": ["a.png"]},
        conv("<image>q", images=["missing.png"]),
        {"images": ["a.png"]},
    ]
    with pytest.raises(DataError) as err:
        load_conversations(_jsonl(tmp_path / "c.jsonl", records))
    text = str(err.value)
    assert "8 bad sample(s)" in text
    assert "c.jsonl:2: 2 <image> placeholder(s) in the messages but 1 image(s)" in text
    assert "c.jsonl:3: 0 <image> placeholder(s) in the messages but 1 image(s)" in text
    assert "c.jsonl:4: empty instruction" in text
    assert "c.jsonl:5: empty answer" in text
    assert "c.jsonl:6: messages must alternate user/assistant" in text
    assert "c.jsonl:7: unknown role 'robot'" in text
    assert "c.jsonl:8: image file not found" in text
    assert "c.jsonl:9: no `messages`" in text


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_grounding(bad)
    with pytest.raises(DataError, match="data file not found"):
        load_grounding(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="no records"):
        load_conversations(empty)
