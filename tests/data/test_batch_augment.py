"""Augmentation on the collated batch (`data.augment_on: device`) gives each sample exactly the
pixels kornia gives it alone, seeded by (seed, epoch, index); evaluation is never augmented."""

from __future__ import annotations

import hashlib
from pathlib import Path

import kornia.augmentation as K
import torch

from tests.conftest import tiny_config
from visiontune.config.schema import Augment
from visiontune.data.augment import AugmentJob, BatchAugmenter
from visiontune.engine.loader import TrainLoader, eval_loader
from visiontune.engine.order import DataOrder
from visiontune.tasks.classify import ClassifyTask

AUGMENT = {"hflip": 0.5, "vflip": 0.3, "rotation": 30, "resized_crop": [0.5, 1.0],
           "color_jitter": 0.3}  # fmt: skip


def kornia_alone(image: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
    """One CHW image through kornia by itself, seeded as documented for (seed, epoch, index)."""
    pipeline = K.AugmentationSequential(
        K.RandomResizedCrop((16, 16), scale=(0.5, 1.0), p=1.0),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomVerticalFlip(p=0.3),
        K.RandomRotation(degrees=30.0, p=1.0),
        K.RandomBrightness(brightness=(0.7, 1.3), p=1.0),
        K.RandomContrast(contrast=(0.7, 1.3), p=1.0),
    )
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest, "little") >> 1)
        return pipeline(image[None])[0].clamp(0, 1)


def test_a_batch_is_augmented_as_each_sample_alone_and_differently_per_epoch() -> None:
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    indices = (9, 0, 4, 17, 3, 11)
    augmenter = BatchAugmenter(Augment.model_validate(AUGMENT), 16, seed=5)
    state = torch.random.get_rng_state()
    epochs = {epoch: augmenter(images.clone(), AugmentJob(epoch, indices)) for epoch in (0, 1)}
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    for epoch, batch in epochs.items():
        for row, index in enumerate(indices):
            assert torch.equal(batch[row], kornia_alone(images[row], 5, epoch, index)), row
    for row in range(len(indices)):
        assert not torch.equal(epochs[0][row], epochs[1][row])
    assert not torch.equal(epochs[0], images)


def test_train_batches_arrive_as_uint8_and_leave_augmented_eval_batches_untouched(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        image_data, tmp_path,
        data={"train": str(image_data / "train"), "val": str(image_data / "val"),
              "num_workers": 0, "preprocess": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
              "augment": {"train": AUGMENT, "val": AUGMENT}},
    )  # fmt: skip
    task = ClassifyTask(cfg)
    splits = task.datasets()
    order = DataOrder(list(range(len(splits.train))), 5, seed=0)
    loader = TrainLoader(splits.train, order, task.collate, cfg.data, torch.device("cpu"))
    batch = next(loader.epoch(2))
    assert batch.inputs["pixel_values"].dtype == torch.uint8  # shipped as the cache holds it
    job = batch.extras["augment"]
    assert job.epoch == 2 and len(job.indices) == 5
    done = task.augment(batch)
    for row, index in enumerate(job.indices):
        unit = batch.inputs["pixel_values"][row].float() / 255
        expected = kornia_alone(unit, cfg.train.seed, 2, index) * 2 - 1  # mean = std = 0.5
        assert torch.equal(done.inputs["pixel_values"][row], expected), row

    val = next(iter(eval_loader(splits.val, 4, task.collate, cfg.data, torch.device("cpu"))))
    assert "augment" not in val.extras and task.augment(val) is val
    # evaluation reads the split's own samples: its augment setting is applied per sample there
    assert torch.equal(val.inputs["pixel_values"][0], splits.val[0]["pixel_values"])
