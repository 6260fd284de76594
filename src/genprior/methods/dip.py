"""Deep Image Prior: the notebooks' optimisation loop for a batch of B images (pure torch).

One ``DIPMethod`` fits B images at once, each with its own randomly initialised ``skip``
network (stacked parameters, see ``genprior.priors.dip.StackedNets``) and its own fixed input z.
Per step and per image, as in the reference notebooks (SPEC §6, §8):

1. the input is z + reg_noise_std · ε with a fresh ε ~ N(0, 1) (z itself never changes);
2. the output x = f(z̃) goes through the task's forward model A — identity (denoising, JPEG,
   flash/no-flash), the mask (inpainting, restoration) or the Lanczos2 downsampler (SR);
3. the loss is the mean squared error between A(x) and the observation (+ tv_weight · TV(x));
4. an exponential moving average of the outputs is kept (denoising and JPEG only);
5. backtracking: when the PSNR of A(x) against the observation drops by more than 5 dB from the
   last checkpoint, the last checkpoint's parameters are restored (denoising, restoration).

A LightningModule drives it like this (one ``training_step`` = one Adam step of all B images)::

    method = DIPMethod(settings, task, observation, mask=mask, clean=clean, seed=0)
    optimizer = torch.optim.Adam(method.parameters(), lr=method.lr_for_step(0))
    # training_step:           loss, logs = method.step_loss(step)   → Lightning backward
    # on_before_optimizer_step: method.before_optimizer_step()       (backtracking restore)
    # at the end:              output, output_ema = method.result()

``fit_step`` runs those three calls in order for a plain loop, ``run`` the whole fit.

Precision: everything (nets, z, observation, mask, forward model, loss, EMA) runs in the
observation's dtype, float32 or float64 (``trainer.precision=64-true``; docs/faithfulness.md).
Random draws (weights, z, ε) are made in float32 whatever that dtype, then cast exactly, so a
float64 run starts from the numbers of the float32 run of the same seed. To replay recorded
values instead (the float64 traces of the original, TRACES_F64.md), pass ``perturbations`` and
call ``load_initial_state`` before the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor, nn

from genprior.degradations import MGANPRIOR_GRAY_WEIGHTS, Gray
from genprior.priors.dip import (
    Downsampler,
    StackedNets,
    get_noise,
    skip,
    skip_output_size,
    to_dtype,
    tv_loss,
)

__all__ = [
    "PRESETS",
    "TASKS",
    "DIPMethod",
    "DIPSettings",
    "bernoulli_mask",
    "check_input_size",
    "crop_box",
    "crop_tensor_to_multiple",
    "crop_to_multiple",
    "load_image",
    "load_preset",
    "noisy_observation",
    "pil_to_tensor",
    "psnr",
    "put_in_center",
    "sr_baselines",
    "sr_pair",
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


@dataclass
class DIPSettings:
    """Hyperparameters of one DIP run; field names are the reference's where it has them.

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
        """Keyword arguments of ``genprior.priors.dip.skip`` for this run."""
        n = len(self.num_channels_down)

        def levels(values: list, name: str) -> list:
            if len(values) == 1:
                return list(values) * n
            if len(values) != n:
                raise ValueError(f"{name} needs 1 or {n} values, got {len(values)}")
            return list(values)

        return {
            "num_input_channels": num_input_channels,
            "num_output_channels": num_output_channels,
            "num_channels_down": list(self.num_channels_down),
            "num_channels_up": list(self.num_channels_up),
            "num_channels_skip": list(self.num_channels_skip),
            "filter_size_down": levels(self.filter_size_down, "filter_size_down"),
            "filter_size_up": levels(self.filter_size_up, "filter_size_up"),
            "filter_skip_size": self.filter_skip_size,
            "need_sigmoid": self.need_sigmoid,
            "need_bias": self.need_bias,
            "pad": self.pad,
            "upsample_mode": levels(self.upsample_mode, "upsample_mode"),
            "downsample_mode": levels(self.downsample_mode, "downsample_mode"),
            "act_fun": self.act_fun,
            "need1x1_up": self.need1x1_up,
        }


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
    "restoration_barbara",
    "restoration_kate",
    "flash_no_flash",
)


def load_preset(name: str, **overrides) -> DIPSettings:
    """``DIPSettings`` from ``configs/task/dip_<name>.yaml`` (key ``dip:``), then overrides.

    Unknown keys fail loudly (OmegaConf structured merge).
    """
    from omegaconf import OmegaConf

    if name not in PRESETS:
        raise ValueError(f"unknown DIP preset {name!r}; available: {', '.join(PRESETS)}")
    text = (
        resources.files("genprior.configs")
        .joinpath("task")
        .joinpath(f"dip_{name}.yaml")
        .read_text()
    )
    merged = OmegaConf.merge(
        OmegaConf.structured(DIPSettings), OmegaConf.create(text).dip, overrides
    )
    return OmegaConf.to_object(merged)


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


def psnr(reference: Tensor, estimate: Tensor) -> Tensor:
    """Per-image PSNR [B] with data range 1, MSE over all channels and pixels in float64 —
    ``skimage.measure.compare_psnr`` on [0, 1] float images as the notebooks use it (SPEC §7.4)."""
    diff = reference.detach().double() - estimate.detach().double()
    mse = diff.square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def check_input_size(height: int, width: int, settings: DIPSettings) -> None:
    """Raise ValueError when the skip network of ``settings`` cannot map an H×W input to an H×W
    output (SPEC §3.3: sizes must survive every ↓2 and ↑2; reflection pads need room)."""
    levels = len(settings.num_channels_down)
    multiple = 2**levels
    advice = (
        f"crop H and W to multiples of {max(multiple, settings.crop_multiple)} "
        f"(genprior.methods.dip.crop_to_multiple; the DIP notebooks crop to multiples of "
        f"{settings.crop_multiple})"
    )
    kwargs = settings.skip_kwargs(1, 1)
    names = (
        "num_channels_skip",
        "filter_size_down",
        "filter_size_up",
        "filter_skip_size",
        "pad",
        "downsample_mode",
        "need1x1_up",
    )

    def output_size(h: int, w: int) -> tuple[int, int]:
        return skip_output_size(h, w, *(kwargs[name] for name in names))

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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _step_seed(seed: int, step: int) -> int:
    # ε of a step depends only on (image seed, step): results do not depend on the batch an
    # image lands in, and a resumed run draws the same perturbations.
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, step]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class DIPMethod(nn.Module):
    """DIP fit of B images: per-image ``skip`` networks, fixed inputs, loss, EMA, backtracking.

    Args:
        settings: hyperparameters (``load_preset`` gives the SPEC's recipes).
        task: one of ``TASKS``; None takes ``settings.task``.
        observation: [B, C, h, w] in [0, 1] — the noisy / JPEG / no-flash image, the LR image
            (SR; the output is h·f × w·f), or the image to inpaint (masked or not).
        mask: [B or 1, 1 or C, H, W], 1 = known (inpainting and restoration only).
        clean: [B, C, H, W] ground truth for PSNR logging, or None.
        seed: one seed for every image (then an image's result does not depend on its batch) or
            one per image. The net and z of an image are built under ``torch.manual_seed(seed)``
            in the notebook's order (net then z; SR: z then net), in float32, without
            touching the global RNG.
        net_input: [B, C', H, W] fixed network input for ``input_type='image'`` (flash image).
        perturbations: the source of ε, called as ``perturbations(step)`` and returning
            [B, C', H, W] (any float dtype; cast to the run's). It must be a function of the
            step: ``result()`` calls it again for the last step. None: seeded draws
            (``drawn_perturbation``). Used to replay recorded perturbations (TRACES_F64.md).

    The run's dtype is the observation's (float32 or float64): mask, clean image, nets, z, the
    SR downsampler, losses and the EMA follow it. ``parameters()`` are the stacked network
    parameters (one Adam over them = B Adams).
    """

    def __init__(
        self,
        settings: DIPSettings,
        task: str | None,
        observation: Tensor,
        mask: Tensor | None = None,
        clean: Tensor | None = None,
        seed: int | Sequence[int] = 0,
        net_input: Tensor | None = None,
        perturbations: Callable[[int], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.task = task = task or settings.task
        if task not in TASKS:
            raise ValueError(f"unknown DIP task {task!r}; expected one of {', '.join(TASKS)}")
        if observation.ndim != 4:
            raise ValueError(
                f"observation must be [B, C, H, W], got shape {tuple(observation.shape)}"
            )
        if settings.backtracking not in ("off", "denoising", "restoration"):
            raise ValueError(
                f"backtracking must be off, denoising or restoration, got {settings.backtracking!r}"
            )
        if settings.final_input not in ("perturbed", "saved"):
            raise ValueError(
                f"final_input must be perturbed or saved, got {settings.final_input!r}"
            )
        if observation.dtype not in DTYPES:
            raise ValueError(
                f"DIP runs in float32 or float64; the observation is {observation.dtype}"
            )
        b, c, h, w = observation.shape
        device, dtype = observation.device, observation.dtype
        factor = settings.sr_factor if task == "super_resolution" else 1
        out_h, out_w = h * factor, w * factor
        check_input_size(out_h, out_w, settings)

        seeds = [int(seed)] * b if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != b:
            raise ValueError(f"got {len(seeds)} seeds for {b} images")
        self.seeds = seeds

        if task in _MASKED_TASKS:
            if mask is None:
                raise ValueError(f"task {task!r} needs a mask (1 = known pixel)")
            if mask.ndim != 4 or mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, b):
                raise ValueError(
                    f"mask must be [B or 1, 1 or C, {h}, {w}], got {tuple(mask.shape)}"
                )
            mask = mask.to(device, dtype)
        elif mask is not None:
            raise ValueError(f"task {task!r} takes no mask")
        if clean is not None and tuple(clean.shape) != (b, c, out_h, out_w):
            raise ValueError(
                f"clean must be [{b}, {c}, {out_h}, {out_w}], got {tuple(clean.shape)}"
            )
        if clean is not None:
            clean = clean.to(device, dtype)  # PSNRs compare in float64 anyway (SPEC §7.4)

        # Nets and z, built on the CPU under each image's seed (SPEC §3.6: same seed, same
        # initial weights as the reference), in the notebook's order (_Z_BEFORE_NET_TASKS).
        # Weights and a noise z are drawn in float32 in every run (see the module docstring);
        # a meshgrid z and Lanczos kernels are computed, so a float64 run gets them unrounded.
        if settings.input_type == "image":
            if (
                net_input is None
                or net_input.shape[0] != b
                or net_input.shape[-2:] != (out_h, out_w)
            ):
                raise ValueError(
                    f"input_type 'image' needs net_input of shape [{b}, C, {out_h}, {out_w}]"
                )
            in_channels = net_input.shape[1]
        else:
            if net_input is not None:
                raise ValueError("net_input is only used with input_type 'image'")
            in_channels = settings.input_depth
        kwargs = settings.skip_kwargs(in_channels, c)

        def draw_z() -> Tensor | None:
            if settings.input_type == "image":
                return None
            z = get_noise(
                settings.input_depth,
                settings.input_type,
                (out_h, out_w),
                settings.input_noise_type,
                settings.input_var,
                dtype=torch.float32 if settings.input_type == "noise" else dtype,
            )
            return z.to(dtype)

        built: dict[int, tuple[nn.Module, Tensor | None]] = {}
        for s in dict.fromkeys(seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                z_first = task in _Z_BEFORE_NET_TASKS
                z = draw_z() if z_first else None
                net = to_dtype(skip(**kwargs, dtype=torch.float32), dtype)
                if not z_first:
                    z = draw_z()
            built[s] = (net, z)
        self.nets = StackedNets([built[s][0] for s in seeds], settings.batched_forward)
        self.nets.to(device)
        if net_input is None:
            net_input = torch.cat([built[s][1] for s in seeds])
        # net_input_saved of the notebooks: never modified, never optimised (OPT_OVER = 'net').
        self.register_buffer("net_input_saved", net_input.detach().to(device, dtype).clone())
        self.perturbations = perturbations
        self.register_buffer("observation", observation.detach().clone())
        self.register_buffer("mask", None if mask is None else mask.detach().clone())
        self.register_buffer("clean", None if clean is None else clean.detach().clone())
        self.register_buffer("output_ema", None)

        if task == "super_resolution":
            # The model's forward operator: Lanczos2 (phase 0.5, replication pad), fixed. The
            # observation itself was made with PIL's Lanczos3 — a deliberate mismatch (SPEC §5.2).
            # Built in the run's dtype: a float64 run uses the unrounded kernel (TRACES_F64.md).
            self.downsampler = (
                Downsampler(
                    c, factor, settings.sr_kernel, phase=0.5, preserve_size=True, dtype=dtype
                )
                .requires_grad_(False)
                .to(device)
            )
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
        self.last_step = -1
        self._generators: dict[str, torch.Generator] = {}

    # --- pieces --------------------------------------------------------------------------

    @property
    def snapshot(self) -> list[Tensor]:
        """The last checkpointed parameters (stacked, one tensor per network parameter)."""
        return [getattr(self, name) for name in self._snapshot_names]

    @property
    def num_images(self) -> int:
        return self.observation.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the whole fit: the observation's (float32 or float64)."""
        return self.observation.dtype

    @torch.no_grad()
    def load_initial_state(
        self,
        index: int,
        state_dict: Mapping[str, Tensor] | None = None,
        net_input: Tensor | None = None,
    ) -> None:
        """Replaces image ``index``'s initial weights and/or its fixed input z before the fit.

        ``state_dict`` is in the reference's format (``skip(...).state_dict()``, SPEC §3.5; BN
        running buffers are ignored), ``net_input`` is z as [1, C', H, W] or [C', H, W]. Both are
        cast to the run's dtype. Used to start from recorded values (TRACES_F64.md's
        ``init_state_dict`` and ``net_input``) instead of this image's seeded draws.
        """
        if self.last_step >= 0:
            raise RuntimeError("the initial state can only be replaced before the first step")
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range for {self.num_images} images")
        if state_dict is not None:
            self.nets.load_state_dict_for(index, state_dict)
            # The backtracking snapshot starts as the initial weights.
            for snap, p in zip(self.snapshot, self.nets.parameters()):
                snap[index].copy_(p[index])
        if net_input is not None:
            row = self.net_input_saved[index]
            if tuple(net_input.shape) not in (tuple(row.shape), (1, *row.shape)):
                raise ValueError(
                    f"net_input must be [1, {', '.join(map(str, row.shape))}], "
                    f"got {tuple(net_input.shape)}"
                )
            row.copy_(net_input.reshape(row.shape))

    def lr_for_step(self, step: int) -> float:
        """Constant learning rate: no notebook uses a schedule (SPEC §7.5)."""
        return self.settings.lr

    def parameters_groups(self) -> list[dict]:
        """One optimizer group with the stacked network parameters (z is never optimised)."""
        return [{"params": list(self.nets.parameters()), "lr": self.settings.lr}]

    def make_optimizer(self) -> torch.optim.Adam:
        """Adam with the notebooks' defaults: betas (0.9, 0.999), eps 1e-8, no weight decay."""
        return torch.optim.Adam(self.parameters_groups(), lr=self.settings.lr)

    def perturbation(self, step: int) -> Tensor:
        """ε of this step, [B, C, H, W], in the run's dtype: from ``perturbations`` when given,
        else ``drawn_perturbation``."""
        z = self.net_input_saved
        if self.perturbations is None:
            return self.drawn_perturbation(step).to(z.dtype)
        eps = self.perturbations(step)
        if tuple(eps.shape) != tuple(z.shape):
            raise ValueError(
                f"perturbations({step}) has shape {tuple(eps.shape)}, expected {tuple(z.shape)}"
            )
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
            gen.manual_seed(_step_seed(self.seeds[0], step))
            eps[:1].normal_(generator=gen)
            eps[1:] = eps[:1]
            return eps
        for b, s in enumerate(self.seeds):
            gen.manual_seed(_step_seed(s, step))
            eps[b].normal_(generator=gen)
        return eps

    def network_input(self, step: int) -> Tensor:
        """z̃ = z + σ_p·ε at this step (z itself when reg_noise_std = 0).

        The notebooks' ``net_input_saved + (noise.normal_() * reg_noise_std)``: the product
        first, then the sum (the same rounding).
        """
        if self.settings.reg_noise_std > 0:
            return self.net_input_saved + self.perturbation(step) * self.settings.reg_noise_std
        return self.net_input_saved

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

    # --- one optimisation step -----------------------------------------------------------

    def step_loss(self, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward of all B images; returns (sum of per-image losses, per-image logs [B]).

        The sum gives every image exactly its own gradient (independent parameters). Also
        updates the EMA and decides backtracking; a decided fall-back is applied by
        ``before_optimizer_step`` (it must come after backward, see there).
        """
        s = self.settings
        self.last_step = step
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

        logs: dict[str, Tensor] = {"loss": loss.detach()}
        # PSNR against the observation: psrn_noisy / psnr_LR / psrn_masked of the notebooks.
        logs["psnr_observed"] = psnr(target, degraded)
        if self.clean is not None:
            logs["psnr_gt"] = psnr(self.clean, detached)
            if self.output_ema is not None:
                logs["psnr_gt_ema"] = psnr(self.clean, self.output_ema)
        logs["fell_back"] = self._decide_backtracking(logs["psnr_observed"]).to(loss.dtype)
        return loss.sum(), logs

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

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Applies the fall-backs decided in ``step_loss``: after backward, before Adam's step.

        This reproduces the reference order exactly: its closure restores the snapshot after
        ``loss.backward()`` and returns, then Adam steps — so the gradient computed at the bad
        parameters is applied on top of the restored ones, and Adam's moments are not rewound
        (SPEC §8.1). Restoring before backward is impossible (the graph holds the parameters).
        """
        if self.settings.backtracking == "off" or not bool(self.fall_back.any()):
            return
        for snap, p in zip(self.snapshot, self.nets.parameters()):
            p.copy_(torch.where(_expand(self.fall_back, p), snap, p))

    def fit_step(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Tensor]:
        """zero_grad → step_loss → backward → before_optimizer_step → Adam step."""
        optimizer.zero_grad(set_to_none=True)
        loss, logs = self.step_loss(step)
        loss.backward()
        self.before_optimizer_step()
        optimizer.step()
        return logs

    def run(self, num_iter: int | None = None, log_every: int = 0) -> list[dict[str, Tensor]]:
        """The whole fit with a fresh Adam; returns the logs of every ``log_every``-th step."""
        optimizer = self.make_optimizer()
        history = []
        for step in range(self.settings.num_iter if num_iter is None else num_iter):
            logs = self.fit_step(optimizer, step)
            if log_every and (step % log_every == 0):
                history.append({"step": torch.tensor(step), **logs})
        return history

    @torch.no_grad()
    def result(self) -> tuple[Tensor, Tensor | None]:
        """(output, output_ema): a final train-mode forward, as the notebooks' last cell.

        Denoising, SR and restoration re-run the net on the global ``net_input``, which the
        closure overwrote with the last *perturbed* input; inpainting's closure perturbs a local
        copy, so its final input is z itself (settings.final_input, SPEC §8.1, §8.4). Outputs
        are not clipped (the notebooks clip only to save/plot). output_ema is None without EMA.
        """
        if self.settings.final_input == "perturbed" and self.last_step >= 0:
            z = self.network_input(self.last_step)
        else:
            z = self.net_input_saved
        return self.nets(z), self.output_ema

    def extra_repr(self) -> str:
        return f"task={self.task}, images={self.num_images}, settings={asdict(self.settings)}"


def _expand(flags: Tensor, like: Tensor) -> Tensor:
    return flags.view(-1, *([1] * (like.ndim - 1)))
