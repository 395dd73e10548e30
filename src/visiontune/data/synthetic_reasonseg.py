"""A synthetic dataset in ReasonSeg's on-disk format: coloured shapes and queries about them.

Each image holds two or three shapes of different colour and kind; the target is one of them
and the queries name it ("the red circle"), relate it to another shape ("the red circle left
of the square"), or describe it in a sentence. Some images carry an `ignore` polygon (a grey
smudge) and a `flag` shape, so readers exercise the whole ReasonSeg label set. It needs no
download, so the text-prompted pipeline can be trained end to end on a CPU in seconds.

    python -m visiontune.data.synthetic_reasonseg OUT_DIR --train 96 --val 24 --size 64
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 20),
}
KINDS = ("circle", "square", "triangle")


def shape_polygon(kind: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """The outline of a shape centred at (cx, cy) as polygon points (circles as 24-gons)."""
    if kind == "square":
        return [(cx - radius, cy - radius), (cx + radius, cy - radius),
                (cx + radius, cy + radius), (cx - radius, cy + radius)]  # fmt: skip
    if kind == "triangle":
        return [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
    steps = 24
    return [
        (
            cx + radius * math.cos(2 * math.pi * i / steps),
            cy + radius * math.sin(2 * math.pi * i / steps),
        )
        for i in range(steps)
    ]


def queries(target: dict, others: list[dict]) -> list[str]:
    """Several phrasings of the same request, as ReasonSeg lists several per image."""
    name = f"{target['colour']} {target['kind']}"
    texts = [f"the {name}", f"segment the {name}"]
    other = others[0]
    side = "left of" if target["cx"] < other["cx"] else "right of"
    texts.append(f"the {name} {side} the {other['kind']}")
    texts.append(f"Which object is the {target['colour']} one shaped like a {target['kind']}?")
    return texts


def make_image(rng: random.Random, size: int) -> tuple[Image.Image, dict]:
    """One picture and its ReasonSeg JSON record."""
    background = tuple(rng.randint(90, 160) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    count = rng.choice((2, 3))
    picks = rng.sample([(c, k) for c in COLOURS for k in KINDS], count)
    radius = size / 8
    slots = rng.sample(range(3), count)
    shapes = []
    for (colour, kind), slot in zip(picks, slots, strict=True):
        r = radius * rng.uniform(0.8, 1.2)
        cx = (slot + 0.5) * size / 3 + rng.uniform(-size / 24, size / 24)
        cx = min(max(cx, r + 1), size - r - 1)
        cy = rng.uniform(r + 1, size - r - 1)
        points = shape_polygon(kind, cx, cy, r)
        draw.polygon(points, fill=COLOURS[colour])
        shapes.append({"colour": colour, "kind": kind, "cx": cx, "points": points})
    target = rng.choice(shapes)
    others = [s for s in shapes if s is not target]
    labelled = [{"label": "target", "points": [list(p) for p in target["points"]],
                 "shape_type": "polygon", "group_id": None}]  # fmt: skip
    if rng.random() < 0.3:
        x, y = rng.uniform(0, size - 8), rng.uniform(0, size - 8)
        smudge = [(x, y), (x + 6, y), (x + 6, y + 6), (x, y + 6)]
        draw.polygon(smudge, fill=(128, 128, 128))
        labelled.append({"label": "ignore", "points": [list(p) for p in smudge],
                         "shape_type": "polygon", "group_id": None})  # fmt: skip
    if rng.random() < 0.2:
        labelled.append({"label": "flag", "points": [[0, 0], [2, 0], [2, 2]],
                         "shape_type": "polygon", "group_id": None})  # fmt: skip
    texts = queries(target, others)
    record = {"text": texts, "is_sentence": False, "shapes": labelled}
    return image, record


def generate(out_dir: Path, splits: dict[str, int], size: int = 64, seed: int = 0) -> Path:
    """Write `out_dir/<split>/<n>.png` with `<n>.json` for each split; return out_dir."""
    rng = random.Random(seed)
    for split, count in splits.items():
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, record = make_image(rng, size)
            image.save(folder / f"{index:04d}.png")
            (folder / f"{index:04d}.json").write_text(json.dumps(record), encoding="utf-8")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--val", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(args.out_dir, {"train": args.train, "val": args.val}, args.size, args.seed)
    print(f"wrote {args.train} train and {args.val} val images to {args.out_dir}")


if __name__ == "__main__":
    main()
