"""Full-reference image quality of a restoration: PSNR, SSIM, MSE, L1, colorization AuC.

Closed-form metrics, computed from the result and the clean image alone (no learned or
published data; those are ``lpips``, ``niqe`` and ``classifier``). Each is a function
returning one value per image, ``Tensor[B]`` in float64 (``psnr``, ``ssim``, ``mse``, ``l1``,
``colorization_auc``); results rows are built from these, and averages over images are taken
when the rows are summarised. The colorization AuC also exists as a ``ScoredMetric``
(``ColorizationAuC``) for the registry of the papers' extra metrics (``genprior.metrics``).

``restoration_metrics`` reproduces DGP's ``get_metrics`` (SPEC §8) for one batch, including its
Lab recombination for colorization, the hole crop for inpainting and SSIM's data_range of 2.

The reference computes these with skimage on HWC numpy arrays; here everything is torch, on
the images' device. ``psnr`` follows skimage's ``peak_signal_noise_ratio`` type rules exactly
(see there); SSIM, MSE and L1 are computed in float64 and match skimage's
``structural_similarity(channel_axis=-1)`` on float64 inputs to ~1e-12.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from genprior.color import lab_to_rgb, rgb_to_lab
from genprior.degradations import Box, center_hole_box
from genprior.metrics.base import ScoredMetric, check_rgb_pair, to_unit

__all__ = [
    "IMAGE_KEYS",
    "METRIC_TASKS",
    "REFERENCE_SSIM_DATA_RANGE",
    "SSIM_WINDOWS",
    "ColorizationAuC",
    "colorization_auc",
    "l1",
    "lab_recombine",
    "mse",
    "psnr",
    "restoration_metrics",
    "ssim",
]

# DGP's SSIM data_range (SPEC §8, §12.12): skimage inferred it from the float dtype ([-1, 1]),
# although the images are in [0, 1]. 1.0 is the correct value for [0, 1] images; 2.0 gives the
# numbers the DGP paper and reference report (higher, because C1 and C2 are 4x larger).
REFERENCE_SSIM_DATA_RANGE = 2.0

# skimage structural_similarity defaults (Wang et al. 2004 constants, uniform window).
_SSIM_WIN = 7
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _check_pair(preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape or preds.dim() != 4:
        raise ValueError(
            "expected two batches [B, C, H, W] of the same shape; got "
            f"{tuple(preds.shape)} and {tuple(target.shape)}"
        )


def _unit_scale(value_range: Sequence[float]) -> float:
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low; got {value_range!r}")
    return hi - lo


def _skimage_float_type(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The float type skimage's metrics compute two images in (``_supported_float_type``).

    Each dtype is mapped on its own (float32 and float64 kept, the half types to float32,
    integers and bool to float64), then the two are promoted: float32 with float32 stays
    float32, anything with float64 is float64.
    """

    def supported(dtype: torch.dtype) -> torch.dtype:
        if dtype in (torch.float32, torch.float64):
            return dtype
        if dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return torch.float64

    return torch.promote_types(supported(a), supported(b))


# --------------------------------------------------------------------------------------------
# Per-image functions
# --------------------------------------------------------------------------------------------


def psnr(preds: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """10 log10(data_range^2 / MSE) per image, float64 Tensor[B]; MSE over all pixels and channels.

    Exactly skimage.metrics.peak_signal_noise_ratio (and the compare_psnr of DGP and DIP, whose
    inferred data_range is 1 for [0, 1] targets; DGP SPEC §8, DIP SPEC §7.4): both images are
    promoted to their common float type (float32 for two float32 batches, float64 when either
    is float64; half types count as float32), differenced and squared in that type, and only
    the mean is accumulated in float64. PSNR is symmetric, so the argument order does not
    change the value. Identical images give +inf, as in skimage. A metric, not a loss: no
    gradient flows through it.
    """
    _check_pair(preds, target)
    # skimage (then and now) differences in the common type, so a float32 run's PSNR carries
    # the float32 rounding of the differences. Differencing in float64 instead moved the DIP
    # notebooks' recorded bicubic/nearest SR baselines by 6.5e-8 dB (this rule: 0) and DIP's
    # float32 test runs by up to 9.2e-8 dB; float64 inputs are unaffected.
    common = _skimage_float_type(preds.dtype, target.dtype)
    diff = preds.detach().to(common) - target.detach().to(common)
    err = diff.square().double().mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range**2 / err)


def ssim(preds: Tensor, target: Tensor, *, data_range: float, window: str = "uniform7") -> Tensor:
    """Mean SSIM per image, K1 = 0.01, K2 = 0.03, per channel, then averaged over channels.

    ``window="uniform7"`` (DGP's reference) is skimage's structural_similarity(channel_axis=-1)
    default: 7x7 uniform window with sample covariance (N/(N-1)). ``window="gaussian11"`` is
    Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5 and population covariance, the
    SSIM the mGANprior paper reports (skimage with gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False). Either way each map is averaged over the windows that lie
    fully inside the image: skimage crops the border that its reflect padding touches, so a
    'valid' filter gives the cropped map directly.

    ``data_range`` has no default on purpose: DGP's reference value is 2.0 (see
    ``REFERENCE_SSIM_DATA_RANGE``) and the correct value for [0, 1] images is 1.0.
    """
    _check_pair(preds, target)
    if window not in SSIM_WINDOWS:
        raise ValueError(f"SSIM window must be one of {list(SSIM_WINDOWS)}, got {window!r}")
    taps, sample_cov = SSIM_WINDOWS[window]
    size = taps.numel()
    if min(preds.shape[-2:]) < size:
        raise ValueError(f"SSIM ({window}) needs images of at least {size}x{size} pixels")
    x = preds.double()
    y = target.double()
    n = size * size
    cov_norm = n / (n - 1) if sample_cov else 1.0

    # One separable filter over the five maps at once (scipy's filters are separable too):
    # along rows, then columns. unfold + weighted sum is several times faster than conv2d
    # for float64 on the CPU.
    w = taps.to(x.device)
    maps = torch.cat((x, y, x * x, y * y, x * y), dim=1)
    maps = (maps.unfold(-2, size, 1) * w).sum(-1)
    maps = (maps.unfold(-1, size, 1) * w).sum(-1)
    ux, uy, uxx, uyy, uxy = maps.chunk(5, dim=1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    # Mean over each channel's map, then over channels: equal channel sizes make this the
    # mean over all of them.
    return (num / den).mean(dim=(1, 2, 3))


def _gaussian_taps(size: int, sigma: float) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r * r) / (2 * sigma * sigma))
    return g / g.sum()


# window name -> (1-D taps of the separable window, sample covariance)
SSIM_WINDOWS: dict[str, tuple[Tensor, bool]] = {
    "uniform7": (torch.full((_SSIM_WIN,), 1.0 / _SSIM_WIN, dtype=torch.float64), True),
    "gaussian11": (_gaussian_taps(11, 1.5), False),
}


def mse(preds: Tensor, target: Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> Tensor:
    """Mean squared error per image on the [0, 1] scale.

    For DGP's [-1, 1] images this is mean((a - b)^2) / 4, the reference's reported mse_loss
    (SPEC §1); pass value_range=(0, 1) for images already in [0, 1].
    """
    _check_pair(preds, target)
    err = (preds.double() - target.double()).pow(2).mean(dim=(1, 2, 3))
    return err / _unit_scale(value_range) ** 2


def l1(preds: Tensor, target: Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> Tensor:
    """Mean absolute error per image on the [0, 1] scale (mean|a - b| / 2 for [-1, 1])."""
    _check_pair(preds, target)
    err = (preds.double() - target.double()).abs().mean(dim=(1, 2, 3))
    return err / _unit_scale(value_range)


# --------------------------------------------------------------------------------------------
# Colorization AuC (Zhang, Isola, Efros 2016; mGANprior §4.2)
# --------------------------------------------------------------------------------------------


def colorization_auc(
    preds: Tensor,
    target: Tensor,
    value_range: Sequence[float] = (-1.0, 1.0),
    max_threshold: float = 150.0,
    step: float = 1.0,
) -> Tensor:
    """Area under the cumulative ab-error curve per image, in percent, float64 Tensor[B].

    Both images go to CIE Lab (sRGB, D65; clipped to the value range first). For each pixel
    d = ||ab_pred - ab_true||_2; acc(t) is the fraction of pixels with d <= t for
    t = 0, step, ..., max_threshold; the result is the trapezoid area under acc(t) divided by
    max_threshold, times 100 (mGANprior SPEC §4.2; the plain, not class-rebalanced, variant).
    A perfect colorization scores 100.
    """
    check_rgb_pair(preds, target)
    ab = [rgb_to_lab(to_unit(x, value_range).clamp(0.0, 1.0))[:, 1:] for x in (preds, target)]
    dist = (ab[0] - ab[1]).square().sum(dim=1).sqrt().flatten(1)
    thresholds = torch.arange(0.0, max_threshold + step / 2, step, dtype=torch.float64, device=dist.device)
    # acc(t) from the sorted distances: the count of d <= t, without a [pixels x thresholds] table.
    counts = torch.searchsorted(dist.sort(dim=1).values, thresholds.expand(dist.shape[0], -1).contiguous(), right=True)
    acc = counts.double() / dist.shape[1]
    return torch.trapezoid(acc, thresholds, dim=1) / max_threshold * 100.0


class ColorizationAuC(ScoredMetric):
    """Mean colorization AuC (%) over images; ``update(preds, target)``."""

    higher_is_better = True
    keys = ("colorization_auc",)

    def __init__(
        self, value_range: Sequence[float] = (-1.0, 1.0), max_threshold: float = 150.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.max_threshold = float(max_threshold)

    def per_image(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        target = check_rgb_pair(preds, target)
        return {"colorization_auc": colorization_auc(preds, target, self.value_range, self.max_threshold)}

    def update(self, preds: Tensor, target: Tensor) -> None:
        self._accumulate(self.per_image(preds, target))

    def _update_from(self, preds: Tensor, target: Tensor | None, labels: Tensor | None) -> None:
        self.update(preds, check_rgb_pair(preds, target))


# --------------------------------------------------------------------------------------------
# DGP's get_metrics (SPEC §8)
# --------------------------------------------------------------------------------------------


def lab_recombine(x: Tensor, target: Tensor) -> Tensor:
    """DGP's colorization result ``x2``: x's a, b with the target's L, back to RGB.

    Both inputs are RGB in [0, 1], [B, 3, H, W]; the result is float64 clipped to [0, 1]
    (skimage rgb2lab / lab2rgb semantics, SPEC §8).
    """
    _check_pair(x, target)
    lab = rgb_to_lab(x)
    lightness = rgb_to_lab(target)[:, 0:1]
    return lab_to_rgb(torch.cat((lightness, lab[:, 1:]), dim=1))


# Tasks with a metric convention, and what they map to. DGP computes metrics for reconstruct,
# colorization, SR and inpainting only; the degradation names are accepted as synonyms.
_TASK_KIND = {
    "reconstruct": "whole",
    "identity": "whole",
    "sr": "whole",
    "colorization": "lab",
    "gray": "lab",
    "inpainting": "hole",
    "center_square": "hole",
    "random_mask": "whole",
    "mask_image": "whole",
}
METRIC_TASKS: tuple[str, ...] = tuple(sorted(_TASK_KIND))
# Entries of restoration_metrics' result that are images, not Tensor[B] values.
IMAGE_KEYS: tuple[str, ...] = ("colorization2",)


def restoration_metrics(
    x: Tensor,
    target_origin: Tensor,
    task: str,
    hole_box: Box | None = None,
    ssim_data_range: float = REFERENCE_SSIM_DATA_RANGE,
) -> dict[str, Tensor]:
    """DGP's per-iteration metrics (SPEC §8) for a batch, one value per image.

    ``x`` (the generator output at full resolution) and ``target_origin`` (the clean image)
    are [B, 3, H, W] in [-1, 1]. Returns float64 Tensor[B] entries:

    * ``l1_loss_origin`` = mean|x - t| / 2 and ``mse_loss_origin`` = mean((x - t)^2) / 4, on
      the raw x (for colorization, not the recombined image);
    * ``psnr`` (data_range 1) and ``ssim`` (``ssim_data_range``, default the reference's 2.0)
      on [0, 1] images: for colorization on the Lab recombination ``lab_recombine``, returned
      as the image entry ``colorization2`` ([B, 3, H, W] in [0, 1]; see ``IMAGE_KEYS``); for
      inpainting on the hole crop ``hole_box`` (default DGP's centre hole; center_square
      needs the box); otherwise on the whole image.

    An explicit ``hole_box`` crops for any task.
    """
    _check_pair(x, target_origin)
    key = task.lower()
    if key not in _TASK_KIND:
        raise ValueError(f"no metric convention for task {task!r}; valid: {list(METRIC_TASKS)}")
    kind = _TASK_KIND[key]
    if kind == "hole" and hole_box is None:
        if key != "inpainting":
            raise ValueError(f"task {task!r} needs hole_box=(top, bottom, left, right)")
        hole_box = center_hole_box(*x.shape[-2:])

    out: dict[str, Tensor] = {
        "l1_loss_origin": l1(x, target_origin),
        "mse_loss_origin": mse(x, target_origin),
    }
    # The reference maps both images to [0, 1] in float32 before handing them to skimage.
    result = (x.detach() + 1) / 2
    reference = (target_origin.detach() + 1) / 2
    if kind == "lab":
        result = lab_recombine(result, reference)
        out["colorization2"] = result
    if hole_box is not None:
        top, bottom, left, right = hole_box
        result = result[..., top:bottom, left:right]
        reference = reference[..., top:bottom, left:right]
    out["psnr"] = psnr(result, reference, data_range=1.0)
    out["ssim"] = ssim(result, reference, data_range=ssim_data_range)
    return out
