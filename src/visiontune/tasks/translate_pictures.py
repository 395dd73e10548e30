"""Pictures of translation: a quick-look of any band count, and source / prediction / target.

Prediction, baseline and target share one contrast stretch (taken from the target, or the
prediction when there is none), so a difference in the picture is a difference in the data
and not in the stretch. The source gets its own: two SAR bands as false colour (VV, VH,
VV - VH), one band as grey.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from visiontune.config.translate import BandsConfig

Limits = tuple[np.ndarray, np.ndarray]


def display_bands(x: torch.Tensor) -> np.ndarray:
    """[H, W, 3] float: the first three bands, SAR false colour for two, grey for one."""
    array = x.detach().float().cpu().numpy()
    if array.shape[0] >= 3:
        return np.moveaxis(array[:3], 0, -1)
    if array.shape[0] == 2:
        return np.stack([array[0], array[1], array[0] - array[1]], axis=-1)
    return np.repeat(array[0][..., None], 3, axis=-1)


def stretch_limits(rgb: np.ndarray, valid: np.ndarray) -> Limits:
    """2nd and 98th percentile per channel over the valid pixels."""
    pixels = rgb[valid] if valid.any() else rgb.reshape(-1, 3)
    low, high = np.percentile(pixels, [2, 98], axis=0)
    return low, np.where(high > low, high, low + 1e-6)


def stretched(rgb: np.ndarray, limits: Limits, valid: np.ndarray) -> np.ndarray:
    low, high = limits
    out = np.clip((rgb - low) / (high - low), 0.0, 1.0)
    out[~valid] = (1.0, 0.0, 1.0)  # no-data in magenta: never mistaken for a dark pixel
    return out


def quicklook(x: torch.Tensor, valid: torch.Tensor, limits: Limits | None = None) -> np.ndarray:
    """[H, W, 3] uint8 picture of a raster of any band count."""
    rgb = display_bands(x)
    mask = valid[0].cpu().numpy().astype(bool)
    shown = stretched(rgb, limits or stretch_limits(rgb, mask), mask)
    return (shown * 255).round().astype(np.uint8)


def save_quicklook(x: torch.Tensor, valid: torch.Tensor, path: Path) -> None:
    Image.fromarray(quicklook(x, valid)).save(path)


def save_comparison(
    tile: dict[str, Any], source: BandsConfig, target: BandsConfig, path: Path
) -> None:
    """One row: source | baseline (when given) | prediction | target (when given) | |error|.

    Composed with PIL rather than matplotlib: it is drawn at every improving evaluation, and a
    row of images with captions needs no axes (matplotlib's layout pass costs seconds)."""
    valid = tile["valid"]
    mask = valid[0].numpy().astype(bool)
    reference = tile.get("target")
    limits = stretch_limits(
        display_bands(reference if reference is not None else tile["prediction"]), mask
    )
    panels: list[tuple[str, np.ndarray]] = [
        (f"source ({source.dir})", quicklook(tile["source"], valid))
    ]
    if tile.get("baseline") is not None:
        title = f"mean-image baseline: PSNR {tile['baseline_psnr']:.2f} dB"
        panels.append((title, quicklook(tile["baseline"], valid, limits)))
    psnr = f": PSNR {tile['psnr']:.2f} dB" if tile.get("psnr") is not None else ""
    panels.append((f"prediction{psnr}", quicklook(tile["prediction"], valid, limits)))
    if reference is not None:
        panels.append((f"target ({target.dir})", quicklook(reference, valid, limits)))
        panels.append(("|prediction - target|", error_picture(tile["prediction"], reference, mask)))
    path.parent.mkdir(parents=True, exist_ok=True)
    compose(panels, str(tile["name"])).save(path)


def error_picture(prediction: torch.Tensor, target: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """Band-mean absolute error in the magma colour map, scaled to its 99th percentile."""
    from matplotlib import colormaps

    error = (prediction - target).abs().mean(0).numpy()
    top = float(np.percentile(error[mask], 99)) if mask.any() else 1.0
    rgb = colormaps["magma"](np.clip(error / max(top, 1e-6), 0, 1))[..., :3]
    rgb[~mask] = (1.0, 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def compose(panels: list[tuple[str, np.ndarray]], title: str, gap: int = 8) -> Image.Image:
    """Panels side by side under the figure's title, each with its caption above it."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    height = max(p.shape[0] for _, p in panels)
    width = max(max(p.shape[1] for _, p in panels), 230)
    canvas = Image.new("RGB", (len(panels) * (width + gap) + gap, height + 52), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill="black", font=font)
    for i, (caption, picture) in enumerate(panels):
        left = gap + i * (width + gap)
        draw.text((left, 26), caption, fill="black", font=font)
        canvas.paste(Image.fromarray(picture), (left, 46))
    return canvas
