"""Reading and writing rasters of any band count and dtype: GeoTIFF, PNG/JPEG and .npy.

Every reader returns bands first (`[C, H, W]`, float32) plus what is needed to write a result
back in the source's place on the ground: the GeoTIFF georeferencing tags (model tie point,
pixel scale or transformation, GeoKey directory and its parameters) and the no-data value.
GeoTIFFs are read with `tifffile` (pure Python: no GDAL); a file that does not parse as a
TIFF is a DataError naming it, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.errors import DataError, located

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RASTER_SUFFIXES = (*TIFF_SUFFIXES, *IMAGE_SUFFIXES, ".npy")

GEO_TAGS = {
    33550: ("ModelPixelScaleTag", "d"),
    33922: ("ModelTiepointTag", "d"),
    34264: ("ModelTransformationTag", "d"),
    34735: ("GeoKeyDirectoryTag", "H"),
    34736: ("GeoDoubleParamsTag", "d"),
    34737: ("GeoAsciiParamsTag", "s"),
}
"""TIFF tag code -> (name, tifffile dtype code) of the tags that place a raster on the ground."""
NODATA_TAG = 42113  # GDAL_NODATA, an ASCII number


@dataclass
class Raster:
    """Bands-first pixels, the source's georeferencing tags (empty when it had none), and its
    no-data value (None when it declared none)."""

    pixels: np.ndarray
    geo: dict[int, Any] = field(default_factory=dict)
    nodata: float | None = None
    dtype: str = "float32"

    @property
    def bands(self) -> int:
        return int(self.pixels.shape[0])


def read_raster(path: Path) -> Raster:
    """Read a raster as `[C, H, W]` float32, whatever the format and the stored dtype."""
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path)
    if suffix == ".npy":
        return _read_npy(path)
    if suffix in IMAGE_SUFFIXES:
        return _read_image(path)
    raise DataError(located(path, f"unsupported raster type {suffix!r}; use {RASTER_SUFFIXES}"))


def _read_tiff(path: Path) -> Raster:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            series = tif.series[0]
            array = series.asarray()
            geo = {code: page.tags[code].value for code in GEO_TAGS if code in page.tags}
            nodata_tag = page.tags.get(NODATA_TAG)
            samples_last = series.axes.endswith("S")
    except (tifffile.TiffFileError, ValueError, OSError, IndexError) as err:
        raise DataError(located(path, f"not a readable GeoTIFF/TIFF: {err}")) from None
    nodata = _parse_nodata(path, nodata_tag.value) if nodata_tag is not None else None
    return Raster(_bands_first(array, samples_last), geo, nodata, str(array.dtype))


def _parse_nodata(path: Path, text: Any) -> float:
    try:
        return float(str(text).strip().strip("\x00"))
    except ValueError:
        raise DataError(located(path, f"GDAL_NODATA tag {text!r} is not a number")) from None


def _read_npy(path: Path) -> Raster:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(located(path, f"not a readable .npy array: {err}")) from None
    if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.number):
        raise DataError(
            located(path, f"expected a numeric [C, H, W] or [H, W] array, got {array.shape}")
        )
    pixels = array[None] if array.ndim == 2 else array
    return Raster(pixels.astype(np.float32), dtype=str(array.dtype))


def _read_image(path: Path) -> Raster:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(located(path, f"not a readable image: {err}")) from None
    return Raster(_bands_first(array, array.ndim == 3), dtype=str(array.dtype))


def _bands_first(array: np.ndarray, samples_last: bool) -> np.ndarray:
    if array.ndim == 2:
        array = array[None]
    elif samples_last:
        array = np.moveaxis(array, -1, 0)
    return np.ascontiguousarray(array, dtype=np.float32)


def write_geotiff(path: Path, pixels: np.ndarray, geo: dict[int, Any]) -> None:
    """Write `[C, H, W]` float32 pixels as a (Geo)TIFF carrying the source's georeferencing,
    band-interleaved as GDAL writes multi-band rasters, so QGIS and rasterio place it."""
    import tifffile

    extratags = []
    for code, value in geo.items():
        _, dtype = GEO_TAGS[code]
        values = value if isinstance(value, str) else tuple(np.ravel(value).tolist())
        count = 0 if isinstance(value, str) else len(values)
        extratags.append((code, dtype, count, values, True))
    tifffile.imwrite(
        path,
        np.moveaxis(pixels.astype(np.float32), 0, -1),
        planarconfig="contig",
        photometric="minisblack",
        extratags=extratags,
    )
