"""Overlapping windows over tiles larger than the model's input, and their blended stitching.

A window grid with stride `size - overlap` always ends flush with the tile's far edge (the
last window moves back rather than running off it), so every pixel is covered. Windows are
blended with weights that fall off towards each window's border: a pixel near a window's
edge, where the model saw the least context, counts least, and seams do not show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def window_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of windows of `size` covering `length` with at least `overlap` shared."""
    if length <= size:
        return [0]
    stride = size - overlap
    starts = list(range(0, length - size, stride))
    return [*starts, length - size]


def window_grid(height: int, width: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """(top, left) of every window over a height x width tile, row by row."""
    return [
        (top, left)
        for top in window_starts(height, size, overlap)
        for left in window_starts(width, size, overlap)
    ]


def blend_weights(size: int, overlap: int) -> torch.Tensor:
    """[size, size] weights: 1 inside, ramping down linearly over the `overlap` border."""
    ramp = torch.ones(size)
    if overlap:
        edge = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        ramp[:overlap] = edge
        ramp[size - overlap :] = torch.minimum(ramp[size - overlap :], edge.flip(0))
    return ramp[:, None] * ramp[None, :]


@dataclass
class WindowRef:
    """Where a window sits: its tile, offset, the tile's size and how many windows it has."""

    tile: str
    top: int
    left: int
    height: int
    width: int
    windows: int


@dataclass
class _Partial:
    total: torch.Tensor
    weight: torch.Tensor
    received: int = 0


@dataclass
class Stitcher:
    """Collects window predictions per tile; `add` returns tiles whose windows are all in."""

    size: int
    overlap: int
    _open: dict[str, _Partial] = field(default_factory=dict)

    def add(self, prediction: torch.Tensor, ref: WindowRef) -> tuple[str, torch.Tensor] | None:
        """Add one window's `[C, size, size]` prediction; the finished tile, when it is."""
        part = self._open.get(ref.tile)
        if part is None:
            channels = prediction.shape[0]
            part = _Partial(
                torch.zeros(channels, ref.height, ref.width),
                torch.zeros(1, ref.height, ref.width),
            )
            self._open[ref.tile] = part
        h, w = prediction.shape[-2:]
        weight = blend_weights(self.size, self.overlap)[:h, :w]
        rows = slice(ref.top, ref.top + h)
        cols = slice(ref.left, ref.left + w)
        part.total[:, rows, cols] += prediction.float().cpu() * weight
        part.weight[:, rows, cols] += weight
        part.received += 1
        if part.received < ref.windows:
            return None
        del self._open[ref.tile]
        return ref.tile, part.total / part.weight.clamp(min=1e-12)
