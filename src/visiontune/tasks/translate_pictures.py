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
    from PIL import Image

    Image.fromarray(quicklook(x, valid)).save(path)


def save_comparison(
    tile: dict[str, Any], source: BandsConfig, target: BandsConfig, path: Path
) -> None:
    """One row: source | baseline (when given) | prediction | target (when given) | |error|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = tile["valid"]
    reference = tile.get("target")
    limits = stretch_limits(
        display_bands(reference if reference is not None else tile["prediction"]),
        valid[0].numpy().astype(bool),
    )
    panels: list[tuple[str, np.ndarray]] = [
        (f"source ({source.dir})", quicklook(tile["source"], valid))
    ]
    if tile.get("baseline") is not None:
        title = f"mean-image baseline\nPSNR {tile['baseline_psnr']:.2f} dB"
        panels.append((title, quicklook(tile["baseline"], valid, limits)))
    psnr = f"\nPSNR {tile['psnr']:.2f} dB" if tile.get("psnr") is not None else ""
    panels.append((f"prediction{psnr}", quicklook(tile["prediction"], valid, limits)))
    if reference is not None:
        panels.append((f"target ({target.dir})", quicklook(reference, valid, limits)))
        error = (tile["prediction"] - reference).abs().mean(0).numpy()
        error[~valid[0].numpy().astype(bool)] = np.nan
        panels.append(("|prediction - target| (band mean)", error))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, image) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(image, cmap="magma" if image.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(tile["name"], fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
