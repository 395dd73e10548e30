"""Train-time augmentation with kornia, deterministic per (seed, epoch, sample index).

Each sample draws its random parameters from its own generator seeded by (train.seed, epoch,
index), inside `torch.random.fork_rng`, so augmentation never consumes the global RNG. That
keeps a resumed run bit-identical to an uninterrupted one whatever the number of workers, and
makes "which crop did sample 17 get in epoch 3" a reproducible question.

Two places can apply it (`data.augment_on`): `Augmenter`, one sample at a time in the data
workers, and `BatchAugmenter`, one batched kornia call on the collated batch on the training
device (the cache then holds, and the workers ship, the uint8 pixels). Both draw each sample's
parameters the same way, so they give the same pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from visiontune.config.schema import Augment

if TYPE_CHECKING:
    import kornia.augmentation as K


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that differs for every (seed, epoch, index); negative seeds are fine."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededPipeline:
    """The configured kornia pipeline and the seed its per-sample draws derive from."""

    def __init__(self, cfg: Augment, size: int, seed: int) -> None:
        self.seed = seed
        self.pipeline = build_pipeline(cfg, size)

    @property
    def active(self) -> bool:
        return self.pipeline is not None


class Augmenter(SeededPipeline):
    """Applies the configured augmentations to one CHW image in [0, 1]."""

    def __call__(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        if self.pipeline is None:
            return image
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            out = self.pipeline(image.unsqueeze(0))
        return out.squeeze(0).clamp_(0.0, 1.0)


def build_pipeline(cfg: Augment, size: int) -> K.AugmentationSequential | None:
    """The kornia pipeline for `cfg`, or None when every augmentation is off (kornia is then
    never imported)."""
    if cfg == Augment():
        return None
    import kornia.augmentation as K

    steps: list[K.AugmentationBase2D] = []
    if cfg.resized_crop is not None:
        steps.append(K.RandomResizedCrop((size, size), scale=tuple(cfg.resized_crop), p=1.0))
    if cfg.hflip > 0:
        steps.append(K.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        steps.append(K.RandomVerticalFlip(p=cfg.vflip))
    if cfg.rotation > 0:
        steps.append(K.RandomRotation(degrees=cfg.rotation, p=1.0))
    if cfg.color_jitter > 0:
        # two steps in a fixed order, not ColorJitter: its order is drawn once per batch, so a
        # batch could not carry each sample's own draw
        jitter = (1.0 - cfg.color_jitter, 1.0 + cfg.color_jitter)
        steps.append(K.RandomBrightness(brightness=jitter, p=1.0))
        steps.append(K.RandomContrast(contrast=jitter, p=1.0))
    if not steps:
        return None
    return K.AugmentationSequential(*steps)


@dataclass(frozen=True)
class AugmentJob:
    """What a batch needs to be augmented on the device: the epoch and each row's sample index
    (carried in `Batch.extras["augment"]` by the collate of an augmenting train split)."""

    epoch: int
    indices: tuple[int, ...]


class BatchAugmenter(SeededPipeline):
    """Applies the configured augmentations to a whole NCHW batch in [0, 1] in one kornia call,
    with every row's parameters drawn as `Augmenter` draws them for that sample alone."""

    def __call__(self, images: torch.Tensor, job: AugmentJob) -> torch.Tensor:
        if self.pipeline is None:
            return images
        per_sample = []
        with torch.random.fork_rng(devices=[]):
            for index in job.indices:
                torch.manual_seed(sample_seed(self.seed, job.epoch, index))
                per_sample.append(self.pipeline.forward_parameters((1, *images.shape[1:])))
        params = [
            type(items[0])(items[0].name, _stack([item.data for item in items], images))
            for items in zip(*per_sample, strict=True)
        ]
        return self.pipeline(images, params=params).clamp_(0.0, 1.0)


def _stack(draws: list[dict[str, torch.Tensor]], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step's per-sample parameters as the parameters of the batch, on its device: rows
    are concatenated (a step skipped by its probability has no row, as in a batched draw)."""
    stacked = {key: torch.cat([draw[key] for draw in draws]).to(images.device) for key in draws[0]}
    stacked["forward_input_shape"] = torch.tensor(images.shape)
    return stacked
