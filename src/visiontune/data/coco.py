"""COCO instance JSON (polygons and RLE) for multi-instance data such as cracks.

RLE is decoded here rather than through pycocotools (a compiled dependency that often fails to
build): counts alternate background/foreground runs over the mask in column-major order,
either as a list of ints ("uncompressed", used for crowds) or as pycocotools' compact string,
where each count is written in 5-bit groups offset by 48, with the sign in bit 0x10 of the
last group and counts from the fourth on stored as differences to the count two before.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.data.images import upright_size
from visiontune.data.labelme import read_json
from visiontune.data.segmentation import TARGET, Polygon, SegRecord, fill_polygons
from visiontune.errors import DataError, ImageError, located

log = logging.getLogger(__name__)


def rle_counts(counts: str | list[int]) -> list[int]:
    """Run lengths from either COCO RLE form (see the module docstring for the string form)."""
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("uncompressed RLE counts must be non-negative integers")
        return list(counts)
    runs: list[int] = []
    position = 0
    data = counts.encode("ascii")
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(data):
                raise ValueError("RLE string ends inside a count")
            chunk = data[position] - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"RLE string has an invalid character {chr(data[position])!r}")
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    if any(r < 0 for r in runs):
        raise ValueError("RLE string decodes to a negative run length")
    return runs


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE `{size: [h, w], counts}` as a uint8 0/1 array of shape (h, w)."""
    height, width = (int(v) for v in rle["size"])
    runs = rle_counts(rle["counts"])
    if sum(runs) != height * width:
        raise ValueError(
            f"RLE runs cover {sum(runs)} pixels, size {height}x{width} has {height * width}"
        )
    values = np.zeros(len(runs), dtype=np.uint8)
    values[1::2] = TARGET
    flat = np.repeat(values, runs)
    return flat.reshape((width, height)).T.copy()


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
        if isinstance(item, dict):
            return decode_rle(item)
        polygons = [
            Polygon(tuple(zip(flat[0::2], flat[1::2], strict=True)), TARGET, 0) for flat in item
        ]
        return fill_polygons(polygons, width, height)


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
        try:
            size = [int(v) for v in seg["size"]]
            runs = rle_counts(seg["counts"])
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"{where}: bad RLE segmentation ({err})")
            return None
        if size != [height, width]:
            problems.append(
                f"{where}: RLE mask size {size[1]}x{size[0]} differs from image {width}x{height}"
            )
            return None
        if sum(runs) != height * width:
            problems.append(f"{where}: RLE runs cover {sum(runs)} pixels, not {height * width}")
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
    return seg
