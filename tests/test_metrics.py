"""Metrics against skimage (the reference's own tools, DGP SPEC §8) and hand-computed values."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import lab2rgb, rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from genprior.color import lab_to_rgb, rgb_to_lab
from genprior.degradations import build_degradation, center_hole_box
from genprior.metrics import (
    IMAGE_KEYS,
    REFERENCE_SSIM_DATA_RANGE,
    l1,
    lab_recombine,
    mse,
    psnr,
    restoration_metrics,
    ssim,
)

# Our metrics and skimage both compute in float64 with the same formulas; they differ only in
# summation order (box filter, means), i.e. a few ulps. 1e-10 leaves ample margin.
SKIMAGE_ATOL = 1e-10


def _hwc(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] tensor -> HWC float64 array: skimage's input as DGP's old skimage (which cast
    to float64) saw it."""
    return x.permute(1, 2, 0).double().numpy()


def _sk_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    # skimage's PSNR is computed on the float32 arrays themselves, like the reference.
    return np.array(
        [
            peak_signal_noise_ratio(ai.permute(1, 2, 0).numpy(), bi.permute(1, 2, 0).numpy(),
                                    data_range=data_range)
            for ai, bi in zip(a, b)
        ]
    )  # fmt: skip


def _sk_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> np.ndarray:
    return np.array(
        [
            structural_similarity(_hwc(ai), _hwc(bi), channel_axis=-1, data_range=data_range)
            for ai, bi in zip(a, b)
        ]
    )


def _synthetic_pair(b: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth structured images in [0, 1] and noisy, blurred versions of them."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([torch.sin(6 * xx) * 0.5 + 0.5, yy, (xx * yy) ** 0.5])
    clean = torch.stack([base.roll(5 * i, dims=-1) for i in range(b)])
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    return clean, noisy


@pytest.fixture(scope="module")
def real_pair(shared_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A real photo at 128 in [0, 1] (crude centre crop + resize) and its x4 SR observation."""
    path = shared_dir / "data" / "dgp" / "ILSVRC2012_val_00003004.JPEG"
    with Image.open(path) as img:
        side = min(img.size)
        img = img.convert("RGB").crop((0, 0, side, side)).resize((128, 128), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    observed = build_degradation("sr", 128, value_range=(0, 1)).target(x)
    return x, observed


# --------------------------------------------------------------------------------------------
# PSNR / SSIM against skimage
# --------------------------------------------------------------------------------------------


def test_psnr_matches_skimage_on_random_images() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 3, 40, 56, generator=g)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    np.testing.assert_allclose(psnr(a, b).numpy(), _sk_psnr(a, b), rtol=0, atol=SKIMAGE_ATOL)
    np.testing.assert_allclose(
        psnr(a, b, data_range=2.0).numpy(), _sk_psnr(a, b, 2.0), rtol=0, atol=SKIMAGE_ATOL
    )


def test_psnr_hand_computed() -> None:
    a = torch.full((2, 3, 16, 16), 0.5)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1] -= 0.01  # MSE 1e-4 -> 40 dB
    expected = torch.tensor([20.0, 40.0], dtype=torch.float64)
    # float32 0.6 - 0.5 is not 0.1: 8.3e-6 dB off, the same at threads 1/2/4 (elementwise float32,
    # then a float64 mean); 12x margin, and a wrong log base or square is off by whole dB
    torch.testing.assert_close(psnr(a, b), expected, atol=1e-4, rtol=0)
    # data_range 2 adds 20 log10(2).
    torch.testing.assert_close(psnr(a, b, 2.0), expected + 20 * math.log10(2), atol=1e-4, rtol=0)
    assert psnr(a, a).isinf().all()


def test_psnr_computes_in_the_pairs_float_type_like_skimage() -> None:
    """skimage's _as_floats: float32 pairs are differenced in float32, a pair with a float64
    image in float64, half types as float32; only the mean is float64. Argument order does not
    matter (DIP passes (estimate, reference), its notebooks (reference, estimate))."""
    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 3, 24, 24, generator=g)
    b = (a + 0.01 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    for x, y in ((a, b), (a, b.double()), (a.double(), b), (a.double(), b.double()),
                 (a.half(), b.half())):
        # measured 0 apart at threads 1/2/4; differencing this float32 pair in float64 instead
        # moves it by 3.2e-9 dB, 30x SKIMAGE_ATOL
        np.testing.assert_allclose(psnr(x, y).numpy(), _sk_psnr(x, y), rtol=0, atol=SKIMAGE_ATOL)
        assert torch.equal(psnr(x, y), psnr(y, x))
    assert psnr(a.bfloat16(), b).dtype == torch.float64
    # A metric: no graph is kept even when an input requires grad (DIP's output does).
    assert not psnr(a.requires_grad_(), b).requires_grad


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_skimage_on_random_and_synthetic(data_range: float) -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 3, 33, 47, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    np.testing.assert_allclose(
        ssim(a, b, data_range=data_range).numpy(), _sk_ssim(a, b, data_range), atol=SKIMAGE_ATOL
    )
    clean, noisy = _synthetic_pair()
    np.testing.assert_allclose(
        ssim(clean, noisy, data_range=data_range).numpy(),
        _sk_ssim(clean, noisy, data_range),
        atol=SKIMAGE_ATOL,
    )


def test_gaussian_window_ssim_matches_wang_et_al_as_skimage_computes_it() -> None:
    """window="gaussian11" (mGANprior's SSIM): 11x11 Gaussian, sigma 1.5, population covariance."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 33, 47, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    for x, y in ((a, b), _synthetic_pair()):
        expected = [structural_similarity(_hwc(xi), _hwc(yi), channel_axis=-1, data_range=1.0,
                                          gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False) for xi, yi in zip(x, y)]
        got = ssim(x, y, data_range=1.0, window="gaussian11")
        np.testing.assert_allclose(got.numpy(), expected, atol=SKIMAGE_ATOL)
        # a different number from the 7x7 uniform window, so the option matters
        assert (got - ssim(x, y, data_range=1.0)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="gaussian11"):
        ssim(a, b, data_range=1.0, window="box")
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[..., :10, :10], b[..., :10, :10], data_range=1.0, window="gaussian11")


@pytest.mark.shared
@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_psnr_ssim_match_skimage_on_real_image(
    real_pair: tuple[torch.Tensor, torch.Tensor], data_range: float
) -> None:
    x, observed = real_pair
    np.testing.assert_allclose(
        ssim(x, observed, data_range=data_range).numpy(),
        _sk_ssim(x, observed, data_range),
        atol=SKIMAGE_ATOL,
    )
    np.testing.assert_allclose(psnr(x, observed).numpy(), _sk_psnr(x, observed), atol=1e-10)


def test_ssim_identical_is_one_and_data_range_two_inflates() -> None:
    clean, noisy = _synthetic_pair()
    torch.testing.assert_close(
        ssim(clean, clean, data_range=1.0), torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0
    )
    # The reference's data_range=2 raises C1, C2 4x and so SSIM (SPEC §12.12).
    assert torch.all(ssim(clean, noisy, data_range=2.0) > ssim(clean, noisy, data_range=1.0))
    assert REFERENCE_SSIM_DATA_RANGE == 2.0
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(clean[..., :6, :6], noisy[..., :6, :6], data_range=1.0)


def test_mse_l1_reference_scaling() -> None:
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.rand(2, 3, 8, 8) * 2 - 1
    # The expected values are float32 means (summed in a CPU- and thread-dependent order), the
    # metrics float64 ones: measured max 1.4e-8 (mse) and 7.1e-9 (l1) apart (threads 1/2/4), so
    # 3e-7 leaves 20x; a wrong scale (/2 for /4) is off by ~0.1.
    torch.testing.assert_close(
        mse(x, t), ((x - t) ** 2).mean(dim=(1, 2, 3)).double() / 4, atol=3e-7, rtol=0
    )
    torch.testing.assert_close(
        l1(x, t), (x - t).abs().mean(dim=(1, 2, 3)).double() / 2, atol=3e-7, rtol=0
    )
    # On [0, 1] images the [0, 1]-scale value is the plain one, and it equals the [-1, 1] one
    # (float64 from the same float32 differences: measured 0 apart, threads 1/2/4).
    torch.testing.assert_close(mse((x + 1) / 2, (t + 1) / 2, value_range=(0, 1)), mse(x, t))
    torch.testing.assert_close(l1((x + 1) / 2, (t + 1) / 2, value_range=(0, 1)), l1(x, t))


# --------------------------------------------------------------------------------------------
# Lab conversion and DGP's colorization recombination
# --------------------------------------------------------------------------------------------


def test_rgb_lab_roundtrip_matches_skimage() -> None:
    g = torch.Generator().manual_seed(3)
    rgb = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64)
    rgb[0, :, 0, :4] = torch.tensor([0.0, 1.0, 0.04045, 0.002]).expand(3, 4)  # edge values
    lab = rgb_to_lab(rgb)
    expected = np.stack([rgb2lab(_hwc(im)) for im in rgb])
    np.testing.assert_allclose(lab.permute(0, 2, 3, 1).numpy(), expected, atol=1e-6, rtol=0)

    # Arbitrary Lab values, many out of gamut (negative z, clipped RGB).
    lab_in = torch.cat(
        [
            torch.rand(2, 1, 24, 24, generator=g, dtype=torch.float64) * 100,
            (torch.rand(2, 2, 24, 24, generator=g, dtype=torch.float64) - 0.5) * 240,
        ],
        dim=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about the negative z values it zeroes
        expected = np.stack([lab2rgb(_hwc(im)) for im in lab_in])
    np.testing.assert_allclose(
        lab_to_rgb(lab_in).permute(0, 2, 3, 1).numpy(), expected, atol=1e-6, rtol=0
    )
    # Round trip: sRGB's two thresholds (0.04045 and 0.0031308 * 12.92) disagree by ~3e-8,
    # so values right at the knee come back that far off, as they do in skimage.
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-7, rtol=0)


def _skimage_recombine(x01: torch.Tensor, t01: torch.Tensor) -> np.ndarray:
    lab = rgb2lab(_hwc(x01))
    lab[..., 0] = rgb2lab(_hwc(t01))[..., 0]
    return lab2rgb(lab)


def test_colorization_metrics_match_skimage_recombination() -> None:
    clean, noisy = _synthetic_pair()
    x, t = noisy * 2 - 1, clean * 2 - 1  # [-1, 1], as restoration_metrics takes them
    out = restoration_metrics(x, t, "colorization")
    assert set(IMAGE_KEYS) <= set(out)
    x2 = out["colorization2"]
    assert x2.shape == x.shape and x2.min() >= 0 and x2.max() <= 1
    expected = np.stack([_skimage_recombine(xi, ti) for xi, ti in zip(noisy, clean)])
    # x (and t) went through float32 [-1, 1] <-> [0, 1] maps: measured max 5.5e-8 from skimage's
    # float64 recombination (threads 1/2/4, elementwise); 18x margin
    np.testing.assert_allclose(x2.permute(0, 2, 3, 1).numpy(), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        lab_recombine(noisy, clean).permute(0, 2, 3, 1).numpy(), expected, atol=1e-6, rtol=0
    )

    exp_psnr = [
        peak_signal_noise_ratio(_hwc(c), e, data_range=1.0) for c, e in zip(clean, expected)
    ]
    exp_ssim = [
        structural_similarity(_hwc(c), e, channel_axis=-1, data_range=2.0)
        for c, e in zip(clean, expected)
    ]
    # measured max 2.9e-9 (PSNR, dB) and 8.0e-10 (SSIM) apart (threads 1/2/4)
    np.testing.assert_allclose(out["psnr"].numpy(), exp_psnr, atol=1e-6)
    np.testing.assert_allclose(out["ssim"].numpy(), exp_ssim, atol=1e-6)
    # l1/mse_origin are on the raw x, not on the recombined image (SPEC §8).
    torch.testing.assert_close(out["mse_loss_origin"], mse(x, t))
    torch.testing.assert_close(out["l1_loss_origin"], l1(x, t))


# --------------------------------------------------------------------------------------------
# restoration_metrics: crops, whole image, errors
# --------------------------------------------------------------------------------------------


def test_inpainting_metrics_use_the_hole_only() -> None:
    g = torch.Generator().manual_seed(4)
    t = torch.rand(2, 3, 128, 128, generator=g) * 2 - 1
    x = (t + 0.1 * torch.randn(t.shape, generator=g)).clamp(-1, 1)
    out = restoration_metrics(x, t, "inpainting")
    top, bottom, left, right = center_hole_box(128, 128)
    assert (top, bottom) == (43, 85)
    crop_t = (t[..., top:bottom, left:right] + 1) / 2
    crop_x = (x[..., top:bottom, left:right] + 1) / 2
    np.testing.assert_allclose(out["psnr"].numpy(), _sk_psnr(crop_t, crop_x), atol=1e-10)
    np.testing.assert_allclose(out["ssim"].numpy(), _sk_ssim(crop_t, crop_x, 2.0), atol=1e-10)

    # Pixels outside the hole change only the *_origin losses.
    x_outside = x.clone()
    x_outside[..., :10, :] = 1.0
    changed = restoration_metrics(x_outside, t, "inpainting")
    torch.testing.assert_close(changed["psnr"], out["psnr"])
    torch.testing.assert_close(changed["ssim"], out["ssim"])
    assert torch.all(changed["mse_loss_origin"] > out["mse_loss_origin"])

    # mGANprior's centre square needs its box; an explicit box crops for any task.
    box = (96, 160, 96, 160)
    big_t, big_x = torch.zeros(1, 3, 256, 256), torch.full((1, 3, 256, 256), 0.2)
    sq = restoration_metrics(big_x, big_t, "center_square", hole_box=box)
    assert sq["psnr"].item() == pytest.approx(20.0, abs=1e-4)  # |diff| 0.1 on [0, 1]
    with pytest.raises(ValueError, match="hole_box"):
        restoration_metrics(big_x, big_t, "center_square")


def test_whole_image_tasks_and_ssim_range_option() -> None:
    clean, noisy = _synthetic_pair()
    x, t = noisy * 2 - 1, clean * 2 - 1
    for task in ("reconstruct", "SR", "random_mask"):
        out = restoration_metrics(x, t, task)
        assert set(out) == {"l1_loss_origin", "mse_loss_origin", "psnr", "ssim"}
        assert all(v.shape == (2,) for v in out.values())
        torch.testing.assert_close(out["psnr"], psnr((x + 1) / 2, (t + 1) / 2))
        torch.testing.assert_close(out["ssim"], ssim((x + 1) / 2, (t + 1) / 2, data_range=2.0))
    correct = restoration_metrics(x, t, "reconstruct", ssim_data_range=1.0)
    # float32 [-1, 1] -> [0, 1] round trip of the inputs: measured max 5.8e-10 (threads 1/2/4)
    np.testing.assert_allclose(correct["ssim"].numpy(), _sk_ssim(clean, noisy, 1.0), atol=1e-6)
    with pytest.raises(ValueError, match=r"'hybrid'.*valid"):
        restoration_metrics(x, t, "hybrid")
    with pytest.raises(ValueError, match="same shape"):
        restoration_metrics(x, t[..., :32], "reconstruct")


@pytest.mark.gpu
def test_metrics_on_cuda_match_cpu() -> None:
    clean, noisy = _synthetic_pair()
    x, t = noisy * 2 - 1, clean * 2 - 1
    for task in ("reconstruct", "colorization", "inpainting"):
        cpu = restoration_metrics(x, t, task)
        gpu = restoration_metrics(x.cuda(), t.cuda(), task)
        for key, value in cpu.items():
            # float64 metrics of the same float32 images; not measurable on CPU-only machines
            torch.testing.assert_close(gpu[key].cpu(), value, atol=1e-6, rtol=0)
