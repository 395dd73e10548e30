"""Copy the five TerraMesh tiles into train (four) and val (one held-out tile) folders.

    python examples/sar_to_optical/prepare_tiles.py [--source DIR] [--out DIR] [--val NAME]

The tiles are read-only inputs: they are copied, never moved or modified. An existing output
folder is left alone (delete it to prepare again).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TILES = Path(__file__).resolve().parents[3] / "shared" / "data" / "terramesh_tiles"
SIDES = ("S1RTC", "S2RGB", "S2L2A")


def prepare(source: Path, out: Path, val: str) -> None:
    names = sorted(p.stem for p in (source / "S1RTC").glob("*.tif"))
    if val not in names:
        sys.exit(f"--val {val!r} is not one of the tiles {names}")
    for name in names:
        split = "val" if name == val else "train"
        for side in SIDES:
            folder = out / split / side
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / side / f"{name}.tif", folder / f"{name}.tif")
    print(f"{out}: train {len(names) - 1} tiles, val {val}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=TILES)
    parser.add_argument("--out", type=Path, default=Path(".demo-data/terramesh"))
    parser.add_argument("--val", default="433D_629L_3_1")
    args = parser.parse_args()
    if args.out.exists():
        print(f"{args.out} exists: left as it is")
        return
    prepare(args.source, args.out, args.val)


if __name__ == "__main__":
    main()
