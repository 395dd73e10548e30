"""Folders of mask PNGs: `root/images/<name>.<ext>` with `root/masks/<name>.png`.

A mask pixel is background when 0 and target otherwise (binary 0/255 masks, as most crack
datasets ship them, work unchanged). `ignore_value`, when set, marks pixels to leave out of
metrics. Kept per instance, every distinct non-zero value is one instance (an instance-id PNG).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visiontune.data.images import IMAGE_SUFFIXES, open_image, upright_size
from visiontune.data.segmentation import IGNORE, TARGET, SegRecord
from visiontune.errors import DataError, located


@dataclass
class PngMasks:
    """A mask PNG rendered as merged target/ignore, or split into its instance values."""

    path: Path
    ignore_value: int | None

    def render(self, width: int, height: int, merge: bool) -> list[np.ndarray]:
        values = self._read()
        if values.shape != (height, width):
            raise DataError(
                f"{self.path}: mask is {values.shape[1]}x{values.shape[0]}, image {width}x{height}"
            )
        ignore = values == self.ignore_value if self.ignore_value is not None else None
        if merge:
            return [self._with_ignore((values != 0).astype(np.uint8) * TARGET, ignore)]
        ids = [v for v in np.unique(values) if v != 0 and v != self.ignore_value]
        return [self._with_ignore((values == v).astype(np.uint8) * TARGET, ignore) for v in ids]

    def _read(self) -> np.ndarray:
        with open_image(self.path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                img = img.convert("L")
            return np.asarray(img).astype(np.int64)

    @staticmethod
    def _with_ignore(mask: np.ndarray, ignore: np.ndarray | None) -> np.ndarray:
        if ignore is not None:
            mask[ignore] = IGNORE
        return mask


def read_mask_folder(
    key: str,
    root: Path,
    images_dir: str,
    masks_dir: str,
    ignore_value: int | None,
    problems: list[str],
) -> list[SegRecord]:
    """One record per image that has a same-named PNG mask of the same size."""
    images, masks = root / images_dir, root / masks_dir
    for folder in (images, masks):
        if not folder.is_dir():
            problems.append(
                f"{key}: {folder} does not exist (expected {images_dir}/ and "
                f"{masks_dir}/ under {root})"
            )
    if not (images.is_dir() and masks.is_dir()):
        return []
    records = []
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for image in files:
        name = image.relative_to(images).with_suffix("")
        mask = masks / name.with_suffix(".png")
        if not mask.is_file():
            problems.append(located(image, f"no mask for it (looked for {mask})"))
            continue
        try:
            width, height = upright_size(image)
            mask_size = upright_size(mask)
        except DataError as err:
            problems.append(str(err))
            continue
        if mask_size != (width, height):
            problems.append(
                located(
                    image,
                    f"mask {mask} is {mask_size[0]}x{mask_size[1]} but image is {width}x{height}",
                )
            )
            continue
        records.append(
            SegRecord(name.as_posix(), image, width, height, PngMasks(mask, ignore_value))
        )
    if not files:
        problems.append(f"{key}: no images in {images}")
    return records
