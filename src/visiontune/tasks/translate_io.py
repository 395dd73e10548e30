"""Prediction for translation: tiles of any size in, GeoTIFF + quick-look + figure out.

Each input tile is cut into overlapping windows of the model's input size and stitched back
(visiontune.data.tiling). The result is written in the target's units as a float32 GeoTIFF
carrying the source's georeferencing when it had any, with NaN where the source had no data;
beside it a PNG quick-look and a source / prediction / target figure (the target is looked up
as `<tile's folder>/../<target dir>/<same name>.*`, and left out when there is none).
Nothing already in the output folder is overwritten: predict refuses before it writes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from visiontune.data.paired import (
    from_model_space,
    invalid_pixels,
    raster_files,
    select_bands,
    to_model_space,
)
from visiontune.data.rasters import Raster, read_raster, write_geotiff
from visiontune.data.tiling import Stitcher, WindowRef, window_grid
from visiontune.errors import DataError, VisiontuneError
from visiontune.task import Batch, Outputs
from visiontune.tasks.translate_pictures import save_comparison, save_quicklook

if TYPE_CHECKING:
    from visiontune.tasks.translate import TranslateTask

log = logging.getLogger(__name__)


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    return {
        "prediction": out_dir / f"{name}.tif",
        "quicklook": out_dir / f"{name}.png",
        "figure": out_dir / f"{name}_compare.png",
    }


@dataclass
class PredictionPass:
    """What the batches of one `predict` share: the stitcher and every input's name."""

    stitcher: Stitcher
    names: list[str]
    checked: bool = False


def refuse_overwrites(names: list[str], out_dir: Path) -> None:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise VisiontuneError(
            f"predict: several inputs are named {twice}: their outputs would "
            "overwrite each other; predict them into separate --out folders"
        )
    existing = [p for n in names for p in output_paths(out_dir, n).values() if p.exists()]
    if existing:
        raise VisiontuneError(
            f"predict: {existing[0]} exists ({len(existing)} output(s) in all); "
            "choose another --out or move them away"
        )


def paired_target(task: TranslateTask, path: Path) -> Path | None:
    folder = path.parent.parent / task.target.dir
    return raster_files(folder).get(path.stem) if folder.is_dir() else None


def read_input(task: TranslateTask, path: Path) -> dict[str, Any]:
    """A tile in model space: source, valid mask, and the paired target when there is one."""
    raster = read_raster(path)
    pixels = select_bands(raster, task.source, "task.source", path)
    invalid = invalid_pixels(
        pixels, task.source.nodata if task.source.nodata is not None else raster.nodata
    )
    size = task.options.crop_size
    if min(pixels.shape[1:]) < size:
        raise DataError(f"{path}: {pixels.shape[1:]} is smaller than task.crop_size {size}")
    tile: dict[str, Any] = {"name": path.stem, "path": path, "raster": raster}
    target_path = paired_target(task, path)
    if target_path is not None:
        target_raster = read_raster(target_path)
        target = select_bands(target_raster, task.target, "task.target", target_path)
        if target.shape[1:] == pixels.shape[1:]:
            invalid = invalid | invalid_pixels(target, task.target.nodata)
            tile["target"] = to_model_space(target, invalid, task.target)
    tile["source"] = to_model_space(pixels, invalid, task.source)
    tile["valid"] = torch.from_numpy(~invalid)[None]
    return tile


def prediction_batches(task: TranslateTask, inputs: list[dict[str, Any]]) -> Iterator[Batch]:
    """Windows of one tile at a time (in input order); an unreadable input yields its error."""
    options = task.options
    step = task.cfg.eval.batch_size or task.cfg.train.micro_batch_size
    names = [Path(str(item["image"])).stem for item in inputs]
    shared = PredictionPass(Stitcher(options.crop_size, options.tile_overlap), names)
    for item in inputs:
        path = Path(str(item["image"]))
        try:
            tile = read_input(task, path)
        except DataError as err:
            log.warning("predict: %s", err)
            record = {"image": str(path), "error": str(err)}
            yield Batch({}, [], extras={"records": [record], "pass": shared})
            continue
        _, height, width = tile["source"].shape
        grid = window_grid(height, width, options.crop_size, options.tile_overlap)
        refs = [WindowRef(tile["name"], t, left, height, width, len(grid)) for t, left in grid]
        for start in range(0, len(refs), step):
            chunk = refs[start : start + step]
            size = options.crop_size
            windows = [
                tile["source"][:, r.top : r.top + size, r.left : r.left + size] for r in chunk
            ]
            last = start + step >= len(refs)
            extras = {"refs": chunk, "pass": shared, "tile": tile if last else None}
            yield Batch(
                {"source": torch.stack(windows)}, [tile["name"]] * len(chunk), extras=extras
            )


def write_predictions(
    task: TranslateTask, outputs: Outputs, batch: Batch, out_dir: Path
) -> list[dict[str, Any]]:
    """Stitch the batch's windows; write the finished tile's files and return its record."""
    shared: PredictionPass = batch.extras["pass"]
    if not shared.checked:
        refuse_overwrites(shared.names, out_dir)
        shared.checked = True
    if not len(batch):
        return batch.extras["records"]
    finished = None
    for prediction, ref in zip(outputs["prediction"], batch.extras["refs"], strict=True):
        finished = shared.stitcher.add(prediction, ref) or finished
    tile = batch.extras["tile"]
    if finished is None or tile is None:
        return []
    return [write_tile(task, tile, finished[1], out_dir)]


def write_tile(
    task: TranslateTask, tile: dict[str, Any], prediction: torch.Tensor, out_dir: Path
) -> dict[str, Any]:
    from visiontune.metrics.image import image_metrics

    paths = output_paths(out_dir, tile["name"])
    raster: Raster = tile["raster"]
    physical = from_model_space(prediction, task.target).numpy()
    physical[:, ~tile["valid"][0].numpy()] = np.nan
    write_geotiff(paths["prediction"], physical, raster.geo)
    save_quicklook(prediction, tile["valid"], paths["quicklook"])
    record: dict[str, Any] = {
        "image": str(tile["path"]),
        "prediction": str(paths["prediction"]),
        "quicklook": str(paths["quicklook"]),
        "figure": str(paths["figure"]),
        "georeferenced": bool(raster.geo),
        "masked_pixels": int((~tile["valid"]).sum()),
    }
    shown = {
        "name": tile["name"],
        "source": tile["source"],
        "prediction": prediction,
        "valid": tile["valid"],
        "target": tile.get("target"),
    }
    if tile.get("target") is not None:
        scores = image_metrics(
            prediction, tile["target"], task.options.data_range, valid=tile["valid"]
        )
        record.update(psnr=float(scores["psnr"]), ssim=float(scores["ssim"]))
        shown["psnr"] = record["psnr"]
    save_comparison(shown, task.source, task.target, paths["figure"])
    return record
