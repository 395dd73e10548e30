"""The configured segmentation splits: read and validate every record, then wrap in datasets.

All formats report problems into one list, raised together after every split was read, so a
user with a broken ReasonSeg download sees every bad file in one run.
"""

from __future__ import annotations

from pathlib import Path

from visiontune.config.schema import Config, SegmentTaskConfig
from visiontune.data.coco import read_coco_split
from visiontune.data.images import ImageSpec, preprocessing_key
from visiontune.data.labelme import LabelMap, read_labelme_split
from visiontune.data.masks import read_mask_folder
from visiontune.data.pixel_cache import PixelCache
from visiontune.data.segmentation import (
    Frame,
    SampleOptions,
    SegmentationDataset,
    SegRecord,
    holdout,
    raise_problems,
)
from visiontune.errors import ConfigError
from visiontune.task import Splits

SPLITS = ("train", "val", "test")


def build_splits(cfg: Config, frame: Frame, clip_spec: ImageSpec | None) -> Splits:
    """Datasets for every configured split (val held out of train when `data.val_fraction`)."""
    data, problems = cfg.data, []
    opts = cfg.task
    assert isinstance(opts, SegmentTaskConfig)
    records: dict[str, list[SegRecord]] = {}
    for split in SPLITS:
        path = getattr(data, split)
        if path is not None:
            records[split] = read_split(cfg, split, Path(path), problems)
            if not records[split] and not problems:
                problems.append(f"data.{split}: split is empty ({path})")
    if "val" not in records and data.val_fraction > 0 and records.get("train"):
        records["train"], records["val"] = holdout(
            records["train"], data.val_fraction, cfg.train.seed
        )
    raise_problems(problems, "data")
    clip = f"|clip:{preprocessing_key(clip_spec)}" if clip_spec is not None else ""
    cache = PixelCache.from_config(data, frame.preprocessing_key() + clip)

    def make(split: str) -> SegmentationDataset | None:
        if split not in records:
            return None
        options = SampleOptions(
            merge=opts.instances == "merge",
            prompt=opts.prompt,
            num_points=opts.num_points,
            clip_spec=clip_spec,
            seed=cfg.train.seed,
            train=split == "train",
        )
        return SegmentationDataset(records[split], frame, options, data.augment.get(split), cache)

    train = make("train")
    assert train is not None
    return Splits(train=train, val=make("val"), test=make("test"))


def read_split(cfg: Config, split: str, path: Path, problems: list[str]) -> list[SegRecord]:
    """Records of one split in the configured `data.format`; problems are appended."""
    key, fmt, opts = f"data.{split}", cfg.data.format, cfg.task
    assert isinstance(opts, SegmentTaskConfig)
    if fmt in ("labelme", "reasonseg"):
        labels = LabelMap(
            tuple(opts.labelme.target_labels),
            tuple(opts.labelme.ignore_labels),
            tuple(opts.labelme.skip_labels),
        )
        return read_labelme_split(key, path, labels, opts.prompt == "text", problems)
    if fmt == "coco":
        merge, by_category = opts.instances == "merge", opts.prompt == "text"
        return read_coco_split(key, path, merge, by_category, problems, opts.coco_images)
    if opts.prompt == "text":
        raise ConfigError(["task.prompt: text needs queries; mask_folder data has none"])
    folder = opts.mask_folder
    return read_mask_folder(key, path, folder.images, folder.masks, folder.ignore_value, problems)
