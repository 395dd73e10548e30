"""RoIAlign in plain torch, for SAM 3's box exemplars where torchvision cannot be imported.

transformers' Sam3GeometryEncoder pools each exemplar box's features with
`torchvision.ops.roi_align`. On machines whose torch has no matching torchvision (the CPU
wheels here: torchvision's PyPI wheels are built against CUDA torch and fail to import), that
name is missing and any box prompt raises NameError. `install_roi_align` then puts this
function where the geometry encoder looks for it; where torchvision imports, it is left alone.

Semantics are torchvision's with its defaults (spatial_scale 1, sampling_ratio -1 = adaptive
ceil(roi size / output size) samples per bin, aligned False): bilinear samples on a regular
grid in each bin, averaged; a sample more than one pixel outside the map counts as 0.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def roi_align(
    features: torch.Tensor, boxes: list[torch.Tensor] | tuple[torch.Tensor, ...], output_size: int
) -> torch.Tensor:
    """features [B, C, H, W], boxes: per image a [K, 4] (x1, y1, x2, y2) in feature pixels;
    returns [sum K, C, output_size, output_size] in the order of the boxes."""
    pooled = []
    for image, image_boxes in enumerate(boxes):
        for box in image_boxes:
            pooled.append(_one(features[image], box.float(), output_size))
    if not pooled:
        return features.new_zeros(0, features.shape[1], output_size, output_size)
    return torch.stack(pooled).to(features.dtype)


def _one(feature: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    channels, height, width = feature.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    roi_w, roi_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    grid_h, grid_w = math.ceil(roi_h / size), math.ceil(roi_w / size)
    ys = y1 + (torch.arange(size * grid_h, dtype=torch.float32) + 0.5) * roi_h / (size * grid_h)
    xs = x1 + (torch.arange(size * grid_w, dtype=torch.float32) + 0.5) * roi_w / (size * grid_w)
    ys, xs = ys.to(feature.device), xs.to(feature.device)
    inside = ((ys >= -1) & (ys <= height))[:, None] & ((xs >= -1) & (xs <= width))[None, :]
    gy = 2 * ys.clamp(0, height - 1) / max(height - 1, 1) - 1
    gx = 2 * xs.clamp(0, width - 1) / max(width - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
    samples = F.grid_sample(feature[None].float(), grid, mode="bilinear", align_corners=True)[0]
    samples = samples * inside
    return samples.view(channels, size, grid_h, size, grid_w).mean((2, 4))


def install_roi_align() -> bool:
    """Give transformers' SAM 3 this RoIAlign when torchvision is missing; True if it did."""
    from transformers.models.sam3 import modeling_sam3

    if hasattr(modeling_sam3, "torchvision"):
        return False
    modeling_sam3.torchvision = SimpleNamespace(ops=SimpleNamespace(roi_align=roi_align))
    return True
