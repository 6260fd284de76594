"""The value range of every per-image metric a result row can hold.

An evaluation's summary (``genprior.results.summarize``) covers these columns (and the
observation's, ``observation_<metric>`` / ``bicubic_<metric>``), and clips each 95% interval
to the metric's range: a t-interval is symmetric, so near a bound it reaches past it (SSIM
values just under 1 gave an interval up to 1.16).

- PSNR (``psnr``, ``psnr_hole``): 10·log10(range² / MSE) >= 0, since the restoration's MSE is
  at most range² for images in the data range (inf for identical images);
- SSIM (``ssim``, ``ssim_hole``): [-1, 1] for any data_range (a product of a luminance and a
  contrast-structure term, each in [-1, 1]);
- ``mse_loss_origin``, ``l1_loss_origin`` (DGP's manipulation-task metrics): >= 0;
- LPIPS: a weighted sum of squared feature differences, >= 0; NIQE: a Mahalanobis-type
  distance, >= 0;
- ``top1``, ``top5`` (classifier accuracy, 100 or 0 per image, in %) and ``colorization_auc``
  (the area under the accuracy-threshold curve, in %): [0, 100];
- DIP network inversion: ``feature_loss`` >= 0, ``unit_activation`` unbounded.
"""

from __future__ import annotations

import math

__all__ = ["METRIC_RANGES", "OBSERVATION_PREFIXES", "metric_range"]

INF = math.inf

METRIC_RANGES: dict[str, tuple[float, float]] = {
    "psnr": (0.0, INF),
    "psnr_hole": (0.0, INF),
    "ssim": (-1.0, 1.0),
    "ssim_hole": (-1.0, 1.0),
    "mse_loss_origin": (0.0, INF),
    "l1_loss_origin": (0.0, INF),
    "lpips": (0.0, INF),
    "niqe": (0.0, INF),
    "top1": (0.0, 100.0),
    "top5": (0.0, 100.0),
    "colorization_auc": (0.0, 100.0),
    # DIP network inversion (methods/inversion.py): the normalised feature distance of a
    # pre-image, >= 0; the maximised unit's activation, any sign
    "feature_loss": (0.0, INF),
    "unit_activation": (-INF, INF),
}

#: Prefixes of the same metric scored on a baseline instead of the result: the observation
#: itself, and DIP super-resolution's bicubic upsampling. Any other ``<name>_<metric>`` column
#: (the defense's ``clean_top1``, ``pgd_adv_top1``, ``sweep0_top1``; enhancement's
#: ``dip_psnr``) is the metric scored on another image and has its range too.
OBSERVATION_PREFIXES: tuple[str, ...] = ("observation_", "bicubic_")

_BY_LENGTH = sorted(METRIC_RANGES, key=len, reverse=True)  # psnr_hole before psnr


def metric_range(column: str) -> tuple[float, float] | None:
    """The range of a result-row column that is a metric: a name of ``METRIC_RANGES``, or one
    with a prefix (``observation_psnr``, ``clean_top1``); None for any other column."""
    if column in METRIC_RANGES:
        return METRIC_RANGES[column]
    for metric in _BY_LENGTH:
        if column.endswith("_" + metric):
            return METRIC_RANGES[metric]
    return None
