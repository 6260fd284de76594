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

Precision. The method computes in its generator's dtype (``MGANPrior.dtype``): float64 for
``trainer.precision=64-true``, where codes, importances, targets, masks, the VGG term, the
losses and the optimizer run in float64 end to end. The reference reads targets and masks with
torchvision's ``to_tensor`` in the default dtype, so a float64 run of it divides the uint8
pixels by 255 in float64 (TRACES_F64.md, dtype rules), where DGP and DIP divide in float32 and
cast. genprior's loaders hand over float32 images (uint8 / 255 in float32, then normalised);
``images_in_dtype`` recovers their exact uint8 values and repeats the division in float64.
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
    "MGANMaskImage",
    "MGANPrior",
    "MGANSettings",
    "MGANStepRecord",
    "VGGFeatureLoss",
    "build_mgan_degradation",
    "images_in_dtype",
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
        if weights is None or not Path(weights).is_file():
            what = "no VGG-16 weights given" if weights is None else f"VGG-16 weights file {weights} does not exist"
            raise FileNotFoundError(f"{what}. {VGG_WEIGHTS_HELP}")
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
    genprior's loaders produce float32 ``(u8 / 255 − 0.5) / 0.5`` (``image_io.to_tensor``);
    when float64 is asked for and the float32 images are exactly such uint8 images, the pixel
    values are recovered (exactly: float32 is far finer than 1/255) and divided again in
    float64. Any other float32 input (not from 8-bit pixels) is widened as it is, and images
    already in ``dtype`` are returned unchanged, so the Python API takes float64 targets as given.
    """
    if images.dtype == dtype:
        return images
    if dtype != torch.float64 or images.dtype != torch.float32:
        return images.to(dtype)
    pixels = ((images.double() + 1) / 2 * 255).round().clamp(0, 255)
    if not torch.equal(pixels.float().div(255).sub(0.5).div(0.5), images):
        return images.double()
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


def ycbcr_recombine(result: Tensor, target: Tensor) -> Tensor:
    """mGANprior's colorization output (SPEC §3.5): Y of the target with Cb, Cr of the result.

    Both [B, 3, H, W] in [0, 1]. Like the reference, the result goes to uint8 by truncation, the
    target's pixels are its original uint8 values, and the YCbCr conversions are PIL's (JPEG,
    full range). Returns [B, 3, H, W] in [0, 1] on ``result``'s device, in float32 (float64 for
    a float64 result).
    """
    # Truncated in float32, or in float64 for a float64 run: the reference's to_pil_image
    # multiplies by 255 in its tensor's (the default) dtype.
    work = result.detach().to(torch.promote_types(result.dtype, torch.float32))
    out_u8 = truncate_to_uint8(work.clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy()
    tgt_u8 = (target.detach().double().clamp(0, 1) * 255).round().to(torch.uint8)
    tgt_u8 = tgt_u8.permute(0, 2, 3, 1).cpu().numpy()
    merged = []
    for out, tgt in zip(out_u8, tgt_u8):
        _, cb, cr = Image.fromarray(out).convert("YCbCr").split()
        y, _, _ = Image.fromarray(tgt).convert("YCbCr").split()
        merged.append(np.asarray(Image.merge("YCbCr", (y, cb, cr)).convert("RGB")))
    rgb = torch.from_numpy(np.stack(merged)).permute(0, 3, 1, 2)
    return rgb.to(device=result.device, dtype=work.dtype).div(255)


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
        if perceptual is not None and {p.dtype for p in perceptual.parameters()} - {G.dtype}:
            raise ValueError(f"the VGG network's dtype must be the generator's ({G.dtype}): move it "
                             "with .to(dtype), as the runner does for trainer.precision")
        self.batch_size = 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of codes, importances, targets, losses and metrics: G's (float64 for
        ``trainer.precision=64-true``)."""
        return self.G.dtype

    # ------------------------------------------------------------------ per-batch set-up
    def start(
        self,
        images: Tensor,
        classes: Tensor | None,
        ids: list[str],
        generators: list[torch.Generator],
        initial_z: Tensor | None = None,
    ) -> None:
        """New batch: observations, fresh codes from each image's own RNG stream, α = 1/N.

        ``images`` are [-1, 1]; float32 ones from genprior's loaders are brought to the
        method's dtype as the reference reads them (``images_in_dtype``). ``initial_z``
        ([B, N, z_dim], any float dtype) replaces the drawn codes.
        """
        s = self.settings
        dtype = self.dtype
        B = images.shape[0]
        device = images.device
        images = images_in_dtype(images, dtype)
        self.batch_size = B
        self.ids = list(ids)
        self.target_origin = images
        self.target = self.degradation.target(images, ids=self.ids)
        shape = (s.z_number, self.G.z_dim)
        if initial_z is not None:
            z = initial_z.to(device=device, dtype=dtype).clone()
        elif s.init_type == "Zero":
            z = torch.zeros(B, *shape, device=device, dtype=dtype)
        else:
            # drawn in float32 whatever the run's dtype: a float64 run starts from the codes of
            # a float32 run (the reference's own draw is unseeded, SPEC §3.1)
            z = torch.stack([torch.randn(*shape, generator=generators[b], dtype=torch.float32)
                             for b in range(B)]).to(device, dtype)
        if tuple(z.shape) != (B, *shape):
            raise ValueError(f"initial z must have shape {(B, *shape)}; got {tuple(z.shape)}")
        # 1/N as a Python double, then in the run's dtype: the reference's torch.full(1/N)
        alpha0 = 1.0 / s.z_number if s.alpha_init is None else float(s.alpha_init)
        self.z = z.detach().clone().requires_grad_(True)
        self.alpha = torch.full((B, s.z_number, self.channels), alpha0, device=device, dtype=dtype)
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
        vgg = torch.zeros(B, device=device, dtype=x.dtype)
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
