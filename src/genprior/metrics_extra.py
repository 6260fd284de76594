"""The papers' metrics beyond PSNR and SSIM: LPIPS, NIQE, classifier accuracy, colorization AuC.

Each metric exists in the two forms of ``genprior.metrics``:

* a function returning one value per image, ``Tensor[B]`` in float64 (``lpips``, ``niqe``,
  ``topk_correct``, ``colorization_auc``);
* a torchmetrics ``Metric`` (``LPIPS``, ``NIQE``, ``ClassifierAccuracy``, ``ColorizationAuC``)
  that keeps sums of those values and image counts in ``dist_reduce_fx="sum"`` states, so a
  multi-GPU evaluation reports the mean over all images of all ranks.

Every metric class also has ``score(preds, target=None, labels=None)``: it updates the state
*and* returns the per-image values (``dict[key, Tensor[B]]``) for the results rows, so nothing
is computed twice. ``score_batch`` does that for a dict of metrics.

Three of them need published data that cannot be downloaded here; all of it comes from local
files named in ``MetricsConfig`` (``docs/degradations_and_metrics.md`` lists where to get each):

* LPIPS: an ImageNet AlexNet/VGG-16 backbone (torchvision's file) and the LPIPS v0.1 linear
  layers (shipped inside torchmetrics' wheel, used from there by default);
* NIQE: the pristine-image MVG model of Mittal et al. 2013 (MATLAB ``modelparameters.mat`` or
  the same numbers as ``niqe_pris_params.npz``), or one fitted with ``fit_niqe_model``;
* accuracy: the classifier's weights (timm model name, local file).

``build_metrics`` turns a ``MetricsConfig`` into metrics; one whose file is missing becomes an
``UnavailableMetric`` (NaN, with a status saying what to download and which key to set), logged
once, so a long run never dies at its last step for want of a weights file.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torchmetrics import Metric

from genprior.color import rgb_to_lab

__all__ = [
    "EXTRA_METRICS",
    "LPIPS",
    "NIQE",
    "ClassifierAccuracy",
    "ColorizationAuC",
    "ImageClassifier",
    "LPIPSNetwork",
    "NIQEModel",
    "UnavailableMetric",
    "WeightsUnavailable",
    "aggd_fit",
    "build_classifier",
    "build_metrics",
    "colorization_auc",
    "default_lpips_weights",
    "fit_niqe_model",
    "load_lpips_network",
    "lpips",
    "matlab_imresize_half",
    "metric_status",
    "niqe",
    "niqe_features",
    "niqe_gray",
    "score_batch",
    "topk_correct",
    "torch_hub_checkpoint",
]

log = logging.getLogger(__name__)


class WeightsUnavailable(FileNotFoundError):
    """A metric's weights or model file is missing; the message says where to get it."""


def _to_unit(images: Tensor, value_range: Sequence[float]) -> Tensor:
    """Images in ``value_range`` mapped to [0, 1] (not clipped)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low; got {value_range!r}")
    return (images - lo) / (hi - lo)


def _check_images(images: Tensor, what: str = "images") -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must be a batch [B, 3, H, W]; got {tuple(images.shape)}")


def _check_pair(preds: Tensor, target: Tensor | None) -> Tensor:
    if target is None:
        raise ValueError("this metric compares two images: pass target")
    _check_images(preds, "preds")
    if preds.shape != target.shape:
        raise ValueError(f"preds and target differ in shape: {tuple(preds.shape)} vs {tuple(target.shape)}")
    return target


def torch_hub_checkpoint(url: str) -> Path:
    """Where torch.hub / torchvision / timm cache the file of ``url`` (read, never downloaded)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # an untrusted file
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


# --------------------------------------------------------------------------------------------
# Mean over images, summed across ranks
# --------------------------------------------------------------------------------------------


class _ScoredMetric(Metric):
    """Per-key sums of per-image values and per-key image counts; compute() is their ratio.

    Subclasses implement ``per_image``, an ``update`` with their own natural signature that
    passes ``per_image``'s values to ``_accumulate``, and ``_update_from`` that calls that
    ``update`` from ``score``'s uniform arguments. ``score`` goes through ``update`` so that
    torchmetrics' bookkeeping (update count, cached result) stays right.

    Each image counts once whatever the batch split and the number of ranks. With
    ``skip_nan`` (classifier accuracy, where a NaN marks an image without a label) NaN values
    are left out of both sums; otherwise a NaN makes the mean NaN, as it should.
    """

    is_differentiable = False
    full_state_update = False
    keys: tuple[str, ...] = ()
    skip_nan = False
    status = "ok"

    value_sum: Tensor
    num_images: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n = len(self.keys)
        self.add_state("value_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self._last_values: dict[str, Tensor] = {}

    def per_image(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def _update_from(self, preds: Tensor, target: Tensor | None, labels: Tensor | None) -> None:
        raise NotImplementedError

    def _accumulate(self, values: dict[str, Tensor]) -> None:
        stacked = torch.stack([values[k].to(self.value_sum) for k in self.keys])
        counted = ~stacked.isnan() if self.skip_nan else torch.ones_like(stacked, dtype=torch.bool)
        self.value_sum += torch.where(counted, stacked, 0.0).sum(dim=1)
        self.num_images += counted.sum(dim=1)
        self._last_values = values

    def score(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Update the state with a batch and return its per-image values (float64 Tensor[B])."""
        self._update_from(preds, target, labels)
        values, self._last_values = self._last_values, {}
        return values

    def compute(self) -> Tensor | dict[str, Tensor]:
        means = self.value_sum / self.num_images
        if len(self.keys) == 1:
            return means[0]
        return dict(zip(self.keys, means.unbind()))


# --------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018), v0.1, "lin" variant
# --------------------------------------------------------------------------------------------

# The lpips package's ScalingLayer: maps [-1, 1] inputs to roughly ImageNet-normalised ones.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Slices of torchvision's ``features`` whose last output is tapped (relu1..relu5 for AlexNet,
# relu1_2 .. relu5_3 for VGG-16), and the tapped channel counts.
_LPIPS_SLICES = {
    "alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
    "vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)),
}
_LPIPS_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
_LPIPS_LIN_KEY = re.compile(r"^lin(\d)\.model\.\d\.weight$")


def _torchvision_weights(net: str) -> Any:
    import torchvision

    return {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}[
        net
    ].IMAGENET1K_V1


def _lpips_help(net: str) -> str:
    url = _torchvision_weights(net).url
    backbone = "AlexNet" if net == "alex" else "VGG-16"
    return (
        f"LPIPS ({net}) needs torchvision's ImageNet {backbone} weights as a local file: "
        f"download {url} on a machine with internet access and put it in the torch hub cache "
        f"({torch_hub_checkpoint(url).parent}) or pass its path as "
        "metrics.lpips_backbone_weights=<file>. The LPIPS linear layers are the lpips "
        f"package's weights/v0.1/{net}.pth; torchmetrics ships a copy that is used by default "
        "(another file: metrics.lpips_weights=<file>)."
    )


def default_lpips_weights(net: str) -> Path:
    """The LPIPS v0.1 linear-layer file that torchmetrics ships (the lpips package's file)."""
    return Path(str(importlib.resources.files("torchmetrics.functional.image"))) / "lpips_models" / f"{net}.pth"


class LPIPSNetwork(nn.Module):
    """LPIPS v0.1 as in the lpips package: ``forward(x0, x1)`` gives the distance per image.

    Inputs are [B, 3, H, W] in [-1, 1]. Both go through the ScalingLayer and the backbone; each
    tapped feature map is normalised to unit length over channels, the squared difference is
    weighted per channel by a learned 1x1 convolution (no bias), averaged over space, and the
    layers are summed. The backbone keeps torchvision's ``features`` indices so its state dict
    keys are the checkpoint's.
    """

    shift: Tensor
    scale: Tensor

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        import torchvision

        if net not in _LPIPS_SLICES:
            raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_SLICES)}; got {net!r}")
        self.net = net
        build = torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16
        # Built on the meta device and materialised without the classifier: its 58M (AlexNet)
        # or 124M (VGG-16) parameters would be initialised only to be thrown away.
        with torch.device("meta"):
            features = build(weights=None).features[: _LPIPS_SLICES[net][-1][1]]
        self.features = features.to_empty(device="cpu")
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                layer.reset_parameters()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS[net])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSNetwork:
        # Always in eval mode: a Lightning module's train() must not flip it.
        return super().train(False)

    @staticmethod
    def _unit(feature: Tensor, eps: float = 1e-10) -> Tensor:
        # The lpips package's normalize_tensor: eps added to the norm, not inside the sqrt.
        return feature / (feature.square().sum(dim=1, keepdim=True).sqrt() + eps)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        h = (torch.cat((x0, x1)) - self.shift) / self.scale
        total = torch.zeros(x0.shape[0], device=x0.device, dtype=h.dtype)
        for (start, stop), lin in zip(_LPIPS_SLICES[self.net], self.lins):
            h = self.features[start:stop](h)
            f0, f1 = h.chunk(2)
            diff = (self._unit(f0) - self._unit(f1)).square()
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


def load_lpips_network(
    net: str = "alex",
    lin_weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
) -> LPIPSNetwork:
    """An ``LPIPSNetwork`` with weights from local files.

    ``backbone_weights``: torchvision's ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``
    (any file whose ``features.<i>.*`` keys are torchvision's; .pth or .safetensors); None
    looks in the torch hub cache. ``lin_weights``: the lpips package's ``weights/v0.1/<net>.pth``
    (keys ``lin<k>.model.1.weight``, shape [1, C, 1, 1]); None uses torchmetrics' copy.
    Raises ``WeightsUnavailable`` when a file is missing, ``ValueError`` when a file is not
    what it should be.
    """
    network = LPIPSNetwork(net)
    backbone = Path(backbone_weights) if backbone_weights else torch_hub_checkpoint(_torchvision_weights(net).url)
    lin = Path(lin_weights) if lin_weights else default_lpips_weights(net)
    for path in (backbone, lin):
        if not path.is_file():
            raise WeightsUnavailable(f"{path} does not exist. " + _lpips_help(net))

    state = _read_state_dict(backbone)
    wanted = {f"features.{k}" for k in network.features.state_dict()}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"{backbone} is not a torchvision {net} checkpoint: missing {missing[:3]} ...")
    network.load_state_dict({k: state[k] for k in wanted}, strict=False)

    lin_state = _read_state_dict(lin)
    found = {int(m.group(1)): v for k, v in lin_state.items() if (m := _LPIPS_LIN_KEY.match(k))}
    shapes = [(1, c, 1, 1) for c in _LPIPS_CHANNELS[net]]
    got = [tuple(found[i].shape) if i in found else None for i in range(len(shapes))]
    if got != shapes:
        raise ValueError(
            f"{lin} is not an LPIPS v0.1 {net} linear-layer file: expected lin0..lin4 "
            f"(lin<k>.model.1.weight) of shapes {shapes}, got {got}"
        )
    for i, layer in enumerate(network.lins):
        layer.weight.copy_(found[i])
    return network


def lpips(
    preds: Tensor, target: Tensor, network: LPIPSNetwork, value_range: Sequence[float] = (-1.0, 1.0)
) -> Tensor:
    """LPIPS distance per image (lower is more similar), float64 Tensor[B].

    Images in ``value_range`` are mapped to [-1, 1], the range LPIPS was trained on; the
    network runs in its own dtype on its own device, at the images' full resolution.
    """
    _check_pair(preds, target)
    p = _to_unit(preds, value_range) * 2 - 1
    t = _to_unit(target, value_range) * 2 - 1
    param = next(network.parameters())
    with torch.no_grad():
        out = network(p.to(param), t.to(param))
    return out.double().to(preds.device)


class LPIPS(_ScoredMetric):
    """Mean LPIPS over images; ``update(preds, target)``."""

    higher_is_better = False
    keys = ("lpips",)

    def __init__(self, network: LPIPSNetwork, value_range: Sequence[float] = (-1.0, 1.0), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network = network
        self.value_range = (float(value_range[0]), float(value_range[1]))

    def per_image(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        return {"lpips": lpips(preds, _check_pair(preds, target), self.network, self.value_range)}

    def update(self, preds: Tensor, target: Tensor) -> None:
        self._accumulate(self.per_image(preds, target))

    def _update_from(self, preds: Tensor, target: Tensor | None, labels: Tensor | None) -> None:
        self.update(preds, _check_pair(preds, target))


# --------------------------------------------------------------------------------------------
# NIQE (Mittal, Soundararajan, Bovik 2013), as the authors' MATLAB release computes it
# --------------------------------------------------------------------------------------------

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
    "genprior.metrics_extra.fit_niqe_model(...).save(<file>.npz); its numbers are then not the "
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
            from scipy.io import loadmat

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
    _check_images(images)
    rgb = _to_unit(images.double(), value_range).clamp(0.0, 1.0) * 255.0
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


class NIQE(_ScoredMetric):
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


# --------------------------------------------------------------------------------------------
# Classifier accuracy (DGP's colorization score and adversarial-defence table)
# --------------------------------------------------------------------------------------------


def _classifier_help(name: str, path: Path | None) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    where = []
    if cfg is not None and cfg.url:
        where.append(cfg.url)
    if cfg is not None and cfg.hf_hub_id:
        where.append(f"huggingface.co/{cfg.hf_hub_id} (model.safetensors)")
    source = " or ".join(where) or "the model's published checkpoint"
    return (
        f"{'Weights file ' + str(path) + ' does not exist. ' if path else ''}Classifier accuracy "
        f"needs weights for timm model {name!r}: download {source} on a machine with internet "
        "access and pass its path as metrics.classifier_weights=<file> (or put the .pth file, "
        f"under its published name, in the torch hub cache {Path(torch.hub.get_dir()) / 'checkpoints'})."
    )


class ImageClassifier(nn.Module):
    """A timm classifier taking genprior images: the preprocessing is inside the module.

    ``forward(images)``: RGB [B, 3, H, W] in ``value_range`` -> clip to [0, 1] -> resize the
    whole image to ``input_size`` (the model's interpolation, antialiased; no centre crop,
    since restored images are already the object's crop) -> ImageNet mean/std -> logits.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        model: nn.Module,
        input_size: int | None = None,
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.model = model.eval().requires_grad_(False)
        self.input_size = int(input_size or cfg.get("input_size", (3, 224, 224))[-1])
        self.interpolation = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
        self.value_range = (float(value_range[0]), float(value_range[1]))
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ImageClassifier:
        return super().train(False)  # batch norm must stay in inference mode

    def forward(self, images: Tensor) -> Tensor:
        x = _to_unit(images.to(self.mean), self.value_range).clamp(0.0, 1.0)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode=self.interpolation,
                align_corners=False, antialias=True,
            ).clamp(0.0, 1.0)
        return self.model((x - self.mean) / self.std)


def build_classifier(
    name: str = "resnet50.tv_in1k",
    weights: str | Path | None = None,
    input_size: int | None = None,
    value_range: Sequence[float] = (-1.0, 1.0),
) -> ImageClassifier:
    """A timm classifier with its weights from a local file (timm's ``pretrained_cfg_overlay``).

    ``name`` is any timm model name (with or without a pretrained tag); the default is the
    original torchvision ResNet-50, the one DGP's tables use. ``weights`` is a .pth or
    .safetensors state dict in timm's (= torchvision's, for ResNets) layout; None looks for
    the torchvision file of the model's pretrained config in the torch hub cache. A missing
    file raises ``WeightsUnavailable``; timm never downloads anything here.
    """
    import timm
    from timm.models import get_pretrained_cfg

    if weights:
        path = Path(weights)
    else:
        cfg = get_pretrained_cfg(name)
        if cfg is None or not cfg.url:
            raise WeightsUnavailable("no classifier weights given. " + _classifier_help(name, None))
        path = torch_hub_checkpoint(cfg.url)
    if not path.is_file():
        raise WeightsUnavailable(_classifier_help(name, path))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    return ImageClassifier(model, input_size, value_range)


def topk_correct(logits: Tensor, labels: Tensor, top_k: Sequence[int] = (1, 5)) -> dict[str, Tensor]:
    """Per image, 100.0 if the label is among the k highest logits, else 0.0 (NaN if label < 0).

    Values are in percent so that their mean over images is the accuracy in percent; a
    negative label (class unknown) gives NaN, which ``ClassifierAccuracy`` leaves out.
    """
    labels = labels.to(logits.device).long()
    # Rank of the true class = number of classes scoring strictly higher.
    true_logit = logits.gather(1, labels.clamp_min(0)[:, None])
    rank = (logits > true_logit).sum(dim=1)
    unknown = labels < 0
    out = {}
    for k in top_k:
        hit = (rank < k).double() * 100.0
        out[f"top{k}"] = torch.where(unknown, torch.nan, hit)
    return out


class ClassifierAccuracy(_ScoredMetric):
    """Top-k accuracy (%) of a classifier on the images; ``update(preds, labels)``.

    ``compute()`` returns ``{"top1": ..., "top5": ...}`` (one entry per k). Images whose label
    is negative (unknown) are not counted.
    """

    higher_is_better = True
    skip_nan = True

    def __init__(self, classifier: nn.Module, top_k: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        self.top_k = tuple(int(k) for k in top_k)
        self.keys = tuple(f"top{k}" for k in self.top_k)
        super().__init__(**kwargs)
        self.classifier = classifier

    def per_image(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        if labels is None:
            raise ValueError("classifier accuracy needs the images' class labels: pass labels")
        _check_images(preds)
        with torch.no_grad():
            logits = self.classifier(preds)
        return topk_correct(logits, labels, self.top_k)

    def update(self, preds: Tensor, labels: Tensor) -> None:
        self._accumulate(self.per_image(preds, labels=labels))

    def _update_from(self, preds: Tensor, target: Tensor | None, labels: Tensor | None) -> None:
        if labels is None:
            raise ValueError("classifier accuracy needs the images' class labels: pass labels")
        self.update(preds, labels)


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
    _check_pair(preds, target)
    ab = [rgb_to_lab(_to_unit(x, value_range).clamp(0.0, 1.0))[:, 1:] for x in (preds, target)]
    dist = (ab[0] - ab[1]).square().sum(dim=1).sqrt().flatten(1)
    thresholds = torch.arange(0.0, max_threshold + step / 2, step, dtype=torch.float64, device=dist.device)
    # acc(t) from the sorted distances: the count of d <= t, without a [pixels x thresholds] table.
    counts = torch.searchsorted(dist.sort(dim=1).values, thresholds.expand(dist.shape[0], -1).contiguous(), right=True)
    acc = counts.double() / dist.shape[1]
    return torch.trapezoid(acc, thresholds, dim=1) / max_threshold * 100.0


class ColorizationAuC(_ScoredMetric):
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
        target = _check_pair(preds, target)
        return {"colorization_auc": colorization_auc(preds, target, self.value_range, self.max_threshold)}

    def update(self, preds: Tensor, target: Tensor) -> None:
        self._accumulate(self.per_image(preds, target))

    def _update_from(self, preds: Tensor, target: Tensor | None, labels: Tensor | None) -> None:
        self.update(preds, _check_pair(preds, target))


# --------------------------------------------------------------------------------------------
# Unavailable metrics, the factory, and scoring a batch with all of them
# --------------------------------------------------------------------------------------------


class UnavailableMetric(Metric):
    """Stands in for a metric whose weights are missing: it scores NaN and says why.

    ``status`` holds the reason with instructions (what to download, which config key to
    set). ``update`` accepts anything and does nothing, so the run goes on.
    """

    is_differentiable = False
    full_state_update = False
    higher_is_better = None

    def __init__(self, name: str, status: str, keys: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name
        self.status = status
        self.keys = tuple(keys or (name,))

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def score(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        self.update()
        nan = torch.full((preds.shape[0],), torch.nan, dtype=torch.float64, device=preds.device)
        return {k: nan.clone() for k in self.keys}

    def compute(self) -> Tensor | dict[str, Tensor]:
        nan = torch.tensor(torch.nan, dtype=torch.float64)
        return nan if len(self.keys) == 1 else {k: nan.clone() for k in self.keys}


def _build_lpips(cfg: Any, value_range: Sequence[float]) -> Metric:
    network = load_lpips_network(cfg.lpips_net, cfg.lpips_weights, cfg.lpips_backbone_weights)
    return LPIPS(network, value_range)


def _build_niqe(cfg: Any, value_range: Sequence[float]) -> Metric:
    if not cfg.niqe_model:
        raise WeightsUnavailable("metrics.niqe_model is not set. " + NIQE_HELP)
    return NIQE(NIQEModel.load(cfg.niqe_model), value_range, int(cfg.niqe_block_size))


def _build_accuracy(cfg: Any, value_range: Sequence[float]) -> Metric:
    classifier = build_classifier(cfg.classifier, cfg.classifier_weights, cfg.classifier_input_size, value_range)
    return ClassifierAccuracy(classifier)


def _build_auc(cfg: Any, value_range: Sequence[float]) -> Metric:
    return ColorizationAuC(value_range, float(cfg.auc_max_threshold))


_BUILDERS = {
    "lpips": (_build_lpips, ("lpips",)),
    "niqe": (_build_niqe, ("niqe",)),
    "accuracy": (_build_accuracy, ("top1", "top5")),
    "colorization_auc": (_build_auc, ("colorization_auc",)),
}
EXTRA_METRICS: tuple[str, ...] = tuple(_BUILDERS)


@rank_zero_only
def _log_unavailable(name: str, status: str) -> None:
    log.warning("metric %r is unavailable and will be reported as NaN: %s", name, status)


def build_metrics(
    cfg: Any, names: Sequence[str] | None = None, value_range: Sequence[float] = (-1.0, 1.0)
) -> dict[str, Metric]:
    """The metrics ``names`` (default ``cfg.extra``) built from a ``MetricsConfig``.

    ``value_range`` is the images' range: (-1, 1) for DGP and mGANprior, (0, 1) for DIP. A
    metric whose weights or model file is missing becomes an ``UnavailableMetric`` (logged
    once, on rank zero); an unknown name or a file of the wrong kind raises ``ValueError``
    right away, before any work is done.
    """
    names = list(cfg.extra if names is None else names)
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid: {list(EXTRA_METRICS)}")
    metrics: dict[str, Metric] = {}
    for name in names:
        build, keys = _BUILDERS[name]
        try:
            metrics[name] = build(cfg, value_range)
        except WeightsUnavailable as missing:
            metrics[name] = UnavailableMetric(name, str(missing), keys)
            _log_unavailable(name, str(missing))
    return metrics


def metric_status(metrics: Mapping[str, Metric]) -> dict[str, str]:
    """``"ok"`` or the reason a metric is unavailable, by name."""
    return {name: str(getattr(m, "status", "ok")) for name, m in metrics.items()}


def score_batch(
    metrics: Mapping[str, Metric],
    preds: Tensor,
    target: Tensor | None = None,
    labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """Update every metric with a batch; return all per-image values (float64 Tensor[B]).

    Keys are the metrics' value names (``lpips``, ``niqe``, ``top1``, ``top5``,
    ``colorization_auc``); an unavailable metric gives NaN.
    """
    out: dict[str, Tensor] = {}
    for metric in metrics.values():
        out.update(metric.score(preds, target, labels))  # type: ignore[operator]
    return out
