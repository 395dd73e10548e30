"""PSNR and SSIM for image-to-image outputs (SAR -> optical and the like), per band and overall.

SSIM follows the reference definition (Wang et al. 2004, and their MATLAB code): an 11 x 11
Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample) covariances, and
the SSIM map averaged only where the window lies wholly inside the image. That is what
scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)` and pytorch-msssim compute; torchmetrics also averages over the
padded border, which moves SSIM by up to 0.02 on real tiles, so a paper's number and ours would
not be comparable.

No-data pixels (NaN in a SAR tile, a nodata value in a GeoTIFF) are excluded through `valid`:
PSNR averages the squared error over valid pixels only, and SSIM averages its map only where the
whole 11 x 11 window is valid, so no statistic mixes in a pixel that does not exist.

Every quantity is computed per image and then averaged over the images of a batch, in float64,
so a metric does not depend on how a split is cut into batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WINDOW_SIZE = 11  # Wang et al.: 11 x 11 Gaussian window ...
WINDOW_SIGMA = 1.5  # ... with standard deviation 1.5 pixels
K1, K2 = 0.01, 0.03  # stabilising constants of the SSIM formula


def gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian of the SSIM window (the 2-D window is its outer product)."""
    radius = WINDOW_SIZE // 2
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (x / WINDOW_SIGMA) ** 2)
    return g / g.sum()


def _filter(images: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local means of [M, 1, H, W], 'valid' positions only ([M, 1, h, w])."""
    g = gaussian_window(images.dtype, images.device)
    images = F.conv2d(images, g.view(1, 1, 1, -1))
    return F.conv2d(images, g.view(1, 1, -1, 1))


def ssim_map(prediction: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """Local SSIM of [N, C, H, W] images: [N, C, H - 10, W - 10], one value per full window.

    Differentiable, so the SSIM loss uses the same definition as the metric.
    """
    n, c, h, w = prediction.shape
    if min(h, w) < WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {WINDOW_SIZE} x {WINDOW_SIZE} pixels (its Gaussian "
            f"window), got {h} x {w}"
        )
    x = prediction.reshape(n * c, 1, h, w)
    y = target.reshape(n * c, 1, h, w)
    # one convolution call for all five local moments
    moments = _filter(torch.cat([x, y, x * x, y * y, x * y]))
    mu_x, mu_y, xx, yy, xy = moments.chunk(5)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim.reshape(n, c, h - WINDOW_SIZE + 1, w - WINDOW_SIZE + 1)


def full_windows(valid: torch.Tensor, size: int = WINDOW_SIZE) -> torch.Tensor:
    """Which size x size windows of a [N, 1, H, W] mask hold only valid pixels ('valid' grid)."""
    any_invalid = F.max_pool2d((~valid).to(torch.float32), size, stride=1)
    return any_invalid == 0


def as_batch(
    prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[C, H, W] or [N, C, H, W] inputs as [N, C, H, W], with a bool mask [N, 1, H, W].

    Invalid pixels are set to zero in both images, so a NaN there cannot reach any sum.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    if prediction.dim() not in (3, 4):
        raise ValueError(f"images must be [C, H, W] or [N, C, H, W], got {tuple(prediction.shape)}")
    if prediction.dim() == 3:
        prediction, target = prediction.unsqueeze(0), target.unsqueeze(0)
        valid = valid.unsqueeze(0) if valid is not None else None
    n, _, h, w = prediction.shape
    if valid is None:
        valid = torch.ones(n, 1, h, w, dtype=torch.bool, device=prediction.device)
    elif valid.shape != (n, 1, h, w):
        raise ValueError(
            f"valid mask must be [N, 1, H, W] = {(n, 1, h, w)}, got {tuple(valid.shape)}"
        )
    valid = valid.to(device=prediction.device, dtype=torch.bool)
    zero = torch.zeros((), dtype=prediction.dtype, device=prediction.device)
    prediction = torch.where(valid, prediction, zero)
    target = torch.where(valid, target, zero)
    return prediction, target, valid


def _check_finite(prediction: torch.Tensor, target: torch.Tensor) -> None:
    """Refuse NaN/inf pixels that the mask left in: they would silently turn every metric NaN."""
    for name, images in (("prediction", prediction), ("target", target)):
        bad = int((~torch.isfinite(images)).sum())
        if bad:
            raise ValueError(
                f"{name} has {bad} NaN/inf value(s) among the pixels counted: mark no-data pixels "
                "as invalid with `valid=`"
            )


def image_metrics(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    valid: torch.Tensor | None = None,
) -> dict[str, float]:
    """PSNR and SSIM of predicted images against targets, overall and per band.

    prediction, target: float tensors [C, H, W] or [N, C, H, W]; `data_range` is the span of
    the values (1.0 for images scaled to [0, 1], 255 for 8-bit values); `valid` is an optional
    bool mask [1, H, W] or [N, 1, H, W] of the pixels that count.

    Returns `psnr`, `ssim`, and `psnr/<band>` and `ssim/<band>` for every band index. PSNR of an
    image uses the mean squared error over all its bands (scikit-image's
    `peak_signal_noise_ratio` on the whole array); SSIM of an image is the mean of its per-band
    SSIM (scikit-image with `channel_axis`). Both are then averaged over the N images; an image
    without a valid pixel (for SSIM: without one wholly valid 11 x 11 window) does not count, and
    identical images give PSNR = inf.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    prediction, target, valid = as_batch(prediction.double(), target.double(), valid)
    _check_finite(prediction, target)
    c = prediction.shape[1]
    pixels = valid.sum(dim=(1, 2, 3)).double()  # [N]
    squared = ((prediction - target) ** 2).sum(dim=(2, 3))  # [N, C]; invalid pixels are 0 - 0
    peak = 10 * math.log10(data_range**2)
    psnr_band = peak - 10 * torch.log10(squared / pixels[:, None])
    psnr_all = peak - 10 * torch.log10(squared.sum(1) / (pixels * c))

    local = ssim_map(prediction, target, data_range)
    windows = full_windows(valid)  # [N, 1, h, w], the grid of `local`
    window_count = windows.sum(dim=(1, 2, 3)).double()
    ssim_band = (local * windows).sum(dim=(2, 3)) / window_count[:, None]  # [N, C]
    ssim_all = ssim_band.mean(1)

    def average(values: torch.Tensor, counts: torch.Tensor) -> float:
        kept = values[counts > 0]
        return float(kept.mean()) if kept.numel() else math.nan

    out = {"psnr": average(psnr_all, pixels), "ssim": average(ssim_all, window_count)}
    for band in range(c):
        out[f"psnr/{band}"] = average(psnr_band[:, band], pixels)
        out[f"ssim/{band}"] = average(ssim_band[:, band], window_count)
    return out
