"""Deep Image Prior (Ulyanov, Vedaldi and Lempitsky, CVPR 2018), for B images at a time.

DIP restores an image by fitting a randomly initialised network f (``dip.net_type``: the
``skip`` encoder-decoder by default; UNet, ResNet, texture_nets, the library hourglasses, see
``genprior.priors.dip_archs``) so that the degraded output A(f(z)) matches the observation: the
network's structure is the prior, and there are no pretrained weights. Every image has its own network (stacked parameters, see
``genprior.priors.dip_nets.StackedNets``) and its own fixed input z. One optimisation step, as
the notebooks' closure does it and as this file writes it from the top (genprior.engine.step
calls these in this order; SPEC §6, §8):

1. ``step_lrs``: Adam's learning rate, constant (no notebook uses a schedule);
2. ``loss``: the input z̃ = z + reg_noise_std · ε with a fresh ε ~ N(0, 1) (z itself never
   changes), x = f(z̃), the task's forward model A: identity (denoising, JPEG, flash/no-flash),
   the mask (inpainting, restoration), the Lanczos2 downsampler (SR) or mGANprior's gray
   (colorization); loss = MSE(A(x), observation) (+ tv_weight · TV(x)); the exponential moving
   average of the outputs (denoising, JPEG); and the backtracking decision: when the PSNR of
   A(x) against the observation drops by more than 5 dB from the last checkpoint, the image
   falls back to the checkpoint's weights (denoising, restoration);
3. backward, then ``before_optimizer_step`` applies those fall-backs (after backward, before
   Adam, exactly the reference's order), then each image's Adam step (betas (0.9, 0.999),
   eps 1e-8; genprior.optim.PerImageAdam);
4. ``end_step``: the fit ends after ``num_iter`` steps, or for one image once its MSE drops
   below ``stop_mse``.

Below them: a new batch (``start``: the notebooks' observations of the loaded images, then
``start_observed``: nets, z, forward model, backtracking state), the results (the EMA or the
last output; the metrics of the rows), the settings (``DIPConfig``, the ``dip`` config section)
and the image preparation helpers of the notebooks.

Precision: everything (nets, z, observation, mask, forward model, loss, EMA, Adam state) runs
in the run's dtype, float32 or float64 (``trainer.precision=64-true``; docs/faithfulness.md).
Observations are made in float32 exactly as the notebooks make them, then cast once; random
draws (weights, z, ε) are made in float32 whatever the dtype, then cast exactly, so a float64
run starts from the numbers of the float32 run of the same seed. To replay recorded values
instead (the float64 traces of the original, TRACES_F64.md), give ``start_observed`` the
``perturbations`` and call ``load_initial_state`` before the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageFilter
from torch import Tensor, nn

from genprior.color import ycbcr_recombine
from genprior.degradations import MGANPRIOR_GRAY_WEIGHTS, CenterSquareMask, Gray, center_hole_box
from genprior.errors import InvalidSettingError
from genprior.items import ImageBatch, StepRecord, image_generator, step_seed
from genprior.methods.base import Method, Progress
from genprior.metrics import psnr, ssim
from genprior.optim import PerImageAdam, StackedOptimizer
from genprior.precision import run_dtype
from genprior.priors.dip_archs import ResNet, UNet, hourglass, net_output_size, texture_nets
from genprior.priors.dip_nets import (
    Downsampler,
    StackedNets,
    get_noise,
    skip,
    skip_kwargs_from,
    skip_output_size_for,
    to_dtype,
    tv_loss,
)

__all__ = [
    "DIP",
    "PRESETS",
    "TASKS",
    "DIPConfig",
    "bernoulli_mask",
    "check_input_size",
    "crop_box",
    "crop_tensor_to_multiple",
    "crop_to_multiple",
    "hole_box",
    "load_image",
    "load_preset",
    "noisy_observation",
    "pil_to_tensor",
    "put_in_center",
    "sr_baselines",
    "sr_pair",
    "unit_range",
]

TASKS = (
    "denoising",  # observation = clean + AWGN (SPEC §8.1, F16)
    "jpeg_artifacts",  # observation = the JPEG itself, no ground truth (SPEC §8.1, snail)
    "super_resolution",  # observation = LR image; forward model Lanczos2 ↓factor (SPEC §8.2)
    "inpainting",  # observation ⊙ mask (SPEC §8.4)
    "restoration",  # inpainting from a random fraction of pixels, with backtracking (SPEC §8.5)
    "flash_no_flash",  # z = the flash image, observation = the no-flash image (SPEC §8.6)
    # Not in the DIP paper: observation = gray image (mGANprior's luma weights, 3 channels), forward
    # model the same gray; for the DIP row of mGANprior's colorization table.
    "colorization",
)
_MASKED_TASKS = ("inpainting", "restoration")
# The SR notebook draws z before building the net; the others build the net first. Seeded
# construction follows each notebook (the seeds of the float64 traces reproduce their initial
# weights and z only in these orders, TRACES_F64.md).
_Z_BEFORE_NET_TASKS = ("super_resolution",)
# The dtypes a DIP fit computes in (trainer.precision 32-true / 64-true).
DTYPES = (torch.float32, torch.float64)
# dip.mask_shape: inpainting's mask from task.mask_path, or a generated centre hole
MASK_SHAPES = ("file", "dgp_center_hole", "center_square")
# dip.net_type (skip_depthN: N = 1…6), dip.opt_over and dip.optimizer (SPEC §4, §7.5)
DIP_NET_TYPES = ("skip", "skip_depthN", "UNet", "ResNet", "texture_nets")
OPT_OVER = ("net", "net,input")
OPTIMIZERS = ("adam", "lbfgs")


@dataclass
class DIPConfig:
    """The ``dip`` config section (config.py's schema is this class): the hyperparameters of one
    DIP run, under the reference's names where it has them.

    The defaults are the F16 denoising notebook (SPEC §8.1) with the default network of §3.4.
    Per-level network lists take one value per level, or a single value for all levels.
    """

    task: str = "denoising"
    num_iter: int = 3000  # Adam steps; the paper reports denoising PSNR after 1800
    lr: float = 0.01  # constant (no schedule in any notebook)

    # Network input z (SPEC §6)
    input_type: str = "noise"  # noise | meshgrid | image (the flash image, passed as net_input)
    input_depth: int = 32  # channels of z (ignored for 'image')
    input_noise_type: str = "u"  # u: U[0,1)·input_var; n: N(0,1)·input_var
    input_var: float = 0.1
    reg_noise_std: float = 1.0 / 30.0  # σ_p of the per-step input perturbation

    # The network (SPEC §3, §4): skip (the fields below) | skip_depth1…6 (the library notebook's
    # hourglass; pad, act_fun, upsample_mode[0]) | UNet | ResNet | texture_nets (their options
    # further down; pad, act_fun, need_sigmoid, need_bias shared). docs/dip.md.
    net_type: str = "skip"
    # skip network (SPEC §3.1); num_input/output_channels come from z and the observation
    num_channels_down: list[int] = field(default_factory=lambda: [128] * 5)
    num_channels_up: list[int] = field(default_factory=lambda: [128] * 5)
    num_channels_skip: list[int] = field(default_factory=lambda: [4] * 5)
    filter_size_down: list[int] = field(default_factory=lambda: [3])
    filter_size_up: list[int] = field(default_factory=lambda: [3])
    filter_skip_size: int = 1
    need_sigmoid: bool = True
    need_bias: bool = True
    pad: str = "reflection"
    upsample_mode: list[str] = field(default_factory=lambda: ["bilinear"])
    downsample_mode: list[str] = field(default_factory=lambda: ["stride"])
    act_fun: str = "LeakyReLU"
    need1x1_up: bool = True
    # UNet (SPEC §4; defaults: the library notebook's alternative, §8.4)
    unet_feature_scale: int = 8
    unet_more_layers: int = 1
    unet_concat_x: bool = False
    unet_upsample_mode: str = "deconv"  # deconv | bilinear | nearest
    unet_norm: str = "instance"  # instance | batch | none
    # ResNet (SPEC §4; defaults: the library notebook's alternative)
    resnet_num_blocks: int = 8
    resnet_num_channels: int = 32
    resnet_need_residual: bool = True
    resnet_norm: str = "batch"  # batch | instance | none
    # texture_nets (SPEC §4): avg-pool ratios of the branches, coarsest first; channels per branch
    texture_ratios: list[int] = field(default_factory=lambda: [32, 16, 8, 4, 2, 1])
    texture_conv_num: int = 8

    # What is optimised and how (SPEC §7.5): OPT_OVER 'net' | 'net,input' (z too, per image);
    # optimizer 'adam' | 'lbfgs' (lbfgs_adam_steps Adam steps at lbfgs_adam_lr, then L-BFGS at
    # lr for num_iter iterations, one image at a time: trainer.batch_size 1)
    opt_over: str = "net"
    optimizer: str = "adam"
    lbfgs_adam_steps: int = 100
    lbfgs_adam_lr: float = 0.001

    # task=dip_prior_samples (no fitting): the net_types drawn (rows of the sheet) and the seeds
    # (columns); each sample is f(z) at initialisation, z the input above, at data.image_size
    sample_nets: list[str] = field(default_factory=lambda: [
        "skip", "skip_depth2", "skip_depth4", "skip_depth6", "UNet", "ResNet", "texture_nets"])
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])

    # Output averaging and backtracking (SPEC §8.1, §8.5)
    exp_weight: float | None = 0.99  # EMA weight; null: no averaging
    backtracking: str = "denoising"  # off | denoising | restoration (which notebook's rule)
    show_every: int = 100  # backtracking period (the notebooks' show_every)
    backtracking_drop_db: float = 5.0
    final_input: str = "perturbed"  # input of the final forward: perturbed (last z̃) | saved (z)
    # Early stop (DGP Table 5's adversarial defense): the fit ends once the MSE between the
    # output and the observation drops below this; 0 = off (every notebook).
    stop_mse: float = 0.0

    # Forward models and observation preparation (used by the helpers below and the presets)
    sr_factor: int = 4
    sr_kernel: str = "lanczos2"
    tv_weight: float = 0.0  # SR notebook's TV term (0 in every preset)
    tv_beta: float = 0.5
    noise_std: float = 25.0 / 255.0  # AWGN σ of the denoising observation
    mask_keep_above: float = 0.5  # restoration: a pixel is known when U[0,1) > this
    # inpainting's mask: "file" (task.mask_path, the notebooks), or a generated centre hole for
    # the DIP columns of the DGP/mGANprior tables: "dgp_center_hole" (DGP's hole, side
    # floor(min(H, W)/3)) or "center_square" (hole_size x hole_size, mGANprior's 64x64)
    mask_shape: str = "file"
    hole_size: int = 64
    # SSIM of the rows (not in the notebooks): 1.0 for these [0, 1] images; the DIP columns of
    # DGP's tables set 2.0, DGP's reference convention (docs/degradations_and_metrics.md)
    ssim_data_range: float = 1.0
    reflect_pad: int = 0  # restoration barbara: reflection-pad the image by 1 pixel first
    crop_multiple: int = 32  # notebooks centre-crop H and W to multiples of this

    # Execution only (no effect on results beyond float rounding): how B nets run together
    batched_forward: str = "auto"  # auto (loop on CPU, vmap on CUDA) | loop | vmap

    def skip_kwargs(self, num_input_channels: int, num_output_channels: int) -> dict:
        """Keyword arguments of ``genprior.priors.dip_nets.skip`` for this run."""
        return skip_kwargs_from(self, num_input_channels, num_output_channels, "dip")

    def build_net(self, num_input_channels: int, num_output_channels: int,
                  dtype: torch.dtype | None = None) -> nn.Module:
        """The ``net_type`` network of this run, its weights drawn from the global RNG in
        ``dtype`` (None: the default dtype), in the reference's construction order."""
        t, cin, cout = self.net_type, num_input_channels, num_output_channels
        if t == "skip":
            return skip(**self.skip_kwargs(cin, cout), dtype=dtype)
        depth = t[len("skip_depth"):]
        if t.startswith("skip_depth") and depth.isdigit():
            return hourglass(int(depth), cin, cout, self.pad, self.upsample_mode[0], self.act_fun, dtype)
        if t == "UNet":
            return UNet(cin, cout, self.unet_feature_scale, self.unet_more_layers, self.unet_concat_x,
                        self.unet_upsample_mode, self.pad, self.unet_norm, self.need_sigmoid, self.need_bias, dtype)
        if t == "ResNet":
            return ResNet(cin, cout, self.resnet_num_blocks, self.resnet_num_channels, self.resnet_need_residual,
                          self.act_fun, self.need_sigmoid, self.resnet_norm, self.pad, dtype)
        if t == "texture_nets":
            return texture_nets(cin, list(self.texture_ratios), self.pad, self.need_sigmoid, self.texture_conv_num,
                                self.upsample_mode[0], cout, self.act_fun, dtype)
        raise InvalidSettingError(f"dip.net_type must be one of {', '.join(DIP_NET_TYPES)}, got {t!r}")

    def check(self) -> None:
        """Raises InvalidSettingError for a net_type, opt_over or optimizer DIP does not know."""
        t = self.net_type
        if not (t in DIP_NET_TYPES or (t.startswith("skip_depth") and t[len("skip_depth"):].isdigit())):
            raise InvalidSettingError(f"dip.net_type must be one of {', '.join(DIP_NET_TYPES)}, got {t!r}")
        if self.opt_over not in OPT_OVER:
            raise InvalidSettingError(f"dip.opt_over must be one of {', '.join(OPT_OVER)}, got {self.opt_over!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidSettingError(f"dip.optimizer must be adam or lbfgs, got {self.optimizer!r}")


PRESETS = (
    "denoising",  # F16 512² (SPEC §8.1)
    "denoising_quick",  # the CPU default job (docs/dip.md)
    "jpeg_snail",
    "sr4",
    "sr8",
    "sr4_prior_effect",
    "inpainting_vase",
    "inpainting_kate",
    "inpainting_library",
    "inpainting_library_unet",  # the notebook's UNet alternative (SPEC §8.4)
    "inpainting_library_resnet",  # and its ResNet alternative
    "restoration_barbara",
    "restoration_kate",
    "flash_no_flash",
)


def load_preset(name: str, **overrides: Any) -> DIPConfig:
    """``DIPConfig`` from ``configs/task/dip_<name>.yaml`` (key ``dip:``), then overrides.

    Unknown keys fail loudly (OmegaConf structured merge).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown DIP preset {name!r}; available: {', '.join(PRESETS)}")
    text = resources.files("genprior.configs").joinpath("task").joinpath(f"dip_{name}.yaml").read_text()
    merged = OmegaConf.merge(OmegaConf.structured(DIPConfig), OmegaConf.create(text).dip, overrides)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class DIP(Method):
    """Fits B images at once: per-image ``skip`` networks, fixed inputs, loss, EMA, backtracking.

    ``settings`` is the ``dip`` section, ``dtype`` the run's (float32 or float64), ``seed`` the
    run's seed: every image's net and z are built under it (so an image's result does not
    depend on its batch), and with the image's id it draws the denoising noise and the
    restoration mask. ``mask_path`` is inpainting's mask file (``task.mask_path``).

    Per batch (``start`` / ``start_observed``) the module holds the stacked network weights,
    its only parameters, and as buffers z, the observation, the mask, the ground truth, the
    EMA, the backtracking snapshot and counters.
    """

    preprocessing: ClassVar[str] = "none"  # images at their own size, [-1, 1] (unit_range)

    def __init__(self, settings: DIPConfig, dtype: torch.dtype = torch.float32, seed: int = 0,
                 mask_path: str | None = None) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"DIP runs in float32 or float64 (trainer.precision 32-true or 64-true); got {dtype}")
        settings.check()
        self.settings = settings
        self.lbfgs: torch.optim.LBFGS | None = None  # optimizer='lbfgs', made when its stage starts
        self.dtype = dtype
        self.seed = int(seed)
        self.mask_path = mask_path
        self.ids: list[str] = []

    @classmethod
    def from_config(cls, cfg: Any) -> DIP:
        """A DIP for ``cfg``: the ``dip`` section, the run's dtype and seed, ``task.mask_path``."""
        settings = DIPConfig(**OmegaConf.to_container(cfg.dip, resolve=True))  # type: ignore[arg-type]
        batch = str(cfg.trainer.batch_size)
        if settings.optimizer == "lbfgs" and batch != "auto" and batch.isdigit() and int(batch) > 1:
            raise InvalidSettingError(
                f"dip.optimizer=lbfgs fits one image at a time, got trainer.batch_size={batch}: L-BFGS's "
                "line search and curvature history are global over all its parameters, so images in one "
                "batch would be coupled; set trainer.batch_size=1 (or auto)")
        return cls(settings, dtype=run_dtype(cfg), seed=int(cfg.seed), mask_path=cfg.task.mask_path or None)

    @classmethod
    def image_size(cls, cfg: Any) -> int:
        """DIP has no resolution of its own: the loaders give it images of ``data.image_size``."""
        return int(cfg.data.image_size)

    @property
    def print_interval(self) -> int:
        return int(self.settings.show_every)

    def stage_lengths(self) -> list[int]:
        if self.settings.optimizer == "lbfgs":  # SPEC §7.5: Adam warm-up, then num_iter L-BFGS iterations
            return [int(self.settings.lbfgs_adam_steps), int(self.settings.num_iter)]
        return [int(self.settings.num_iter)]  # one stage: the notebooks' loop

    def max_batch_size(self) -> int | None:
        """1 with L-BFGS (its line search and history couple every parameter it is given)."""
        return 1 if self.settings.optimizer == "lbfgs" else None

    # ============================================================== one step (SPEC §6, §8)
    def step_lrs(self) -> dict[str, Tensor]:
        """1. Constant learning rate: no notebook uses a schedule (SPEC §7.5); 0 once done.
        With L-BFGS, its Adam warm-up runs at lbfgs_adam_lr (the reference's 0.001)."""
        s = self.settings
        lr = s.lbfgs_adam_lr if s.optimizer == "lbfgs" else s.lr
        lrs = self.progress.active().to(torch.float64) * lr
        return {"net": lrs, "input": lrs} if s.opt_over == "net,input" else {"net": lrs}

    def loss(self) -> tuple[Tensor, StepRecord, Tensor | None]:
        """2. Forward of all B images: the sum of their losses (each image's gradient is its
        own), their per-image logs, and the EMA to show (None without averaging).

        Also updates the EMA and decides backtracking; a decided fall-back is applied by
        ``before_optimizer_step`` (it must come after backward, see there).
        """
        s = self.settings
        step = self.step_count
        self.step_count += 1
        out = self.nets(self.network_input(step))
        detached = out.detach()
        if s.exp_weight is not None:
            # out_avg starts at the first output: no zero init, no bias correction (SPEC §8.1).
            if self.output_ema is None:
                self.output_ema = detached.clone()
            else:
                self.output_ema = self.output_ema * s.exp_weight + detached * (1 - s.exp_weight)

        degraded = self.degrade(out)
        target = self.target()
        # MSELoss(mean) per image: the mean runs over C·H·W, hole pixels included (SPEC §8.4).
        loss = (degraded - target).square().flatten(1).mean(dim=1)
        self.last_mse = loss.detach()  # the data term alone, for stop_mse
        if s.tv_weight:
            loss = loss + s.tv_weight * torch.stack([tv_loss(o[None], s.tv_beta) for o in out])

        # "loss" first: the columns of losses.csv, in the notebooks' order (StepRecord.reported)
        logs: dict[str, Tensor] = {"loss": loss.detach()}
        # PSNR against the observation: psrn_noisy / psnr_LR / psrn_masked of the notebooks.
        logs["psnr_observed"] = psnr(degraded, target)
        if self.clean is not None:
            logs["psnr_gt"] = psnr(detached, self.clean)
            if self.output_ema is not None:
                logs["psnr_gt_ema"] = psnr(self.output_ema, self.clean)
        logs["fell_back"] = self._decide_backtracking(logs["psnr_observed"]).to(loss.dtype)
        record = StepRecord(total=logs["loss"], active=self.progress.active(), terms=logs)
        # Snapshots show the averaged output (what DIP reports); none without averaging.
        return loss.sum(), record, self.output_ema

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """3. Applies the fall-backs decided in ``loss``: after backward, before Adam's step.

        This reproduces the reference order exactly: its closure restores the snapshot after
        ``loss.backward()`` and returns, then Adam steps, so the gradient computed at the bad
        parameters is applied on top of the restored ones, and Adam's moments are not rewound
        (SPEC §8.1). Restoring before backward is impossible (the graph holds the parameters).
        """
        if self.settings.backtracking == "off" or not bool(self.fall_back.any()):
            return
        for snap, p in zip(self.snapshot, self.nets.parameters()):
            p.copy_(torch.where(_expand(self.fall_back, p), snap, p))

    def end_step(self, record: StepRecord) -> list[bool]:
        """4. The fit ends after num_iter steps, or once an image's MSE < stop_mse (DGP Table
        5's early stop for purification; 0 = off, every notebook)."""
        stop = [False] * self.batch_size
        if self.settings.stop_mse > 0:  # ends the fit: DIP has one stage
            stop = (self.last_mse < self.settings.stop_mse).tolist()
        return self.progress.advance(stop)

    def network_input(self, step: int) -> Tensor:
        """z̃ = z + σ_p·ε at this step (z itself when reg_noise_std = 0).

        The notebooks' ``net_input_saved + (noise.normal_() * reg_noise_std)``: the product
        first, then the sum (the same rounding).
        """
        if self.settings.reg_noise_std > 0:
            return self.net_input_saved + self.perturbation(step) * self.settings.reg_noise_std
        return self.net_input_saved

    def perturbation(self, step: int) -> Tensor:
        """ε of this step, [B, C, H, W], in the run's dtype: from ``perturbations`` when given,
        else ``drawn_perturbation``."""
        z = self.net_input_saved
        if self.perturbations is None:
            return self.drawn_perturbation(step).to(z.dtype)
        eps = self.perturbations(step)
        if tuple(eps.shape) != tuple(z.shape):
            raise ValueError(f"perturbations({step}) has shape {tuple(eps.shape)}, expected {tuple(z.shape)}")
        return eps.to(z.device, z.dtype)

    def drawn_perturbation(self, step: int) -> Tensor:
        """Seeded ε ~ N(0, 1), float32 [B, C, H, W], a function of (image seed, step) only.

        Drawn in float32 in every run, so a float64 run perturbs with the float32 run's ε.
        """
        z = self.net_input_saved
        key = str(z.device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=z.device)
        gen = self._generators[key]
        eps = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        if len(set(self.seeds)) == 1:
            gen.manual_seed(step_seed(self.seeds[0], step))
            eps[:1].normal_(generator=gen)
            eps[1:] = eps[:1]
            return eps
        for b, s in enumerate(self.seeds):
            gen.manual_seed(step_seed(s, step))
            eps[b].normal_(generator=gen)
        return eps

    def degrade(self, x: Tensor) -> Tensor:
        """The task's forward model A(x) used by the loss."""
        if self.downsampler is not None:
            return self.downsampler(x)
        if self.gray is not None:
            return self.gray.apply(x)
        if self.mask is not None:
            return x * self.mask
        return x

    def target(self) -> Tensor:
        """What A(x) is compared with: the observation (masked for inpainting/restoration)."""
        return self.observation * self.mask if self.mask is not None else self.observation

    def _decide_backtracking(self, psnr_observed: Tensor) -> Tensor:
        """The notebooks' rule, per image, without host synchronisation (SPEC §8.1, §8.5).

        denoising: checked when the counter i is *not* a multiple of show_every; restoration:
        when it *is* one. On a check, a drop of more than 5 dB below the last checkpoint's PSNR
        means fall back (restore, i not incremented); otherwise checkpoint the current
        parameters. Unchecked steps just increment i.
        """
        s = self.settings
        if s.backtracking == "off":
            self.iteration += 1
            self.fall_back.zero_()
            return self.fall_back.clone()
        on_period = self.iteration % s.show_every == 0
        checked = ~on_period if s.backtracking == "denoising" else on_period
        fall_back = checked & (psnr_observed - self.psnr_last < -s.backtracking_drop_db)
        keep = checked & ~fall_back
        # Snapshot = the parameters this forward used; backward does not change them. The
        # reference's `.cpu()` copy is a real copy on CUDA; here it is always a clone.
        for snap, p in zip(self.snapshot, self.nets.parameters()):
            snap.copy_(torch.where(_expand(keep, p), p.detach(), snap))
        self.psnr_last.copy_(torch.where(keep, psnr_observed, self.psnr_last))
        self.iteration += (~fall_back).long()
        self.fall_back.copy_(fall_back)
        return fall_back

    def make_optimizer(self, fused: bool = True) -> PerImageAdam:
        """Adam with the notebooks' defaults (betas (0.9, 0.999), eps 1e-8, no weight decay), one
        per image, over the network weights (OPT_OVER 'net'), and z in its own group with
        OPT_OVER 'net,input' (``get_params``, SPEC §7.5)."""
        groups = [{"name": "net", "params": list(self.nets.parameters())}]
        if self.settings.opt_over == "net,input":
            groups.append({"name": "input", "params": [self.net_input_saved]})
        return PerImageAdam(groups, batch_size=self.batch_size, betas=(0.9, 0.999), eps=1e-8, fused=fused)

    def optimizer_step(self, optimizer: StackedOptimizer, evaluate: Callable[[], Tensor]) -> None:
        """Adam: one evaluation, one update (the base class). L-BFGS stage (SPEC §7.5): one
        iteration of ``torch.optim.LBFGS(lr, tolerance_grad=-1, tolerance_change=-1)`` with
        ``evaluate`` as its closure, so every engine step is one function evaluation.

        The reference makes one ``LBFGS(max_iter=num_iter).step(closure)`` call; here each step
        is a ``step`` call with max_iter=1 on the same optimizer, whose history, direction and
        step size persist in its state, so the evaluated points and updates are the same: with
        these tolerances its only early exit is a direction with gradient·direction > 1, where
        the reference stops and here the parameters stay put for the remaining steps.
        """
        s = self.settings
        if s.optimizer != "lbfgs" or self.progress.current(0) == 0:
            super().optimizer_step(optimizer, evaluate)
            return
        if self.lbfgs is None:
            params = list(self.nets.parameters())
            if s.opt_over == "net,input":
                params.append(self.net_input_saved)
            self.lbfgs = torch.optim.LBFGS(params, lr=s.lr, max_iter=1, tolerance_grad=-1, tolerance_change=-1)
        self.lbfgs.step(evaluate)

    # ============================================================== a new batch
    def start(self, batch: ImageBatch) -> None:
        """The notebooks' observations of the batch's images (``observe``), then their fit."""
        observed = [self.observe(image, image_id) for image, image_id in zip(batch.images.detach().cpu(), batch.ids)]
        observations, masks, cleans, shown = (list(column) for column in zip(*observed))
        if len({tuple(o.shape) for o in observations}) > 1:
            raise ValueError("images of different sizes cannot share a DIP batch; use trainer.batch_size=1")
        self.start_observed(batch.ids, torch.stack(observations),
                            mask=torch.stack(masks) if masks[0] is not None else None,
                            clean=torch.stack(cleans) if cleans[0] is not None else None,
                            shown=torch.stack(shown))

    def observe(self, image: Tensor, image_id: str) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """(observation, mask, ground truth, observation shown next to the result) of one loaded
        image ([C, H, W] in [-1, 1]), in float32 as the notebooks make them: the image as u8 / 255,
        centre-cropped to multiples of ``crop_multiple``, then degraded by the task's recipe."""
        s = self.settings
        clean = crop_tensor_to_multiple(unit_range(image)[None], int(s.crop_multiple))[0]
        task = s.task
        if task == "denoising":
            gen = image_generator(self.seed, image_id)
            noise = torch.randn(clean.shape, generator=gen, dtype=torch.float32)
            noisy = (clean + noise * s.noise_std).clamp(0, 1)
            return noisy, None, clean, noisy
        if task == "super_resolution":
            f = int(s.sr_factor)
            h, w = clean.shape[-2:]
            hr = clean[..., : h - h % f, : w - w % f]
            img = Image.fromarray((hr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            lr_img = img.resize((hr.shape[-1] // f, hr.shape[-2] // f), Image.Resampling.LANCZOS)
            lr = torch.from_numpy(np.asarray(lr_img, dtype=np.float32) / 255).permute(2, 0, 1)
            shown = torch.nn.functional.interpolate(lr[None], scale_factor=f, mode="nearest")[0]
            return lr, None, hr, shown
        if task == "jpeg_artifacts":
            return clean, None, None, clean
        if task == "colorization":
            gray = Gray(MGANPRIOR_GRAY_WEIGHTS, value_range=(0.0, 1.0)).apply(clean[None])[0]
            return gray, None, clean, gray
        if task in _MASKED_TASKS:
            if task == "restoration":
                gen = image_generator(self.seed, image_id)
                draw = torch.rand(clean.shape[-2:], generator=gen, dtype=torch.float32)
                mask = (draw > s.mask_keep_above).to(torch.float32)[None]
            elif s.mask_shape != "file":
                top, bottom, left, right = hole_box(s, *clean.shape[-2:])  # type: ignore[misc]
                mask = torch.ones(1, *clean.shape[-2:], dtype=torch.float32)
                mask[:, top:bottom, left:right] = 0.0
            else:
                if not self.mask_path:
                    raise ValueError("DIP inpainting needs a mask image: set task.mask_path=<file> (white = known)")
                m = Image.open(self.mask_path).convert("L")
                if m.size != (clean.shape[-1], clean.shape[-2]):
                    m = m.resize((clean.shape[-1], clean.shape[-2]), Image.Resampling.NEAREST)
                mask = torch.from_numpy((np.asarray(m) > 127).astype(np.float32))[None]
            return clean * mask, mask, clean, clean * mask
        raise ValueError(f"DIP task {task!r} is not available in train.py (flash_no_flash needs two images)")

    def start_observed(
        self,
        ids: Sequence[str],
        observation: Tensor,
        mask: Tensor | None = None,
        clean: Tensor | None = None,
        shown: Tensor | None = None,
        seeds: Sequence[int] | None = None,
        net_input: Tensor | None = None,
        perturbations: Callable[[int], Tensor] | None = None,
    ) -> None:
        """Starts B images from their observations, cast once to the run's dtype on the module's
        device: their nets, z, forward model, EMA and backtracking state, and a fresh schedule.

        Args:
            ids: the images' ids.
            observation: [B, C, h, w] in [0, 1]: the noisy / JPEG / no-flash / gray image, the
                LR image (SR; the output is h·f × w·f), or the image to inpaint (masked or not).
            mask: [B or 1, 1 or C, H, W], 1 = known (inpainting and restoration only).
            clean: [B, C, H, W] ground truth for the PSNRs and metrics, or None.
            shown: the observation shown next to the result (observation.png); None: observation.
            seeds: one per image; None: the run's seed for every image. The net and z of an image
                are built under ``torch.manual_seed(seed)`` in the notebook's order (net then z;
                SR: z then net), in float32, without touching the global RNG.
            net_input: [B, C', H, W] fixed network input for ``input_type='image'`` (flash image).
            perturbations: the source of ε, called as ``perturbations(step)`` and returning
                [B, C', H, W] (any float dtype; cast to the run's). It must be a function of the
                step: ``result()`` calls it again for the last step. None: seeded draws
                (``drawn_perturbation``). Used to replay recorded perturbations (TRACES_F64.md).
        """
        settings, task = self.settings, self.settings.task
        if task not in TASKS:
            raise ValueError(f"unknown DIP task {task!r}; expected one of {', '.join(TASKS)}")
        if observation.ndim != 4:
            raise ValueError(f"observation must be [B, C, H, W], got shape {tuple(observation.shape)}")
        if settings.backtracking not in ("off", "denoising", "restoration"):
            raise ValueError(f"backtracking must be off, denoising or restoration, got {settings.backtracking!r}")
        if settings.final_input not in ("perturbed", "saved"):
            raise ValueError(f"final_input must be perturbed or saved, got {settings.final_input!r}")
        b, c, h, w = observation.shape
        if len(ids) != b:
            raise ValueError(f"got {len(ids)} ids for {b} images")
        if settings.optimizer == "lbfgs" and b > 1:
            raise InvalidSettingError(f"dip.optimizer=lbfgs fits one image at a time, got a batch of {b} "
                                      "(L-BFGS couples all its parameters); use trainer.batch_size=1")
        device, dtype = self.device, self.dtype
        factor = settings.sr_factor if task == "super_resolution" else 1
        out_h, out_w = h * factor, w * factor
        self.seeds = [self.seed] * b if seeds is None else [int(s) for s in seeds]
        if len(self.seeds) != b:
            raise ValueError(f"got {len(self.seeds)} seeds for {b} images")

        if task in _MASKED_TASKS:
            if mask is None:
                raise ValueError(f"task {task!r} needs a mask (1 = known pixel)")
            if mask.ndim != 4 or mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, b):
                raise ValueError(f"mask must be [B or 1, 1 or C, {h}, {w}], got {tuple(mask.shape)}")
        elif mask is not None:
            raise ValueError(f"task {task!r} takes no mask")
        if clean is not None and tuple(clean.shape) != (b, c, out_h, out_w):
            raise ValueError(f"clean must be [{b}, {c}, {out_h}, {out_w}], got {tuple(clean.shape)}")
        if settings.input_type == "image":
            if net_input is None or net_input.shape[0] != b or net_input.shape[-2:] != (out_h, out_w):
                raise ValueError(f"input_type 'image' needs net_input of shape [{b}, C, {out_h}, {out_w}]")
            in_channels = net_input.shape[1]
        else:
            if net_input is not None:
                raise ValueError("net_input is only used with input_type 'image'")
            in_channels = settings.input_depth
        check_input_size(out_h, out_w, settings, in_channels)

        # The one cast to the run's dtype (PSNRs compare in float64 anyway, SPEC §7.4).
        def cast(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.detach().to(device, dtype).clone()

        self.ids = list(ids)
        self.register_buffer("observation", cast(observation))
        self.register_buffer("mask", cast(mask))
        self.register_buffer("clean", cast(clean))
        self.register_buffer("shown", cast(shown if shown is not None else observation))
        self.register_buffer("output_ema", None)
        self.perturbations = perturbations
        self.hole = hole_box(settings, h, w)  # scored separately by metrics()

        # Nets and z, built on the CPU under each image's seed (SPEC §3.6: same seed, same
        # initial weights as the reference), in the notebook's order (_Z_BEFORE_NET_TASKS).
        # Weights and a noise z are drawn in float32 in every run (see the module docstring);
        # a meshgrid z and Lanczos kernels are computed, so a float64 run gets them unrounded.
        def draw_z() -> Tensor | None:
            if settings.input_type == "image":
                return None
            z = get_noise(settings.input_depth, settings.input_type, (out_h, out_w), settings.input_noise_type,
                          settings.input_var, dtype=torch.float32 if settings.input_type == "noise" else dtype)
            return z.to(dtype)

        built: dict[int, tuple[nn.Module, Tensor | None]] = {}
        for s in dict.fromkeys(self.seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                z_first = task in _Z_BEFORE_NET_TASKS
                z = draw_z() if z_first else None
                net = to_dtype(settings.build_net(in_channels, c, dtype=torch.float32), dtype)
                if not z_first:
                    z = draw_z()
            built[s] = (net, z)
        self.nets = StackedNets([built[s][0] for s in self.seeds], settings.batched_forward).to(device)
        if net_input is None:
            net_input = torch.cat([built[s][1] for s in self.seeds])  # type: ignore[misc]
        # net_input_saved of the notebooks: fixed with OPT_OVER 'net'; with 'net,input' a
        # per-image parameter ([B, C', H, W]) that Adam / L-BFGS update (make_optimizer).
        for registry in (self._buffers, self._parameters):
            registry.pop("net_input_saved", None)
        if settings.opt_over == "net,input":
            self.register_parameter("net_input_saved", nn.Parameter(cast(net_input)))
        else:
            self.register_buffer("net_input_saved", cast(net_input))
        self.lbfgs = None

        if task == "super_resolution":
            # The model's forward operator: Lanczos2 (phase 0.5, replication pad), fixed. The
            # observation itself was made with PIL's Lanczos3, a deliberate mismatch (SPEC §5.2).
            # Built in the run's dtype: a float64 run uses the unrounded kernel (TRACES_F64.md).
            self.downsampler = Downsampler(c, factor, settings.sr_kernel, phase=0.5, preserve_size=True,
                                           dtype=dtype).requires_grad_(False).to(device)
        else:
            self.downsampler = None
        # colorization's forward model: mGANprior's luma, copied to 3 channels
        self.gray = Gray(MGANPRIOR_GRAY_WEIGHTS, value_range=(0.0, 1.0)) if task == "colorization" else None

        # Backtracking state per image (SPEC §8.1): the reference's counter i (it does not advance
        # on a fall-back), the PSNR at the last checkpoint and the checkpointed parameters.
        self.register_buffer("iteration", torch.zeros(b, dtype=torch.long, device=device))
        self.register_buffer("psnr_last", torch.zeros(b, dtype=torch.float64, device=device))
        self.register_buffer("fall_back", torch.zeros(b, dtype=torch.bool, device=device))
        self._snapshot_names = []
        for index, p in enumerate(self.nets.parameters()):
            self.register_buffer(f"snapshot_{index}", p.detach().clone())
            self._snapshot_names.append(f"snapshot_{index}")
        self._generators: dict[str, torch.Generator] = {}
        self.step_count = 0  # steps taken: the index of the next step's ε
        self.last_output: Tensor | None = None
        self.progress = Progress(self.stage_lengths(), b)

    @property
    def snapshot(self) -> list[Tensor]:
        """The last checkpointed parameters (stacked, one tensor per network parameter)."""
        return [getattr(self, name) for name in self._snapshot_names]

    @torch.no_grad()
    def load_initial_state(self, index: int, state_dict: Mapping[str, Tensor] | None = None,
                           net_input: Tensor | None = None) -> None:
        """Replaces image ``index``'s initial weights and/or its fixed input z before the fit.

        ``state_dict`` is in the reference's format (``skip(...).state_dict()``, SPEC §3.5; BN
        running buffers are ignored), ``net_input`` is z as [1, C', H, W] or [C', H, W]. Both are
        cast to the run's dtype. Used to start from recorded values (TRACES_F64.md's
        ``init_state_dict`` and ``net_input``) instead of this image's seeded draws.
        """
        if self.step_count > 0:
            raise RuntimeError("the initial state can only be replaced before the first step")
        if not 0 <= index < self.batch_size:
            raise IndexError(f"image index {index} out of range for {self.batch_size} images")
        if state_dict is not None:
            self.nets.load_state_dict_for(index, state_dict)
            # The backtracking snapshot starts as the initial weights.
            for snap, p in zip(self.snapshot, self.nets.parameters()):
                snap[index].copy_(p[index])
        if net_input is not None:
            row = self.net_input_saved[index]
            if tuple(net_input.shape) not in (tuple(row.shape), (1, *row.shape)):
                raise ValueError(f"net_input must be [1, {', '.join(map(str, row.shape))}], "
                                 f"got {tuple(net_input.shape)}")
            row.copy_(net_input.reshape(row.shape))

    # ============================================================== results
    @torch.no_grad()
    def result(self) -> tuple[Tensor, Tensor | None]:
        """(output, output_ema): a final train-mode forward, as the notebooks' last cell.

        Denoising, SR and restoration re-run the net on the global ``net_input``, which the
        closure overwrote with the last *perturbed* input; inpainting's closure perturbs a local
        copy, so its final input is z itself (settings.final_input, SPEC §8.1, §8.4). Outputs
        are not clipped (the notebooks clip only to save/plot). output_ema is None without EMA.
        """
        if self.settings.final_input == "perturbed" and self.step_count > 0:
            z = self.network_input(self.step_count - 1)
        else:
            z = self.net_input_saved
        return self.nets(z), self.output_ema

    def final_output(self) -> Tensor:
        """The EMA (the result DIP reports, SPEC §8.1), else the last output; the last output
        is kept for result_last_iterate.png."""
        out, ema = self.result()
        self.last_output = out.detach()
        final = (ema if ema is not None else out).detach()
        if self.settings.task == "colorization" and self.clean is not None:
            # As mGANprior's colorization result: the target's Y with the output's CbCr.
            final = ycbcr_recombine(final.clamp(0, 1), self.clean)
        return final

    def display(self, x: Tensor) -> Tensor:
        return x.detach().clamp(0, 1)  # in the run's dtype; the PNG writer quantises

    def observation_for_display(self) -> Tensor:
        return self.shown

    def clean_for_display(self) -> Tensor | None:
        return self.clean

    @torch.no_grad()
    def metrics(self, x: Tensor | None) -> dict[str, Tensor]:  # type: ignore[override]
        """PSNR of the result against the ground truth; SSIM (``ssim_data_range``) and the hole's
        PSNR/SSIM for the DIP columns of the DGP and mGANprior tables (the notebooks report
        PSNR only)."""
        if self.clean is None or x is None:
            return {}
        clean, result = self.clean, x.clamp(0, 1)
        data_range = float(self.settings.ssim_data_range)
        out = {"psnr": psnr(result, clean)}
        if min(clean.shape[-2:]) >= 7:
            out["ssim"] = ssim(result, clean, data_range=data_range)
        if self.hole is not None:
            top, bottom, left, right = self.hole
            crop_r, crop_c = result[..., top:bottom, left:right], clean[..., top:bottom, left:right]
            out["psnr_hole"] = psnr(crop_r, crop_c)
            out["ssim_hole"] = ssim(crop_r, crop_c, data_range=data_range)
        return out

    def extra_images(self, x: Tensor, b: int) -> dict[str, Tensor]:
        if self.last_output is None:
            return {}
        return {"result_last_iterate": self.last_output[b].clamp(0, 1)}

    @torch.no_grad()
    def observation_metrics(self, b: int) -> dict[str, float]:
        clean, shown = self.clean, self.shown
        if clean is None or shown.shape != clean.shape:
            return {}
        out = {"observation_psnr": float(psnr(shown[b : b + 1], clean[b : b + 1])[0])}
        if self.settings.task == "super_resolution":
            # The DIP paper's "bicubic" row: PIL bicubic upsampling of the LR image (the SR
            # notebook's baseline); observation_psnr above is the nearest-neighbour one.
            # Values k/255 in any dtype: * 255 and round give back the uint8 LR image exactly.
            lr = self.observation[b].detach().cpu().clamp(0, 1)
            lr_img = Image.fromarray((lr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            bicubic = sr_baselines(lr_img, (clean.shape[-1], clean.shape[-2]))["bicubic"]
            out["bicubic_psnr"] = float(psnr(bicubic[None].to(clean.dtype), clean[b : b + 1].cpu())[0])
        return out

    def image_info(self, b: int) -> dict[str, Any]:
        return {"fell_back_steps": None}

    def extra_repr(self) -> str:
        return f"images={self.batch_size}, dtype={self.dtype}, settings={asdict(self.settings)}"


def unit_range(image: Tensor) -> Tensor:
    """A loaded image ([-1, 1] float32, u8 / 255 normalised) as the notebooks' ``pil_to_np``
    gives it: u8 / 255 in float32, bit for bit.

    Mapping back with (x + 1) / 2 is one ulp off for 63 of the 256 values, so the 8-bit values
    are recovered first (exactly: they are within 1e-5 of integers after the scaling).
    """
    u8 = ((image.to(torch.float32) + 1) * 127.5).round().clamp(0, 255)
    return u8 / 255


def hole_box(settings: DIPConfig, height: int, width: int) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of inpainting's generated hole (``mask_shape``), None for a
    mask file and the other tasks."""
    if settings.task != "inpainting" or settings.mask_shape == "file":
        return None
    if settings.mask_shape == "dgp_center_hole":
        return center_hole_box(height, width)
    if settings.mask_shape == "center_square":
        return CenterSquareMask(int(settings.hole_size)).metric_box(height, width)
    raise ValueError(f"dip.mask_shape must be one of {', '.join(MASK_SHAPES)}, got {settings.mask_shape!r}")


# ---------------------------------------------------------------------------------------------
# Image preparation (SPEC §7.1, §7.2, §8)
# ---------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> Image.Image:
    """PIL image, mode unchanged (grayscale stays 'L'), no resize — as ``get_image(path, -1)``."""
    img = Image.open(path)
    img.load()
    return img


def pil_to_tensor(img: Image.Image) -> Tensor:
    """C×H×W float32 in [0, 1] as uint8 / 255 (grayscale → 1×H×W; SPEC §1)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 255.0)


def crop_box(width: int, height: int, d: int = 32, rounding: str = "floor") -> tuple[int, ...]:
    """Centre-crop box (left, top, right, bottom) to multiples of d (SPEC §7.1).

    'floor' is ``crop_image``; 'round' is the SR loader, whose half-margins go through Python's
    round-half-even (only the offset differs, and only for margins ≡ 3 mod 4).
    """
    new_w, new_h = width - width % d, height - height % d
    if new_w == 0 or new_h == 0:
        raise ValueError(f"a {width}×{height} (W×H) image has no crop to multiples of {d}")
    if rounding == "floor":
        return (
            (width - new_w) // 2,
            (height - new_h) // 2,
            (width + new_w) // 2,
            (height + new_h) // 2,
        )
    if rounding == "round":
        left, top = round((width - new_w) / 2), round((height - new_h) / 2)
        return (left, top, left + new_w, top + new_h)
    raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")


def crop_to_multiple(img: Image.Image, d: int = 32, rounding: str = "floor") -> Image.Image:
    """Centre crop of a PIL image to multiples of d (SPEC §7.1)."""
    return img.crop(crop_box(img.size[0], img.size[1], d, rounding))


def crop_tensor_to_multiple(x: Tensor, d: int = 32) -> Tensor:
    """Centre crop of a […, H, W] tensor to multiples of d, with ``crop_image``'s offsets."""
    h, w = x.shape[-2:]
    left, top, right, bottom = crop_box(w, h, d)
    return x[..., top:bottom, left:right]


def sr_pair(img: Image.Image, factor: int, d: int = 32) -> tuple[Image.Image, Image.Image]:
    """(HR, LR) as ``load_LR_HR_imgs_sr(…, 'CROP')``: HR centre-cropped to multiples of d, LR the
    PIL Lanczos (= the removed ANTIALIAS) resize to (W // f, H // f) (SPEC §7.2). Convert LR with
    ``pil_to_tensor`` to get the uint8-quantised observation of the notebooks."""
    hr = crop_to_multiple(img, d, rounding="round")
    lr = hr.resize((hr.size[0] // factor, hr.size[1] // factor), Image.Resampling.LANCZOS)
    return hr, lr


def sr_baselines(lr: Image.Image, size: tuple[int, int]) -> dict[str, Tensor]:
    """``get_baselines`` of the SR notebook (SPEC §7.2): PIL bicubic and nearest upsampling of
    the LR image to ``size`` = (W, H), and bicubic + UnsharpMask(2, 150, 3), as C×H×W tensors."""
    bicubic = lr.resize(size, Image.Resampling.BICUBIC)
    return {
        "bicubic": pil_to_tensor(bicubic),
        "nearest": pil_to_tensor(lr.resize(size, Image.Resampling.NEAREST)),
        "sharp": pil_to_tensor(bicubic.filter(ImageFilter.UnsharpMask(2, 150, 3))),
    }


def put_in_center(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Pastes […, h, w] into a zero canvas of size (H, W) at offset floor((H−h)/2) (SPEC §7.2)."""
    h, w = x.shape[-2:]
    out = x.new_zeros((*x.shape[:-2], *size))
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    out[..., top : top + h, left : left + w] = x
    return out


def noisy_observation(
    clean: Tensor, sigma: float = 25.0 / 255.0, generator: torch.Generator | None = None
) -> Tensor:
    """clip(x + N(0, σ²), 0, 1), drawn and added in float64, not re-quantised to 8 bits, rounded
    to float32 as ``get_noisy_image`` does (SPEC §8.1), returned in ``clean``'s dtype: for a
    float64 ``clean`` this is the float64 run's observation (TRACES_F64.md, dtype rules)."""
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64) * sigma
    noisy = (clean.double() + noise.to(clean.device)).clamp(0, 1)
    return noisy.to(torch.float32).to(clean.dtype)


def bernoulli_mask(
    height: int, width: int, keep_above: float, generator: torch.Generator | None = None
) -> Tensor:
    """1×H×W mask, 1 (known) where a U[0,1) draw exceeds ``keep_above`` (SPEC §8.5).

    The reference draws with an unseeded numpy RNG; here the draw is torch's, seeded by the
    caller. One mask is shared by all channels, as in both restoration recipes.
    """
    return (torch.rand((1, height, width), generator=generator) > keep_above).float()


def check_input_size(height: int, width: int, settings: DIPConfig, in_channels: int | None = None) -> None:
    """Raise ValueError when the network of ``settings`` cannot map an H×W input to an H×W
    output (SPEC §3.3: sizes must survive every ↓2 and ↑2; reflection pads need room).

    The skip network's size is computed (``skip_output_size``); the other types are run once on
    the meta device (no weights drawn, no compute) with ``in_channels`` (default input_depth).
    """
    if settings.net_type != "skip":
        channels = settings.input_depth if in_channels is None else in_channels
        with torch.device("meta"):
            net = settings.build_net(channels, 3)
        try:
            out = net_output_size(net, channels, height, width)
        except ValueError as err:
            raise ValueError(f"DIP's {settings.net_type} network: {err}") from None
        if out != (height, width):
            raise ValueError(
                f"DIP's {settings.net_type} network maps a {height}×{width} (H×W) image to {out[0]}×{out[1]}; "
                f"crop H and W to a multiple its downsampling survives (dip.crop_multiple)")
        return
    levels = len(settings.num_channels_down)
    multiple = 2**levels
    advice = (
        f"crop H and W to multiples of {max(multiple, settings.crop_multiple)} "
        f"(genprior.methods.dip.crop_to_multiple; the DIP notebooks crop to multiples of "
        f"{settings.crop_multiple})"
    )
    kwargs = settings.skip_kwargs(1, 1)

    def output_size(h: int, w: int) -> tuple[int, int]:
        return skip_output_size_for(h, w, kwargs)

    try:
        out = output_size(height, width)
    except ValueError as err:
        smallest = multiple
        while smallest < 64 * multiple:  # the smallest square multiple the net accepts
            try:
                output_size(smallest, smallest)
                break
            except ValueError:
                smallest += multiple
        raise ValueError(
            f"DIP's {levels}-level skip network cannot take a {height}×{width} (H×W) image: "
            f"{err}; the smallest square input it takes is {smallest}×{smallest}; {advice}"
        ) from None
    if out != (height, width):
        raise ValueError(
            f"DIP's {levels}-level skip network maps a {height}×{width} (H×W) image to "
            f"{out[0]}×{out[1]}, so its output cannot be compared with the image; {advice}"
        )


def _expand(flags: Tensor, like: Tensor) -> Tensor:
    return flags.view(-1, *([1] * (like.ndim - 1)))
