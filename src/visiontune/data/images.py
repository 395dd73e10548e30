"""Safe image decoding and the deterministic part of preprocessing.

Every image goes through the same steps at train, eval and predict time: decode (EXIF rotation
applied, converted to RGB so that greyscale, palette and RGBA files all give three channels),
pad to square (a fundus or a document is not stretched into a different shape), resize, scale
to [0, 1] and normalise. A file PIL cannot decode (or refuses as a decompression bomb) raises
ImageError naming the file, so the caller decides whether to stop (up-front checks, predict) or
skip and count (mid-training).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from visiontune.config.schema import Config
from visiontune.errors import ImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})  # how PIL opens 16-bit grey
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects: a square side in pixels and per-channel mean/std."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_to_square: bool = True


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """`Image.open` whose every failure is an ImageError naming the file.

    Besides unreadable files this covers PIL's decompression-bomb guard: a header claiming
    more than twice `Image.MAX_IMAGE_PIXELS` raises DecompressionBombError, which is not an
    OSError and would otherwise escape as a raw traceback that names no file (the warning
    between one and two times the limit is caught too, for runs that turn warnings into errors).
    """
    try:
        with Image.open(path) as img:
            yield img
    except FileNotFoundError:
        raise ImageError(path, "image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(path, f"refused as a decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(path, f"cannot decode image ({err})") from None


def decode_image(path: Path) -> Image.Image:
    """Open `path` fully (not lazily) as an upright RGB image; ImageError if it cannot be read.

    `load()` forces the whole file to be decoded here, so a truncated file fails now, naming
    the file, instead of later inside a resize with an anonymous "image file is truncated".
    """
    with open_image(path) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)
        return to_eight_bits(upright).convert("RGB")


def to_eight_bits(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image scaled to 8 bits by its bit depth (65535 -> 255).

    PIL's own `convert("RGB")` clips such an image at 255, so a CT slice or an X-ray whose
    values live in 0..65535 would come out almost entirely white.
    """
    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    values = np.asarray(img, dtype=np.float64).clip(0, 65535)
    return Image.fromarray(np.round(values * (255 / 65535)).astype(np.uint8))


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is displayed (EXIF rotation applied), from the header alone.

    Annotations are drawn on the displayed image and `decode_image` applies the rotation, so a
    size read without it would clip a portrait photo's polygons to its landscape raw frame.
    """
    with open_image(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112)
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def pad_to_square(img: Image.Image) -> Image.Image:
    """Centre the image on a black square canvas (black is what fundus borders already are)."""
    width, height = img.size
    side = max(width, height)
    if width == height:
        return img
    canvas = Image.new("RGB", (side, side))
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def to_pixels(img: Image.Image, spec: ImageSpec) -> torch.Tensor:
    """Pad and resize to a CHW uint8 tensor: the deterministic part, which a cache can keep."""
    if spec.pad_to_square:
        img = pad_to_square(img)
    img = img.resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_unit_tensor(img: Image.Image, spec: ImageSpec) -> torch.Tensor:
    """Pad, resize and scale to a CHW float tensor in [0, 1] (augmentation works on this)."""
    return to_pixels(img, spec).float() / 255.0


def preprocessing_key(spec: ImageSpec) -> str:
    """What `to_pixels` depends on, for the pixel cache's keys (mean/std come later)."""
    return f"square:{spec.size}:pad={spec.pad_to_square}:bicubic:exif-rgb8"


def normalise(unit: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    mean, std = _channel_stats(spec.mean, spec.std)
    return (unit - mean.to(unit.device)) / std.to(unit.device)


@functools.cache
def _channel_stats(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel tensors built once, not per sample (this runs for every image)."""
    return torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)


def load_pixels(path: Path, spec: ImageSpec) -> torch.Tensor:
    """Decode and preprocess without augmentation: the eval and predict path."""
    return normalise(to_unit_tensor(decode_image(path), spec), spec)


def resolve_image_spec(cfg: Config) -> ImageSpec:
    """Preprocessing settings: `data.preprocess` wins, then the model's image processor, then
    the inline model config's image_size with mean = std = 0.5.

    Using the processor the model was pre-trained with matters: MedSigLIP expects 448 px and
    mean = std = 0.5, an ImageNet ViT 224 px and other statistics; a mismatch costs accuracy
    silently.
    """
    pre = cfg.data.preprocess
    size, mean, std = _from_model(cfg)
    return ImageSpec(
        size=pre.size or size,
        mean=pre.mean or mean,
        std=pre.std or std,
        pad_to_square=pre.pad_to_square,
    )


Defaults = tuple[int, tuple[float, float, float], tuple[float, float, float]]
_HALF = (0.5, 0.5, 0.5)


def _from_model(cfg: Config) -> Defaults:
    model_cfg = cfg.model
    if model_cfg.config is not None:
        return _inline_image_size(model_cfg.config), _HALF, _HALF
    from transformers import AutoConfig, AutoImageProcessor

    source = model_cfg.name_or_path
    kwargs: dict[str, Any] = {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    try:
        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        log.warning(
            "no image processor found for %s (%s); using the model config's image_size and "
            "mean = std = 0.5 (set data.preprocess to override)",
            source,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
        )
        config = AutoConfig.from_pretrained(source, **kwargs)
        return _inline_image_size(config.to_dict()), _HALF, _HALF
    return _processor_size(processor), _triple(processor.image_mean), _triple(processor.image_std)


def _processor_size(processor: Any) -> int:
    """The square side the processor finally produces (its crop when it crops, as CLIP does)."""
    for attr in ("crop_size", "size"):
        value = getattr(processor, attr, None)
        if value is None:
            continue
        for key in ("height", "shortest_edge", "width"):
            side = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
            if side:
                return int(side)
        if isinstance(value, int):
            return value
    return 224


def _inline_image_size(config: dict[str, Any]) -> int:
    """`image_size` of a vision config, or of the `vision_config` of a two-tower one (SigLIP)."""
    vision = config.get("vision_config")
    if isinstance(vision, dict) and "image_size" in vision:
        return int(vision["image_size"])
    if hasattr(vision, "image_size"):
        return int(vision.image_size)
    size = config.get("image_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


def _triple(values: Any) -> tuple[float, float, float]:
    items = [float(v) for v in (values if isinstance(values, list | tuple) else [values] * 3)]
    return items[0], items[1], items[2]
