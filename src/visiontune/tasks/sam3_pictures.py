"""Pictures of SAM 3 answers: every instance in its own colour, outlined, with its score.

With one colour for all instances, two touching cracks read as one; a colour each (spread
around the hue circle by the golden ratio, so neighbours in the list differ most) and a white
outline show how the model split them.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from visiontune.metrics.segmentation import boundary

GOLDEN = 0.618033988749895


def instance_colour(index: int) -> tuple[int, int, int]:
    hue = (0.1 + index * GOLDEN) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def instance_overlay(
    image: Image.Image,
    masks: np.ndarray,
    scores: list[float],
    boxes: list[list[float]] | None = None,
    alpha: float = 0.55,
) -> Image.Image:
    """The image with instance k tinted in colour k, its outline white, its score written."""
    out = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    edges = np.zeros(out.shape[:2], dtype=bool)
    for k, mask in enumerate(masks):
        colour = np.array(instance_colour(k), dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        edges |= boundary(torch.from_numpy(mask)).numpy()
    out[edges] = 255.0
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for k, score in enumerate(scores):
        if boxes is not None:
            x1, y1, x2, y2 = boxes[k]
            draw.rectangle([x1, y1, x2, y2], outline=instance_colour(k))
            draw.text((x1 + 2, y1 + 1), f"{score:.2f}", fill=instance_colour(k))
    return picture
