"""Write scikit-learn's bundled handwritten digits (no download) as an image folder.

1,797 8x8 greyscale digits become 32x32 PNGs under <out>/train/<digit>/ and <out>/val/<digit>/
(a seeded, stratified 80/20 split), the layout `data.format: imagefolder` reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def write_digits(out: Path, size: int = 32, seed: int = 0) -> Path:
    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    train_idx, val_idx = train_test_split(
        np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in indices:
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BILINEAR)
            picture.save(folder / f"{i:04d}.png")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo-data/digits")
    if (target / "val").is_dir():
        print(f"digits already at {target}")
    else:
        print(f"wrote digits to {write_digits(target)}")
