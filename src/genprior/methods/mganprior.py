"""mGANprior (Gu, Shen, Zhou, CVPR 2020): multi-code GAN inversion with a fixed PGGAN.

Per image, N latent codes z_n and a per-channel importance α_n (one weight per channel of the
feature map at the composing layer l) are optimised; the generator never changes. The image is

    x = G2( Σ_n G1(z_n) ⊙ α_n / N ),   G1 = modules [0, l), G2 = modules [l, end)

(mGANprior SPEC §2, §3.1; ``PGGANGenerator.multi_code``). The loss is the released code's
"Combine" loss on the *degraded* images (SPEC §3.2, §3.5):

    λ_L2 · mean((A(x) − A(y))²) + λ_L1 · mean|A(x) − A(y)| + λ_vgg · 0.001 · mean|φ(A(x)) − φ(A(y))|

with φ = VGG-16 relu3_3 of the ImageNet-normalised image resized to 256 by nearest neighbour,
and A the task's degradation (identity, gray, mask, bilinear x1/f downsampling; noise is in
the observation only). The optimiser is plain SGD with lr 1 on z and α (SPEC §3.3), for a
fixed number of iterations; the result is one more forward pass with the final codes.

A batch of B images is fitted at once: z is ``[B, N, 512]`` and α ``[B, N, C]``, every
image's loss depends only on its own tensors, and the summed loss gives each image its own
gradient, so B > 1 gives each image its B = 1 result (up to the rounding of batched kernels).
The "single latent code" baseline is N = 1 with α fixed at 1 (``train_alpha=False``): then
x = G(z) exactly, whatever the composing layer.

This file reads from the top: the settings (``MGANConfig``, the ``mganprior`` config section),
the method (``MGANPrior``, the written ``Method`` interface that genprior.engine drives: one
stage of ``iterations`` steps, per-image SGD instead of DGP's Adam), then its building blocks
(the perceptual term, the tasks' degradations, the images in the run's dtype).

Precision. The method computes in its generator's dtype (``MGANPrior.dtype``): float64 for
``trainer.precision=64-true``, where codes, importances, targets, masks, the VGG term, the
losses and the optimizer run in float64 end to end. The reference reads targets and masks with
torchvision's ``to_tensor`` in the default dtype, so a float64 run of it divides the uint8
pixels by 255 in float64 (TRACES_F64.md, dtype rules), where DGP and DIP divide in float32 and
cast. genprior's loaders hand over float32 images (uint8 / 255 in float32, then normalised);
``images_in_dtype`` recovers their exact uint8 values and repeats the division in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from genprior.color import ycbcr_recombine
from genprior.degradations import (
    MGANPRIOR_GRAY_WEIGHTS,
    AdditiveGaussianNoise,
    Box,
    CenterSquareMask,
    Degradation,
    Downsample,
    Gray,
    Identity,
    MaskImage,
    Masking,
    RandomPixelMask,
)
from genprior.errors import MissingFileError
from genprior.items import ImageBatch, StepRecord, image_generator
from genprior.losses import IMAGENET_MEAN, IMAGENET_STD, VGG16_LAYERS, load_vgg16_features
from genprior.methods.base import Method, Progress
from genprior.metrics import psnr, ssim
from genprior.optim import PerImageAdam, PerImageSGD
from genprior.precision import run_dtype
from genprior.priors.pggan import PGGANGenerator
from genprior.priors.registry import get, load_pggan

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "MGAN_TASKS",
    "MGANConfig",
    "MGANMaskImage",
    "MGANPrior",
    "VGGFeatureLoss",
    "build_mgan_degradation",
    "images_in_dtype",
]

# task.name -> what the degradation is (mGANprior SPEC §3.5; the paper's quantitative
# inpainting settings are the centre 64x64 hole and 80 % random pixels, SPEC §3.5 end).
MGAN_TASKS: dict[str, str] = {
    "inversion": "identity",
    "reconstruct": "identity",
    "colorization": "gray",
    "inpainting": "center_square",
    "random_mask": "random_mask",
    "mask_image": "mask_image",
    "sr": "sr",
    "denoising": "noise",
}

# mganprior.optimization=Adam: torch.optim.Adam's defaults, as the released code builds it.
ADAM_BETAS: tuple[float, float] = (0.9, 0.999)
ADAM_EPS = 1e-8

VGG_WEIGHTS_HELP = (
    "mGANprior's perceptual term needs torchvision's ImageNet VGG-16 as a local file: "
    "vgg16-397923af.pth (download.pytorch.org/models/vgg16-397923af.pth, what the reference "
    "loads through vgg16(pretrained=True)) or timm's port of it, 'vgg16.tv_in1k' "
    "(huggingface.co/timm/vgg16.tv_in1k). Download it on a machine with internet access and pass "
    "mganprior.vgg_weights=<file>, or turn the term off with mganprior.vgg_lambda=0."
)


# ------------------------------------------------------------------------------ the settings
@dataclass
class MGANConfig:
    """The ``mganprior`` config section (prior.kind=pggan): the released scripts' options under
    their flag names (SPEC §3.6), plus named switches for the paper's variants."""

    composing_layer: int = 6  # index into layer0..layer{2K-1}, toRGB; the composed map is layer{l}'s input
    z_number: int = 30  # N latent codes per image
    iterations: int = 3000
    optimization: str = "GD"  # GD (plain SGD, every released script) | Adam (ADAM_BETAS, ADAM_EPS)
    lr: float = 1.0
    l2_lambda: float = 1.0
    l1_lambda: float = 0.0
    vgg_lambda: float = 1.0  # 0.1 in the released inpainting script
    vgg_layer: str = "relu3_3"  # the code's --vgg_layer 16; the paper's layer is conv4_3
    vgg_loss_type: str = "L1"  # L1 | L2
    vgg_scale: float = 0.001  # hard-wired in the released VGG loss
    image_size: int = 256  # VGG input size (nearest resize)
    # local torchvision/timm VGG-16 file (needed when vgg_lambda > 0), or "random": a small
    # seeded random-weight VGG-16 (1/8 widths, RANDOM_VGG_SEED) that needs no file, chosen by the
    # tiny prior's preset (prior=pggan_tiny) for tests; never the default of a published prior
    vgg_weights: str | None = None
    init_type: str = "Normal"  # z init: Normal (z ~ N(0, I)) | Zero
    alpha_init: float | None = None  # None: 1/z_number, as the code
    train_alpha: bool = True  # false with z_number=1: the single-latent-code baseline, x = G(z)
    average_codes: bool = True  # the code's 1/N in the composition; false: the paper's plain sum
    hole_size: int = 64  # task=inpainting: a centred hole_size x hole_size square
    ssim_data_range: float = 1.0  # images in [0, 1]
    # gaussian11: Wang et al.'s 11x11 Gaussian window (sigma 1.5), as the paper reports SSIM;
    # uniform7: skimage's default 7x7 uniform window (genprior's SSIM before this option)
    ssim_window: str = "gaussian11"
    print_interval: int = 100

    def __post_init__(self) -> None:
        if self.optimization not in ("GD", "Adam"):
            raise ValueError(f"mganprior.optimization must be 'GD' or 'Adam'; got {self.optimization!r}")
        if self.init_type not in ("Normal", "Zero"):
            raise ValueError(f"mganprior.init_type must be 'Normal' or 'Zero'; got {self.init_type!r}")
        if self.z_number < 1:
            raise ValueError(f"mganprior.z_number must be >= 1; got {self.z_number}")
        if self.iterations < 0:
            raise ValueError(f"mganprior.iterations must be >= 0; got {self.iterations}")


# ------------------------------------------------------------------------------ the method
class MGANPrior(Method):
    """Fits B images at once with a fixed PGGAN; every image's codes z and importances α are
    the module's parameters (registered by ``start``)."""

    preprocessing: ClassVar[str] = "pggan"

    def __init__(self, G: PGGANGenerator, config: MGANConfig, degradation: Degradation,
                 perceptual: VGGFeatureLoss | None = None, task: str = "inversion", seed: int = 0) -> None:
        super().__init__()
        self.G = G.eval()
        for p in self.G.parameters():
            p.requires_grad_(False)
        self.config = config
        self.degradation = degradation
        self.perceptual = perceptual
        self.task = task
        self.seed = int(seed)
        self.layer = G.check_layer(config.composing_layer)
        self.channels = G.feature_shape(self.layer)[0]
        if config.vgg_lambda > 0 and perceptual is None:
            raise ValueError("mganprior.vgg_lambda > 0 needs the VGG-16 network; " + VGG_WEIGHTS_HELP)
        if perceptual is not None and {p.dtype for p in perceptual.parameters()} - {G.dtype}:
            raise ValueError(f"the VGG network's dtype must be the generator's ({G.dtype}): move it "
                             "with .to(dtype), as from_config does for trainer.precision")
        # Codes to start an image from instead of drawing them, by image id ([N, z_dim] each).
        # The reference draws its codes unseeded (SPEC §3.1): replaying one of its runs needs them.
        self.initial_latents: dict[str, Tensor] = {}
        self.ids: list[str] = []

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of codes, importances, targets, losses and metrics: G's (float64 for
        ``trainer.precision=64-true``)."""
        return self.G.dtype

    @property
    def print_interval(self) -> int:
        return int(self.config.print_interval)

    def stage_lengths(self) -> list[int]:
        return [self.config.iterations]  # one stage: a fixed number of SGD steps

    # ------------------------------------------------------------------ per-batch set-up
    def start(self, batch: ImageBatch) -> None:
        """New batch: observations, fresh codes from each image's own stream, α = 1/N.

        ``batch.images`` are [-1, 1]; float32 ones from genprior's loaders are brought to the
        method's dtype as the reference reads them (``images_in_dtype``).
        """
        c = self.config
        device, dtype = self.device, self.dtype
        B = len(batch)
        res = self.G.resolution
        if tuple(batch.images.shape[-2:]) != (res, res):
            raise ValueError(f"images are {tuple(batch.images.shape[-2:])} but this PGGAN makes "
                             f"{res}x{res} images")
        self.ids = list(batch.ids)
        self.target_origin = images_in_dtype(batch.images.to(device), dtype)
        self.target = self.degradation.target(self.target_origin, ids=self.ids)
        shape = (c.z_number, self.G.z_dim)
        codes = []
        for image_id in self.ids:
            if image_id in self.initial_latents:
                z = self.initial_latents[image_id]
                if tuple(z.shape) != shape:
                    raise ValueError(f"initial z of image {image_id!r} must have shape {shape}; "
                                     f"got {tuple(z.shape)}")
            elif c.init_type == "Zero":
                z = torch.zeros(shape, dtype=dtype)
            else:
                # drawn in float32 whatever the run's dtype: a float64 run starts from the codes
                # of a float32 run (the reference's own draw is unseeded, SPEC §3.1)
                z = torch.randn(*shape, generator=image_generator(self.seed, image_id), dtype=torch.float32)
            codes.append(z.to(device, dtype))
        self.z = nn.Parameter(torch.stack(codes))
        # 1/N as a Python double, then in the run's dtype: the reference's torch.full(1/N)
        alpha0 = 1.0 / c.z_number if c.alpha_init is None else float(c.alpha_init)
        self.alpha = nn.Parameter(torch.full((B, c.z_number, self.channels), alpha0, device=device, dtype=dtype),
                                  requires_grad=c.train_alpha)
        self.target_features: Tensor | None = None
        if self.perceptual is not None:
            with torch.no_grad():  # the target side of φ never changes within a fit
                self.target_features = self.perceptual.features_of(self.target)
        self.progress = Progress(self.stage_lengths(), B)

    def make_optimizer(self, fused: bool = True) -> PerImageSGD | PerImageAdam:
        """Per-image SGD (``GD``, the released default) or Adam, over z (and α when trained).

        ``fused`` (perf.fused_optimizer, DGP's speed option) is not used: SGD has no fused
        form, and the Adam option keeps PerImageAdam's per-tensor loop, as it always has.
        """
        groups: list[dict[str, Any]] = [{"name": "z", "params": [self.z]}]
        if self.config.train_alpha:
            groups.append({"name": "alpha", "params": [self.alpha]})
        if self.config.optimization == "GD":
            return PerImageSGD(groups, batch_size=self.batch_size)
        return PerImageAdam(groups, batch_size=self.batch_size, betas=ADAM_BETAS, eps=ADAM_EPS)

    # ------------------------------------------------------------------ one step
    def step_lrs(self) -> dict[str, Tensor]:
        lr = torch.tensor([0.0 if d else self.config.lr for d in self.progress.done], dtype=torch.float64)
        return {"z": lr, "alpha": lr.clone()}

    def render(self, z: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        z = self.z if z is None else z
        alpha = self.alpha if alpha is None else alpha
        return self.G.multi_code(z, alpha, self.layer, self.config.average_codes)

    def loss(self) -> tuple[Tensor, StepRecord, Tensor]:
        """One iteration's forward pass: the summed loss, the per-image record, x.

        The record's terms are the reference's, on its [-1, 1] scale; vgg includes its 0.001.
        """
        c = self.config
        active = self.progress.active()
        x = self.render()
        x_map = self.degradation.apply(x, ids=self.ids)
        diff = x_map - self.target
        l2 = diff.square().flatten(1).mean(1)
        l1 = diff.abs().flatten(1).mean(1)
        vgg = torch.zeros(self.batch_size, device=x.device, dtype=x.dtype)
        if self.perceptual is not None and c.vgg_lambda > 0:
            assert self.target_features is not None
            vgg = self.perceptual(x_map, self.target_features)
        # The released CombinationLoss's order of terms: l1, l2, vgg.
        per_image = c.l1_lambda * l1 + c.l2_lambda * l2 + c.vgg_lambda * vgg
        total = (per_image * active.to(x.device)).sum()  # every image's gradient is its own
        record = StepRecord(total=per_image.detach(), active=active,
                            terms={"l2_loss": l2.detach(), "l1_loss": l1.detach(), "vgg_loss": vgg.detach()})
        return total, record, x.detach()

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def final_output(self) -> Tensor:
        """One more forward pass with the final codes (SPEC §3.3): the raw generator output."""
        return self.render().detach()

    def latents(self, b: int) -> dict[str, Tensor]:
        """Image b's fitted codes and importances (CPU copies)."""
        return {"z": self.z[b].detach().cpu().clone(), "alpha": self.alpha[b].detach().cpu().clone(),
                "composing_layer": torch.tensor(self.layer)}

    def display(self, x: Tensor) -> Tensor:
        """[-1, 1] -> [0, 1] in the method's dtype (float32, or float64 for a float64 run)."""
        return ((x.detach().to(self.dtype) + 1) / 2).clamp(0, 1)

    def observation_for_display(self) -> Tensor:
        obs = self.target
        if obs.shape[-2:] != self.target_origin.shape[-2:]:
            # SR: the low-resolution image, nearest-upsampled (the reference's <name>-nn.png).
            obs = F.interpolate(obs, size=self.target_origin.shape[-2:], mode="nearest")
        return self.display(obs)

    def clean_for_display(self) -> Tensor:
        return self.display(self.target_origin)

    def result_for_metrics(self, x: Tensor) -> Tensor:
        """What the reference saves as the task's result, in [0, 1]: the raw G output, except
        for colorization (target's Y with the output's CbCr)."""
        result = self.display(x)
        if self.task == "colorization":
            result = ycbcr_recombine(result, self.clean_for_display())
        return result

    def hole_box(self) -> Box | None:
        if isinstance(self.degradation, CenterSquareMask):
            return self.degradation.metric_box(*self.target_origin.shape[-2:])
        return None

    @torch.no_grad()
    def metrics(self, x: Tensor) -> dict[str, Tensor]:
        """PSNR / SSIM of the task's result against the clean image, per image ([B])."""
        c = self.config
        result = self.result_for_metrics(x).double()
        clean = self.clean_for_display().double()
        out = {
            "psnr": psnr(result, clean, data_range=1.0),
            "ssim": ssim(result, clean, data_range=c.ssim_data_range, window=c.ssim_window),
        }
        box = self.hole_box()
        if box is not None:
            top, bottom, left, right = box
            crop_r, crop_c = result[..., top:bottom, left:right], clean[..., top:bottom, left:right]
            out["psnr_hole"] = psnr(crop_r, crop_c, data_range=1.0)
            out["ssim_hole"] = ssim(crop_r, crop_c, data_range=c.ssim_data_range, window=c.ssim_window)
        return out

    @torch.no_grad()
    def extra_images(self, x: Tensor, b: int) -> dict[str, Tensor]:
        if self.task == "colorization":
            return {"colorization": self.result_for_metrics(x[b : b + 1])[0]}
        if isinstance(self.degradation, Masking):
            # Not in the reference (its inpainting output is the raw G image): the known pixels
            # of the observation pasted over the result.
            known = self.degradation.known_mask(self.target_origin[b : b + 1], ids=self.ids[b : b + 1])
            pasted = self.target_origin[b : b + 1] * known + x[b : b + 1] * (1 - known)
            return {"composited": self.display(pasted)[0]}
        return {}

    @torch.no_grad()
    def observation_metrics(self, b: int) -> dict[str, float]:
        if isinstance(self.degradation, Identity):
            return {}  # inversion: the observation is the clean image
        obs = self.observation_for_display()[b : b + 1].double()
        clean = self.clean_for_display()[b : b + 1].double()
        return {"observation_psnr": float(psnr(obs, clean, data_range=1.0)[0])}

    def image_info(self, b: int) -> dict[str, Any]:
        return {"z_number": self.config.z_number, "composing_layer": self.layer,
                "train_alpha": self.config.train_alpha}

    # ------------------------------------------------------------------ from the config
    @classmethod
    def from_config(cls, cfg: DictConfig) -> MGANPrior:  # type: ignore[override]
        """An mGANprior for ``cfg``: the task's degradation, the VGG term and the PGGAN
        (genprior.priors.registry), both in the run's dtype (``trainer.precision``: float32
        weights are copied exactly into float64 networks for ``64-true``)."""
        task = str(cfg.task.name)
        p = cfg.prior
        resolution = int(p.resolution)
        spec = get(str(p.name), "pggan")
        if resolution != spec.resolution:
            raise ValueError(f"prior.resolution={resolution} but {p.name} is a {spec.resolution}-pixel "
                             f"model; set prior.resolution={spec.resolution} (or pick another prior)")
        config: MGANConfig = OmegaConf.to_object(cfg.mganprior)  # type: ignore[assignment]
        degradation = build_mgan_degradation(
            task, resolution, sr_factor=int(cfg.task.sr_factor), hole_size=config.hole_size,
            mask_path=cfg.task.mask_path, mask_fraction=float(cfg.task.mask_fraction),
            noise_sigma=float(cfg.task.noise_sigma), seed=int(cfg.seed),
        )
        dtype = run_dtype(cfg)
        perceptual = None
        if config.vgg_lambda > 0:
            perceptual = VGGFeatureLoss.from_file(
                config.vgg_weights, config.vgg_layer, image_size=config.image_size,
                loss_type=config.vgg_loss_type, scale=config.vgg_scale,
            ).to(dtype)
        if p.weights == "random":
            G = load_pggan(str(p.name), random_init_seed=int(p.init_seed), dtype=dtype)
        elif p.weights == "pretrained":
            G = load_pggan(str(p.name), weights_dir=p.weights_dir, path=p.G_path, dtype=dtype)
        else:
            raise ValueError(f"prior.weights must be 'pretrained' or 'random', got {p.weights!r}")
        return cls(G, config, degradation, perceptual=perceptual, task=task, seed=int(cfg.seed))


# --------------------------------------------------------------------------------------------
# The perceptual term
# --------------------------------------------------------------------------------------------


RANDOM_VGG_SEED = 0
# VGG-16's features: convolutions (their output channels) and max-pools ("M"), each conv
# followed by a ReLU, so that module indices match VGG16_LAYERS.
_VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def random_vgg16_features(upto: int, width_divisor: int = 8, seed: int = RANDOM_VGG_SEED) -> nn.Sequential:
    """VGG-16's ``features`` up to module ``upto`` (inclusive) with 1/``width_divisor`` of its
    channels and seeded random weights (mganprior.vgg_weights=random): the perceptual term's
    shape and cost without the ImageNet file, for the tiny test prior. Its values mean nothing."""
    layers: list[nn.Module] = []
    channels = 3
    with torch.random.fork_rng(devices=[]):  # the run's own random stream is left as it was
        torch.manual_seed(seed)
        for entry in _VGG16_PLAN:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = max(1, int(entry) // width_divisor)
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                channels = width
            if len(layers) > upto:
                break
    return nn.Sequential(*layers[: upto + 1]).eval()


class VGGFeatureLoss(nn.Module):
    """The released VGGLoss (SPEC §3.2) per image: scale · mean|φ(x) − φ(y)| (or squared).

    φ(x) = VGG-16 ``features`` up to ``layer`` of nearest-resize(normalize(x·0.5 + 0.5)), with
    the ImageNet mean/std and resize to ``image_size``. ``relu3_3`` is the code's
    ``--vgg_layer 16`` (the first 16 modules); the paper names conv4_3.

    ``features`` is any stack of modules (``from_file`` loads torchvision's VGG-16). The network
    computes in the dtype it is moved to; the ImageNet mean/std are made from the Python
    constants in the input's dtype, as the reference's ``torch.Tensor([0.485, ...])`` is in the
    default dtype (float64 in a float64 run, not float32 values widened).
    """

    def __init__(
        self,
        features: nn.Sequential,
        image_size: int = 256,
        loss_type: str = "L1",
        scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if loss_type not in ("L1", "L2"):
            raise ValueError(f"mganprior.vgg_loss_type must be 'L1' or 'L2'; got {loss_type!r}")
        self.features = features.eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.image_size = int(image_size)
        self.loss_type = loss_type
        self.scale = float(scale)
        # (device, dtype) -> (mean, std) [1, 3, 1, 1]; not buffers, which .to(float64) would
        # widen from float32 instead of making from the decimal constants.
        self._normalization: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_file(cls, weights: str | Path | None, layer: str = "relu3_3", **kwargs: Any) -> VGGFeatureLoss:
        if layer not in VGG16_LAYERS:
            raise ValueError(f"unknown VGG-16 layer {layer!r}; valid: {sorted(VGG16_LAYERS)}")
        if str(weights) == "random":
            return cls(random_vgg16_features(VGG16_LAYERS[layer]), **kwargs)
        if weights is None or not Path(weights).is_file():
            what = "no VGG-16 weights given" if weights is None else f"VGG-16 weights file {weights} does not exist"
            raise MissingFileError(f"{what}. {VGG_WEIGHTS_HELP}")
        return cls(load_vgg16_features(weights, VGG16_LAYERS[layer]), **kwargs)

    def normalization(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The ImageNet mean and std as [1, 3, 1, 1] tensors on ``like``'s device and dtype."""
        key = (like.device, like.dtype)
        if key not in self._normalization:
            mean = torch.tensor(IMAGENET_MEAN, dtype=like.dtype).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=like.dtype).view(1, 3, 1, 1)
            self._normalization[key] = (mean.to(like.device), std.to(like.device))
        return self._normalization[key]

    def features_of(self, x: Tensor) -> Tensor:
        mean, std = self.normalization(x)
        h = (x * 0.5 + 0.5).sub(mean).div(std)
        return self.features(F.interpolate(h, size=self.image_size, mode="nearest"))

    def forward(self, x: Tensor, target_features: Tensor) -> Tensor:
        diff = self.features_of(x) - target_features
        per_elem = diff.abs() if self.loss_type == "L1" else diff.square()
        return per_elem.flatten(1).mean(1) * self.scale


# --------------------------------------------------------------------------------------------
# Degradations, images in the run's dtype, and the colorization result
# --------------------------------------------------------------------------------------------


class MGANMaskImage(MaskImage):
    """mGANprior's mask file (SPEC §3.5): white marks **missing** pixels, no resizing, RGB(A)
    reduced to its first 3 channels, and the loss sees x · (1 − m).

    m is the file's uint8 / 255 in the images' dtype, as the reference's ``parsing_mask`` gets
    it from ``to_tensor`` in the default dtype (TRACES_F64.md, dtype rules). float32 images take
    ``MaskImage``'s float32 path (the same numbers); float64 images get 1 − u8/255 computed in
    float64. The difference is real: the released masks have anti-aliased edges (mask-1.png
    has 2952 pixels strictly between 0 and 1), where float32 rounding of m would show.
    """

    def __init__(self, path: str | Path, value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__(path, white_is_known=False, resize="error", value_range=value_range)
        self._wide: dict[tuple[Any, ...], Tensor] = {}

    def known_mask(self, x: Tensor, ids: Any = None) -> Tensor:
        narrow = super().known_mask(x, ids)  # MaskImage's size and channel checks, cached
        if x.dtype != torch.float64:
            return narrow
        key = (*x.shape[-2:], x.device, x.dtype)
        if key not in self._wide:
            pixels = np.asarray(self._image, dtype=np.uint8)
            pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            missing = torch.from_numpy(pixels.copy()).to(torch.float64).div(255)
            self._wide[key] = (1 - missing)[None].to(x.device)
        return self._wide[key]


def images_in_dtype(images: Tensor, dtype: torch.dtype) -> Tensor:
    """Preprocessed [-1, 1] images in ``dtype``, as mGANprior's reference would have read them.

    The reference's targets are ``(to_tensor(uint8) − 0.5) · 2`` with ``to_tensor`` dividing by
    255 in the default dtype (TRACES_F64.md, dtype rules): in a float64 run the target is
    ``(u8.double() / 255 − 0.5) · 2``, not float32 values widened (those differ by ~1e-8).
    genprior's loaders produce float32 ``(u8 / 255 − 0.5) / 0.5`` (``image_io.to_tensor``).
    When float64 is asked for and the images are exactly such float32 uint8 images (held in
    float32, or already widened to float64, as Lightning's 64-true input conversion would),
    the pixel values are recovered (exactly: float32 is far finer than 1/255) and divided again
    in float64. Any other input (not from 8-bit pixels, e.g. float64 targets made in float64)
    is only cast, so the Python API takes float64 targets as given.
    """
    if dtype != torch.float64 or images.dtype not in (torch.float32, torch.float64):
        return images.to(dtype)
    pixels = ((images.double() + 1) / 2 * 255).round().clamp(0, 255)
    if not torch.equal(pixels.float().div(255).sub(0.5).div(0.5).to(images.dtype), images):
        return images.to(dtype)
    return (pixels / 255 - 0.5) * 2


def build_mgan_degradation(
    task: str,
    resolution: int,
    *,
    sr_factor: int = 16,
    hole_size: int = 64,
    mask_path: str | None = None,
    mask_fraction: float = 0.8,
    noise_sigma: float = 25.0,
    seed: int = 0,
) -> Degradation:
    """The degradation of an mGANprior task (``MGAN_TASKS``) for square images of ``resolution``."""
    if task not in MGAN_TASKS:
        raise ValueError(f"task.name={task!r} is not an mGANprior task; valid: {sorted(MGAN_TASKS)}")
    kind = MGAN_TASKS[task]
    if kind == "identity":
        return Identity()
    if kind == "gray":
        return Gray(MGANPRIOR_GRAY_WEIGHTS)
    if kind == "center_square":
        mask = CenterSquareMask(int(hole_size))
        mask.metric_box(resolution, resolution)  # fails early if it does not fit
        return mask
    if kind == "random_mask":
        return RandomPixelMask(drop_fraction=float(mask_fraction), seed=int(seed))
    if kind == "mask_image":
        if not mask_path:
            raise ValueError("task.name=mask_image needs task.mask_path=<mask PNG, white = missing>")
        # mGANprior's masks mark missing pixels white and are used at the image size as they are.
        image_mask = MGANMaskImage(mask_path)
        image_mask.mask_array(resolution, resolution)
        return image_mask
    if kind == "sr":
        if resolution % int(sr_factor):
            raise ValueError(f"SR factor {sr_factor} does not divide the resolution {resolution}")
        return Downsample(int(sr_factor), kernel="bilinear", upsample=False)
    assert kind == "noise"
    # The released code has no denoising script; the paper shows it (Fig. 1d). Additive
    # Gaussian noise on the observation, identity forward model (genprior's interpretation).
    return AdditiveGaussianNoise(float(noise_sigma) / 255.0, seed=int(seed))


