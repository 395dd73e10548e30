"""A merged classification export loads in plain transformers and predicts like the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from tests.conftest import tiny_config
from visiontune import api
from visiontune.errors import VisiontuneError
from visiontune.export import export_merged


def test_merged_export_matches_the_adapter_and_refuses_to_overwrite(
    image_data: Path, tmp_path: Path
) -> None:
    api.train(tiny_config(image_data, tmp_path / "runs", train={"max_steps": 2}))
    run = tmp_path / "runs/tiny"
    out = export_merged(run, tmp_path / "merged")
    merged = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.size == {"height": 16, "width": 16}
    assert merged.config.id2label == {0: "a", 1: "b", 2: "c"}
    ours = api.load_run(run).runner.adapter
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(pixel_values=pixels).logits,
            ours(pixel_values=pixels)["logits"],
            atol=1e-5,
            rtol=1e-4,
        )
    with pytest.raises(VisiontuneError, match="not empty"):
        export_merged(run, out)
