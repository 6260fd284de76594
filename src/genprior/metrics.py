"""Image-quality metrics of a restoration run: per image, and aggregated over images.

Each metric exists in two forms:

* a function returning one value per image, ``Tensor[B]`` in float64 (``psnr``, ``ssim``,
  ``mse``, ``l1``);
* a torchmetrics ``Metric`` (``PSNR``, ``SSIM``, ``MSE``, ``L1``) that sums those values and
  counts images in ``add_state(..., dist_reduce_fx="sum")`` states, so a multi-GPU evaluation
  reports the mean over all images of all ranks with no hand-written all-reduce.

``restoration_metrics`` reproduces DGP's ``get_metrics`` (SPEC §8) for one batch, including its
Lab recombination for colorization, the hole crop for inpainting and SSIM's data_range of 2.

The reference computes these with skimage on HWC numpy arrays; here everything is torch, on
the images' device, in float64, and matches skimage's ``peak_signal_noise_ratio`` and
``structural_similarity(channel_axis=-1)`` on float64 inputs to ~1e-12.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from genprior.color import lab_to_rgb, rgb_to_lab
from genprior.degradations import Box, center_hole_box

__all__ = [
    "IMAGE_KEYS",
    "L1",
    "METRIC_TASKS",
    "MSE",
    "PSNR",
    "REFERENCE_SSIM_DATA_RANGE",
    "SSIM",
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


# --------------------------------------------------------------------------------------------
# Per-image functions
# --------------------------------------------------------------------------------------------


def psnr(preds: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """10 log10(data_range^2 / MSE) per image; MSE in float64 over all pixels and channels.

    Matches skimage.metrics.peak_signal_noise_ratio (and DGP's and DIP's compare_psnr, whose
    inferred data_range is 1 for [0, 1] targets; DGP SPEC §8, DIP SPEC §7.4). Identical images
    give +inf, as in skimage.
    """
    _check_pair(preds, target)
    # Like skimage (then and now): difference and square in the inputs' common float type
    # (float32 for float32 images), only the mean accumulated in float64.
    err = (preds - target).square().double().mean(dim=(1, 2, 3))
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
# torchmetrics wrappers: mean over images, DDP-reducible by summation
# --------------------------------------------------------------------------------------------


class _MeanOverImages(Metric):
    """Sum of per-image values and number of images; compute() is their ratio.

    Each image counts once whatever the batch split and the number of ranks, which is how DGP
    averages its per-image metrics over a dataset (SPEC §11).
    """

    is_differentiable = False
    full_state_update = False

    value_sum: Tensor
    num_images: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("value_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def per_image(self, preds: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        values = self.per_image(preds, target)
        self.value_sum += values.sum().to(self.value_sum)
        self.num_images += values.numel()

    def compute(self) -> Tensor:
        return self.value_sum / self.num_images


class PSNR(_MeanOverImages):
    """Mean over images of the per-image PSNR (``psnr``); data_range 1 for [0, 1] images."""

    higher_is_better = True

    def __init__(self, data_range: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_range = float(data_range)

    def per_image(self, preds: Tensor, target: Tensor) -> Tensor:
        return psnr(preds, target, self.data_range)


class SSIM(_MeanOverImages):
    """Mean over images of the per-image SSIM (``ssim``).

    ``data_range`` must be given: 2.0 (``REFERENCE_SSIM_DATA_RANGE``) reproduces DGP's numbers,
    1.0 is the correct value for [0, 1] images.
    """

    higher_is_better = True

    def __init__(self, *, data_range: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_range = float(data_range)

    def per_image(self, preds: Tensor, target: Tensor) -> Tensor:
        return ssim(preds, target, data_range=self.data_range)


class MSE(_MeanOverImages):
    """Mean over images of the per-image MSE on the [0, 1] scale (``mse``)."""

    higher_is_better = False

    def __init__(self, value_range: Sequence[float] = (-1.0, 1.0), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.value_range = (float(value_range[0]), float(value_range[1]))

    def per_image(self, preds: Tensor, target: Tensor) -> Tensor:
        return mse(preds, target, self.value_range)


class L1(_MeanOverImages):
    """Mean over images of the per-image L1 on the [0, 1] scale (``l1``)."""

    higher_is_better = False

    def __init__(self, value_range: Sequence[float] = (-1.0, 1.0), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.value_range = (float(value_range[0]), float(value_range[1]))

    def per_image(self, preds: Tensor, target: Tensor) -> Tensor:
        return l1(preds, target, self.value_range)


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
