"""Per-item losses between predicted and target images, with a mask of the pixels that count.

Every loss has the signature `(prediction [N, C, H, W], target [N, C, H, W], valid bool
[N, 1, H, W]) -> [N]`, one value per item, so a task can sum them and report the item count
(see `losses.py`). No-data pixels (NaN in SAR, a GeoTIFF's nodata value) are `False` in `valid`
and must not move any loss: NaN there never reaches a sum, and a pixel that does not exist has
no error.

- `l1`, `mse`: mean absolute / squared error over the valid pixels of an item (all bands).
- `ssim`: 1 - SSIM, with the same Gaussian-window SSIM as `metrics.image` (Wang et al.), averaged
  over the windows that hold only valid pixels.
- `ms_ssim`: 1 - multi-scale SSIM from pytorch-msssim (5 scales, Wang et al. 2003 weights; both
  sides must exceed 160 pixels). MS-SSIM has no per-window mask, so invalid pixels of both images
  are filled with the mean of the item's valid target pixels (per band): they carry zero error,
  though windows that straddle the edge of a no-data region see a flat patch on both sides.
- `gradient`: L1 between the Sobel gradients (x and y) of prediction and target, over positions
  whose 3 x 3 neighbourhood is valid: sharp edges in the target must be sharp in the prediction,
  which pixel losses alone reward weakly.
- `lpips`: learned perceptual distance (Zhang et al. 2018, the `lpips` package), registered only
  when the `lpips` extra is installed; 3-band images in [0, 1], invalid pixels filled as for
  `ms_ssim`. Its AlexNet/VGG backbone weights download from the torchvision hub on first use.

SSIM-type losses take `data_range` (1.0 by default: targets scaled to [0, 1]). Every loss computes
in at least fp32, and the SSIM-type ones outside autocast: their variance terms are differences of
nearly equal numbers, which fp16 cancels.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch
import torch.nn.functional as F

from visiontune.metrics.image import as_batch, full_windows, ssim_map

MS_SSIM_MIN_SIDE = 161  # pytorch-msssim: 4 halvings of the image with an 11-pixel window


class ImageLoss(Protocol):
    """A per-item image loss: (prediction, target, valid) -> [N]."""

    def __call__(
        self, prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, /
    ) -> torch.Tensor: ...


def _checked(
    prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, C, H, W] images (at least fp32) with invalid pixels zeroed in both, and the mask."""
    if prediction.dim() != 4 or prediction.shape != target.shape:
        raise ValueError(
            "image losses take prediction and target of one shape [N, C, H, W], got "
            f"{tuple(prediction.shape)} and {tuple(target.shape)}"
        )
    prediction, target, valid = as_batch(prediction, target, valid)
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays
    return prediction.to(dtype), target.to(dtype), valid


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-item mean of [N, C, h, w] values over a [N, 1, h, w] mask (0 where it is empty)."""
    count = mask.sum(dim=(1, 2, 3)) * values.shape[1]
    return (values * mask).sum(dim=(1, 2, 3)) / count.clamp(min=1)


def l1(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean absolute error over the valid pixels of each item."""
    prediction, target, valid = _checked(prediction, target, valid)
    return _masked_mean((prediction - target).abs(), valid)


def mse(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the valid pixels of each item."""
    prediction, target, valid = _checked(prediction, target, valid)
    return _masked_mean((prediction - target) ** 2, valid)


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None,
    data_range: float = 1.0,
) -> torch.Tensor:
    """1 - SSIM of each item, averaged over bands and over the wholly valid 11 x 11 windows."""
    prediction, target, valid = _checked(prediction, target, valid)
    with torch.autocast(prediction.device.type, enabled=False):
        local = ssim_map(prediction, target, data_range)
    windows = full_windows(valid)
    # an item without a wholly valid window carries no signal: loss 0, not 1
    return _masked_mean(1 - local, windows)


def _fill_invalid(
    prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invalid pixels of both images set to the item's mean valid target value, per band."""
    count = valid.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    fill = (target * valid).sum(dim=(2, 3), keepdim=True) / count
    return torch.where(valid, prediction, fill), torch.where(valid, target, fill)


def ms_ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None,
    data_range: float = 1.0,
) -> torch.Tensor:
    """1 - MS-SSIM (pytorch-msssim) of each item; images need both sides over 160 pixels."""
    from pytorch_msssim import ms_ssim as library_ms_ssim

    prediction, target, valid = _checked(prediction, target, valid)
    side = min(prediction.shape[-2:])
    if side < MS_SSIM_MIN_SIDE:
        raise ValueError(
            f"the ms_ssim loss needs images of at least {MS_SSIM_MIN_SIDE} pixels a side (5 scales "
            f"of an 11-pixel window), got {tuple(prediction.shape[-2:])}: train on larger crops, "
            "or use the ssim loss"
        )
    prediction, target = _fill_invalid(prediction, target, valid)
    with torch.autocast(prediction.device.type, enabled=False):
        score = library_ms_ssim(prediction, target, data_range=data_range, size_average=False)
    return 1 - score


def gradient(
    prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Mean |Sobel_x(p) - Sobel_x(t)| + |Sobel_y(p) - Sobel_y(t)| over wholly valid 3 x 3 patches.

    The Sobel kernels are divided by 8, so a ramp rising by 1 per pixel has gradient 1.
    """
    prediction, target, valid = _checked(prediction, target, valid)
    sobel_x = prediction.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    kernels = torch.stack([sobel_x, sobel_x.T]).unsqueeze(1)  # [2, 1, 3, 3]
    n, c, h, w = prediction.shape
    difference = (prediction - target).reshape(n * c, 1, h, w)  # Sobel is linear
    edges = F.conv2d(difference, kernels).abs().sum(1).reshape(n, c, h - 2, w - 2)
    return _masked_mean(edges, full_windows(valid, 3))


_LPIPS_NETS: dict[tuple[str, bool, str], torch.nn.Module] = {}


def _lpips_net(net: str, pretrained_backbone: bool, device: torch.device) -> torch.nn.Module:
    """The frozen LPIPS network, built once per (backbone, device)."""
    key = (net, pretrained_backbone, str(device))
    if key not in _LPIPS_NETS:
        try:
            import lpips as lpips_package
        except Exception as error:  # torchvision built for another torch fails with RuntimeError
            raise ImportError(
                "the lpips loss needs the `lpips` extra (pip install 'visiontune[lpips]') and a "
                f"torchvision that imports with this torch; importing lpips failed: {error}"
            ) from error
        model = lpips_package.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
        _LPIPS_NETS[key] = model.to(device).eval().requires_grad_(False)
    return _LPIPS_NETS[key]


def lpips(
    prediction: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None,
    net: str = "alex",
    pretrained_backbone: bool = True,
) -> torch.Tensor:
    """LPIPS distance of each item; 3-band (or 1-band, repeated) images in [0, 1].

    The first call with `pretrained_backbone=True` downloads the AlexNet/VGG weights from the
    torchvision hub (the lpips package itself ships only its small linear layers).
    """
    prediction, target, valid = _checked(prediction, target, valid)
    bands = prediction.shape[1]
    if bands not in (1, 3):
        raise ValueError(f"the lpips loss compares RGB images: select 3 bands, got {bands}")
    prediction, target = _fill_invalid(prediction, target, valid)
    if bands == 1:
        prediction, target = prediction.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
    model = _lpips_net(net, pretrained_backbone, prediction.device)
    with torch.autocast(prediction.device.type, enabled=False):
        distance = model(prediction, target, normalize=True)  # normalize: [0, 1] -> [-1, 1]
    return distance.reshape(-1)


LPIPS_INSTALLED = importlib.util.find_spec("lpips") is not None

IMAGE_LOSSES: dict[str, ImageLoss] = {
    "l1": l1,
    "mse": mse,
    "ssim": ssim,
    "ms_ssim": ms_ssim,
    "gradient": gradient,
}
if LPIPS_INSTALLED:
    IMAGE_LOSSES["lpips"] = lpips


def image_loss(name: str) -> ImageLoss:
    """The built-in image loss called `name`, or an error saying what exists and how to get it."""
    if name in IMAGE_LOSSES:
        return IMAGE_LOSSES[name]
    if name == "lpips":
        raise ValueError(
            "the lpips loss needs the `lpips` extra: pip install 'visiontune[lpips]' (it needs "
            "torchvision; its AlexNet backbone weights download on first use)"
        )
    known = ", ".join(sorted(IMAGE_LOSSES))
    raise ValueError(f"unknown image loss {name!r}; built-in: {known}")
