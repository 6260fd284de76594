"""NIQE (Mittal, Soundararajan, Bovik 2013), as the authors' MATLAB release computes it.

No-reference: an image's NIQE is the distance of its patch statistics from a multivariate
Gaussian fitted on pristine images. That pristine model is published data read from a local
file (MATLAB ``modelparameters.mat`` or the same numbers as ``niqe_pris_params.npz``), or one
fitted with ``fit_niqe_model``; ``docs/degradations_and_metrics.md`` lists where to get it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.io import loadmat
from torch import Tensor

from genprior.metrics.base import ScoredMetric, WeightsUnavailable, check_rgb, to_unit

__all__ = [
    "MATLAB_RGB2GRAY",
    "NIQE",
    "NIQE_BLOCK_SIZE",
    "NIQE_HELP",
    "NIQEModel",
    "aggd_fit",
    "fit_niqe_model",
    "matlab_imresize_half",
    "niqe",
    "niqe_features",
    "niqe_gray",
]

# MATLAB rgb2gray: the first row of the inverse NTSC (YIQ) matrix.
MATLAB_RGB2GRAY = (0.298936021293775, 0.587043074451121, 0.114020904255103)
NIQE_BLOCK_SIZE = 96
NIQE_NUM_FEATURES = 36  # 18 per scale, two scales
# estimateaggdparam's search grid for the shape parameter: 0.2:0.001:10.
_AGGD_GRID_START, _AGGD_GRID_STEP, _AGGD_GRID_SIZE = 0.2, 0.001, 9801
# The four neighbour directions of the paired products (circshift offsets in the release).
_NIQE_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))

NIQE_HELP = (
    "NIQE needs the pristine-image model (a 36-dim mean and 36x36 covariance) of Mittal et al. "
    "2013. Use the authors' MATLAB release (modelparameters.mat with mu_prisparam and "
    "cov_prisparam, in niqe_release.zip from live.ece.utexas.edu/research/quality/) or the "
    "same numbers as BasicSR's / pyiqa's niqe_pris_params.npz (mu_pris_param, cov_pris_param), "
    "downloaded on a machine with internet access, and pass its path as "
    "metrics.niqe_model=<file>. To fit a model on your own pristine images instead, use "
    "genprior.metrics.fit_niqe_model(...).save(<file>.npz); its numbers are then not the "
    "papers'."
)


@dataclass(frozen=True)
class NIQEModel:
    """The multivariate Gaussian of NIQE features of pristine images (float64 mean and cov)."""

    mu: Tensor
    cov: Tensor

    def __post_init__(self) -> None:
        n = NIQE_NUM_FEATURES
        if tuple(self.mu.shape) != (n,) or tuple(self.cov.shape) != (n, n):
            raise ValueError(
                f"a NIQE model has a mean of shape ({n},) and a covariance of shape ({n}, {n}); "
                f"got {tuple(self.mu.shape)} and {tuple(self.cov.shape)}"
            )

    @classmethod
    def load(cls, path: str | Path) -> NIQEModel:
        """Read a .mat (MATLAB release) or .npz (BasicSR/pyiqa layout, or ``save``'s) model."""
        path = Path(path)
        if not path.is_file():
            raise WeightsUnavailable(f"NIQE model file {path} does not exist. " + NIQE_HELP)
        if path.suffix == ".mat":
            data = dict(loadmat(str(path)))
        else:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        for mu_key, cov_key in (("mu_prisparam", "cov_prisparam"), ("mu_pris_param", "cov_pris_param")):
            if mu_key in data and cov_key in data:
                mu = torch.from_numpy(np.asarray(data[mu_key], dtype=np.float64).reshape(-1))
                cov = torch.from_numpy(np.asarray(data[cov_key], dtype=np.float64))
                return cls(mu, cov)
        found = sorted(k for k in data if not k.startswith("__"))
        raise ValueError(
            f"{path} holds no NIQE model: expected mu_prisparam/cov_prisparam (.mat) or "
            f"mu_pris_param/cov_pris_param (.npz); found {found}"
        )

    def save(self, path: str | Path) -> None:
        """Write the model as .npz in BasicSR's layout (mu_pris_param [1, 36], cov_pris_param)."""
        np.savez(
            path,
            mu_pris_param=self.mu.double().numpy().reshape(1, -1),
            cov_pris_param=self.cov.double().numpy(),
        )


def _matlab_round(x: Tensor) -> Tensor:
    # MATLAB rounds halves away from zero (torch.round rounds them to even); x >= 0 here.
    return torch.floor(x + 0.5)


def niqe_gray(images: Tensor, value_range: Sequence[float] = (-1.0, 1.0), quantize: bool = True) -> Tensor:
    """Luminance on the 0..255 scale, [B, H, W] float64, as the release reads an image.

    The release runs on ``rgb2gray(imread(file))``: a uint8 image and MATLAB's rgb2gray
    weights, rounded back to uint8. ``quantize`` reproduces both roundings; without it the
    float luminance is used. Values outside ``value_range`` are clipped first.
    """
    check_rgb(images)
    rgb = to_unit(images.double(), value_range).clamp(0.0, 1.0) * 255.0
    if quantize:
        rgb = _matlab_round(rgb)
    weights = torch.tensor(MATLAB_RGB2GRAY, dtype=torch.float64, device=images.device)
    gray = torch.einsum("c,bchw->bhw", weights, rgb)
    return _matlab_round(gray) if quantize else gray


def _niqe_window(device: torch.device) -> Tensor:
    # fspecial('gaussian', 7, 7/6), normalised, as its 1-D factor: the 2-D window is the
    # outer product of this with itself, so the filter runs as two 1-D passes.
    x = torch.arange(-3, 4, dtype=torch.float64, device=device)
    g = torch.exp(-(x**2) / (2 * (7 / 6) ** 2))
    return g / g.sum()


def _mscn(gray: Tensor) -> tuple[Tensor, Tensor]:
    """Mean-subtracted contrast-normalised coefficients and the local std (``sigma``).

    imfilter(..., 'replicate') with the 7x7 Gaussian; ``(im - mu) / (sigma + 1)``.
    """
    g = _niqe_window(gray.device)
    im = gray.unsqueeze(1)
    # The local means of the image and of its square together: along rows, then columns.
    both = F.pad(torch.cat((im, im * im), dim=1), (3, 3, 3, 3), mode="replicate")
    both = both.unfold(-1, 7, 1) @ g
    both = (both.unfold(-2, 7, 1) @ g).contiguous()
    mu, mean_sq = both[:, :1], both[:, 1:]
    sigma = (mean_sq - mu * mu).abs().sqrt()
    return ((im - mu) / (sigma + 1)).squeeze(1), sigma.squeeze(1)


def _cubic(x: Tensor) -> Tensor:
    # Keys' cubic convolution kernel with a = -0.5, as MATLAB imresize's 'bicubic'.
    a = x.abs()
    return torch.where(
        a <= 1,
        1.5 * a**3 - 2.5 * a**2 + 1,
        torch.where(a <= 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, torch.zeros_like(a)),
    )


def matlab_imresize_half(images: Tensor) -> Tensor:
    """MATLAB ``imresize(im, 0.5)`` (bicubic, antialiased) of [B, H, W] with H, W even.

    For scale 1/2 MATLAB's contributions reduce to one 8-tap filter at stride 2: output i
    (1-based) centres on input 2i - 0.5, taps 2i-4 .. 2i+3 weighted by 0.5·cubic(0.5·d); the
    image is extended symmetrically (edge pixel repeated), 3 pixels each side. Rows first,
    then columns, as MATLAB does for equal scales.
    """
    if images.dim() != 3 or images.shape[-1] % 2 or images.shape[-2] % 2:
        raise ValueError(f"expected [B, H, W] with even H and W; got {tuple(images.shape)}")
    distances = torch.arange(3.5, -4.0, -1.0, dtype=torch.float64, device=images.device)
    taps = 0.5 * _cubic(0.5 * distances)
    taps = (taps / taps.sum()).to(images.dtype)

    def along_last(x: Tensor) -> Tensor:
        n = x.shape[-1]
        index = torch.arange(-3, n + 3, device=x.device)
        index = torch.where(index < 0, -index - 1, index)
        index = torch.where(index >= n, 2 * n - 1 - index, index)
        windows = x[..., index].unfold(-1, 8, 2)
        return windows @ taps

    return along_last(along_last(images.transpose(-1, -2)).transpose(-1, -2))


def _aggd_grid() -> tuple[Tensor, Tensor]:
    """The shape grid 0.2:0.001:10 and its ratios r(γ) = Γ(2/γ)² / (Γ(1/γ) Γ(3/γ))."""
    gam = _AGGD_GRID_START + _AGGD_GRID_STEP * torch.arange(_AGGD_GRID_SIZE, dtype=torch.float64)
    r_gam = torch.exp(2 * torch.lgamma(2 / gam) - torch.lgamma(1 / gam) - torch.lgamma(3 / gam))
    return gam, r_gam


# Computed once (a few ms): every fit of every patch uses it.
_AGGD_GAM, _AGGD_RATIO = _aggd_grid()


def _nearest_grid_index(r_gam: Tensor, x: Tensor) -> Tensor:
    """argmin_i (r_gam[i] - x)^2 for each x, first index on ties, 0 for NaN (MATLAB's min).

    r(γ) increases strictly along the grid, so the nearest point is one of the two around x's
    insertion point; comparing their squared differences gives what a search over all 9801
    points gives (tested), without a [patches x 9801] table.
    """
    hi = torch.searchsorted(r_gam, x.nan_to_num(nan=0.0).contiguous()).clamp(1, r_gam.numel() - 1)
    lo = hi - 1
    index = torch.where((r_gam[hi] - x) ** 2 < (r_gam[lo] - x) ** 2, hi, lo)
    return torch.where(x.isnan(), 0, index)


def aggd_fit(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric generalised Gaussian fit of each row of ``values`` [N, M]: (alpha, beta_l, beta_r).

    The release's estimateaggdparam, moment matching on a grid: left/right standard deviations
    from the negative/positive samples, the generalised Gaussian ratio
    rhat = E|x|^2 / E[x^2] corrected for asymmetry, alpha the grid point 0.2:0.001:10 whose
    ratio r(α) is nearest (first on ties), and beta = std * sqrt(Γ(1/α)/Γ(3/α)).
    As in MATLAB, a row without negative (or positive) samples has a NaN std, and alpha falls
    back to the grid's first point, which is what MATLAB's NaN-skipping min returns.
    """
    v = values.double()
    sq = v * v
    neg, pos = v < 0, v > 0
    left_std = (torch.where(neg, sq, 0.0).sum(1) / neg.sum(1)).sqrt()
    right_std = (torch.where(pos, sq, 0.0).sum(1) / pos.sum(1)).sqrt()
    gamma_hat = left_std / right_std
    r_hat = v.abs().mean(1) ** 2 / sq.mean(1)
    r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    gam, r_gam = _AGGD_GAM.to(v.device), _AGGD_RATIO.to(v.device)
    alpha = gam[_nearest_grid_index(r_gam, r_hat_norm)]
    ratio = torch.exp(0.5 * (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)))
    return alpha, left_std * ratio, right_std * ratio


def _blocks(x: Tensor, size: int) -> Tensor:
    """[B, H, W] (H, W multiples of size) to [B, N, size, size], blocks in MATLAB's column order."""
    b, h, w = x.shape
    blocks = x.reshape(b, h // size, size, w // size, size).permute(0, 3, 1, 2, 4)
    return blocks.reshape(b, -1, size, size)


def _block_features(structdis: Tensor) -> Tensor:
    """The release's computefeature on blocks [B, N, s, s] -> [B, N, 18]."""
    b, n = structdis.shape[:2]
    flat = structdis.reshape(b * n, *structdis.shape[2:])
    alpha, beta_l, beta_r = aggd_fit(flat.flatten(1))
    feats = [alpha, (beta_l + beta_r) / 2]
    for shift in _NIQE_SHIFTS:
        pair = flat * torch.roll(flat, shifts=shift, dims=(1, 2))  # circshift within the block
        alpha, beta_l, beta_r = aggd_fit(pair.flatten(1))
        mean = (beta_r - beta_l) * torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha))
        feats += [alpha, mean, beta_l, beta_r]
    return torch.stack(feats, dim=-1).view(b, n, 18)


def niqe_features(gray: Tensor, block_size: int = NIQE_BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Patch features [B, N, 36] and patch sharpness [B, N] of luminance images [B, H, W].

    The release's computequality up to the MVG fit: crop to whole blocks; at two scales (the
    second an imresize by 1/2), MSCN coefficients, then 18 AGGD features per block of
    ``block_size / scale`` pixels; sharpness is the mean local std of each block at scale 1
    (used only to pick sharp patches when fitting a pristine model).
    """
    if block_size % 2:
        raise ValueError(f"NIQE's block size must be even (it is halved); got {block_size}")
    _, h, w = gray.shape
    rows, cols = h // block_size, w // block_size
    if rows * cols < 2:
        raise ValueError(
            f"NIQE needs at least two {block_size}x{block_size} patches; a {h}x{w} image has "
            f"{rows * cols}. Use larger images or a smaller metrics.niqe_block_size (the "
            "pristine model was fit on 96x96 patches)."
        )
    im = gray.double()[:, : rows * block_size, : cols * block_size]
    feats = []
    sharpness = torch.empty(0)
    for scale in (1, 2):
        structdis, sigma = _mscn(im)
        feats.append(_block_features(_blocks(structdis, block_size // scale)))
        if scale == 1:
            sharpness = _blocks(sigma, block_size).mean(dim=(2, 3))
            im = matlab_imresize_half(im)
    return torch.cat(feats, dim=-1), sharpness


def _nan_mean_cov(feats: Tensor) -> tuple[Tensor, Tensor]:
    """MATLAB nanmean (per column) and nancov (rows with a NaN dropped; N - 1 normalisation)."""
    mu = feats.nanmean(dim=0)
    complete = feats[~feats.isnan().any(dim=1)]
    if complete.shape[0] < 2:
        raise ValueError("NIQE needs at least two patches whose features are all finite")
    return mu, torch.cov(complete.T)


def niqe(
    preds: Tensor,
    model: NIQEModel,
    value_range: Sequence[float] = (-1.0, 1.0),
    block_size: int = NIQE_BLOCK_SIZE,
    quantize: bool = True,
) -> Tensor:
    """NIQE per image (lower is more natural), float64 Tensor[B].

    The release's computequality: features of *all* patches of the image (no sharpness
    selection; that is only for fitting the pristine model), their mean and covariance, and
    sqrt((mu_p - mu)^T pinv((cov_p + cov) / 2) (mu_p - mu)). Images are RGB [B, 3, H, W] in
    ``value_range``; see ``niqe_gray`` for the luminance and ``quantize``.
    """
    feats, _ = niqe_features(niqe_gray(preds, value_range, quantize), block_size)
    mu_p = model.mu.to(feats)
    cov_p = model.cov.to(feats)
    out = []
    for image_feats in feats:
        mu, cov = _nan_mean_cov(image_feats)
        d = mu_p - mu
        out.append((d @ torch.linalg.pinv((cov_p + cov) / 2) @ d).clamp_min(0).sqrt())
    return torch.stack(out)


def fit_niqe_model(
    images: Iterable[Tensor],
    value_range: Sequence[float] = (-1.0, 1.0),
    block_size: int = NIQE_BLOCK_SIZE,
    sharpness_threshold: float = 0.75,
    quantize: bool = True,
) -> NIQEModel:
    """A pristine model from your own images, as the release's estimatemodelparam.

    Each image (batches [B, 3, H, W] in ``value_range``; sizes may differ between batches)
    contributes the features of its patches whose sharpness exceeds ``sharpness_threshold``
    times the image's sharpest patch; the model is the NaN-aware mean and covariance of all
    of them. The published model was fit this way on 125 pristine images that are not
    available here, so a model of your own gives NIQE values on a different scale.
    """
    kept = []
    for batch in images:
        feats, sharpness = niqe_features(niqe_gray(batch, value_range, quantize), block_size)
        for image_feats, image_sharpness in zip(feats, sharpness):
            kept.append(image_feats[image_sharpness > sharpness_threshold * image_sharpness.max()])
    if not kept:
        raise ValueError("fit_niqe_model got no images")
    mu, cov = _nan_mean_cov(torch.cat(kept))
    return NIQEModel(mu.cpu(), cov.cpu())


class NIQE(ScoredMetric):
    """Mean NIQE over images; ``update(preds)`` (no reference image)."""

    higher_is_better = False
    keys = ("niqe",)

    def __init__(
        self,
        model: NIQEModel,
        value_range: Sequence[float] = (-1.0, 1.0),
        block_size: int = NIQE_BLOCK_SIZE,
        quantize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.block_size = int(block_size)
        self.quantize = quantize

    def per_image(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        return {"niqe": niqe(preds, self.model, self.value_range, self.block_size, self.quantize)}

    def update(self, preds: Tensor) -> None:
        self._accumulate(self.per_image(preds))

    def _update_from(self, preds: Tensor, target: Tensor | None, labels: Tensor | None) -> None:
        self.update(preds)

