"""Joint image + mask augmentation of segmentation samples: geometry moves both, colour only
the image, and each (seed, epoch, sample) always gets the same draw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.segment.builders import crack_data, segment_config
from visiontune.tasks.segment import SegmentTask


def train_samples(root: Path, augment: dict[str, Any], epoch: int = 0) -> list[dict[str, Any]]:
    data = {"format": "mask_folder", "train": str(root), "augment": {"train": augment}}
    dataset = SegmentTask(segment_config(data, {"prompt": "none"})).datasets().train
    dataset.set_epoch(epoch)
    return [dataset[i] for i in range(len(dataset))]


def valid(sample: dict[str, Any], key: str) -> torch.Tensor:
    """The frame's unpadded region (SAM pads bottom-right)."""
    h, w = sample["valid_hw"]
    return sample[key][..., :h, :w]


def test_flip_moves_image_and_masks_together_and_jitter_leaves_masks_alone(
    tmp_path: Path,
) -> None:
    root = crack_data(tmp_path / "cracks")
    plain = train_samples(root, {})
    flipped = train_samples(root, {"hflip": 1.0, "color_jitter": 0.4})
    for before, after in zip(plain, flipped, strict=True):
        assert torch.equal(valid(after, "masks"), valid(before, "masks").flip(-1))
        image_before, image_after = valid(before, "pixel_values"), valid(after, "pixel_values")
        assert image_after.shape == image_before.shape
        assert not torch.allclose(image_after, image_before.flip(-1), atol=1e-3)
        # brightness/contrast keep the crack darker than the background it crosses
        crack = valid(after, "masks")[0].bool()
        assert image_after[:, crack].mean() < image_after[:, ~crack].mean()


def test_each_epoch_draws_again_and_the_same_epoch_draws_the_same(tmp_path: Path) -> None:
    root = crack_data(tmp_path / "cracks")
    augment = {"color_jitter": 0.4, "rotation": 20}
    first = train_samples(root, augment, epoch=1)
    again = train_samples(root, augment, epoch=1)
    later = train_samples(root, augment, epoch=2)
    for a, b, c in zip(first, again, later, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["masks"], b["masks"])
        assert not torch.equal(a["pixel_values"], c["pixel_values"])
