"""Train-time augmentation with kornia, deterministic per (seed, epoch, sample index).

Each sample draws its random parameters from its own generator seeded by (train.seed, epoch,
index), inside `torch.random.fork_rng`, so augmentation never consumes the global RNG. That
keeps a resumed run bit-identical to an uninterrupted one whatever the number of workers, and
makes "which crop did sample 17 get in epoch 3" a reproducible question.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from visiontune.config.schema import Augment

if TYPE_CHECKING:
    import kornia.augmentation as K


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that differs for every (seed, epoch, index); negative seeds are fine."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Augmenter:
    """Applies the configured augmentations to one CHW image in [0, 1]."""

    def __init__(self, cfg: Augment, size: int, seed: int) -> None:
        self.seed = seed
        self.pipeline = build_pipeline(cfg, size)

    @property
    def active(self) -> bool:
        return self.pipeline is not None

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
        steps.append(K.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter, p=1.0))
    if not steps:
        return None
    return K.AugmentationSequential(*steps)
