"""End to end through visiontune.api: overfit to 100% clicks, predict, export, push.

One run trains the tiny example's Qwen2-VL, loaded from a save_pretrained directory as a hub
checkpoint would be, and every later test reads that run.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import torch
from huggingface_hub.utils import _http
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer

from visiontune import api
from visiontune.config.schema import Config
from visiontune.errors import VisiontuneError
from visiontune.export import export_merged, push_to_hub
from visiontune.models.qwen_vl import VisionChatProcessor


@pytest.fixture(scope="module")
def trained_run(
    ground_config: Callable[..., Config], tiny_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> api.TrainResult:
    out = tmp_path_factory.mktemp("runs")
    cfg = ground_config(
        out,
        "model.config=null",
        f"model.name_or_path={tiny_base}",
        "task.processor=null",
        "train.max_steps=40",
        "eval.every_steps=20",
    )
    return api.train(cfg)


def _records(tiny_data: Path) -> list[dict[str, Any]]:
    lines = (tiny_data / "val.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_overfitting_a_handful_reaches_full_click_accuracy(trained_run: api.TrainResult) -> None:
    summary = trained_run.summary
    assert summary["status"] == "completed" and summary["steps"] == 40
    last = summary["last_eval"]
    assert last["click_accuracy"] == 1.0
    assert last["click_accuracy.text"] == 1.0 and last["click_accuracy.icon"] == 1.0
    assert last["unparseable"] == 0.0
    assert summary["accepted"] is True
    losses = [json.loads(line)["loss"] for line in (trained_run.run_dir / "metrics.jsonl").open()]
    assert losses[-1] < 0.05 * losses[0]


def test_predict_prints_the_point_and_draws_it(
    trained_run: api.TrainResult, tiny_data: Path, tmp_path: Path
) -> None:
    record = _records(tiny_data)[0]
    image = tiny_data / record["image"]
    (result,) = api.predict(
        trained_run.run_dir, [{"image": str(image), "text": record["instruction"]}], tmp_path
    )
    x1, y1, x2, y2 = record["bbox"]
    x, y = result["point"]
    assert x1 <= x <= x2 and y1 <= y <= y2
    drawn = Image.open(result["picture"]).convert("RGB")
    original = Image.open(image).convert("RGB")
    assert drawn.size == original.size
    assert drawn.tobytes() != original.tobytes()


def test_merged_export_loads_in_plain_transformers_and_matches_the_adapter(
    trained_run: api.TrainResult, tiny_base: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = export_merged(trained_run.run_dir, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_base))
    adapted = PeftModel.from_pretrained(base, str(trained_run.run_dir / "best")).eval()
    processor = VisionChatProcessor.load(str(out), 56 * 56, 112 * 112)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == processor.chat_template
    record = _records(tiny_data)[0]
    text = processor.render([{"role": "user", "content": "<image>" + record["instruction"]}], True)
    inputs = processor([text], [[Image.open(tiny_data / record["image"]).convert("RGB")]])
    untrained = AutoModelForImageTextToText.from_pretrained(str(tiny_base)).eval()
    with torch.no_grad():
        want = adapted(**inputs).logits
        got = merged(**inputs).logits
        before = untrained(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, want, atol=1e-2)  # the adapter did change the model
    with pytest.raises(VisiontuneError, match="not empty"):
        export_merged(trained_run.run_dir, out)


@pytest.fixture
def hub_requests() -> Iterator[list[httpx2.Request]]:
    """The Hub's HTTP API answered in-process: the only thing replaced is the transport."""
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/me/tiny-click"})
        if path == "/api/validate-yaml":  # the model card's metadata
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return httpx2.Response(200, json={"files": modes})
        if "/commit/" in path:
            url = "https://huggingface.co/me/tiny-click/commit/0123abcd"
            return httpx2.Response(200, json={"commitUrl": url, "commitOid": "0123abcd"})
        return httpx2.Response(404, json={"error": f"not stubbed: {path}"})

    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(answer)))
    try:
        yield seen
    finally:
        _http.set_client_factory(_http.default_client_factory)


def test_push_to_hub_uploads_the_export_folder(
    trained_run: api.TrainResult, tmp_path: Path, hub_requests: list[httpx2.Request]
) -> None:
    out = export_merged(trained_run.run_dir, tmp_path / "merged")
    url = push_to_hub(out, "me/tiny-click", token="hf_test_token")
    assert url == "https://huggingface.co/me/tiny-click/commit/0123abcd"
    create = next(r for r in hub_requests if r.url.path == "/api/repos/create")
    payload = json.loads(create.content)
    assert payload["name"] == "tiny-click" and payload["organization"] == "me"
    assert payload["visibility"] == "private"
    assert create.headers["authorization"] == "Bearer hf_test_token"
    commit = next(r for r in hub_requests if "/commit/" in r.url.path)
    lines = [json.loads(line) for line in commit.content.decode().splitlines()]
    uploaded = {
        line["value"]["path"]: base64.b64decode(line["value"]["content"])
        for line in lines
        if line["key"] == "file"
    }
    local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert uploaded == local
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(
        local
    )
