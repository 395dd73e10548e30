"""Paired image-to-image data: `<split>/<source dir>/<name>` with `<split>/<target dir>/<name>`.

Files pair by name without extension (a GeoTIFF source may pair with a PNG target). Every
problem of a split is reported at once, each naming its file: a source without its target
and the reverse, band counts that differ across files, a band index out of range, source and
target of different sizes. Pixels that are NaN, or equal to the declared no-data value, in any
band of either side are left out of losses and metrics (the `valid` mask) and counted.

Tiles are small (a few hundred pixels a side) and read once into memory; the train split is
then seen as random crops, the same crop and flips for source and target, drawn per
(seed, epoch, index) so that a resumed run sees exactly the crops it would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from visiontune.config.translate import BandsConfig
from visiontune.data.rasters import RASTER_SUFFIXES, Raster, read_raster
from visiontune.data.tiling import WindowRef, window_grid
from visiontune.errors import DataError, located

log = logging.getLogger(__name__)


@dataclass
class Tile:
    """One pair in model space: source and target `[C, H, W]`, the valid mask `[1, H, W]`."""

    name: str
    source: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor

    @property
    def masked_pixels(self) -> int:
        return int((~self.valid).sum())


def raster_files(folder: Path) -> dict[str, Path]:
    """Raster files of a folder by name without extension."""
    if not folder.is_dir():
        raise DataError(located(folder, "folder does not exist"))
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in RASTER_SUFFIXES}


def find_pairs(split: Path, source_dir: str, target_dir: str) -> list[tuple[str, Path, Path]]:
    """(name, source file, target file) of every pair; all unpaired files in one error."""
    sources = raster_files(split / source_dir)
    targets = raster_files(split / target_dir)
    problems = [
        located(path, f"source without its target (no {target_dir}/{name}.*)")
        for name, path in sources.items()
        if name not in targets
    ]
    problems += [
        located(path, f"target without its source (no {source_dir}/{name}.*)")
        for name, path in targets.items()
        if name not in sources
    ]
    if problems:
        raise DataError.listing(problems, str(split), "unpaired file(s)")
    if not sources:
        raise DataError(located(split / source_dir, f"no raster files ({RASTER_SUFFIXES})"))
    return [(name, sources[name], targets[name]) for name in sorted(sources)]


def select_bands(raster: Raster, side: BandsConfig, key: str, path: Path) -> np.ndarray:
    """The configured bands, or a DataError naming the key and the file's band count."""
    if side.bands is None:
        return raster.pixels
    bad = [b for b in side.bands if not 0 <= b < raster.bands]
    if bad:
        raise DataError(
            located(
                path,
                f"{key}.bands {bad} out of range: the file has {raster.bands} band(s) "
                f"(0..{raster.bands - 1})",
            )
        )
    return raster.pixels[side.bands]


def invalid_pixels(pixels: np.ndarray, nodata: float | None) -> np.ndarray:
    """[H, W] True where any band is NaN/inf or equals the no-data value."""
    bad = ~np.isfinite(pixels).all(axis=0)
    if nodata is not None:
        bad |= (pixels == nodata).any(axis=0)
    return bad


RawPair = tuple[str, np.ndarray, np.ndarray, np.ndarray]
"""(name, source bands, target bands, invalid mask [H, W]) as read, before any scaling."""


def read_split(split: Path, source: BandsConfig, target: BandsConfig) -> list[RawPair]:
    """Every pair of a split, checked; all problems of the split in one DataError."""
    problems: list[str] = []
    pairs: list[RawPair] = []
    first: dict[str, tuple[int, Path]] = {}
    for name, src_path, tgt_path in find_pairs(split, source.dir, target.dir):
        sides = [
            read_side(path, side, key, first, problems)
            for key, side, path in (("task.source", source, src_path),
                                    ("task.target", target, tgt_path))
        ]  # fmt: skip
        if sides[0] is None or sides[1] is None:
            continue
        (src, src_bad), (tgt, tgt_bad) = sides
        if src.shape[1:] != tgt.shape[1:]:
            problems.append(located(tgt_path, f"size {tgt.shape[1:]} differs from its "
                                              f"source's {src.shape[1:]}"))  # fmt: skip
            continue
        pairs.append((name, src, tgt, src_bad | tgt_bad))
    if problems:
        raise DataError.listing(problems, str(split))
    return pairs


def read_side(
    path: Path,
    side: BandsConfig,
    key: str,
    first: dict[str, tuple[int, Path]],
    problems: list[str],
) -> tuple[np.ndarray, np.ndarray] | None:
    """One file's selected bands and invalid mask; None (and a problem noted) when its band
    count differs from the first file of its side."""
    raster = read_raster(path)
    count, example = first.setdefault(key, (raster.bands, path))
    if raster.bands != count:
        problems.append(located(path, f"{raster.bands} band(s), but {example} has {count}: "
                                      "every file of a side needs the same"))  # fmt: skip
        return None
    pixels = select_bands(raster, side, key, path)
    nodata = side.nodata if side.nodata is not None else raster.nodata
    return pixels, invalid_pixels(pixels, nodata)


def band_stats(
    arrays: list[np.ndarray], masks: list[np.ndarray], side: BandsConfig
) -> tuple[list[float], list[float]]:
    """Per-band mean and std over the valid pixels of a split, after dB clipping."""
    values = np.concatenate(
        [clip_db(a, side)[:, ~m] for a, m in zip(arrays, masks, strict=True)], axis=1
    ).astype(np.float64)
    std = values.std(axis=1)
    return values.mean(axis=1).tolist(), np.where(std > 0, std, 1.0).tolist()


def clip_db(pixels: np.ndarray, side: BandsConfig) -> np.ndarray:
    return np.clip(pixels, *side.db_clip) if side.db_clip is not None else pixels


def to_model_space(pixels: np.ndarray, invalid: np.ndarray, side: BandsConfig) -> torch.Tensor:
    """Clip, scale (stats or range), and zero the invalid pixels so no NaN reaches the model."""
    x = clip_db(pixels, side).astype(np.float32)
    if side.scale == "range":
        assert side.range is not None
        low, high = side.range
        x = (x - low) / (high - low)
    elif side.scale == "stats":
        assert side.mean is not None and side.std is not None
        x = (x - np.asarray(side.mean, np.float32)[:, None, None]) / np.asarray(
            side.std, np.float32
        )[:, None, None]
    x = np.where(invalid[None], 0.0, x)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def from_model_space(x: torch.Tensor, side: BandsConfig) -> torch.Tensor:
    """Inverse of `to_model_space`'s scaling: back to the units the files store."""
    if side.scale == "range":
        assert side.range is not None
        low, high = side.range
        return x * (high - low) + low
    if side.scale == "stats":
        assert side.mean is not None and side.std is not None
        mean = torch.tensor(side.mean)[:, None, None]
        return x * torch.tensor(side.std)[:, None, None] + mean
    return x


def model_space_tiles(
    raw: list[RawPair],
    source: BandsConfig,
    target: BandsConfig,
) -> list[Tile]:
    return [
        Tile(
            name,
            to_model_space(src, invalid, source),
            to_model_space(tgt, invalid, target),
            torch.from_numpy(~invalid)[None],
        )
        for name, src, tgt, invalid in raw
    ]


def sample(tile: Tile, top: int, left: int, size: int) -> dict[str, Any]:
    rows, cols = slice(top, top + size), slice(left, left + size)
    return {
        "source": tile.source[:, rows, cols],
        "target": tile.target[:, rows, cols],
        "valid": tile.valid[:, rows, cols],
    }


class TrainCrops(Dataset):
    """`crops_per_tile` random crops of each tile per epoch, flipped alike on both sides."""

    def __init__(
        self, tiles: list[Tile], size: int, crops_per_tile: int, flips: bool, seed: int
    ) -> None:
        self.tiles, self.size, self.per_tile = tiles, size, crops_per_tile
        self.flips, self.seed = flips, seed

    def __len__(self) -> int:
        return len(self.tiles) * self.per_tile

    @property
    def keys(self) -> list[str]:
        return [f"{t.name}#{k}" for t in self.tiles for k in range(self.per_tile)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.training_sample(0, index)

    def training_sample(self, epoch: int, index: int) -> dict[str, Any]:
        tile = self.tiles[index // self.per_tile]
        rng = np.random.default_rng([self.seed, epoch, index])
        _, height, width = tile.source.shape
        top = int(rng.integers(0, height - self.size + 1))
        left = int(rng.integers(0, width - self.size + 1))
        item = sample(tile, top, left, self.size)
        if self.flips:
            dims = [d for d, flip in ((-1, rng.random() < 0.5), (-2, rng.random() < 0.5)) if flip]
            if dims:
                item = {k: v.flip(dims) for k, v in item.items()}
        return {**item, "id": f"{tile.name}@{top},{left}"}


class TileWindows(Dataset):
    """Every overlapping window of every tile, for evaluation and prediction."""

    def __init__(self, tiles: list[Tile], size: int, overlap: int) -> None:
        self.tiles = tiles
        self.size = size
        self.refs: list[tuple[int, WindowRef]] = []
        for i, tile in enumerate(tiles):
            _, height, width = tile.source.shape
            grid = window_grid(height, width, size, overlap)
            for top, left in grid:
                self.refs.append((i, WindowRef(tile.name, top, left, height, width, len(grid))))

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, ref = self.refs[index]
        return {**sample(self.tiles[i], ref.top, ref.left, self.size), "id": ref.tile, "ref": ref}
