"""Synthetic crack images for the SAM 3 demo and tests: a mask folder with instance ids.

Each image is grey concrete-like noise with one to three dark cracks (jagged polylines, 2-3
px wide by default), each in its own horizontal band so that no two touch: the connected
components of the mask are then exactly the instances, and its pixel values (1, 2, 3) too.

    python -m visiontune.data.synthetic_cracks OUT [--count 8] [--size 96]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def crack_image(
    rng: random.Random, size: int, widths: tuple[int, ...] = (2, 3)
) -> tuple[Image.Image, Image.Image]:
    """One image and its instance-id mask (0 background, k for crack k)."""
    noise = np.random.default_rng(rng.randrange(2**31)).normal(170, 12, (size, size, 3))
    image = Image.fromarray(noise.clip(0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    count = rng.randint(1, 3)
    band = size // count
    for k in range(count):
        top = k * band + 4
        y = rng.uniform(top, top + band - 8)
        x = rng.uniform(2, size * 0.3)
        points = [(x, y)]
        while x < size * rng.uniform(0.7, 0.98):
            x += rng.uniform(4, 9)
            y = min(max(y + rng.uniform(-4, 4), top), top + band - 8)
            points.append((x, y))
        width = rng.choice(widths)
        draw_image.line(points, fill=(35, 30, 30), width=width)
        draw_mask.line(points, fill=k + 1, width=width)
    return image, mask


def generate(
    out: Path, count: int = 8, size: int = 96, seed: int = 0, widths: tuple[int, ...] = (2, 3)
) -> Path:
    """`out/train/{images,masks}` with `count` images; returns `out`."""
    rng = random.Random(seed)
    for folder in ("images", "masks"):
        (out / "train" / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = crack_image(rng, size, widths)
        image.save(out / "train" / "images" / f"crack{i:03d}.png")
        mask.save(out / "train" / "masks" / f"crack{i:03d}.png")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--width", type=int, nargs="+", default=[2, 3], help="crack widths, px")
    args = parser.parse_args()
    print(generate(args.out, args.count, args.size, widths=tuple(args.width)))
