"""COCO instance JSON (polygons and RLE) for multi-instance data such as cracks.

Masks are decoded by pycocotools, COCO's own code, so a polygon covers exactly the pixels
COCO's evaluation and areas count (a vertex at (x, y) is a pixel corner: the square [0, 2] x
[0, 3] covers pixels x 0-1, y 0-2). pycocotools checks little on its own: it rejects RLE runs
that run past the mask, but leaves the pixels after runs that stop short uninitialised, and
it truncates or wraps uncompressed counts that are not non-negative integers. So every RLE is
checked here when the file is read, and a bad one is named with its file and annotation.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from visiontune.data.images import upright_size
from visiontune.data.labelme import read_json
from visiontune.data.segmentation import TARGET, SegRecord
from visiontune.errors import DataError, ImageError, located

log = logging.getLogger(__name__)


def check_rle(rle: dict[str, Any], height: int, width: int) -> str | None:
    """Why `rle` is not a mask of `height` x `width` pixels, or None when it is one."""
    try:
        size = [int(v) for v in rle["size"]]
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        return "an RLE needs `size: [height, width]` and `counts`"
    if size != [height, width]:
        return f"RLE mask size {size[1]}x{size[0]} differs from image {width}x{height}"
    pixels = height * width
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            return "uncompressed RLE counts must be non-negative integers"
        if sum(counts) != pixels:
            return f"RLE runs cover {sum(counts)} pixels, not {pixels}"
        return None
    if not isinstance(counts, str) or not counts.isascii():
        return "RLE counts must be a list of integers or pycocotools' ASCII string"
    # pycocotools rejects runs past the end, so runs covering exactly `pixels` decode at
    # (height, width) and fail one pixel shorter; runs that stop short decode at both.
    if not _decodes(counts, (height, width)):
        return f"RLE string is malformed or its runs cover more than {pixels} pixels"
    if _decodes(counts, (pixels - 1, 1)):
        return f"RLE string's runs cover fewer than the {pixels} pixels of the mask"
    return None


def _decodes(counts: str, size: tuple[int, int]) -> bool:
    try:
        mask_utils.decode({"size": list(size), "counts": counts})
    except ValueError:
        return False
    return True


@dataclass
class AnnotationMasks:
    """One image's instances: each a list of polygons or one RLE dict."""

    instances: list[list[list[float]] | dict[str, Any]]

    def render(self, width: int, height: int, merge: bool) -> list[np.ndarray]:
        masks = [self._one(item, width, height) for item in self.instances]
        if merge:
            merged = np.zeros((height, width), dtype=np.uint8)
            for mask in masks:
                merged = np.maximum(merged, mask)
            return [merged]
        return masks

    @staticmethod
    def _one(item: list[list[float]] | dict[str, Any], width: int, height: int) -> np.ndarray:
        """One instance as a uint8 0/TARGET mask (checked by `check_rle` when read)."""
        if isinstance(item, dict):
            rle = item
            if isinstance(item["counts"], list):
                rle = mask_utils.frPyObjects(item, height, width)
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(item, height, width))
        return (mask_utils.decode(rle) * TARGET).astype(np.uint8)


def find_annotation_file(key: str, path: Path) -> Path:
    """The JSON itself, or the one JSON inside a folder (Roboflow's `_annotations.coco.json`)."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.json")) if path.is_dir() else []
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise DataError(f"{key}: {path} holds {what} COCO JSON files; point it at one file")
    return found[0]


def read_coco_split(
    key: str,
    path: Path,
    merge: bool,
    by_category: bool,
    problems: list[str],
    image_dir: Path | None = None,
) -> list[SegRecord]:
    """Records from a COCO file: one per image, or per (image, category) with `by_category`.

    With `by_category` the category name becomes the record's text, so "crack" can be a text
    prompt. Problems (missing images, bad segmentations, size mismatches) are appended.
    """
    try:
        source = find_annotation_file(key, path)
        data = read_json(source)
    except DataError as err:
        problems.append(str(err))
        return []
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        problems.append(f"{source}: not a COCO instance file (no `images` list)")
        return []
    folder = image_dir or source.parent
    categories = {c.get("id"): str(c.get("name")) for c in data.get("categories", [])}
    images = {}
    for entry in data["images"]:
        image = _check_image(source, folder, entry, problems)
        if image is not None:
            images[entry["id"]] = image
    grouped: dict[Any, dict[Any, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for index, ann in enumerate(data.get("annotations", [])):
        where = f"{source}: annotations[{index}]"
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in images:
            problems.append(f"{where}: image_id {image_id!r} is not in `images`")
            continue
        _, width, height = images[image_id]
        item = _segmentation(where, ann.get("segmentation"), width, height, problems)
        if item is not None:
            group = ann.get("category_id") if by_category else None
            grouped[image_id][group].append(item)
    records = []
    for image_id, (file, width, height) in images.items():
        groups = grouped[image_id] if by_category else {None: grouped[image_id][None]}
        for group, items in groups.items():
            name = file.relative_to(folder).with_suffix("").as_posix()
            text = categories.get(group, str(group))
            records.append(
                SegRecord(
                    sample_id=f"{name}:{text}" if by_category else name,
                    image=file,
                    width=width,
                    height=height,
                    masks=AnnotationMasks(items),
                    texts=[text] if by_category else [],
                )
            )
    if not records and not problems:
        problems.append(f"{key}: {source} lists no usable images")
    return records


def _check_image(
    source: Path, folder: Path, entry: Any, problems: list[str]
) -> tuple[Path, int, int] | None:
    if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
        problems.append(f"{source}: an `images` entry lacks id or file_name: {entry!r:.80}")
        return None
    file = folder / str(entry["file_name"])
    try:
        width, height = upright_size(file)
    except ImageError as err:
        problems.append(located(file, f"{err.problem} (image id {entry['id']} of {source})"))
        return None
    declared = (entry.get("width", width), entry.get("height", height))
    if declared != (width, height):
        problems.append(
            f"{source}: image id {entry['id']} declares {declared[0]}x{declared[1]} but "
            f"{file} is {width}x{height}"
        )
        return None
    return file, width, height


def _segmentation(
    where: str, seg: Any, width: int, height: int, problems: list[str]
) -> list[list[float]] | dict[str, Any] | None:
    """A validated polygon list or RLE dict, or None with the problem recorded."""
    if isinstance(seg, dict):
        problem = check_rle(seg, height, width)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            return None
        return seg
    if not isinstance(seg, list) or not seg:
        problems.append(f"{where}: segmentation must be polygons or an RLE dict")
        return None
    for flat in seg:
        if not isinstance(flat, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in flat
        ):
            problems.append(f"{where}: polygon coordinates must be numbers, got {flat!r:.60}")
            return None
        if len(flat) < 6 or len(flat) % 2:
            problems.append(f"{where}: a polygon needs at least 3 (x, y) points, got {flat!r:.60}")
            return None
        far = _far_point(flat, width, height)
        if far is not None:
            problems.append(
                f"{where}: polygon point {far} lies far outside the {width}x{height} image "
                "(annotated on a larger copy of the image?)"
            )
            return None
    return seg


def _far_point(flat: list[float], width: int, height: int) -> tuple[float, float] | None:
    """A point that is not finite or lies more than one image size outside the image.

    Points slightly outside are clipped by pycocotools; far ones make its rasterizer walk
    (and allocate for) every pixel of the edge, and crash it at around 1e9.
    """
    for x, y in zip(flat[0::2], flat[1::2], strict=True):
        inside_x = math.isfinite(x) and -width <= x <= 2 * width
        inside_y = math.isfinite(y) and -height <= y <= 2 * height
        if not (inside_x and inside_y):
            return (x, y)
    return None
