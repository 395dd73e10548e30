"""Paired data of the translate task on copies of the real TerraMesh tiles: pairing, bands,
no-data, statistics, identical crops, tiling. Expected values come from tifffile and numpy
directly, never from the code under test."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from tests.translate.tiles import NAMES, VAL, translate_config
from visiontune.api import make_task
from visiontune.config.translate import BandsConfig
from visiontune.data.paired import TrainCrops, model_space_tiles, read_split
from visiontune.data.rasters import read_raster
from visiontune.data.tiling import Stitcher, WindowRef, window_grid
from visiontune.errors import DataError


def test_geotiff_reads_bands_first_as_tifffile_stores_them(tiles: Path) -> None:
    path = tiles / "train" / "S1RTC" / f"{NAMES[1]}.tif"
    raster = read_raster(path)
    expected = tifffile.imread(path)  # (H, W, C) float64
    assert raster.pixels.shape == (2, 224, 224)
    assert np.array_equal(raster.pixels, np.moveaxis(expected, -1, 0).astype(np.float32))
    with tifffile.TiffFile(path) as tif:
        assert raster.geo[33922] == tif.pages[0].tags["ModelTiepointTag"].value


def test_png_jpeg_and_npy_read_bands_first(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", rgb.transpose(2, 0, 1).astype(np.int16))
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    assert np.array_equal(read_raster(tmp_path / "a.png").pixels, rgb.transpose(2, 0, 1))
    assert np.array_equal(read_raster(tmp_path / "b.npy").pixels, rgb.transpose(2, 0, 1))
    assert read_raster(tmp_path / "c.jpg").pixels.shape == (3, 20, 30)


def test_a_source_without_its_target_and_the_reverse_are_both_named(tiles: Path) -> None:
    (tiles / "train" / "S2RGB" / f"{NAMES[1]}.tif").unlink()
    shutil.copyfile(tiles / "val" / "S2RGB" / f"{VAL}.tif", tiles / "train" / "S2RGB" / "x.tif")
    with pytest.raises(DataError) as err:
        make_task(translate_config(tiles, tiles / "runs")).datasets()
    message = str(err.value)
    assert f"S1RTC/{NAMES[1]}.tif: source without its target" in message
    assert "S2RGB/x.tif: target without its source" in message


def test_band_counts_that_differ_across_files_name_the_file(tiles: Path) -> None:
    odd = tiles / "train" / "S1RTC" / f"{NAMES[2]}.tif"
    tifffile.imwrite(odd, tifffile.imread(odd)[..., 0])
    with pytest.raises(DataError, match=f"{NAMES[2]}.tif: 1 band\\(s\\), but .* has 2"):
        make_task(translate_config(tiles, tiles / "runs")).datasets()


def test_a_band_index_out_of_range_names_the_key_and_the_band_count(tiles: Path) -> None:
    cfg = translate_config(
        tiles, tiles / "runs", task={"source": {"dir": "S1RTC", "bands": [0, 2]}}
    )
    with pytest.raises(DataError, match=r"task.source.bands \[2\] out of range: the file has 2"):
        make_task(cfg).datasets()


def test_a_file_that_is_not_a_geotiff_is_named(tiles: Path) -> None:
    bad = tiles / "train" / "S1RTC" / f"{NAMES[3]}.tif"
    bad.write_bytes(b"this is not a tiff")
    with pytest.raises(DataError, match=f"{NAMES[3]}.tif: not a readable GeoTIFF"):
        make_task(translate_config(tiles, tiles / "runs")).datasets()


def test_nan_and_nodata_sar_pixels_are_masked_and_counted(tiles: Path) -> None:
    path = tiles / "train" / "S1RTC" / f"{NAMES[1]}.tif"
    sar = tifffile.imread(path)
    sar[10:20, 30:35, 0] = np.nan  # 50 pixels NaN in VV
    sar[100, 100:104, 1] = -9999.0  # 4 pixels of no-data in VH
    tifffile.imwrite(
        path,
        sar,
        photometric="minisblack",
        planarconfig="contig",
        extratags=[(42113, "s", 0, "-9999", True)],
    )
    task = make_task(translate_config(tiles, tiles / "runs"))
    task.datasets()
    raw = read_split(tiles / "train", task.source, task.target)
    tile = model_space_tiles(raw, task.source, task.target)[0]
    assert tile.name == NAMES[1] and tile.masked_pixels == 54
    assert torch.isfinite(tile.source).all()
    # the train-split statistics leave the 54 pixels out (numpy on the valid pixels by hand)
    clipped = [
        np.clip(tifffile.imread(tiles / "train" / "S1RTC" / f"{n}.tif"), -30, 5) for n in NAMES[1:]
    ]
    keep = np.ones((224, 224), bool)
    keep[10:20, 30:35] = False
    keep[100, 100:104] = False
    values = np.concatenate([clipped[0][keep]] + [c.reshape(-1, 2) for c in clipped[1:]])
    assert np.allclose(task.source.mean, values.mean(0), rtol=1e-6)
    assert np.allclose(task.source.std, values.std(0), rtol=1e-6)


def test_train_statistics_are_pinned_in_the_config_stored_with_the_run(tiles: Path) -> None:
    task = make_task(translate_config(tiles, tiles / "runs"))
    pinned = task.resolved_config().task
    assert pinned.source.mean is not None and len(pinned.source.mean) == 2
    assert pinned.target.mean is None  # scale: range needs none


def test_crops_and_flips_are_identical_for_source_and_target(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train",):
        for k in range(2):
            source = rng.normal(size=(2, 40, 48)).astype(np.float32)
            (tmp_path / split / "src").mkdir(parents=True, exist_ok=True)
            (tmp_path / split / "tgt").mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / split / "src" / f"t{k}.npy", source)
            np.save(tmp_path / split / "tgt" / f"t{k}.npy", 2 * source[::-1] + 1)
    side_s = BandsConfig(dir="src", scale="none")
    side_t = BandsConfig(dir="tgt", scale="none")
    tiles = model_space_tiles(read_split(tmp_path / "train", side_s, side_t), side_s, side_t)
    crops = TrainCrops(tiles, size=16, crops_per_tile=20, flips=True, seed=3)
    flipped = 0
    for index in range(len(crops)):
        item = crops.training_sample(epoch=1, index=index)
        assert torch.equal(item["target"], 2 * item["source"].flip(0) + 1)
        name, offset = item["id"].split("@")
        top, left = map(int, offset.split(","))
        window = tiles[index // 20].source[:, top : top + 16, left : left + 16]
        flipped += not torch.equal(item["source"], window)
    assert 0 < flipped < len(crops)  # flips happen, and not always
    again = crops.training_sample(epoch=1, index=7)
    assert torch.equal(again["source"], crops.training_sample(epoch=1, index=7)["source"])


@pytest.mark.parametrize(
    ("height", "width", "size", "overlap"), [(224, 224, 64, 16), (50, 37, 16, 5)]
)
def test_overlapping_windows_stitch_back_to_the_tile(
    height: int, width: int, size: int, overlap: int
) -> None:  # noqa: E501
    tile = torch.randn(3, height, width)
    grid = window_grid(height, width, size, overlap)
    stitcher = Stitcher(size, overlap)
    done = None
    for top, left in grid:
        window = tile[:, top : top + size, left : left + size]
        done = stitcher.add(window, WindowRef("t", top, left, height, width, len(grid)))
    assert done is not None and done[0] == "t"
    assert torch.allclose(done[1], tile, atol=1e-5)
    covered = torch.zeros(height, width)
    for top, left in grid:
        covered[top : top + size, left : left + size] += 1
    assert covered.min() >= 1 and max(t for t, _ in grid) == height - size
