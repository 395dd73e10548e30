"""Image losses: per-item shape, zero at the target, correct gradients, independent values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_msssim import ssim as library_ssim
from scipy.ndimage import binary_erosion, gaussian_filter, sobel
from skimage.metrics import structural_similarity

from visiontune.image_losses import IMAGE_LOSSES, LPIPS_INSTALLED, image_loss, lpips

CPU_LOSSES = ["l1", "mse", "ssim", "ms_ssim", "gradient"]


def images(n: int, c: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A target and a noisy prediction of it, float64, in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(n, c, side, side, generator=gen, dtype=torch.float64)
    target = torch.nn.functional.avg_pool2d(target, 3, 1, 1)  # some spatial structure
    noise = 0.1 * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    return (target + noise).clamp(0, 1), target


def side_for(name: str) -> int:
    return 176 if name == "ms_ssim" else 24  # ms_ssim needs > 160 px; 176 halves evenly 4 times


def a_mask(n: int, side: int) -> torch.Tensor:
    valid = torch.ones(n, 1, side, side, dtype=torch.bool)
    valid[0, :, : side // 3, : side // 2] = False
    return valid


@pytest.mark.parametrize("name", CPU_LOSSES)
def test_per_item_zero_at_target_and_ignores_no_data(name: str) -> None:
    side = side_for(name)
    prediction, target = images(3, 2, side, seed=1)
    loss = IMAGE_LOSSES[name]
    values = loss(prediction, target, None)
    assert values.shape == (3,) and bool((values > 0).all())
    assert loss(target, target, None).abs().max() < 1e-6
    # no-data pixels hold NaN in the target and garbage in the prediction: nothing may leak
    valid = a_mask(3, side)
    holed, wild = target.clone(), target.clone()
    holed[~valid.expand_as(holed)] = math.nan
    wild[~valid.expand_as(wild)] = 5.0
    masked = loss(wild, holed, valid)
    assert masked.abs().max() < 1e-6
    # and an item's loss does not depend on the other items of the batch
    alone = loss(prediction[1:2], target[1:2], None)
    assert float(alone[0]) == pytest.approx(float(values[1]), abs=1e-9)


@pytest.mark.parametrize("name", CPU_LOSSES)
def test_gradient_matches_finite_differences(name: str) -> None:
    """Directional derivative from autograd equals the central difference, per item."""
    side = side_for(name)
    prediction, target = images(2, 2, side, seed=2)
    valid = a_mask(2, side)
    loss = IMAGE_LOSSES[name]
    prediction.requires_grad_(True)
    values = loss(prediction, target, valid)
    (grad,) = torch.autograd.grad(values.sum(), prediction)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert grad[~valid.expand_as(grad)].abs().max() == 0  # no-data pixels get no gradient
    direction = torch.randn(prediction.shape, generator=torch.Generator().manual_seed(3))
    # fp64 inputs stay fp64 inside; a small step keeps l1 and gradient off their kinks
    direction = direction.double() * 1e-6
    with torch.no_grad():
        up = loss(prediction + direction, target, valid).sum()
        down = loss(prediction - direction, target, valid).sum()
    numeric = float(up - down) / 2
    analytic = float((grad * direction).sum())
    assert numeric == pytest.approx(analytic, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("name", ["mse", "ssim", "gradient"])
def test_gradcheck_on_small_images(name: str) -> None:
    """torch's own gradcheck (fp64 inputs are computed in fp64)."""
    prediction, target = images(1, 1, 12, seed=4)
    valid = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    loss = IMAGE_LOSSES[name]
    assert torch.autograd.gradcheck(
        lambda p: loss(p, target, valid).double(),
        (prediction.requires_grad_(True),),
        eps=1e-7,
        atol=1e-6,
        rtol=1e-4,
        fast_mode=True,
    )


def test_l1_and_mse_are_means_over_valid_pixels() -> None:
    prediction, target = images(2, 3, 16, seed=5)
    valid = a_mask(2, 16)
    p, t, v = prediction.numpy(), target.numpy(), valid.numpy()
    for item in range(2):
        keep = np.broadcast_to(v[item], p[item].shape)
        error = p[item][keep] - t[item][keep]
        assert float(IMAGE_LOSSES["l1"](prediction, target, valid)[item]) == pytest.approx(
            np.abs(error).mean(), rel=1e-5
        )
        assert float(IMAGE_LOSSES["mse"](prediction, target, valid)[item]) == pytest.approx(
            (error**2).mean(), rel=1e-5
        )


def test_ssim_loss_against_pytorch_msssim_and_scikit_image() -> None:
    prediction, target = images(2, 3, 40, seed=6)
    ours = IMAGE_LOSSES["ssim"](prediction, target, None)
    theirs = 1 - library_ssim(prediction, target, data_range=1.0, size_average=False)
    assert torch.allclose(ours.double(), theirs, atol=1e-5)
    valid = a_mask(2, 40)
    masked = IMAGE_LOSSES["ssim"](prediction, target, valid)
    eroded = binary_erosion(valid[0, 0].numpy(), structure=np.ones((11, 11)), border_value=0)
    bands = []
    for band in range(3):
        _, full = structural_similarity(
            prediction[0, band].numpy(),
            target[0, band].numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            full=True,
        )
        bands.append(full[eroded].mean())
    assert float(masked[0]) == pytest.approx(1 - np.mean(bands), abs=1e-5)


def numpy_ms_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """MS-SSIM of one [C, H, W] pair written out from Wang et al. 2003 with scipy filters."""
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    c1, c2 = 0.01**2, 0.03**2
    per_band = []
    for xb, yb in zip(x, y, strict=True):
        factors = []
        for scale, weight in enumerate(weights):

            def blur(a: np.ndarray) -> np.ndarray:
                return gaussian_filter(a, 1.5, truncate=3.5)[5:-5, 5:-5]

            mx, my = blur(xb), blur(yb)
            vx, vy = blur(xb * xb) - mx**2, blur(yb * yb) - my**2
            cov = blur(xb * yb) - mx * my
            cs = ((2 * cov + c2) / (vx + vy + c2)).mean()
            if scale < len(weights) - 1:
                factors.append(max(cs, 0) ** weight)
                h, w = xb.shape
                xb = xb.reshape(h // 2, 2, w // 2, 2).mean((1, 3))
                yb = yb.reshape(h // 2, 2, w // 2, 2).mean((1, 3))
            else:
                luminance_cs = ((2 * mx * my + c1) * (2 * cov + c2)) / (
                    (mx**2 + my**2 + c1) * (vx + vy + c2)
                )
                factors.append(max(luminance_cs.mean(), 0) ** weight)
        per_band.append(np.prod(factors))
    return float(np.mean(per_band))


def test_ms_ssim_loss_against_a_numpy_ms_ssim() -> None:
    prediction, target = images(2, 2, 176, seed=7)
    ours = IMAGE_LOSSES["ms_ssim"](prediction, target, None)
    for item in range(2):
        expected = 1 - numpy_ms_ssim(prediction[item].numpy(), target[item].numpy())
        assert float(ours[item]) == pytest.approx(expected, abs=1e-4)


def test_gradient_loss_by_hand_and_against_scipy_sobel() -> None:
    """A unit step between columns 3 and 4 of an 8 x 8 image, predicted flat: the normalised Sobel
    gives 0.5 at the two interior columns beside the step in each of the 6 interior rows, so the
    mean over the 6 x 6 interior is 6 * 2 * 0.5 / 36 = 1/6."""
    target = torch.zeros(1, 1, 8, 8)
    target[..., 4:] = 1.0
    flat = torch.zeros_like(target)
    assert float(IMAGE_LOSSES["gradient"](flat, target, None)[0]) == pytest.approx(1 / 6)
    prediction, target = images(1, 2, 20, seed=8)
    difference = (prediction - target)[0].numpy()
    expected = np.mean(
        [
            (np.abs(sobel(band, axis=1)) + np.abs(sobel(band, axis=0)))[1:-1, 1:-1] / 8
            for band in difference
        ]
    )
    assert float(IMAGE_LOSSES["gradient"](prediction, target, None)[0]) == pytest.approx(
        expected, rel=1e-5
    )


def test_ms_ssim_on_small_images_says_what_to_do() -> None:
    prediction, target = images(1, 1, 64, seed=9)
    with pytest.raises(ValueError, match="at least 161 pixels a side.*ssim loss"):
        IMAGE_LOSSES["ms_ssim"](prediction, target, None)


def test_unknown_and_missing_losses_are_named() -> None:
    with pytest.raises(ValueError, match="unknown image loss 'l3'; built-in: .*gradient.*ms_ssim"):
        image_loss("l3")
    if LPIPS_INSTALLED:
        assert image_loss("lpips") is lpips
    else:
        assert "lpips" not in IMAGE_LOSSES
        with pytest.raises(ValueError, match=r"visiontune\[lpips\].*download on first use"):
            image_loss("lpips")


def _lpips_importable() -> str | None:
    """Why the LPIPS test cannot run here, or None when it can."""
    try:
        import lpips  # noqa: F401
    except Exception as error:  # a torchvision built for a CUDA torch raises RuntimeError
        return f"lpips does not import here ({type(error).__name__}: {error})"
    return None


@pytest.mark.skipif(_lpips_importable() is not None, reason=str(_lpips_importable()))
def test_lpips_with_a_random_backbone() -> None:
    """No download: random AlexNet features, the package's own linear layers."""
    torch.manual_seed(0)
    prediction, target = images(2, 3, 64, seed=10)
    prediction, target = prediction.float().requires_grad_(True), target.float()
    values = lpips(prediction, target, None, pretrained_backbone=False)
    assert values.shape == (2,) and bool((values > 0).all())
    values.sum().backward()
    assert prediction.grad is not None and torch.isfinite(prediction.grad).all()
    assert lpips(target, target, None, pretrained_backbone=False).abs().max() < 1e-6
