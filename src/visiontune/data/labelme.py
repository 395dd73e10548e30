"""ReasonSeg / labelme layout: `split/xxx.jpg` next to `split/xxx.json`.

The JSON holds `text` (a list of queries; evaluation uses the first), `is_sentence`, and
labelme `shapes` (`{label, points, shape_type, group_id}`). Labels map to mask values: target
-> 1, ignore -> 255 (left out of metrics), flag -> skipped. Every file is checked before
training starts and all problems are reported together; some ReasonSeg files are cp1252
rather than UTF-8, so that is tried second.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontune.data.images import IMAGE_SUFFIXES, upright_size
from visiontune.data.segmentation import (
    IGNORE,
    SHARED,
    TARGET,
    Polygon,
    PolygonMasks,
    SegRecord,
)
from visiontune.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelMap:
    """Which shape labels are targets, ignore regions, or skipped flags."""

    target: tuple[str, ...] = ("target",)
    ignore: tuple[str, ...] = ("ignore",)
    skip: tuple[str, ...] = ("flag",)

    def value(self, label: str) -> int | None:
        if label in self.target:
            return TARGET
        if label in self.ignore:
            return IGNORE
        return None

    def known(self) -> list[str]:
        return [*self.target, *self.ignore, *self.skip]


def read_json(path: Path) -> Any:
    """Parse JSON as UTF-8 (BOM allowed), falling back to cp1252; DataError if corrupt."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="strict")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: corrupt JSON ({err.msg} at line {err.lineno})") from None


def read_labelme_split(
    key: str, root: Path, labels: LabelMap, need_text: bool, problems: list[str]
) -> list[SegRecord]:
    """Records of every JSON/image pair under `root`; problems are appended, not raised."""
    if not root.is_dir():
        problems.append(f"{key}: {root} is not a directory of images with labelme JSON files")
        return []
    records = []
    clipped: dict[str, int] = {}
    for path in sorted(root.rglob("*.json")):
        try:
            record = _read_one(path, root, labels, need_text, clipped)
        except DataError as err:
            problems.append(str(err))
            continue
        records.append(record)
    if not records and not problems:
        problems.append(f"{key}: no labelme JSON files in {root}")
    if clipped:
        first = ", ".join(f"{name} ({n})" for name, n in list(clipped.items())[:3])
        log.warning(
            "%s: clipped %d polygon point(s) outside the image in %d file(s), e.g. %s",
            key,
            sum(clipped.values()),
            len(clipped),
            first,
        )
    return records


def _read_one(
    path: Path, root: Path, labels: LabelMap, need_text: bool, clipped: dict[str, int]
) -> SegRecord:
    try:
        data = read_json(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: neither UTF-8 nor cp1252 text ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with `shapes`")
    image = _sibling_image(path)
    width, height = upright_size(image)
    texts = _texts(path, data, need_text)
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise DataError(f"{path}: `shapes` must be a list of labelme shapes")
    polygons = []
    for index, shape in enumerate(shapes):
        where = f"{path}: shapes[{index}]"
        if not isinstance(shape, dict):
            raise DataError(f"{where}: expected an object with label and points")
        label = str(shape.get("label"))
        if label in labels.skip:
            continue
        value = labels.value(label)
        if value is None:
            raise DataError(f"{where}: unknown label {label!r}; known labels: {labels.known()}")
        points = _points(where, shape, width, height, clipped, path.name)
        group = shape.get("group_id")
        instance = SHARED if value == IGNORE else (int(group) if group is not None else -2 - index)
        polygons.append(Polygon(tuple(points), value, instance))
    sample_id = path.relative_to(root).with_suffix("").as_posix()
    return SegRecord(
        sample_id=sample_id,
        image=image,
        width=width,
        height=height,
        masks=PolygonMasks(polygons),
        texts=texts,
        is_sentence=bool(data.get("is_sentence", False)),
    )


def _sibling_image(path: Path) -> Path:
    for candidate in sorted(path.parent.glob(path.stem + ".*")):
        if candidate.suffix.lower() in IMAGE_SUFFIXES:
            return candidate
    raise DataError(f"{path}: no image next to it (looked for {path.stem}.jpg/.png/...)")


def _texts(path: Path, data: dict[str, Any], need_text: bool) -> list[str]:
    raw = data.get("text", [])
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{path}: `text` must be a list of strings")
    texts = [t.strip() for t in texts if t.strip()]
    if need_text and not texts:
        raise DataError(f"{path}: `text` is empty; text-prompted segmentation needs a query")
    return texts


def _points(
    where: str, shape: dict[str, Any], width: int, height: int, clipped: dict[str, int], name: str
) -> list[tuple[float, float]]:
    """Validated polygon points, clipped to the image (counted per file for one warning)."""
    raw = shape.get("points")
    if not isinstance(raw, list) or not all(
        isinstance(p, list | tuple) and len(p) == 2 and all(_is_number(v) for v in p) for p in raw
    ):
        raise DataError(f"{where}: points must be a list of [x, y] numbers, got {raw!r:.80}")
    points = [(float(x), float(y)) for x, y in raw]
    kind = shape.get("shape_type") or "polygon"
    if kind == "rectangle" and len(points) == 2:
        (x1, y1), (x2, y2) = points
        points = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    elif kind != "polygon":
        raise DataError(f"{where}: shape_type {kind!r} is not supported (polygon, rectangle)")
    if len(points) < 3:
        raise DataError(f"{where}: a polygon needs at least 3 points, got {len(points)}")
    inside = [(min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))) for x, y in points]
    moved = sum(a != b for a, b in zip(points, inside, strict=True))
    if moved:
        clipped[name] = clipped.get(name, 0) + moved
    return inside


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
