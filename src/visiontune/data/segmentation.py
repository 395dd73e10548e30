"""Segmentation samples: records from any on-disk format, mask rendering, SAM-frame inputs.

Format readers (labelme/ReasonSeg, COCO, mask folders) validate everything they can up front
and produce `SegRecord`s; masks are rendered lazily, at the image's own resolution, when a
sample is read. Mask values: 0 background, 1 target, 255 ignore (left out of metrics; the task
decides whether it is background or excluded in the loss).

SAM's frame: the longest side is resized to `size` and the image padded bottom-right to a
square, so the padded area is not part of the picture; `valid_hw` says which part is.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import kornia.augmentation as K
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from visiontune.config.schema import Augment
from visiontune.data.augment import sample_seed
from visiontune.data.images import (
    ImageSpec,
    decode_image,
    normalise,
    to_pixels,
)
from visiontune.data.pixel_cache import PixelCache, Pixels
from visiontune.errors import DataError
from visiontune.task import Skipped

log = logging.getLogger(__name__)

TARGET = 1
IGNORE = 255
SHARED = -1  # instance id of ignore polygons: they apply to every instance of an image


def raise_problems(problems: list[str], what: str) -> None:
    """One DataError listing every problem found, so a user fixes all of them at once."""
    if problems:
        raise DataError.listing(problems, what)


class MaskSource(Protocol):
    """Where a record's masks come from; renders one uint8 array (H, W) per instance."""

    def render(self, width: int, height: int, merge: bool) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Polygon:
    points: tuple[tuple[float, float], ...]
    value: int  # TARGET or IGNORE
    instance: int  # SHARED for ignore regions

    @property
    def area(self) -> float:
        """Shoelace area: the fill order (largest first, so small shapes stay visible)."""
        xs = np.array([p[0] for p in self.points])
        ys = np.array([p[1] for p in self.points])
        return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def fill_polygons(polygons: list[Polygon], width: int, height: int) -> np.ndarray:
    """Fill polygons largest area first, so a small shape drawn over a large one survives."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in sorted(polygons, key=lambda p: p.area, reverse=True):
        draw.polygon(list(polygon.points), fill=polygon.value, outline=polygon.value)
    return np.asarray(canvas, dtype=np.uint8).copy()


@dataclass
class PolygonMasks:
    """Masks drawn from polygons (labelme/ReasonSeg shapes, COCO polygon annotations)."""

    polygons: list[Polygon]

    def render(self, width: int, height: int, merge: bool) -> list[np.ndarray]:
        if merge:
            return [fill_polygons(self.polygons, width, height)]
        instances = sorted({p.instance for p in self.polygons if p.instance != SHARED})
        return [
            fill_polygons([p for p in self.polygons if p.instance in (k, SHARED)], width, height)
            for k in instances
        ]


@dataclass
class SegRecord:
    """One image with its masks and (for text-prompted segmentation) its queries."""

    sample_id: str
    image: Path
    width: int
    height: int
    masks: MaskSource
    texts: list[str] = field(default_factory=list)
    is_sentence: bool = False


@dataclass(frozen=True)
class Frame:
    """SAM's input frame: longest side resized to `size`, padded bottom-right to a square."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        scale = self.size / max(height, width)
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def unit_image(self, image: Image.Image) -> torch.Tensor:
        """Resized (not yet padded) CHW float image in [0, 1]."""
        return self.frame_pixels(image).float() / 255.0

    def frame_pixels(self, image: Image.Image) -> torch.Tensor:
        """Resized (not yet padded) CHW uint8 image: what the pixel cache keeps."""
        h, w = self.resized_hw(image.height, image.width)
        array = np.array(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def preprocessing_key(self) -> str:
        return f"sam-frame:{self.size}:bilinear:exif-rgb8"

    def resize_masks(self, masks: list[np.ndarray], height: int, width: int) -> torch.Tensor:
        h, w = self.resized_hw(height, width)
        resized = [
            np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.NEAREST)) for m in masks
        ]
        if not resized:
            return torch.zeros(0, h, w, dtype=torch.uint8)
        return torch.from_numpy(np.stack(resized)).to(torch.uint8)

    def pad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Pad the last two dims bottom-right with zeros to size x size."""
        h, w = tensor.shape[-2:]
        return torch.nn.functional.pad(tensor, (0, self.size - w, 0, self.size - h))

    def normalise(self, unit: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (unit - mean) / std


def joint_pipeline(cfg: Augment | None) -> K.AugmentationSequential | None:
    """Kornia augmentation applied identically to the image and its masks (nearest for masks).

    It runs per sample in the data workers, not batched on the device as classification's
    does: the box and point prompts are drawn from the augmented masks (a sample whose target
    left the frame is skipped), and each SAM frame is padded bottom-right from its own size,
    which a flip or rotation of the padded batch would move.
    """
    if cfg is None:
        return None
    steps: list[K.AugmentationBase2D] = []
    if cfg.hflip > 0:
        steps.append(K.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        steps.append(K.RandomVerticalFlip(p=cfg.vflip))
    if cfg.rotation > 0:
        steps.append(K.RandomRotation(degrees=cfg.rotation, p=1.0))
    if cfg.resized_crop is not None:
        # A crop of area fraction s, resized back, is a zoom of 1/sqrt(s) about a shifted centre;
        # as an affine map it keeps the frame's own (per-image) size, which a crop could not.
        zoom = 1.0 / cfg.resized_crop[0] ** 0.5
        shift = (1.0 - 1.0 / zoom) / 2
        steps.append(
            K.RandomAffine(degrees=0.0, translate=(shift, shift), scale=(1.0, zoom), p=1.0)
        )
    if cfg.color_jitter > 0:
        # brightness then contrast, as classification draws them (ColorJitter's order is random)
        jitter = (1.0 - cfg.color_jitter, 1.0 + cfg.color_jitter)
        steps.append(K.RandomBrightness(brightness=jitter, p=1.0))
        steps.append(K.RandomContrast(contrast=jitter, p=1.0))
    if not steps:
        return None
    return K.AugmentationSequential(*steps, data_keys=["input", "mask"])


@dataclass(frozen=True)
class SampleOptions:
    """What a split's samples hold: merged or per-instance masks, prompts, a CLIP view."""

    merge: bool
    prompt: str  # none | box | points | text
    num_points: int
    clip_spec: ImageSpec | None
    seed: int
    train: bool


class SegmentationDataset(Dataset):
    """Records decoded on access into SAM-frame inputs plus original-resolution eval masks.

    A sample that cannot be read (corrupt image) or has nothing to learn or score (a mask that
    is all ignore) comes back as `Skipped` with the reason, and the engine counts it.
    """

    def __init__(
        self,
        records: list[SegRecord],
        frame: Frame,
        options: SampleOptions,
        augment: Augment | None = None,
        cache: PixelCache | None = None,
    ) -> None:
        self.records = records
        self.frame = frame
        self.options = options
        self.cache = cache
        self.pipeline = joint_pipeline(augment)
        self.epoch = 0

    @property
    def augmented(self) -> bool:
        """Random augmentation changes the pixels, so cached frozen features cannot be reused."""
        return self.pipeline is not None

    def image_paths(self) -> list[Path]:
        """The images this split reads, for `config check` to decode."""
        return [r.image for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def keys(self) -> list[str]:
        """Sample id, image and queries per sample: what a resumed data position refers to."""
        return [f"{r.sample_id}\t{r.image}\t{r.texts}" for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        record = self.records[index]
        try:
            pixels = self.pixels(record.image)
            height, width = (int(v) for v in pixels["size"])
            masks = record.masks.render(width, height, self.options.merge)
        except DataError as err:
            return Skipped(record.sample_id, str(err))
        if not masks:
            return Skipped(record.sample_id, "no instance to segment")
        if all(bool((m == IGNORE).all()) for m in masks):
            return Skipped(record.sample_id, "mask is entirely ignore (255): nothing to score")
        seed = sample_seed(self.options.seed, self.epoch if self.options.train else 0, index)
        unit = pixels["frame"].float() / 255.0
        frame_masks = self.frame.resize_masks(masks, height, width)
        eval_masks = torch.from_numpy(np.stack(masks))
        if self.pipeline is not None:
            unit, frame_masks = self._augment(unit, frame_masks, seed)
            eval_masks = frame_masks
        prompts: dict[str, torch.Tensor] = {}
        if self.options.prompt in ("box", "points"):
            keep = [i for i, m in enumerate(frame_masks) if bool((m == TARGET).any())]
            if not keep:
                return Skipped(record.sample_id, f"{self.options.prompt} prompt: empty target")
            frame_masks, eval_masks = frame_masks[keep], eval_masks[keep]
            prompts = gt_prompts(frame_masks, self.options.num_points, seed)
        sample: dict[str, Any] = {
            "id": record.sample_id,
            "image_path": str(record.image),
            "pixel_values": self.frame.pad(self.frame.normalise(unit)),
            "masks": self.frame.pad(frame_masks),
            "valid_hw": tuple(unit.shape[-2:]),
            "eval_masks": eval_masks,
            "augmented": self.pipeline is not None,
            **prompts,
        }
        if self.options.prompt == "text":
            texts = record.texts
            sample["text"] = random.Random(seed).choice(texts) if self.options.train else texts[0]
        if self.options.clip_spec is not None:
            sample["clip_pixel_values"] = normalise(
                pixels["clip"].float() / 255.0, self.options.clip_spec
            )
        return sample

    def pixels(self, path: Path) -> Pixels:
        """The SAM-frame view (and the CLIP view when there is one) as uint8, plus the
        original (height, width) the masks are drawn at; from the cache when configured."""

        def make() -> Pixels:
            image = decode_image(path)
            views = {
                "frame": self.frame.frame_pixels(image),
                "size": torch.tensor([image.height, image.width], dtype=torch.int64),
            }
            if self.options.clip_spec is not None:
                views["clip"] = to_pixels(image, self.options.clip_spec)
            return views

        return make() if self.cache is None else self.cache.load(path, make)

    def _augment(
        self, unit: torch.Tensor, masks: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.pipeline is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, mask = self.pipeline(unit[None], masks[None].float())
        return image[0].clamp(0.0, 1.0), mask[0].round().to(torch.uint8)


def gt_prompts(masks: torch.Tensor, num_points: int, seed: int) -> dict[str, torch.Tensor]:
    """Box (x1, y1, x2, y2) and `num_points` foreground points per mask, in frame pixels.

    Points are drawn at random (seeded per sample and epoch) from the target pixels, as SAM's
    own training samples clicks; the box is tight around the target.
    """
    generator = torch.Generator().manual_seed(seed)
    boxes, points = [], []
    for mask in masks:
        ys, xs = torch.nonzero(mask == TARGET, as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float())
        pick = torch.randint(len(xs), (num_points,), generator=generator)
        points.append(torch.stack([xs[pick], ys[pick]], dim=-1).float())
    return {"boxes": torch.stack(boxes), "points": torch.stack(points)}


def holdout(
    records: list[SegRecord], fraction: float, seed: int
) -> tuple[list[SegRecord], list[SegRecord]]:
    """Seeded random split of `fraction` of the records into a validation split."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(records)))
    held = set(order[:n_val])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )
