"""Instance targets for SAM 3: one sample per (image, category), every instance a mask.

Sources: COCO instances (one record per image and category; an image without an instance of
a category is a negative example of it), labelme shapes (shapes sharing a `group_id` are one
instance) and mask folders (each 8-connected component of the non-zero pixels is an instance,
or each distinct value with `task.sam3.instances_from: values`).

Resizing: the image is squashed to SAM 3's square input (as Sam3ImageProcessor does, no
padding). A mask is resized with "any" semantics: a frame pixel is on when any original pixel
under it is on (area interpolation, then > 0). Nearest-neighbour resizing samples one source
pixel per frame pixel and so drops most of a one-pixel crack when the image shrinks; with
"any" a crack stays a connected line at least one frame pixel wide. Metrics are computed on
the original-resolution masks, so this widening never flatters a score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from visiontune.data.coco import find_annotation_file, read_coco_split
from visiontune.data.images import decode_image
from visiontune.data.labelme import LabelMap, read_json, read_labelme_split
from visiontune.data.masks import PngMasks, read_mask_folder
from visiontune.data.pixel_cache import PixelCache, Pixels
from visiontune.data.segmentation import IGNORE, SHARED, TARGET, MaskSource, PolygonMasks
from visiontune.errors import DataError
from visiontune.task import Skipped

log = logging.getLogger(__name__)


@dataclass
class NoInstances:
    """A negative example: the category does not occur in the image."""

    def render(self, width: int, height: int, merge: bool) -> list[np.ndarray]:
        return []


@dataclass
class ComponentMasks:
    """Each 8-connected component of a mask PNG's non-zero pixels as one instance."""

    png: PngMasks

    def render(self, width: int, height: int, merge: bool) -> list[np.ndarray]:
        merged = self.png.render(width, height, merge=True)[0]
        labels, count = ndimage.label(merged == TARGET, structure=np.ones((3, 3), dtype=int))
        ignore = merged == IGNORE
        masks = []
        for value in range(1, count + 1):
            mask = (labels == value).astype(np.uint8) * TARGET
            mask[ignore] = IGNORE
            masks.append(mask)
        return masks


@dataclass
class InstanceRecord:
    sample_id: str
    image: Path
    width: int
    height: int
    masks: MaskSource
    category: str


def read_instances(
    fmt: str, key: str, path: Path, options: Any, problems: list[str]
) -> list[InstanceRecord]:
    """Records of one split; `options` is the segment task config (prompts, formats)."""
    if fmt == "coco":
        return _coco(key, path, options, problems)
    category = single_category(options.prompts, fmt)
    if fmt in ("labelme", "reasonseg"):
        labels = LabelMap(
            tuple(options.labelme.target_labels),
            tuple(options.labelme.ignore_labels),
            tuple(options.labelme.skip_labels),
        )
        records = read_labelme_split(key, path, labels, False, problems)
        return [
            InstanceRecord(r.sample_id, r.image, r.width, r.height, r.masks, category)
            for r in records
        ]
    folder = options.mask_folder
    records = read_mask_folder(
        key, path, folder.images, folder.masks, folder.ignore_value, problems
    )
    split_values = options.sam3.instances_from == "values"
    return [
        InstanceRecord(
            r.sample_id,
            r.image,
            r.width,
            r.height,
            r.masks if split_values else ComponentMasks(r.masks),  # type: ignore[arg-type]
            category,
        )
        for r in records
    ]


def declared_instances(record: InstanceRecord) -> int | None:
    """How many instances a record's annotations declare, where that is known without
    rendering (COCO annotations, labelme instance ids); None for mask PNGs."""
    masks = record.masks
    if isinstance(masks, NoInstances):
        return 0
    if isinstance(masks, PolygonMasks):
        return len({p.instance for p in masks.polygons if p.instance != SHARED})
    instances = getattr(masks, "instances", None)
    return len(instances) if isinstance(instances, list) else None


def too_many_instances(records: list[InstanceRecord], limit: int) -> list[str]:
    """One problem per record declaring more instances than the model has queries, found
    before training so that every such image is named at once (mask PNGs are checked as they
    are read)."""
    problems = []
    for record in records:
        count = declared_instances(record)
        if count is not None and count > limit:
            problems.append(
                f"{record.image}: {count} instances of {record.category!r} but the model has "
                f"{limit} queries; set task.sam3.too_many_instances: truncate to keep the "
                f"{limit} largest"
            )
    return problems


def single_category(prompts: dict[str, str], fmt: str) -> str:
    if len(prompts) != 1:
        raise DataError(
            f"task.prompts: {fmt} data has one category; name it and its text prompt, e.g. "
            "`task.prompts: {crack: crack}`" + (f" (got {sorted(prompts)})" if prompts else "")
        )
    return next(iter(prompts))


def _coco(key: str, path: Path, options: Any, problems: list[str]) -> list[InstanceRecord]:
    """Per (image, category) records, negatives included, every category checked against
    `task.prompts` when it is set."""
    found = read_coco_split(key, path, False, True, problems, options.coco_images)
    images = read_coco_split(key, path, False, False, [], options.coco_images)
    try:
        source = find_annotation_file(key, path)
        listed = [str(c.get("name")) for c in read_json(source).get("categories", [])]
    except (DataError, AttributeError):
        return []
    categories = list(options.prompts) or listed
    unknown = [c for c in listed if options.prompts and c not in options.prompts]
    problems.extend(
        f"{source}: category {c!r} matches no prompt in task.prompts {sorted(options.prompts)}"
        for c in unknown
    )
    missing = [c for c in categories if c not in listed]
    problems.extend(f"task.prompts: {c!r} is not a category of {source}" for c in missing)
    have = {r.sample_id for r in found}
    records = [
        InstanceRecord(r.sample_id, r.image, r.width, r.height, r.masks, r.texts[0])
        for r in found
        if r.texts[0] in categories
    ]
    for image in images:
        for category in categories:
            if f"{image.sample_id}:{category}" not in have:
                records.append(
                    InstanceRecord(
                        f"{image.sample_id}:{category}",
                        image.image,
                        image.width,
                        image.height,
                        NoInstances(),
                        category,
                    )
                )
    return sorted(records, key=lambda r: r.sample_id)


def resize_any(masks: np.ndarray, size: int) -> torch.Tensor:
    """(M, H, W) 0/1 masks to (M, size, size) bool: on where any source pixel under it is on."""
    if len(masks) == 0:
        return torch.zeros(0, size, size, dtype=torch.bool)
    tensor = torch.from_numpy(masks.astype(np.float32))[:, None]
    return F.interpolate(tensor, size=(size, size), mode="area")[:, 0] > 0


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) in [0, 1] around each mask, edges at pixel borders (never zero-size,
    so a one-pixel crack still has a box GIoU can score)."""
    count, height, width = masks.shape
    if count == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(2), masks.any(1)
    line_h = torch.arange(height, device=masks.device)
    line_w = torch.arange(width, device=masks.device)
    y1 = torch.where(rows, line_h, height).min(1).values
    y2 = torch.where(rows, line_h, -1).max(1).values + 1
    x1 = torch.where(cols, line_w, width).min(1).values
    x2 = torch.where(cols, line_w, -1).max(1).values + 1
    scale = torch.tensor([width, height, width, height], device=masks.device)
    return torch.stack([x1, y1, x2, y2], 1).float() / scale


@dataclass(frozen=True)
class InstanceOptions:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_instances: int
    truncate: bool
    prompts: dict[str, str]
    exemplars: int = 0
    seed: int = 0


class InstanceDataset(Dataset):
    """Records decoded on access into SAM 3 inputs and per-instance targets.

    `ignore` pixels (255) of any instance form one per-sample ignore region (`ignore` at the
    input frame, `eval_ignore` at the original size; target pixels never count as ignored)
    that the loss and the union-mask metrics leave out.

    Instances that are empty (all ignore, or no pixel at all) are dropped, counted in
    `empty_instances` and named in the log; a record whose every instance is ignore comes
    back as Skipped (nothing to learn or score), while a record with no instance at all is a
    negative example.
    """

    def __init__(
        self, records: list[InstanceRecord], options: InstanceOptions, cache: PixelCache | None
    ) -> None:
        self.records = records
        self.options = options
        self.cache = cache
        self.empty_instances = 0
        self.augmented = False
        self.epoch = 0

    @property
    def keys(self) -> list[str]:
        return [f"{r.sample_id}\t{r.image}\t{r.category}" for r in self.records]

    def image_paths(self) -> list[Path]:
        return [r.image for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        """Only the drawn box exemplars depend on the epoch (pixels are never augmented)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        record = self.records[index]
        try:
            pixels = self.pixels(record.image)
            height, width = (int(v) for v in pixels["size"])
            rendered = record.masks.render(width, height, False)
        except DataError as err:
            return Skipped(record.sample_id, str(err))
        if self._all_ignore(record, rendered, width, height):
            return Skipped(record.sample_id, "every instance is ignore: nothing to score")
        truth = [m == TARGET for m in rendered]
        empty = [k for k, m in enumerate(truth) if not m.any()]
        if empty:
            self.empty_instances += len(empty)
            log.warning("%s: instance(s) %s are empty and were dropped", record.sample_id, empty)
        truth = [m for m in truth if m.any()]
        truth = self._limit(record, truth)
        stack = np.stack(truth) if truth else np.zeros((0, height, width), dtype=bool)
        frame = resize_any(stack, self.options.size)
        ignore = np.zeros((height, width), dtype=bool)
        for mask in rendered:
            ignore |= mask == IGNORE
        ignore &= ~stack.any(0)
        unit = pixels["frame"].float() / 255.0
        mean = torch.tensor(self.options.mean).view(3, 1, 1)
        std = torch.tensor(self.options.std).view(3, 1, 1)
        boxes = mask_boxes(frame)
        return {
            "id": record.sample_id,
            "image_path": str(record.image),
            "category": record.category,
            "text": self.options.prompts.get(record.category, record.category),
            "pixel_values": (unit - mean) / std,
            "masks": frame,
            "boxes": boxes,
            "exemplar_boxes": boxes[self._exemplars(index, len(boxes))],
            "eval_masks": torch.from_numpy(stack),
            "eval_ignore": torch.from_numpy(ignore),
            "ignore": resize_any(ignore[None], self.options.size)[0] & ~frame.any(0),
        }

    def _exemplars(self, index: int, count: int) -> torch.Tensor:
        """Which instances are shown as exemplars: a different draw each epoch, the same for
        the same (seed, epoch, sample) so that a resumed run sees what it would have seen."""
        wanted = min(self.options.exemplars, count)
        if wanted == 0:
            return torch.zeros(0, dtype=torch.long)
        rng = np.random.default_rng((self.options.seed, self.epoch, index))
        return torch.from_numpy(np.sort(rng.choice(count, wanted, replace=False)))

    @staticmethod
    def _all_ignore(
        record: InstanceRecord, rendered: list[np.ndarray], width: int, height: int
    ) -> bool:
        """Instances that are all ignore, or (labelme: ignore shapes belong to no instance) an
        annotated image with ignore shapes and no target shape."""
        if rendered:
            return all(bool((m == IGNORE).all()) for m in rendered)
        if isinstance(record.masks, NoInstances):
            return False
        merged = record.masks.render(width, height, True)
        return bool(merged) and bool((merged[0] == IGNORE).any())

    def _limit(self, record: InstanceRecord, truth: list[np.ndarray]) -> list[np.ndarray]:
        """At most `max_instances` (the model's queries): an error, or the largest kept."""
        limit = self.options.max_instances
        if len(truth) <= limit:
            return truth
        if not self.options.truncate:
            raise DataError(
                f"{record.image}: {len(truth)} instances of {record.category!r} but the model "
                f"has {limit} queries; set task.sam3.too_many_instances: truncate to keep the "
                f"{limit} largest"
            )
        log.warning(
            "%s: %d instances, only the %d largest kept (model has %d queries)",
            record.image, len(truth), limit, limit,
        )  # fmt: skip
        return sorted(truth, key=lambda m: -int(m.sum()))[:limit]

    def pixels(self, path: Path) -> Pixels:
        """The squashed S x S uint8 image and the original (height, width)."""

        def make() -> Pixels:
            image = decode_image(path)
            size = self.options.size
            array = np.array(image.resize((size, size), Image.Resampling.BILINEAR), np.uint8)
            return {
                "frame": torch.from_numpy(array).permute(2, 0, 1).contiguous(),
                "size": torch.tensor([image.height, image.width], dtype=torch.int64),
            }

        return make() if self.cache is None else self.cache.load(path, make)
