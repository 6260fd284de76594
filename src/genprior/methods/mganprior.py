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

The method has DGP's interface (``genprior.methods.dgp``) so that ``Reconstruction`` and the
output callbacks drive it unchanged; ``make_optimizer`` supplies SGD instead of Adam.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

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
    truncate_to_uint8,
)
from genprior.losses import IMAGENET_MEAN, IMAGENET_STD, VGG16_LAYERS, load_vgg16_features
from genprior.methods.base import SettingsAccessors
from genprior.metrics import psnr, ssim
from genprior.optim import PerImageAdam, PerImageSGD
from genprior.priors.pggan import PGGANGenerator
from genprior.schedule import Progress, Stage

__all__ = [
    "MGAN_TASKS",
    "MGANPrior",
    "MGANSettings",
    "MGANStepRecord",
    "VGGFeatureLoss",
    "build_mgan_degradation",
    "ycbcr_recombine",
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

VGG_WEIGHTS_HELP = (
    "mGANprior's perceptual term needs torchvision's ImageNet VGG-16 as a local file: "
    "vgg16-397923af.pth (download.pytorch.org/models/vgg16-397923af.pth, what the reference "
    "loads through vgg16(pretrained=True)) or timm's port of it, 'vgg16.tv_in1k' "
    "(huggingface.co/timm/vgg16.tv_in1k). Download it on a machine with internet access and pass "
    "mganprior.vgg_weights=<file>, or turn the term off with mganprior.vgg_lambda=0."
)


@dataclass
class MGANSettings:
    """The released scripts' options (SPEC §3.6), plus named switches for the paper's variants."""

    composing_layer: int = 6
    z_number: int = 30
    iterations: int = 3000
    optimization: str = "GD"  # GD = plain SGD (every released script) | Adam (torch defaults)
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)  # Adam only
    eps: float = 1e-8  # Adam only
    l2_lambda: float = 1.0
    l1_lambda: float = 0.0
    vgg_lambda: float = 1.0
    train_alpha: bool = True
    average_codes: bool = True  # the code's 1/N in the composition; False: the paper's plain sum
    alpha_init: float | None = None  # None: 1/N, as the code
    init_type: str = "Normal"  # z init: Normal (z ~ N(0, I)) | Zero
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


@dataclass
class MGANStepRecord:
    """Per-image values of one iteration (``[B]`` tensors), as the Combine loss computes them."""

    l2: Tensor
    l1: Tensor
    vgg: Tensor
    total: Tensor
    active: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def reported(self) -> dict[str, Tensor]:
        """The loss terms on the [-1, 1] scale of the reference; vgg includes its 0.001."""
        return {"l2_loss": self.l2, "l1_loss": self.l1, "vgg_loss": self.vgg, "loss": self.total}


# --------------------------------------------------------------------------------------------
# The perceptual term
# --------------------------------------------------------------------------------------------


class VGGFeatureLoss(nn.Module):
    """The released VGGLoss (SPEC §3.2) per image: scale · mean|φ(x) − φ(y)| (or squared).

    φ(x) = VGG-16 ``features`` up to ``layer`` of nearest-resize(normalize(x·0.5 + 0.5)), with
    the ImageNet mean/std and resize to ``image_size``. ``relu3_3`` is the code's
    ``--vgg_layer 16`` (the first 16 modules); the paper names conv4_3.
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
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, weights: str | Path | None, layer: str = "relu3_3", **kwargs: Any) -> VGGFeatureLoss:
        if layer not in VGG16_LAYERS:
            raise ValueError(f"unknown VGG-16 layer {layer!r}; valid: {sorted(VGG16_LAYERS)}")
        if weights is None or not Path(weights).is_file():
            what = "no VGG-16 weights given" if weights is None else f"VGG-16 weights file {weights} does not exist"
            raise FileNotFoundError(f"{what}. {VGG_WEIGHTS_HELP}")
        return cls(load_vgg16_features(weights, VGG16_LAYERS[layer]), **kwargs)

    def features_of(self, x: Tensor) -> Tensor:
        h = (x * 0.5 + 0.5).sub(self.mean).div(self.std)
        return self.features(F.interpolate(h, size=self.image_size, mode="nearest"))

    def forward(self, x: Tensor, target_features: Tensor) -> Tensor:
        diff = self.features_of(x) - target_features
        per_elem = diff.abs() if self.loss_type == "L1" else diff.square()
        return per_elem.flatten(1).mean(1) * self.scale


# --------------------------------------------------------------------------------------------
# Degradations and the colorization result
# --------------------------------------------------------------------------------------------


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
        image_mask = MaskImage(mask_path, white_is_known=False, resize="error")
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


def ycbcr_recombine(result: Tensor, target: Tensor) -> Tensor:
    """mGANprior's colorization output (SPEC §3.5): Y of the target with Cb, Cr of the result.

    Both [B, 3, H, W] in [0, 1]. Like the reference, the result goes to uint8 by truncation, the
    target's pixels are its original uint8 values, and the YCbCr conversions are PIL's (JPEG,
    full range). Returns [B, 3, H, W] float32 in [0, 1] on ``result``'s device.
    """
    out_u8 = truncate_to_uint8(result.detach().float().clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy()
    tgt_u8 = (target.detach().double().clamp(0, 1) * 255).round().to(torch.uint8)
    tgt_u8 = tgt_u8.permute(0, 2, 3, 1).cpu().numpy()
    merged = []
    for out, tgt in zip(out_u8, tgt_u8):
        _, cb, cr = Image.fromarray(out).convert("YCbCr").split()
        y, _, _ = Image.fromarray(tgt).convert("YCbCr").split()
        merged.append(np.asarray(Image.merge("YCbCr", (y, cb, cr)).convert("RGB")))
    rgb = torch.from_numpy(np.stack(merged)).permute(0, 3, 1, 2)
    return rgb.to(device=result.device, dtype=torch.float32).div(255)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


class MGANPrior(SettingsAccessors, nn.Module):
    """Fits B images at once with a fixed PGGAN; holds the per-image codes and importances."""

    def __init__(
        self,
        G: PGGANGenerator,
        settings: MGANSettings,
        degradation: Degradation,
        perceptual: VGGFeatureLoss | None = None,
        task: str = "inversion",
        ssim_data_range: float = 1.0,
        ssim_window: str = "gaussian11",
    ) -> None:
        super().__init__()
        self.G = G.eval()
        for p in self.G.parameters():
            p.requires_grad_(False)
        self.settings = settings
        self.degradation = degradation
        self.perceptual = perceptual
        self.task = task
        self.ssim_data_range = float(ssim_data_range)
        self.ssim_window = str(ssim_window)
        self.layer = G.check_layer(settings.composing_layer)
        self.channels = G.feature_shape(self.layer)[0]
        if settings.vgg_lambda > 0 and perceptual is None:
            raise ValueError("mganprior.vgg_lambda > 0 needs the VGG-16 network; " + VGG_WEIGHTS_HELP)
        self.batch_size = 0

    # ------------------------------------------------------------------ per-batch set-up
    def start(
        self,
        images: Tensor,
        classes: Tensor | None,
        ids: list[str],
        generators: list[torch.Generator],
        initial_z: Tensor | None = None,
    ) -> None:
        """New batch: observations, fresh codes from each image's own RNG stream, α = 1/N."""
        s = self.settings
        B = images.shape[0]
        device = images.device
        self.batch_size = B
        self.ids = list(ids)
        self.target_origin = images
        self.target = self.degradation.target(images, ids=self.ids)
        shape = (s.z_number, self.G.z_dim)
        if initial_z is not None:
            z = initial_z.to(device=device, dtype=torch.float32).clone()
        elif s.init_type == "Zero":
            z = torch.zeros(B, *shape, device=device)
        else:
            z = torch.stack([torch.randn(*shape, generator=generators[b]) for b in range(B)]).to(device)
        if tuple(z.shape) != (B, *shape):
            raise ValueError(f"initial z must have shape {(B, *shape)}; got {tuple(z.shape)}")
        alpha0 = 1.0 / s.z_number if s.alpha_init is None else float(s.alpha_init)
        self.z = z.detach().clone().requires_grad_(True)
        self.alpha = torch.full((B, s.z_number, self.channels), alpha0, device=device)
        self.alpha.requires_grad_(s.train_alpha)
        self.target_features: Tensor | None = None
        if self.perceptual is not None:
            with torch.no_grad():  # the target side of φ never changes within a fit
                self.target_features = self.perceptual.features_of(self.target)
        stage = Stage(iterations=s.iterations, G_lr=0.0, z_lr=s.lr, ftr_num=0, ft_num=0, lr_ratio=1.0,
                      w_D_loss=0.0, w_mse=s.l2_lambda, w_percep=s.vgg_lambda, use_in=False)
        self.progress = Progress([stage], B)
        self.last_record: MGANStepRecord | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"name": "z", "params": [self.z]}]
        if self.settings.train_alpha:
            groups.append({"name": "alpha", "params": [self.alpha]})
        return groups

    def make_optimizer(self) -> PerImageSGD | PerImageAdam:
        """SGD (``GD``, the released default) or Adam with torch's defaults."""
        if self.settings.optimization == "GD":
            return PerImageSGD(self.param_groups(), batch_size=self.batch_size)
        return PerImageAdam(self.param_groups(), batch_size=self.batch_size,
                            betas=self.settings.betas, eps=self.settings.eps)

    def step_lrs(self) -> dict[str, Tensor]:
        lr = torch.tensor([0.0 if d else self.settings.lr for d in self.progress.done], dtype=torch.float64)
        return {"z": lr, "alpha": lr.clone()}

    # ------------------------------------------------------------------ forward and loss
    def render(self, z: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        z = self.z if z is None else z
        alpha = self.alpha if alpha is None else alpha
        return self.G.multi_code(z, alpha, self.layer, self.settings.average_codes)

    def loss(self) -> tuple[Tensor, MGANStepRecord, Tensor]:
        """One iteration's forward pass: the summed loss, the per-image record, x."""
        s = self.settings
        B = self.batch_size
        device = self.z.device
        active = self.progress.active()
        x = self.render()
        x_map = self.degradation.apply(x, ids=self.ids)
        diff = x_map - self.target
        l2 = diff.square().flatten(1).mean(1)
        l1 = diff.abs().flatten(1).mean(1)
        vgg = torch.zeros(B, device=device)
        if self.perceptual is not None and s.vgg_lambda > 0:
            assert self.target_features is not None
            vgg = self.perceptual(x_map, self.target_features)
        # The released CombinationLoss's order of terms: l1, l2, vgg.
        per_image = s.l1_lambda * l1 + s.l2_lambda * l2 + s.vgg_lambda * vgg
        total = (per_image * active.to(device)).sum()
        record = MGANStepRecord(l2=l2.detach(), l1=l1.detach(), vgg=vgg.detach(),
                                total=per_image.detach(), active=active)
        self.last_record = record
        return total, record, x.detach()

    def end_step(self, record: MGANStepRecord) -> list[bool]:
        return self.progress.end_step([False] * self.batch_size)

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def final_output(self) -> Tensor:
        """One more forward pass with the final codes (SPEC §3.3): the raw generator output."""
        return self.render().detach()

    def latents(self, b: int) -> dict[str, Tensor]:
        """Image b's fitted codes and importances (CPU copies)."""
        return {"z": self.z[b].detach().cpu().clone(), "alpha": self.alpha[b].detach().cpu().clone(),
                "composing_layer": torch.tensor(self.layer)}

    @staticmethod
    def display(x: Tensor) -> Tensor:
        return ((x.detach().float() + 1) / 2).clamp(0, 1)

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
        result = self.result_for_metrics(x).double()
        clean = self.clean_for_display().double()
        out = {
            "psnr": psnr(result, clean, data_range=1.0),
            "ssim": ssim(result, clean, data_range=self.ssim_data_range, window=self.ssim_window),
        }
        box = self.hole_box()
        if box is not None:
            top, bottom, left, right = box
            crop_r, crop_c = result[..., top:bottom, left:right], clean[..., top:bottom, left:right]
            out["psnr_hole"] = psnr(crop_r, crop_c, data_range=1.0)
            out["ssim_hole"] = ssim(crop_r, crop_c, data_range=self.ssim_data_range, window=self.ssim_window)
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
        return {"z_number": self.settings.z_number, "composing_layer": self.layer,
                "train_alpha": self.settings.train_alpha}
