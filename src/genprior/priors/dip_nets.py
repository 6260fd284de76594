"""Deep Image Prior networks: the ``skip`` encoder-decoder and the pieces it is built from.

Everything here follows the DIP SPEC (``shared/reference/dip/SPEC.md``, written from the
reference repository DmitryUlyanov/deep-image-prior at 042e0d4). The module tree reproduces the
reference's ``state_dict`` key names (SPEC §3.5), so the parity fixtures load with
``strict=True``, and conv layers are created in the reference order (SPEC §3.6), so a given
``torch.manual_seed`` gives the reference's initial weights.

Two ways to run the network:

* ``skip(...)`` returns an ordinary ``nn.Module`` for one image (batch 1, train-mode BN: the
  reference never calls ``eval()``; SPEC §1).
* ``StackedNets`` runs B independent copies of one architecture with *stacked* parameters
  (leading image dimension) through ``torch.func.functional_call`` + ``torch.vmap``, so every
  image sees exactly what a batch-1 network would see (BN statistics of its own image).

Builders take an optional ``dtype`` (PyTorch's factory argument; None is the default dtype, as
in the reference). ``skip(..., dtype=torch.float64)`` under ``torch.manual_seed(s)`` draws the
very weights of the reference run with ``torch.set_default_dtype(torch.float64)``, the setting
of the float64 traces (TRACES_F64.md); float32 and float64 draws of one seed differ.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genprior.errors import InvalidSettingError

__all__ = [
    "Concat",
    "Downsampler",
    "StackedNets",
    "Swish",
    "act",
    "bn",
    "conv",
    "get_kernel",
    "get_noise",
    "skip",
    "skip_kwargs_from",
    "skip_output_size",
    "skip_output_size_for",
    "to_dtype",
    "tv_loss",
]

# ---------------------------------------------------------------------------------------------
# Lanczos / Gaussian / box downsampler (SPEC §5)
# ---------------------------------------------------------------------------------------------

# kernel_type -> (underlying kernel, kernel_width as a function of factor, support, sigma)
_KERNEL_PRESETS: dict[str, tuple[str, Any, float | None, float | None]] = {
    "lanczos2": ("lanczos", lambda f: 4 * f + 1, 2.0, None),
    "lanczos3": ("lanczos", lambda f: 6 * f + 1, 3.0, None),
    "gauss12": ("gauss", lambda f: 7, None, 0.5),
    "gauss1sq2": ("gauss", lambda f: 9, None, 1.0 / math.sqrt(2.0)),
}


def get_kernel(
    factor: int,
    kernel_type: str,
    phase: float,
    kernel_width: int,
    support: float | None = None,
    sigma: float | None = None,
) -> np.ndarray:
    """The 2-D resampling kernel of the DIP Downsampler, float64, normalised to sum 1 (SPEC §5.1).

    ``kernel_type`` is the *underlying* type here ('lanczos', 'gauss' or 'box'); the named
    presets ('lanczos2', …) are resolved by :class:`Downsampler`.
    """
    if phase not in (0, 0.5):
        raise ValueError(f"phase must be 0 or 0.5, got {phase}")
    if kernel_type == "box":
        if phase != 0.5:
            raise ValueError("the box kernel exists only with phase 0.5")
        kernel = np.full((kernel_width, kernel_width), 1.0 / (kernel_width * kernel_width))
    elif kernel_type == "gauss":
        if sigma is None or phase == 0.5:
            raise ValueError("the gauss kernel needs sigma and phase 0")
        centre = (kernel_width + 1.0) / 2.0
        # The reference halves the distances (SPEC §5.1, Gaussian variant).
        d = (np.arange(1, kernel_width + 1) - centre) / 2.0
        sq = d[:, None] ** 2 + d[None, :] ** 2
        kernel = np.exp(-sq / (2.0 * sigma * sigma)) / (2.0 * np.pi * sigma * sigma)
    elif kernel_type == "lanczos":
        if support is None:
            raise ValueError("the lanczos kernel needs a support")
        size = kernel_width - 1 if phase == 0.5 else kernel_width
        centre = (kernel_width + 1.0) / 2.0
        t = np.arange(1, size + 1, dtype=np.float64)
        # Phase 0.5 puts the taps at half-integer offsets, symmetric about the kernel centre.
        d = np.abs(t + 0.5 - centre) / factor if phase == 0.5 else np.abs(t - centre) / factor
        with np.errstate(divide="ignore", invalid="ignore"):
            taps = support * np.sin(np.pi * d) * np.sin(np.pi * d / support) / (np.pi**2 * d * d)
        taps = np.where(d == 0, 1.0, taps)
        # Element (i, j) is 1 · L(d_i) · L(d_j), the product the reference forms per element.
        kernel = taps[:, None] * taps[None, :]
    else:
        raise ValueError(f"unknown kernel type {kernel_type!r} (lanczos, gauss, box)")
    return kernel / kernel.sum()


class Downsampler(nn.Module):
    """DIP's fixed-kernel downsampler (SPEC §5): a full ``Conv2d(n_planes → n_planes)`` with the
    kernel on the plane-to-plane diagonal, stride ``factor``, optional replication padding.

    The conv is an ordinary ``Conv2d`` child named ``downsampler_`` with trainable weight and
    bias, exactly as in the reference: inside a ``skip`` network (downsample_mode 'lanczos2')
    its weights are part of ``net.parameters()`` and Adam trains them (SPEC §2.1, quirk). As
    the SR forward model, freeze it (``requires_grad_(False)``).
    """

    def __init__(
        self,
        n_planes: int,
        factor: int,
        kernel_type: str,
        phase: float = 0,
        kernel_width: int | None = None,
        support: float | None = None,
        sigma: float | None = None,
        preserve_size: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_type in _KERNEL_PRESETS:
            base, width_of, support, sigma = _KERNEL_PRESETS[kernel_type]
            kernel_width = width_of(factor)
        elif kernel_type in ("lanczos", "gauss", "box"):
            base = kernel_type
            if kernel_width is None:
                raise ValueError(f"kernel_type {kernel_type!r} needs an explicit kernel_width")
        else:
            raise ValueError(
                f"unknown kernel_type {kernel_type!r}; expected one of "
                f"{[*_KERNEL_PRESETS, 'lanczos', 'gauss', 'box']}"
            )
        self.factor = factor
        self.kernel = get_kernel(factor, base, phase, kernel_width, support, sigma)
        k = self.kernel.shape[0]
        # Creating the Conv2d draws its default init from the global RNG before the weights are
        # overwritten; that draw is part of the reference construction order (SPEC §3.6).
        self.downsampler_ = nn.Conv2d(
            n_planes, n_planes, kernel_size=k, stride=factor, padding=0, dtype=dtype
        )
        self.write_kernel_()
        # Odd kernels pad symmetrically by (K−1)/2; even (phase 0.5) kernels by (K−f)/2, so
        # output pixel j is centred on input block [j·f, j·f + f − 1] (SPEC §5.2).
        self.pad = ((k - 1) // 2 if k % 2 == 1 else (k - factor) // 2) if preserve_size else 0
        self.preserve_size = preserve_size

    @torch.no_grad()
    def write_kernel_(self) -> None:
        """(Re)writes the float64 kernel onto the plane-to-plane diagonal, zero elsewhere and a
        zero bias, rounded once to the conv's current dtype.

        The reference casts the kernel to its Conv2d's dtype: float32 in the notebooks (SPEC
        §5.2), float64 — unrounded — in a float64 run (TRACES_F64.md). Call it after casting a
        freshly built downsampler (``to_dtype`` does), because casting a float32 conv to
        float64 would keep the float32-rounded kernel.
        """
        weight = self.downsampler_.weight
        weight.zero_()
        self.downsampler_.bias.zero_()
        kernel = torch.from_numpy(self.kernel).to(weight.dtype)
        for p in range(weight.shape[0]):
            weight[p, p] = kernel

    def forward(self, x: Tensor) -> Tensor:
        if self.preserve_size:
            x = F.pad(x, (self.pad,) * 4, mode="replicate")
        return self.downsampler_(x)


# ---------------------------------------------------------------------------------------------
# Building blocks (SPEC §2)
# ---------------------------------------------------------------------------------------------


class Swish(nn.Module):
    """x · sigmoid(x) (SPEC §2.3)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


def act(act_fun: str | type[nn.Module] = "LeakyReLU") -> nn.Module:
    """Activation by name (SPEC §2.3); a module class is instantiated without arguments."""
    if not isinstance(act_fun, str):
        return act_fun()
    if act_fun == "LeakyReLU":
        return nn.LeakyReLU(0.2, inplace=True)  # slope 0.2, not PyTorch's 0.01
    if act_fun == "Swish":
        return Swish()
    if act_fun == "ELU":
        return nn.ELU()
    if act_fun == "none":
        return nn.Sequential()
    raise ValueError(f"unknown activation {act_fun!r} (LeakyReLU, Swish, ELU, none)")


def bn(num_features: int, dtype: torch.dtype | None = None) -> nn.BatchNorm2d:
    """PyTorch-default BatchNorm2d (SPEC §2.2)."""
    return nn.BatchNorm2d(num_features, dtype=dtype)


def conv(
    in_f: int,
    out_f: int,
    kernel_size: int,
    stride: int = 1,
    bias: bool = True,
    pad: str = "zero",
    downsample_mode: str = "stride",
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """[pad] → Conv2d → [downsampler], children numbered from "0" (SPEC §2.1)."""
    downsampler: nn.Module | None = None
    if stride != 1 and downsample_mode != "stride":
        if downsample_mode == "avg":
            downsampler = nn.AvgPool2d(stride, stride)
        elif downsample_mode == "max":
            downsampler = nn.MaxPool2d(stride, stride)
        elif downsample_mode in ("lanczos2", "lanczos3"):
            # Built before the Conv2d: its own Conv2d's init draw comes first (SPEC §3.6).
            downsampler = Downsampler(
                out_f, stride, downsample_mode, phase=0.5, preserve_size=True, dtype=dtype
            )
        else:
            raise ValueError(
                f"unknown downsample_mode {downsample_mode!r} (stride, avg, max, lanczos2, lanczos3)"
            )
        stride = 1  # the conv runs at full resolution and the pool follows it
    to_pad = (kernel_size - 1) // 2
    layers: list[nn.Module] = []
    if pad == "reflection":
        # Created even for p = 0 (1×1 convs): a no-op that shifts the child indices (SPEC §3.5).
        layers.append(nn.ReflectionPad2d(to_pad))
        to_pad = 0
    # Any other pad string behaves like zero padding, as in the reference.
    layers.append(
        nn.Conv2d(in_f, out_f, kernel_size, stride, padding=to_pad, bias=bias, dtype=dtype)
    )
    if downsampler is not None:
        layers.append(downsampler)
    return nn.Sequential(*layers)


class Concat(nn.Module):
    """Runs every branch on the same input and concatenates along ``dim``, centre-cropping all
    outputs to the smallest H and W when their sizes differ (SPEC §2.4)."""

    def __init__(self, dim: int, *branches: nn.Module) -> None:
        super().__init__()
        self.dim = dim
        for index, branch in enumerate(branches):
            self.add_module(str(index), branch)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self._modules.values()]
        heights = [o.shape[-2] for o in outs]
        widths = [o.shape[-1] for o in outs]
        if len(set(heights)) > 1 or len(set(widths)) > 1:
            h, w = min(heights), min(widths)
            outs = [
                o[
                    ...,
                    (o.shape[-2] - h) // 2 : (o.shape[-2] - h) // 2 + h,
                    (o.shape[-1] - w) // 2 : (o.shape[-1] - w) // 2 + w,
                ]
                for o in outs
            ]
        return torch.cat(outs, dim=self.dim)


def _append(container: nn.Sequential, module: nn.Module) -> None:
    # The reference's monkey-patched Module.add names children by 1-based position (SPEC §2.6).
    container.add_module(str(len(container) + 1), module)


def _per_level(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but the network has {n} levels")
        return list(value)
    return [value] * n


def _upsample(mode: str) -> nn.Upsample:
    if mode == "bilinear":
        # align_corners=False: the current reference and the fixtures (SPEC §2.5).
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    if mode == "nearest":
        return nn.Upsample(scale_factor=2, mode="nearest")
    raise ValueError(f"unknown upsample_mode {mode!r} (nearest, bilinear)")


# skip()'s arguments that a method's config section sets under the same names; those in
# _SKIP_PER_LEVEL are lists of one value (every level) or one value per level.
_SKIP_SETTINGS = (
    "num_channels_down", "num_channels_up", "num_channels_skip", "filter_size_down",
    "filter_size_up", "filter_skip_size", "need_sigmoid", "need_bias", "pad", "upsample_mode",
    "downsample_mode", "act_fun", "need1x1_up",
)
_SKIP_PER_LEVEL = ("filter_size_down", "filter_size_up", "upsample_mode", "downsample_mode")


def skip_kwargs_from(settings: Any, num_input_channels: int, num_output_channels: int,
                     section: str) -> dict[str, Any]:
    """Keyword arguments of :func:`skip` from a config section (``dip``, ``inversion``) whose
    fields carry skip's argument names; a field the section lacks keeps skip's default. A
    per-level list of one value is repeated for every level; any other length but the number
    of levels is refused (the message names ``<section>.<field>``)."""
    n = len(settings.num_channels_down)
    kwargs: dict[str, Any] = {"num_input_channels": num_input_channels,
                              "num_output_channels": num_output_channels}
    for name in _SKIP_SETTINGS:
        if not hasattr(settings, name):
            continue
        value = getattr(settings, name)
        if name in _SKIP_PER_LEVEL:
            value = list(value)
            if len(value) == 1:
                value = value * n
            elif len(value) != n:
                raise InvalidSettingError(f"{section}.{name} needs 1 or {n} values, got {len(value)}")
        elif name.startswith("num_channels_"):
            value = list(value)
        kwargs[name] = value
    return kwargs


# ---------------------------------------------------------------------------------------------
# The skip network (SPEC §3)
# ---------------------------------------------------------------------------------------------


def skip(
    num_input_channels: int = 2,
    num_output_channels: int = 3,
    num_channels_down: Sequence[int] = (16, 32, 64, 128, 128),
    num_channels_up: Sequence[int] = (16, 32, 64, 128, 128),
    num_channels_skip: Sequence[int] = (4, 4, 4, 4, 4),
    filter_size_down: int | Sequence[int] = 3,
    filter_size_up: int | Sequence[int] = 3,
    filter_skip_size: int = 1,
    need_sigmoid: bool = True,
    need_bias: bool = True,
    pad: str = "zero",
    upsample_mode: str | Sequence[str] = "nearest",
    downsample_mode: str | Sequence[str] = "stride",
    act_fun: str | type[nn.Module] = "LeakyReLU",
    need1x1_up: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """The DIP encoder-decoder with skip connections; arguments and defaults as the reference
    ``models/skip.py`` (SPEC §3.1). All skip channels 0 gives the paper's "hourglass".

    ``dtype``: the dtype the weights are created (and drawn) in; None is the default dtype.
    """
    n = len(num_channels_down)
    if not (len(num_channels_up) == len(num_channels_skip) == n):
        raise ValueError(
            "num_channels_down, num_channels_up and num_channels_skip must have the same length, "
            f"got {n}, {len(num_channels_up)}, {len(num_channels_skip)}"
        )
    n_d, n_u, n_s = list(num_channels_down), list(num_channels_up), list(num_channels_skip)
    up_modes = _per_level(upsample_mode, n, "upsample_mode")
    down_modes = _per_level(downsample_mode, n, "downsample_mode")
    k_down = _per_level(filter_size_down, n, "filter_size_down")
    k_up = _per_level(filter_size_up, n, "filter_size_up")

    net = nn.Sequential()
    level = net  # container of the current level; level 0 is the network itself
    c_in = num_input_channels
    for i in range(n):
        deepest = i == n - 1
        deeper = nn.Sequential()
        skip_branch = nn.Sequential()
        _append(level, Concat(1, skip_branch, deeper) if n_s[i] > 0 else deeper)
        # Channels coming back from below: the next level's decoder width, or at the deepest
        # level the encoder width (no decoder below it).
        k_below = n_d[i] if deepest else n_u[i + 1]
        # BN after the concat has no activation (SPEC §9.2).
        _append(level, bn(n_s[i] + k_below, dtype))

        # Conv creation order: skip, down, second encoder, decoder k_u, decoder 1×1 — all of
        # level i before anything of level i+1 (SPEC §3.6).
        if n_s[i] > 0:
            _append(
                skip_branch,
                conv(c_in, n_s[i], filter_skip_size, bias=need_bias, pad=pad, dtype=dtype),
            )
            _append(skip_branch, bn(n_s[i], dtype))
            _append(skip_branch, act(act_fun))

        _append(deeper, conv(c_in, n_d[i], k_down[i], 2, need_bias, pad, down_modes[i], dtype))
        _append(deeper, bn(n_d[i], dtype))
        _append(deeper, act(act_fun))
        _append(deeper, conv(n_d[i], n_d[i], k_down[i], bias=need_bias, pad=pad, dtype=dtype))
        _append(deeper, bn(n_d[i], dtype))
        _append(deeper, act(act_fun))
        below = nn.Sequential()
        if not deepest:
            _append(deeper, below)  # filled by the next iteration
        # upsample_mode[i] brings level i+1's output back to level i's resolution.
        _append(deeper, _upsample(up_modes[i]))

        _append(level, conv(n_s[i] + k_below, n_u[i], k_up[i], 1, need_bias, pad, dtype=dtype))
        _append(level, bn(n_u[i], dtype))
        _append(level, act(act_fun))
        if need1x1_up:
            _append(level, conv(n_u[i], n_u[i], 1, bias=need_bias, pad=pad, dtype=dtype))
            _append(level, bn(n_u[i], dtype))
            _append(level, act(act_fun))

        c_in = n_d[i]
        level = below

    _append(net, conv(n_u[0], num_output_channels, 1, bias=need_bias, pad=pad, dtype=dtype))
    if need_sigmoid:
        _append(net, nn.Sigmoid())
    return net


def to_dtype(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A freshly built network cast to ``dtype`` (in place), its Lanczos downsamplers' kernels
    rewritten from float64 so that a float64 network holds the unrounded kernel, as the
    reference's float64 run does (TRACES_F64.md). For untrained networks only: the kernels
    inside a ``skip`` are trainable (SPEC §2.1) and would be reset."""
    net.to(dtype)
    for module in net.modules():
        if isinstance(module, Downsampler):
            module.write_kernel_()
    return net


# The ``skip`` kwargs that decide its output size (skip_output_size's parameters).
SKIP_SIZE_KEYS = ("num_channels_skip", "filter_size_down", "filter_size_up", "filter_skip_size", "pad",
                  "downsample_mode", "need1x1_up")


def skip_output_size_for(height: int, width: int, kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """:func:`skip_output_size` of the network ``skip(**kwargs)`` builds (other kwargs ignored)."""
    return skip_output_size(height, width, **{k: kwargs[k] for k in SKIP_SIZE_KEYS if k in kwargs})


def skip_output_size(
    height: int,
    width: int,
    num_channels_skip: Sequence[int],
    filter_size_down: int | Sequence[int] = 3,
    filter_size_up: int | Sequence[int] = 3,
    filter_skip_size: int = 1,
    pad: str = "zero",
    downsample_mode: str | Sequence[str] = "stride",
    need1x1_up: bool = True,
) -> tuple[int, int]:
    """Output (H, W) of a ``skip`` network for an input of (height, width), without running it.

    Follows SPEC §3.3: stride convs map L → ceil(L/2), avg/max/Lanczos pools L → floor(L/2),
    the decoder doubles, a Concat crops to the smaller branch. Raises ValueError when reflection
    padding would need a pad ≥ the feature size (the reference fails there too), which is what
    makes 32×32 too small for 5 levels of 3×3 convs.
    """
    n = len(num_channels_skip)
    k_down = _per_level(filter_size_down, n, "filter_size_down")
    k_up = _per_level(filter_size_up, n, "filter_size_up")
    down_modes = _per_level(downsample_mode, n, "downsample_mode")

    def conv_len(length: int, k: int, stride: int, where: str) -> int:
        p = (k - 1) // 2
        if pad == "reflection" and p >= length:
            raise ValueError(
                f"the {where} sees a {length}-pixel-wide feature map, too small for its "
                f"{k}×{k} reflection padding"
            )
        out = (length + 2 * p - k) // stride + 1
        if out < 1:
            raise ValueError(f"the {where} would produce an empty feature map")
        return out

    def pool_len(length: int, mode: str) -> int:
        if mode in ("avg", "max"):
            return length // 2
        if mode in ("lanczos2", "lanczos3"):
            a = 2 if mode == "lanczos2" else 3
            taps, p = 4 * a, 3 * a  # kernel 2·a·f and pad (K − f)/2 for factor 2
            return (length + 2 * p - taps) // 2 + 1
        raise ValueError(f"unknown downsample_mode {mode!r}")

    def level_len(i: int, length: int) -> int:
        if down_modes[i] == "stride":
            deeper = conv_len(length, k_down[i], 2, f"level-{i} down conv")
        else:
            deeper = pool_len(conv_len(length, k_down[i], 1, f"level-{i} down conv"), down_modes[i])
        if deeper < 1:
            raise ValueError(f"level {i} downsampling leaves an empty feature map")
        deeper = conv_len(deeper, k_down[i], 1, f"level-{i} second encoder conv")
        if i < n - 1:
            deeper = level_len(i + 1, deeper)
        deeper *= 2
        if num_channels_skip[i] > 0:
            deeper = min(deeper, conv_len(length, filter_skip_size, 1, f"level-{i} skip conv"))
        out = conv_len(deeper, k_up[i], 1, f"level-{i} decoder conv")
        if need1x1_up:
            out = conv_len(out, 1, 1, f"level-{i} 1×1 conv")
        return out

    return level_len(0, height), level_len(0, width)


# ---------------------------------------------------------------------------------------------
# Network input and TV loss (SPEC §6, §7.3)
# ---------------------------------------------------------------------------------------------


def get_noise(
    input_depth: int,
    method: str,
    spatial_size: int | tuple[int, int],
    noise_type: str = "u",
    var: float = 1.0 / 10,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The DIP network input z, shape 1×input_depth×H×W (SPEC §6).

    'noise': U[0, 1) ('u') or N(0, 1) ('n') times ``var`` — so the default z is U(0, 0.1), not
    centred — drawn in ``dtype`` (None: the default dtype, as the reference's ``torch.zeros``;
    float32 and float64 draws differ). 'meshgrid': 2 channels, x = j/(W−1) then y = i/(H−1),
    built in float64 and rounded to ``dtype`` (None: float32, the notebooks' cast).
    ``spatial_size`` is (H, W); an int means square.
    """
    h, w = (spatial_size, spatial_size) if isinstance(spatial_size, int) else spatial_size
    if method == "noise":
        shape = (1, input_depth, h, w)
        if noise_type == "u":
            z = torch.rand(shape, generator=generator, dtype=dtype)
        elif noise_type == "n":
            z = torch.randn(shape, generator=generator, dtype=dtype)
        else:
            raise ValueError(f"unknown noise_type {noise_type!r} (u, n)")
        return z * var
    if method == "meshgrid":
        if input_depth != 2:
            raise ValueError(f"the meshgrid input has 2 channels, got input_depth={input_depth}")
        xs = np.arange(w, dtype=np.float64) / max(w - 1, 1)
        ys = np.arange(h, dtype=np.float64) / max(h - 1, 1)
        grid = np.stack(
            [np.broadcast_to(xs[None, :], (h, w)), np.broadcast_to(ys[:, None], (h, w))]
        )
        return torch.from_numpy(grid[None]).to(dtype or torch.float32)
    raise ValueError(f"unknown input method {method!r} (noise, meshgrid)")


def tv_loss(x: Tensor, beta: float = 0.5) -> Tensor:
    """Sum-reduced TV^β over an N×C×H×W tensor (SPEC §7.3): squared horizontal and vertical
    differences, both cropped to (H−1)×(W−1), added, raised to β, summed (not averaged)."""
    dh = (x[..., :-1, 1:] - x[..., :-1, :-1]) ** 2
    dv = (x[..., 1:, :-1] - x[..., :-1, :-1]) ** 2
    return torch.sum((dh + dv) ** beta)


# ---------------------------------------------------------------------------------------------
# B independent networks with stacked parameters
# ---------------------------------------------------------------------------------------------


def _strip_running_stats(module: nn.Module) -> None:
    # Batched path: BN always normalises with the image's own statistics (train mode, as in
    # every notebook, SPEC §1); running statistics are never read, so they are dropped rather
    # than updated in place under vmap.
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


class StackedNets(nn.Module):
    """B independent copies of one network, parameters stacked along a leading image dimension.

    ``forward(z)`` with z of shape [B, C, H, W] runs image b through copy b as a batch of one
    (``torch.func.functional_call`` with image b's slices), so BatchNorm uses the statistics of
    that image only, exactly like the reference's batch-1 train-mode forward. Execution modes
    (same results up to float rounding):

    * 'vmap': ``torch.vmap`` over the images — every conv becomes one grouped convolution.
    * 'loop': a Python loop over the images on views of the stacked tensors (``unbind``; its
      backward stacks the B gradients in one op).
    * 'auto' (default): 'loop' on CPU, 'vmap' on CUDA. On CPU, grouped-conv backward is slow:
      vmap measured 2.6× slower than the loop for B = 4 at 128² with 128 channels, 1.4× with
      32 channels (docs/dip.md). The CUDA choice is not measured yet.

    The stacked tensors are registered parameters (``parameters()`` yields one leaf per
    reference parameter, of shape [B, *shape]), so one ``torch.optim.Adam`` over them is B
    independent Adams: its update is element-wise and all images step together.

    BatchNorm running statistics are not kept here (they never influence a train-mode output).
    ``state_dict_for(b)`` rebuilds a reference-format state_dict for image b, with the template's
    running buffers.
    """

    def __init__(self, nets: Sequence[nn.Module], mode: str = "auto") -> None:
        super().__init__()
        if mode not in ("auto", "vmap", "loop"):
            raise ValueError(f"mode must be auto, vmap or loop, got {mode!r}")
        self.mode = mode
        if not nets:
            raise ValueError("StackedNets needs at least one network")
        template = nets[0]
        self._names = [name for name, _ in template.named_parameters()]
        for net in nets[1:]:
            if [name for name, _ in net.named_parameters()] != self._names:
                raise ValueError("all networks must have the same architecture")
        self.params = nn.ParameterList(
            nn.Parameter(torch.stack([dict(net.named_parameters())[name].detach() for net in nets]))
            for name in self._names
        )
        self._template_buffers = {k: v.detach().clone() for k, v in template.named_buffers()}
        base = copy.deepcopy(template).train()
        _strip_running_stats(base)
        # Kept out of the module tree on purpose: its own weights are placeholders (the stacked
        # ones are supplied by functional_call), and they must not reach the optimiser.
        self.__dict__["_base"] = base.requires_grad_(False)

    @classmethod
    def replicate(cls, net: nn.Module, num_images: int, mode: str = "auto") -> StackedNets:
        """B copies of the same initial weights."""
        return cls([net] * num_images, mode)

    @property
    def num_images(self) -> int:
        return self.params[0].shape[0]

    def stacked(self) -> dict[str, Tensor]:
        """Reference parameter name → stacked tensor [B, *shape]."""
        return dict(zip(self._names, self.params))

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[0] != self.num_images:
            raise ValueError(f"expected {self.num_images} inputs, got a batch of {z.shape[0]}")
        base = self.__dict__["_base"]
        if next(base.parameters(), torch.empty(0)).device != z.device:
            base.to(z.device)  # placeholder weights only follow the device for functional_call

        mode = self.mode
        if mode == "auto":
            mode = "vmap" if z.is_cuda else "loop"
        if mode == "loop" or self.num_images == 1:
            # B = 1 needs no batching at all: plain functional_call on the only slice.
            slices = [p.unbind(0) for p in self.params]
            outs = [
                torch.func.functional_call(
                    base, {name: s[b] for name, s in zip(self._names, slices)}, (z[b : b + 1],)
                )
                for b in range(self.num_images)
            ]
            return torch.cat(outs)

        def one_image(params: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(base, params, (x.unsqueeze(0),)).squeeze(0)

        return torch.vmap(one_image)(self.stacked(), z)

    @torch.no_grad()
    def load_state_dict_for(self, index: int, state_dict: Mapping[str, Tensor]) -> None:
        """Loads a reference-format state_dict (e.g. ``skip(...).state_dict()``, or recorded
        initial weights) into image ``index``'s slices, cast to the stacked dtype; the inverse
        of ``state_dict_for``. Keys must be exactly the template's. BatchNorm running buffers
        are checked by name and otherwise ignored: they never reach a train-mode output."""
        expected = [*self._names, *self._template_buffers]
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in set(expected)]
        if missing or unexpected:
            raise KeyError(
                f"state_dict does not fit the network: missing {missing}, unexpected {unexpected}"
            )
        for name, p in self.stacked().items():
            value = state_dict[name]
            if tuple(value.shape) != tuple(p.shape[1:]):
                raise ValueError(
                    f"{name}: expected shape {tuple(p.shape[1:])}, got {tuple(value.shape)}"
                )
            p[index].copy_(value)

    def state_dict_for(self, index: int) -> dict[str, Tensor]:
        """A reference-format state_dict of image ``index`` (loads into ``skip(...)`` strictly)."""
        out = {k: v.clone() for k, v in self._template_buffers.items()}
        for name, p in self.stacked().items():
            out[name] = p[index].detach().clone()
        return out
