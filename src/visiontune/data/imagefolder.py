"""Image-classification data from an image folder or a CSV (APTOS-style), validated up front.

Two layouts, chosen by `data.format`:

- `imagefolder`: `<split_dir>/<class_name>/<image>.png|jpg|jpeg|bmp|tif`;
- `csv`: a CSV file per split with an image column and a label column; image paths follow
  `data.csv.image_pattern` relative to the CSV's folder (`train_images/{image}.png`).

Everything that can be checked before training is checked before training, and every problem
is reported in one error, so a user fixes the config and the data in one round instead of
discovering one missing file per (expensive) run. Decoding all images up front would take
minutes on real datasets, so a file that exists but is corrupt is found when it is read (the
dataset returns `Skipped` and the engine counts it) or by `visiontune config check`, which does
spend those minutes.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from visiontune.config.schema import Augment, Config, DataConfig
from visiontune.data.augment import Augmenter
from visiontune.data.images import (
    IMAGE_SUFFIXES,
    ImageSpec,
    decode_image,
    normalise,
    preprocessing_key,
    to_pixels,
)
from visiontune.data.pixel_cache import PixelCache
from visiontune.errors import ConfigError, DataError, located
from visiontune.task import Skipped, Splits

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SHOWN = 5  # how many offending files or rows an error message lists


@dataclass(frozen=True)
class Record:
    """One labelled image: where it is, its class index, and the id used in logs."""

    path: Path
    label: int
    sample_id: str


@dataclass(frozen=True)
class RawEntry:
    """An image path with its label as written on disk, before classes are known."""

    path: Path
    label: str
    sample_id: str
    where: str


class ImageClassificationDataset(Dataset):
    """Labelled images, preprocessed (and augmented when configured) on access."""

    def __init__(
        self,
        records: list[Record],
        spec: ImageSpec,
        augment: Augment | None,
        seed: int,
        cache: PixelCache | None = None,
        augment_later: bool = False,
    ) -> None:
        self.records = records
        self.spec = spec
        self.cache = cache
        self.augmenter = Augmenter(augment or Augment(), spec.size, seed)
        self.augment_later = augment_later and self.augmenter.active
        self.epoch = 0

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def keys(self) -> list[str]:
        """Sample id and label index per sample: what a resumed data position refers to."""
        return [f"{r.sample_id}\t{r.label}" for r in self.records]

    def image_paths(self) -> list[Path]:
        """The files this split reads, for `config check` to decode."""
        return [r.path for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        """Called by the engine before each epoch: augmentation is drawn per (epoch, index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        record = self.records[index]
        try:
            unit = self.pixels(record.path).float() / 255.0
        except DataError as err:
            return Skipped(record.sample_id, str(err))
        unit = self.augmenter(unit, self.epoch, index)
        return {
            "pixel_values": normalise(unit, self.spec),
            "label": record.label,
            "id": record.sample_id,
        }

    def training_sample(self, epoch: int, index: int) -> dict[str, Any] | Skipped:
        """What the training loader reads. With `data.augment_on: device` (and augmentation
        configured): the uint8 pixels with their (epoch, index), for the task to augment and
        normalise the collated batch on the device; otherwise the sample as indexing gives it.
        Anyone else indexing the dataset (evaluation, checks) gets finished samples."""
        if not self.augment_later:
            self.set_epoch(epoch)
            return self[index]
        record = self.records[index]
        try:
            pixels = self.pixels(record.path)
        except DataError as err:
            return Skipped(record.sample_id, str(err))
        return {
            "pixel_values": pixels,
            "label": record.label,
            "id": record.sample_id,
            "augment": (epoch, index),
        }

    def pixels(self, path: Path) -> torch.Tensor:
        """The padded, resized uint8 image, from the cache when one is configured."""
        if self.cache is None:
            return to_pixels(decode_image(path), self.spec)
        entry = self.cache.load(path, lambda: {"image": to_pixels(decode_image(path), self.spec)})
        return entry["image"]


def build_splits(cfg: Config, spec: ImageSpec) -> tuple[list[str], Splits]:
    """Read and validate every configured split; return the class names and the datasets.

    Raises one ConfigError listing every problem (paths, columns, missing files, labels).
    """
    data = cfg.data
    problems: list[str] = []
    raw: dict[str, list[RawEntry]] = {}
    for split in SPLITS:
        path = getattr(data, split)
        if path is not None:
            raw[split] = _read_split(data, split, Path(path), problems)
    classes = _class_names(data, raw.get("train", []))
    records = {
        split: _to_records(data, split, entries, classes, problems)
        for split, entries in raw.items()
    }
    for split, entries in raw.items():
        if not entries and not _already_reported(problems, split):
            where = _abs(getattr(data, split))
            problems.append(f"data.{split}: split is empty (no images in {where})")
    if "train" in records and data.val is None and data.val_fraction > 0:
        records["train"], records["val"] = stratified_holdout(
            records["train"], data.val_fraction, cfg.train.seed, problems, data.group_pattern
        )
    if problems:
        raise ConfigError(problems, source="data")
    _warn_gaps(classes, records["train"])
    cache = PixelCache.from_config(data, preprocessing_key(spec)) if records else None

    def make(split: str) -> ImageClassificationDataset | None:
        if split not in records:
            return None
        return ImageClassificationDataset(
            records[split],
            spec,
            data.augment.get(split),
            cfg.train.seed,
            cache,
            augment_later=split == "train" and data.augment_on == "device",
        )

    train = make("train")
    assert train is not None
    return classes, Splits(train=train, val=make("val"), test=make("test"))


def stratified_holdout(
    records: list[Record],
    fraction: float,
    seed: int,
    problems: list[str],
    group_pattern: str | None = None,
) -> tuple[list[Record], list[Record]]:
    """Hold out `fraction` of each class (seeded), so val keeps the train class balance.

    With `group_pattern` whole groups (a patient's images) are held out together, stratified
    by the group's highest label: splitting images instead would put one eye of a patient in
    train and the other in val, and the validation score would flatter the model.
    """
    groups = _groups(records, group_pattern, problems)
    by_class: dict[int, list[list[Record]]] = defaultdict(list)
    for members in groups.values():
        by_class[max(r.label for r in members)].append(members)
    rng = random.Random(seed)
    train: list[Record] = []
    val: list[Record] = []
    for label in sorted(by_class):
        stratum = list(by_class[label])
        rng.shuffle(stratum)
        n_val = min(round(len(stratum) * fraction), len(stratum) - 1)
        val.extend(r for members in stratum[:n_val] for r in members)
        train.extend(r for members in stratum[n_val:] for r in members)
    if records and not val:
        problems.append(
            f"data.val_fraction: {fraction} of {len(records)} train images holds out no image; "
            "raise it or give data.val"
        )
    return train, val


def _groups(
    records: list[Record], pattern: str | None, problems: list[str]
) -> dict[str, list[Record]]:
    """Records by group: each its own without a pattern, else by the pattern's match."""
    if pattern is None:
        return {str(i): [r] for i, r in enumerate(records)}
    regex = re.compile(pattern)
    groups: dict[str, list[Record]] = defaultdict(list)
    unmatched = []
    for record in records:
        match = regex.search(record.sample_id)
        if match is None:
            unmatched.append(record.sample_id)
        else:
            groups[match.group(1) if regex.groups else match.group(0)].append(record)
    if unmatched:
        problems.append(
            f"data.group_pattern: {pattern!r} matches no group in {len(unmatched)} sample id(s), "
            f"e.g. {unmatched[:3]}"
        )
    return groups


def _read_split(data: DataConfig, split: str, path: Path, problems: list[str]) -> list[RawEntry]:
    key = f"data.{split}"
    if not path.exists():
        problems.append(f"{key}: path does not exist: {_abs(path)}")
        return []
    if data.format == "imagefolder":
        if not path.is_dir():
            problems.append(f"{key}: {_abs(path)} is not a folder (data.format is imagefolder)")
            return []
        return _read_folder(key, path, problems)
    if not path.is_file():
        problems.append(f"{key}: {_abs(path)} is not a CSV file (data.format is csv)")
        return []
    return _read_csv(data, key, path, problems)


def _read_folder(key: str, root: Path, problems: list[str]) -> list[RawEntry]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = sum(1 for p in root.iterdir() if _is_image(p))
        hint = f" (it holds {loose} loose images)" if loose else ""
        problems.append(
            f"{key}: no class folders in {_abs(root)}{hint}; expected <folder>/<class>/<image>"
        )
        return []
    entries: list[RawEntry] = []
    for folder in folders:
        images = sorted(p for p in folder.iterdir() if _is_image(p))
        if not images:
            problems.append(f"{key}: class folder {_abs(folder)} holds no images")
        where = str(folder)
        for image in images:
            rel = f"{folder.name}/{image.name}"
            entries.append(RawEntry(image, folder.name, rel, where))
    return entries


def _read_csv(data: DataConfig, key: str, path: Path, problems: list[str]) -> list[RawEntry]:
    columns = data.csv
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [c for c in reader.fieldnames or []]
        missing = [
            f"{name} (data.csv.{field})"
            for field, name in (
                ("image_column", columns.image_column),
                ("label_column", columns.label_column),
            )
            if name not in header
        ]
        if missing:
            problems.append(
                f"{key}: {_abs(path)} has no column {', '.join(missing)}; its columns are {header}"
            )
            return []
        rows = list(reader)
    entries: list[RawEntry] = []
    absent: list[str] = []
    seen: dict[str, tuple[int, str]] = {}
    repeated: list[str] = []
    for line, row in enumerate(rows, start=2):
        image = (row[columns.image_column] or "").strip()
        label = (row[columns.label_column] or "").strip()
        if image in seen:
            _repeated_id(path, line, image, label, seen[image], repeated, problems)
            continue
        seen[image] = line, label
        image_path = path.parent / columns.image_pattern.format(image=image)
        if not image_path.is_file():
            absent.append(str(image_path.relative_to(path.parent)))
        entries.append(RawEntry(image_path, label, image, f"{path}:{line}"))
    if repeated:
        log.warning(
            "%s: %d repeated row(s) with the same id and label kept once, e.g. %s",
            path,
            len(repeated),
            "; ".join(repeated[:_SHOWN]),
        )
    if absent:
        problems.append(
            f"{key}: {len(absent)} of {len(rows)} image files listed in {path.name} are missing "
            f"(looked under {_abs(path.parent)} with data.csv.image_pattern "
            f"{columns.image_pattern!r}), e.g. {absent[:_SHOWN]}"
        )
    return entries


def _repeated_id(
    path: Path,
    line: int,
    image: str,
    label: str,
    first: tuple[int, str],
    repeated: list[str],
    problems: list[str],
) -> None:
    """A second row for an id: harmless when it repeats the label, a contradiction otherwise.

    A contradiction is an error rather than a "last row wins": training on whichever label
    came last would teach the model a grade nobody checked.
    """
    first_line, first_label = first
    if label == first_label:
        repeated.append(f"id {image!r} at lines {first_line} and {line}")
        return
    problems.append(
        located(
            path,
            f"id {image!r} is labelled {label!r} here but {first_label!r} at line "
            f"{first_line}; one image cannot have two labels",
            line,
        )
    )


def _class_names(data: DataConfig, train: list[RawEntry]) -> list[str]:
    """`data.classes`, else the train labels sorted (numerically when all are integers)."""
    if data.classes is not None:
        return list(data.classes)
    values = {e.label for e in train if e.label}
    if values and all(_is_int(v) for v in values):
        return sorted(values, key=int)
    return sorted(values)


def _to_records(
    data: DataConfig,
    split: str,
    entries: list[RawEntry],
    classes: list[str],
    problems: list[str],
) -> list[Record]:
    """Map on-disk labels to class indices; name every unknown label with where it was seen.

    A CSV label may be a class name or, when `data.classes` is given, an integer position in
    it (APTOS writes grades 0-4 and `data.classes` names them none..proliferative).
    """
    index = {name: i for i, name in enumerate(classes)}
    positional = data.format == "csv" and data.classes is not None
    records: list[Record] = []
    unknown: list[str] = []
    for entry in entries:
        label = index.get(entry.label)
        if label is None and positional and _is_int(entry.label):
            position = int(entry.label)
            label = position if 0 <= position < len(classes) else None
        if label is None:
            unknown.append(f"{entry.where}: {entry.label!r}")
            continue
        records.append(Record(entry.path, label, entry.sample_id))
    if unknown and classes:
        problems.append(
            f"data.{split}: {len(unknown)} label(s) not in the classes {classes} "
            f"(data.classes), e.g. {'; '.join(unknown[:_SHOWN])}"
        )
    return records


def _warn_gaps(classes: list[str], train: list[Record]) -> None:
    counts = torch.bincount(torch.tensor([r.label for r in train]), minlength=len(classes))
    empty = [classes[i] for i, n in enumerate(counts.tolist()) if n == 0]
    if empty:
        log.warning("classes without any training image: %s", empty)


def _already_reported(problems: list[str], split: str) -> bool:
    return any(p.startswith(f"data.{split}:") for p in problems)


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _abs(path: Path | str | None) -> str:
    return str(Path(path or ".").resolve())
