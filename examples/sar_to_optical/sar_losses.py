"""The user's own loss term for the SAR -> optical example: SAR edge agreement.

Where the SAR image has an edge (a field boundary, a shoreline), the optical image should have
one too. The term is 1 - the correlation between the gradient magnitude of the prediction's
brightness and that of the SAR's VV band, over the valid pixels: 0 when every SAR edge shows
in the prediction with proportional strength, up to 2 when they are anti-correlated.

Called as `sar_edge_loss(outputs, batch, band=0)` through
`task.losses: [{fn: "sar_losses:sar_edge_loss", weight: ..., args: {band: 0}}]` and returns one
value per item, as every loss term must.
"""

from __future__ import annotations

import torch

from visiontune.task import Batch


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] -> [N, 1, H - 1, W - 1] forward-difference gradient magnitude."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx.square() + dy.square() + 1e-12).sqrt()


def sar_edge_loss(outputs: dict[str, torch.Tensor], batch: Batch, band: int = 0) -> torch.Tensor:
    prediction = outputs["prediction"].float()
    sar = batch.inputs["source"][:, band : band + 1].float()
    valid = batch.targets["valid"]
    keep = (valid[..., :-1, :-1] & valid[..., 1:, :-1] & valid[..., :-1, 1:]).float()
    a = gradient_magnitude(prediction.mean(dim=1, keepdim=True))
    b = gradient_magnitude(sar)
    count = keep.sum(dim=(1, 2, 3)).clamp(min=1)
    a = a - (a * keep).sum(dim=(1, 2, 3), keepdim=True) / count[:, None, None, None]
    b = b - (b * keep).sum(dim=(1, 2, 3), keepdim=True) / count[:, None, None, None]
    covariance = (a * b * keep).sum(dim=(1, 2, 3))
    spread = (a.square() * keep).sum(dim=(1, 2, 3)) * (b.square() * keep).sum(dim=(1, 2, 3))
    return 1.0 - covariance / (spread.sqrt() + 1e-8)
