"""The preprocessed-pixel cache: exact, keyed by file and settings, self-healing, never fatal."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import make_imagefolder, tiny_config
from tests.segment.builders import crack_data, segment_config
from visiontune import api
from visiontune.config.schema import DataConfig
from visiontune.data.imagefolder import build_splits
from visiontune.data.images import ImageSpec, preprocessing_key, resolve_image_spec
from visiontune.data.pixel_cache import CACHE_VERSION, PixelCache
from visiontune.tasks.segment import SegmentTask

SPEC = ImageSpec(size=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def reference_pixels(path: Path, size: int) -> np.ndarray:
    """What decoding must give, computed with PIL and numpy alone (HWC uint8)."""
    img = Image.open(path).convert("RGB")
    side = max(img.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return np.array(canvas.resize((size, size), Image.Resampling.BICUBIC))


def photo(path: Path, seed: int, shape: tuple[int, int] = (30, 40)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def disk_cache(directory: Path, spec: ImageSpec = SPEC) -> PixelCache:
    data = DataConfig.model_validate({"train": ".", "cache": "disk", "cache_dir": directory})
    cache = PixelCache.from_config(data, preprocessing_key(spec))
    assert cache is not None
    return cache


def read(cache: PixelCache, image: Path, spec: ImageSpec = SPEC) -> torch.Tensor:
    from visiontune.data.images import decode_image, to_pixels

    return cache.load(image, lambda: {"image": to_pixels(decode_image(image), spec)})["image"]


def test_cached_pixels_are_exact_and_served_without_decoding(tmp_path: Path) -> None:
    image = photo(tmp_path / "x.png", 0)
    cache = disk_cache(tmp_path / "cache")
    first = read(cache, image)
    expected = torch.from_numpy(reference_pixels(image, 24)).permute(2, 0, 1)
    assert first.dtype == torch.uint8 and torch.equal(first, expected)
    # Garbage of the same size and time stamp: only a cache hit can still give the pixels.
    stat = image.stat()
    image.write_bytes(b"\0" * stat.st_size)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert torch.equal(read(cache, image), expected)


def test_a_changed_file_or_setting_misses(tmp_path: Path) -> None:
    image = photo(tmp_path / "x.png", 0)
    cache = disk_cache(tmp_path / "cache")
    read(cache, image)
    photo(image, 1, shape=(30, 41))  # new content, new size and time
    expected = torch.from_numpy(reference_pixels(image, 24)).permute(2, 0, 1)
    assert torch.equal(read(cache, image), expected)
    bigger = ImageSpec(32, SPEC.mean, SPEC.std)
    pixels = read(disk_cache(tmp_path / "cache", bigger), image, bigger)
    assert torch.equal(pixels, torch.from_numpy(reference_pixels(image, 32)).permute(2, 0, 1))
    unpadded = ImageSpec(24, SPEC.mean, SPEC.std, pad_to_square=False)
    assert preprocessing_key(unpadded) != preprocessing_key(SPEC)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip_pixel", "garbage"])
def test_a_damaged_entry_is_rebuilt(tmp_path: Path, damage: str, caplog) -> None:
    image = photo(tmp_path / "x.png", 0)
    cache = disk_cache(tmp_path / "cache")
    expected = read(cache, image).clone()
    (entry,) = (tmp_path / "cache").rglob("*.safetensors")
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_pixel":
        data[-5] ^= 0xFF  # inside the pixel bytes: the header still parses
    else:
        data = bytearray(b"not a safetensors file")
    entry.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(read(cache, image), expected)
    assert "rebuilt" in caplog.text and str(image) in caplog.text
    caplog.clear()
    assert torch.equal(read(cache, image), expected)  # the rewritten entry is good again
    assert "rebuilt" not in caplog.text


def test_an_entry_of_another_version_is_rebuilt(tmp_path: Path) -> None:
    image = photo(tmp_path / "x.png", 0)
    cache = disk_cache(tmp_path / "cache")
    expected = read(cache, image).clone()
    (entry,) = (tmp_path / "cache").rglob("*.safetensors")
    old = {"version": "0", "key": cache.key_text(image), "crc": "0"}
    save_file({"image": torch.zeros(3, 24, 24, dtype=torch.uint8)}, str(entry), metadata=old)
    assert torch.equal(read(cache, image), expected)
    header = entry.read_bytes()
    meta = json.loads(header[8 : 8 + int.from_bytes(header[:8], "little")])["__metadata__"]
    assert meta["version"] == CACHE_VERSION


def test_an_unwritable_cache_dir_warns_once_and_trains_without_cache(
    image_data: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = tiny_config(
        image_data, tmp_path / "runs", train={"max_steps": 3},
        data={"train": str(image_data / "train"), "val": str(image_data / "val"),
              "cache": "disk", "cache_dir": str(blocker / "cache"), "num_workers": 0,
              "preprocess": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}},
    )  # fmt: skip
    result = api.train(cfg)
    assert result.state.step == 3
    log = (tmp_path / "runs/tiny/train.log").read_text()
    assert log.count("cannot be written") == 1 and str(blocker / "cache") in log


def test_memory_cache_is_shared_by_workers_and_removed_at_exit(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(image_data, tmp_path, data={
        "train": str(image_data / "train"), "cache": "memory",
        "preprocess": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}})  # fmt: skip
    _, splits = build_splits(cfg, resolve_image_spec(cfg))
    cache = splits.train.cache
    assert cache is not None and cache.directory.exists()
    if Path("/dev/shm").is_dir():
        assert cache.directory.parent == Path("/dev/shm")
    loader = torch.utils.data.DataLoader(splits.train, batch_size=5, num_workers=2,
                                         collate_fn=list)  # fmt: skip
    first = [s["pixel_values"] for b in loader for s in b]
    assert len(list(cache.directory.rglob("*.safetensors"))) == 23
    again = [s["pixel_values"] for b in loader for s in b]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    script = textwrap.dedent("""
        from visiontune.config.schema import DataConfig
        from visiontune.data.pixel_cache import PixelCache
        cache = PixelCache.from_config(DataConfig(train=".", cache="memory"), "k")
        print(cache.directory)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    assert not Path(out.stdout.strip()).exists()


FULL_DISK = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from visiontune.config.schema import DataConfig
from visiontune.data.imagefolder import ImageClassificationDataset, Record
from visiontune.data.images import ImageSpec, preprocessing_key
from visiontune.data.pixel_cache import PixelCache
spec = ImageSpec(64, (0.5,) * 3, (0.5,) * 3)
data = DataConfig(train=".", cache="disk", cache_dir=sys.argv[2])
cache = PixelCache.from_config(data, preprocessing_key(spec))
records = [Record(p, 0, p.name) for p in sorted(Path(sys.argv[1]).rglob("*.png"))]
dataset = ImageClassificationDataset(records, spec, None, 0, cache)
samples = [dataset[i] for i in range(len(dataset))]
print("read", sum(isinstance(s, dict) for s in samples), "stopped", cache.stopped)
"""


def test_a_full_disk_stops_caching_and_training_data_keeps_coming(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a small tmpfs")
    make_imagefolder(tmp_path / "images", {"a": 6}, size=32)
    mount = tmp_path / "small"
    mount.mkdir()
    (tmp_path / "script.py").write_text(FULL_DISK)
    # 64 px entries are 12 KiB each: a 32 KiB file system holds two of the six.
    command = (
        f"mount -t tmpfs -o size=32k tmpfs {mount} && "
        f"{sys.executable} {tmp_path / 'script.py'} {tmp_path / 'images'} {mount}/cache"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True,
                          text=True, env=env)  # fmt: skip
    if "mount" in done.stderr and done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert "read 6 stopped True" in done.stdout
    assert done.stderr.count("stopped writing the image cache") == 1
    assert "the disk is full" in done.stderr


def test_segmentation_reads_the_same_samples_through_the_cache(tmp_path: Path) -> None:
    root = crack_data(tmp_path / "cracks")
    plain = {"format": "mask_folder", "train": str(root)}
    cached = {**plain, "cache": "disk", "cache_dir": str(tmp_path / "cache")}
    without = SegmentTask(segment_config(plain, {"prompt": "box"})).datasets().train
    for _ in range(2):  # fill, then read back
        with_cache = SegmentTask(segment_config(cached, {"prompt": "box"})).datasets().train
        for index in range(len(without)):
            a, b = without[index], with_cache[index]
            assert a.keys() == b.keys()
            for key, value in a.items():
                same = torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key]
                assert same, key
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4
