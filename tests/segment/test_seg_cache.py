"""Frozen-trunk cache: SAM image embeddings computed once, reused, keyed by weights too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.segment.builders import crack_data, segment_config
from visiontune.models.sam import SamAdapter
from visiontune.task import Batch, LossOut
from visiontune.tasks.segment import SegmentTask


def task_and_batch(root: Path, **task: Any) -> tuple[SegmentTask, SamAdapter, Batch]:
    cfg = segment_config({"format": "mask_folder", "train": str(root)}, {"prompt": "box", **task})
    seg = SegmentTask(cfg)
    dataset = seg.datasets().train
    model = seg.adapter()
    assert isinstance(model, SamAdapter)
    return seg, model, seg.collate([dataset[i] for i in range(len(dataset))])


def loss(seg: SegmentTask, model: torch.nn.Module, batch: Batch) -> LossOut:
    return seg.loss(model(**batch.inputs), batch)


def count_encoder_calls(model: SamAdapter) -> list[int]:
    calls: list[int] = []
    encoder = model.sam.vision_encoder
    encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def test_memory_cache_computes_each_image_once_and_changes_nothing(tmp_path: Path) -> None:
    root = crack_data(tmp_path / "cracks")
    cached, model, batch = task_and_batch(root)
    calls = count_encoder_calls(model)
    first = loss(cached, model, batch).loss_sum
    second = loss(cached, model, batch).loss_sum
    assert calls == [4]  # the second epoch's batch never reaches the encoder
    assert model.cache is not None and (model.cache.hits, model.cache.misses) == (4, 4)
    plain, plain_model, plain_batch = task_and_batch(root, cache="off")
    plain_model.load_state_dict(model.state_dict())
    reference = loss(plain, plain_model, plain_batch).loss_sum
    assert torch.allclose(first, reference) and torch.allclose(second, reference)


def test_disk_cache_is_reused_across_runs_and_keyed_by_weights(tmp_path: Path) -> None:
    root = crack_data(tmp_path / "cracks")
    disk = {"cache": "disk", "cache_dir": str(tmp_path / "cache")}
    first, model, batch = task_and_batch(root, **disk)
    loss(first, model, batch)
    again, model2, batch2 = task_and_batch(root, **disk)
    calls = count_encoder_calls(model2)
    loss(again, model2, batch2)
    assert calls == [] and model2.cache is not None and model2.cache.hits == 4
    other_seed = segment_config(
        {"format": "mask_folder", "train": str(root)},
        {"prompt": "box", **disk},
        train={"max_steps": 1, "seed": 1},
    )
    other = SegmentTask(other_seed)
    other_model = other.adapter()
    calls = count_encoder_calls(other_model)
    dataset = other.datasets().train
    loss(other, other_model, other.collate([dataset[i] for i in range(len(dataset))]))
    assert calls == [4]  # different frozen weights: a different cache folder
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_augmented_batches_bypass_the_cache(tmp_path: Path) -> None:
    root = crack_data(tmp_path / "cracks")
    cfg = segment_config(
        {"format": "mask_folder", "train": str(root), "augment": {"train": {"hflip": 0.5}}},
        {"prompt": "box"},
    )
    seg = SegmentTask(cfg)
    dataset = seg.datasets().train
    model = seg.adapter()
    calls = count_encoder_calls(model)
    batch = seg.collate([dataset[i] for i in range(len(dataset))])
    loss(seg, model, batch)
    loss(seg, model, batch)
    assert calls == [4, 4]
    assert model.cache is not None and model.cache.hits == 0


def test_no_prompt_and_point_prompts_give_one_mask_per_target(tmp_path: Path) -> None:
    root = crack_data(tmp_path / "cracks")
    for prompt in ("none", "points"):
        seg, model, batch = task_and_batch(root, prompt=prompt, num_points=3)
        out = loss(seg, model, batch)
        assert out.count == 4 and torch.isfinite(out.loss_sum)
        assert out.loss_sum.requires_grad
