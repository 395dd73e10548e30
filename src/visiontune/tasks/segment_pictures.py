"""Pictures of masks: mask PNGs, overlays on the image, and a grid of evaluation examples.

A number like gIoU 0.41 says little about *how* a model fails; a few overlays (prediction in
magenta, ground truth outlined in green) show at a glance whether it misses thin parts, bleeds
into the background or picks the wrong object for the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visiontune.data.images import decode_image
from visiontune.metrics.segmentation import IGNORE, boundary

PRED_RGB = np.array([255, 0, 255], dtype=np.float32)
TRUTH_RGB = np.array([40, 255, 40], dtype=np.uint8)


@dataclass
class Example:
    """One evaluated mask kept for the figure."""

    image: str
    text: str
    pred: np.ndarray  # bool (H, W)
    truth: np.ndarray  # uint8 (H, W): 0, 1, IGNORE
    iou: float


def save_mask(mask: np.ndarray, path: Path) -> Path:
    """A binary mask as an 8-bit PNG, 255 = object, viewable in any image viewer."""
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def overlay(
    image: Image.Image, pred: np.ndarray, truth: np.ndarray | None = None, alpha: float = 0.6
) -> Image.Image:
    """The image with the prediction tinted magenta and the ground truth's outline in green."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = np.where(pred[..., None], (1 - alpha) * rgb + alpha * PRED_RGB, rgb)
    out = tinted.clip(0, 255).astype(np.uint8)
    if truth is not None:
        target = torch.from_numpy((truth != 0) & (truth != IGNORE))
        out[boundary(target).numpy()] = TRUTH_RGB
    return Image.fromarray(out)


def examples_figure(examples: list[Example], path: Path) -> Path:
    """A grid: one row per example, prediction overlay with the query and IoU as title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(examples))
    rows = (len(examples) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, example in zip(axes.flat, examples, strict=False):
        ax.imshow(overlay(decode_image(Path(example.image)), example.pred, example.truth))
        query = example.text if len(example.text) <= 60 else example.text[:57] + "..."
        ax.set_title(f"{query}\nIoU {example.iou:.2f}" if query else f"IoU {example.iou:.2f}")
    fig.suptitle("prediction (magenta) vs ground-truth outline (green)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
