"""PSNR/SSIM against scikit-image on the real Sentinel tiles and random data, and by hand."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy.ndimage import binary_erosion
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from visiontune.metrics.image import image_metrics

TILES = Path(__file__).resolve().parents[3] / "shared" / "data" / "terramesh_tiles"
SHARED_TILES = TILES if TILES.is_dir() else Path("/work/shared/data/terramesh_tiles")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the real TerraMesh tiles (the shared folder is read-only input)."""
    if not SHARED_TILES.is_dir():
        pytest.skip(f"the real Sentinel tiles are not at {SHARED_TILES}")
    copy = tmp_path_factory.mktemp("terramesh") / "tiles"
    shutil.copytree(SHARED_TILES, copy)
    return copy


def read(folder: Path) -> list[np.ndarray]:
    """Every tile of one modality as float64 [H, W, C], in file-name order."""
    return [tifffile.imread(p).astype(np.float64) for p in sorted(folder.glob("*.tif"))]


def sk_ssim(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """scikit-image with Wang et al.'s settings; pred/target are [H, W, C]."""
    return float(
        structural_similarity(
            pred,
            target,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=data_range,
            channel_axis=2,
        )
    )


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def assert_matches_skimage(preds: list[np.ndarray], targets: list[np.ndarray], rng: float) -> None:
    ours = image_metrics(
        torch.stack([chw(p) for p in preds]).float(),
        torch.stack([chw(t) for t in targets]).float(),
        data_range=rng,
    )
    ssims = [sk_ssim(p, t, rng) for p, t in zip(preds, targets, strict=True)]
    psnrs = [
        peak_signal_noise_ratio(t, p, data_range=rng) for p, t in zip(preds, targets, strict=True)
    ]
    assert ours["ssim"] == pytest.approx(np.mean(ssims), abs=1e-3)
    assert ours["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-4)
    for band in range(preds[0].shape[2]):
        band_ssim = [
            sk_ssim(p[..., band : band + 1], t[..., band : band + 1], rng)
            for p, t in zip(preds, targets, strict=True)
        ]
        band_psnr = [
            peak_signal_noise_ratio(t[..., band], p[..., band], data_range=rng)
            for p, t in zip(preds, targets, strict=True)
        ]
        assert ours[f"ssim/{band}"] == pytest.approx(np.mean(band_ssim), abs=1e-3)
        assert ours[f"psnr/{band}"] == pytest.approx(np.mean(band_psnr), abs=1e-4)


def test_matches_scikit_image_on_real_rgb_tiles(tiles: Path) -> None:
    """Each real S2 RGB tile judged against another place, and against a noisy copy of itself."""
    rgb = [t / 255.0 for t in read(tiles / "S2RGB")]
    others = rgb[1:] + rgb[:1]
    noise = np.random.default_rng(0).normal(0, 0.05, rgb[0].shape)
    noisy = [np.clip(t + noise, 0, 1) for t in rgb]
    assert_matches_skimage(others, rgb, 1.0)
    assert_matches_skimage(noisy, rgb, 1.0)


def test_matches_scikit_image_on_real_multispectral_and_sar_tiles(tiles: Path) -> None:
    """12-band L2A reflectance (scaled to [0, ~1.5]) and 2-band SAR in dB (range 40 dB)."""
    l2a = [t / 10000.0 for t in read(tiles / "S2L2A")]
    assert_matches_skimage(l2a[:2], l2a[2:4], 1.5)
    sar = read(tiles / "S1RTC")
    assert_matches_skimage(sar[:3], sar[2:], 40.0)


def test_matches_scikit_image_on_random_data() -> None:
    rng = np.random.default_rng(3)
    target = rng.uniform(0, 255, (2, 37, 52, 4))
    pred = np.clip(target + rng.normal(0, 30, target.shape), 0, 255)
    assert_matches_skimage(list(pred), list(target), 255.0)


def test_valid_mask_matches_scikit_image_on_fully_valid_windows(tiles: Path) -> None:
    """No-data pixels: PSNR over valid pixels, SSIM averaged where the whole window is valid.

    The reference is scikit-image's full SSIM map, averaged with scipy's binary erosion of the
    mask by the 11 x 11 window; the no-data pixels hold NaN and must not leak into either value.
    """
    sar = read(tiles / "S1RTC")
    pred, target = sar[0], sar[1]
    valid = np.ones(target.shape[:2], dtype=bool)
    valid[:40, :70] = False  # a no-data corner
    valid[120:125, 30:200] = False  # a missing stripe
    target = target.copy()
    target[~valid] = np.nan
    ours = image_metrics(
        chw(pred), chw(target), data_range=40.0, valid=torch.from_numpy(valid)[None]
    )

    eroded = binary_erosion(valid, structure=np.ones((11, 11)), border_value=0)
    filled = np.where(valid[..., None], target, 0.0)
    band_ssim, band_psnr = [], []
    for band in range(2):
        _, full = structural_similarity(
            pred[..., band],
            filled[..., band],
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=40.0,
            full=True,
        )
        band_ssim.append(full[eroded].mean())
        mse = np.mean((pred[..., band][valid] - target[..., band][valid]) ** 2)
        band_psnr.append(10 * np.log10(40.0**2 / mse))
        assert ours[f"ssim/{band}"] == pytest.approx(band_ssim[-1], abs=1e-3)
        assert ours[f"psnr/{band}"] == pytest.approx(band_psnr[-1], abs=1e-4)
    assert ours["ssim"] == pytest.approx(np.mean(band_ssim), abs=1e-3)
    overall_mse = np.mean((pred[valid] - target[valid]) ** 2)
    assert ours["psnr"] == pytest.approx(10 * np.log10(40.0**2 / overall_mse), abs=1e-4)


def test_psnr_by_hand() -> None:
    """Band 0 is off by 0.1 everywhere (MSE 0.01, 20 dB), band 1 by 0.01 (MSE 1e-4, 40 dB)."""
    target = torch.zeros(2, 16, 16)
    pred = torch.stack([torch.full((16, 16), 0.1), torch.full((16, 16), 0.01)])
    m = image_metrics(pred, target)
    assert m["psnr/0"] == pytest.approx(20.0, abs=1e-4)
    assert m["psnr/1"] == pytest.approx(40.0, abs=1e-4)
    assert m["psnr"] == pytest.approx(-10 * math.log10((0.01 + 0.0001) / 2), abs=1e-4)


def test_ssim_of_constant_images_by_hand() -> None:
    """Flat images have no variance, so SSIM is the luminance term (2ab + C1) / (a² + b² + C1)."""
    c1 = (0.01 * 1.0) ** 2
    m = image_metrics(torch.full((1, 20, 20), 0.5), torch.full((1, 20, 20), 0.25))
    assert m["ssim"] == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1), abs=1e-9)


def test_identical_images_and_batch_average() -> None:
    images = torch.rand(3, 2, 24, 24, generator=torch.Generator().manual_seed(0))
    same = image_metrics(images, images)
    assert same["ssim"] == pytest.approx(1.0) and same["psnr"] == math.inf
    noisy = images + 0.1 * torch.rand(images.shape, generator=torch.Generator().manual_seed(1))
    batch = image_metrics(noisy, images)
    singles = [image_metrics(noisy[i], images[i]) for i in range(3)]
    for key in ("psnr", "ssim", "psnr/1", "ssim/0"):
        assert batch[key] == pytest.approx(np.mean([s[key] for s in singles]), abs=1e-9)


def test_bad_input_is_named() -> None:
    image = torch.rand(1, 16, 16)
    with pytest.raises(ValueError, match="differ in shape"):
        image_metrics(image, torch.rand(2, 16, 16))
    with pytest.raises(ValueError, match="at least 11 x 11"):
        image_metrics(torch.rand(1, 8, 30), torch.rand(1, 8, 30))
    holed = image.clone()
    holed[0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="target has 1 NaN/inf"):
        image_metrics(image, holed)
    valid = torch.ones(1, 16, 16, dtype=torch.bool)
    valid[0, 3, 3] = False
    masked = image_metrics(image, holed, valid=valid)  # equal wherever a pixel counts
    assert masked["psnr"] == math.inf and masked["ssim"] == pytest.approx(1.0)
