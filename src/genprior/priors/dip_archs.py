"""Deep Image Prior's other networks: UNet, ResNet, texture_nets, the library notebook's
hourglasses, and ``get_net``, the dispatcher over all of them.

The ``skip`` network and the blocks everything is built from live in ``dip_nets``; this module
sits on top of it (DIP SPEC §4, reference ``models/`` at 042e0d4). Module trees keep the
reference's child names, so a network's ``state_dict`` keys are the reference's, and conv
layers are created in the reference's order, so a seed gives the reference's initial weights.

Every network here runs in ``dip_nets.StackedNets`` (B independent copies through
``functional_call``): BatchNorm in train mode and InstanceNorm normalise with the statistics of
one image, as a batch-1 reference forward does.

Where the reference cannot run (SPEC §4) this module does what it meant and says so:

* ``get_net('ResNet')`` passes its positional arguments in the wrong slots (the BatchNorm class
  lands in ``act_fun``); here the arguments go where their names say (see ``get_net``).
* ``UNet(more_layers > 1)`` refers to an undefined attribute; here the extra levels are
  unwound from the deepest up, as the code intends.
* ``texture_nets`` computes a float padding (Python 3 ``/``); here it is ``(k - 1) // 2``.
* ``ResidualSequential``'s crop (never needed: its convs keep the size) uses float indices;
  here integer ones.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from genprior.priors.dip_nets import Concat, act, conv, skip

__all__ = [
    "LIBRARY_WIDTHS",
    "NET_TYPES",
    "ResNet",
    "UNet",
    "activation_maximization_net",
    "feature_inversion_net",
    "get_net",
    "hourglass",
    "net_output_size",
    "norm_layer",
    "texture_nets",
]

# get_net's types; 'skip_depthN' stands for skip_depth1 … skip_depth6 (the library notebook).
NET_TYPES = ("skip", "skip_depthN", "UNet", "ResNet", "texture_nets", "identity")
# Encoder/decoder widths of the inpainting-library hourglasses, level 0 first (SPEC §8.4).
LIBRARY_WIDTHS = (16, 32, 64, 128, 128, 128)


def norm_layer(name: str | None, num_features: int, affine: bool | None = None,
               dtype: torch.dtype | None = None) -> nn.Module | None:
    """'batch' (BatchNorm2d), 'instance' (InstanceNorm2d) or None/'none' (no layer).

    ``affine`` None keeps PyTorch's default (True for BatchNorm, False for InstanceNorm, as the
    reference's ``norm_layer(C)``); ResNet passes ``affine=True`` as the reference does.
    """
    if name in (None, "none"):
        return None
    kwargs = {} if affine is None else {"affine": affine}
    if name == "batch":
        return nn.BatchNorm2d(num_features, dtype=dtype, **kwargs)
    if name == "instance":
        return nn.InstanceNorm2d(num_features, dtype=dtype, **kwargs)
    raise ValueError(f"unknown norm {name!r} (batch, instance, none)")


def _present(*modules: nn.Module | None) -> list[nn.Module]:
    return [m for m in modules if m is not None]  # a norm of 'none' is left out


# ---------------------------------------------------------------------------------------------
# UNet (reference models/unet.py)
# ---------------------------------------------------------------------------------------------


class _DoubleConv(nn.Module):
    """``unetConv2``: two (3×3 conv → [norm] → ReLU), children ``conv1`` and ``conv2``."""

    def __init__(self, in_size: int, out_size: int, norm: str | None, need_bias: bool, pad: str,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        for name, c_in in (("conv1", in_size), ("conv2", out_size)):
            self.add_module(name, nn.Sequential(*_present(
                conv(c_in, out_size, 3, bias=need_bias, pad=pad, dtype=dtype),
                norm_layer(norm, out_size, dtype=dtype), nn.ReLU())))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class _Down(nn.Module):
    """``unetDown``: MaxPool 2 then a double conv (children ``conv``, ``down``)."""

    def __init__(self, in_size: int, out_size: int, norm: str | None, need_bias: bool, pad: str,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        self.conv = _DoubleConv(in_size, out_size, norm, need_bias, pad, dtype)
        self.down = nn.MaxPool2d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.down(x))


class _Up(nn.Module):
    """``unetUp``: ×2 (4×4/2 transposed conv, or Upsample + 3×3 conv), concatenation with the
    encoder feature (centre-cropped to the upsampled size), a double conv without norm."""

    def __init__(self, out_size: int, upsample_mode: str, need_bias: bool, pad: str,
                 same_num_filt: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        num_filt = out_size if same_num_filt else out_size * 2
        if upsample_mode == "deconv":
            # bias=True whatever need_bias says, as the reference's ConvTranspose2d.
            self.up: nn.Module = nn.ConvTranspose2d(num_filt, out_size, 4, stride=2, padding=1, dtype=dtype)
        elif upsample_mode in ("bilinear", "nearest"):
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode=upsample_mode),
                                    conv(num_filt, out_size, 3, bias=need_bias, pad=pad, dtype=dtype))
        else:
            raise ValueError(f"unknown UNet upsample_mode {upsample_mode!r} (deconv, bilinear, nearest)")
        self.conv = _DoubleConv(out_size * 2, out_size, None, need_bias, pad, dtype)

    def forward(self, deeper: Tensor, encoder: Tensor) -> Tensor:
        up = self.up(deeper)
        h, w = up.shape[-2:]
        top, left = (encoder.shape[-2] - h) // 2, (encoder.shape[-1] - w) // 2
        return self.conv(torch.cat([up, encoder[..., top : top + h, left : left + w]], 1))


class UNet(nn.Module):
    """The reference ``UNet`` (SPEC §4): widths [64, 128, 256, 512, 1024] // feature_scale, a
    double-conv start, four MaxPool downs (+ ``more_layers`` at the widest width), as many ups
    with skip concatenation, a 1×1 output conv and an optional sigmoid. ReLU throughout.

    ``norm``: 'instance' (the reference default), 'batch' (get_net's) or 'none'; ``concat_x``
    appends avg-pooled copies of the input to every encoder level; ``pad`` 'zero' or
    'reflection'. H and W must be multiples of 2^(4 + more_layers) for the output to have the
    input's size (max pooling floors, the decoder doubles).
    """

    def __init__(self, num_input_channels: int = 3, num_output_channels: int = 3, feature_scale: int = 4,
                 more_layers: int = 0, concat_x: bool = False, upsample_mode: str = "deconv",
                 pad: str = "zero", norm: str | None = "instance", need_sigmoid: bool = True,
                 need_bias: bool = True, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.more_layers = more_layers
        self.concat_x = concat_x
        f = [w // feature_scale for w in (64, 128, 256, 512, 1024)]
        cut = num_input_channels if concat_x else 0  # room for the pooled input at every level

        def down(c_in: int, c_out: int) -> _Down:
            return _Down(c_in, c_out - cut, norm, need_bias, pad, dtype)

        # Creation order = the reference's (its initial weights under a seed).
        self.start = _DoubleConv(num_input_channels, f[0] - cut, norm, need_bias, pad, dtype)
        self.down1, self.down2, self.down3, self.down4 = (down(f[k], f[k + 1]) for k in range(4))
        if more_layers > 0:
            self.more_downs = nn.ModuleList(down(f[4], f[4]) for _ in range(more_layers))
            self.more_ups = nn.ModuleList(
                _Up(f[4], upsample_mode, need_bias, pad, same_num_filt=True, dtype=dtype) for _ in range(more_layers)
            )
        self.up4, self.up3, self.up2, self.up1 = (
            _Up(f[k], upsample_mode, need_bias, pad, dtype=dtype) for k in (3, 2, 1, 0)
        )
        final = conv(f[0], num_output_channels, 1, bias=need_bias, pad=pad, dtype=dtype)
        self.final = nn.Sequential(final, nn.Sigmoid()) if need_sigmoid else final

    def forward(self, x: Tensor) -> Tensor:
        pooled = [x]
        if self.concat_x:
            for _ in range(4 + self.more_layers):
                pooled.append(nn.functional.avg_pool2d(pooled[-1], 2, 2))

        def with_input(feature: Tensor, level: int) -> Tensor:
            return torch.cat([feature, pooled[level]], 1) if self.concat_x else feature

        encoder = [with_input(self.start(x), 0)]
        for level, block in enumerate((self.down1, self.down2, self.down3, self.down4), start=1):
            encoder.append(with_input(block(encoder[-1]), level))
        if self.more_layers > 0:
            for k, block in enumerate(self.more_downs):
                encoder.append(with_input(block(encoder[-1]), 5 + k))
            up = encoder[-1]
            # Deepest first: more_ups[-1] joins the two deepest features, then upwards.
            for k in reversed(range(self.more_layers)):
                up = self.more_ups[k](up, encoder[4 + k])
        else:
            up = encoder[4]
        for block, feature in zip((self.up4, self.up3, self.up2, self.up1), reversed(encoder[:4])):
            up = block(up, feature)
        return self.final(up)


# ---------------------------------------------------------------------------------------------
# ResNet (reference models/resnet.py)
# ---------------------------------------------------------------------------------------------


class _Residual(nn.Sequential):
    """``ResidualSequential``: the layers' output plus their input (centre-cropped if smaller)."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        dh, dw = x.shape[-2] - out.shape[-2], x.shape[-1] - out.shape[-1]
        if dh or dw:
            x = x[..., dh // 2 : dh // 2 + out.shape[-2], dw // 2 : dw // 2 + out.shape[-1]]
        return out + x


class ResNet(nn.Module):
    """The reference ``ResNet`` (SPEC §4): conv3×3 + act, ``num_blocks`` residual blocks of
    [conv3×3 (no bias) → norm → act → conv3×3 (no bias) → norm], conv3×3 → norm, conv3×3 to the
    output channels, sigmoid. All at full resolution (no size constraint beyond the padding).

    The reference appends the sigmoid whatever ``need_sigmoid`` says; here ``need_sigmoid`` is
    honoured and defaults to True (the reference's network). The inner convs zero-pad (plain
    ``Conv2d(…, padding=1)``); only the first and last use ``pad``. The sequence is the child
    ``model``, so keys are ``model.<i>.…`` as in the reference.
    """

    def __init__(self, num_input_channels: int, num_output_channels: int, num_blocks: int, num_channels: int,
                 need_residual: bool = True, act_fun: str = "LeakyReLU", need_sigmoid: bool = True,
                 norm: str = "batch", pad: str = "reflection", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        block_type = _Residual if need_residual else nn.Sequential
        c = num_channels
        layers: list[nn.Module] = [conv(num_input_channels, c, 3, bias=True, pad=pad, dtype=dtype), act(act_fun)]
        for _ in range(num_blocks):
            layers.append(block_type(*_present(
                nn.Conv2d(c, c, 3, 1, 1, bias=False, dtype=dtype), norm_layer(norm, c, affine=True, dtype=dtype),
                act(act_fun),
                nn.Conv2d(c, c, 3, 1, 1, bias=False, dtype=dtype), norm_layer(norm, c, affine=True, dtype=dtype),
            )))
        layers += [nn.Conv2d(c, c, 3, 1, 1, dtype=dtype), norm_layer(norm, c, affine=True, dtype=dtype),
                   conv(c, num_output_channels, 3, bias=True, pad=pad, dtype=dtype)]
        if need_sigmoid:
            layers.append(nn.Sigmoid())
        self.model = nn.Sequential(*_present(*layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


# ---------------------------------------------------------------------------------------------
# texture_nets (reference models/texture_nets.py)
# ---------------------------------------------------------------------------------------------


def _texture_conv(in_f: int, out_f: int, k: int, pad: str, dtype: torch.dtype | None) -> nn.Module:
    # texture_nets' own conv: a bare Conv2d for zero padding (so keys are "<i>.weight"), a
    # [ReflectionPad2d, Conv2d] Sequential for reflection; the padding is (k − 1) // 2.
    if pad == "reflection":
        return nn.Sequential(nn.ReflectionPad2d((k - 1) // 2), nn.Conv2d(in_f, out_f, k, padding=0, dtype=dtype))
    return nn.Conv2d(in_f, out_f, k, padding=(k - 1) // 2, dtype=dtype)


def _add(seq: nn.Sequential, module: nn.Module) -> None:
    seq.add_module(str(len(seq) + 1), module)  # the reference's 1-based Module.add


def texture_nets(inp: int = 3, ratios: Sequence[int] = (32, 16, 8, 4, 2, 1), pad: str = "zero",
                 need_sigmoid: bool = False, conv_num: int = 8, upsample_mode: str = "nearest",
                 num_output_channels: int = 3, act_fun: str = "LeakyReLU",
                 dtype: torch.dtype | None = None) -> nn.Sequential:
    """The multi-scale texture-network generator (Ulyanov et al. 2016) as the DIP repository
    builds it (SPEC §4): branch i avg-pools z by ``ratios[i]`` and runs
    [3×3, 3×3, 1×1 conv, each → BN → act] with ``conv_num`` channels; from the coarsest, the
    merged result is upsampled ×2, BN-ed and concatenated with the next branch (BN-ed too), and
    the concatenation (``conv_num · j`` channels) goes through the same three convs; the finest
    ends in a 1×1 conv to ``num_output_channels``, and a sigmoid only with ``need_sigmoid`` (off
    in the reference and in get_net, so outputs are not confined to [0, 1]).

    Assumptions where SPEC is silent: the padding is ``(k − 1) // 2`` (the reference's float
    ``/`` fails on Python 3); the output channels, hard-coded 3 in the reference, are an
    argument; ``fill_noise`` (a GenNoise that replaces each pooled input with fresh noise at
    every forward) is left out: get_net never sets it and it would not be a fixed-input prior.
    H and W must be multiples of max(ratios) for the output to have the input's size.
    """
    cur: nn.Sequential | None = None
    n = len(ratios)
    for i, ratio in enumerate(ratios):
        j = i + 1
        branch = nn.Sequential()
        _add(branch, nn.AvgPool2d(ratio, ratio))
        for c_in, k in ((inp, 3), (conv_num, 3), (conv_num, 1)):
            _add(branch, _texture_conv(c_in, conv_num, k, pad, dtype))
            _add(branch, nn.BatchNorm2d(conv_num, dtype=dtype))
            _add(branch, act(act_fun))
        if cur is None:
            _add(branch, nn.Upsample(scale_factor=2, mode=upsample_mode))
            cur = branch
            continue
        # BN before merging, on both sides.
        _add(branch, nn.BatchNorm2d(conv_num, dtype=dtype))
        _add(cur, nn.BatchNorm2d(conv_num * (j - 1), dtype=dtype))
        merged = nn.Sequential()
        _add(merged, Concat(1, cur, branch))
        for k in (3, 3, 1):
            _add(merged, _texture_conv(conv_num * j, conv_num * j, k, pad, dtype))
            _add(merged, nn.BatchNorm2d(conv_num * j, dtype=dtype))
            _add(merged, act(act_fun))
        if i == n - 1:
            _add(merged, _texture_conv(conv_num * j, num_output_channels, 1, pad, dtype))
        else:
            _add(merged, nn.Upsample(scale_factor=2, mode=upsample_mode))
        cur = merged
    if cur is None:
        raise ValueError("texture_nets needs at least one ratio")
    if need_sigmoid:
        _add(cur, nn.Sigmoid())
    return cur


# ---------------------------------------------------------------------------------------------
# skip-based recipes of the notebooks (SPEC §3.7, §8.4, §8.7)
# ---------------------------------------------------------------------------------------------


def hourglass(depth: int, input_depth: int = 1, n_channels: int = 3, pad: str = "reflection",
              upsample_mode: str = "nearest", act_fun: str = "LeakyReLU",
              dtype: torch.dtype | None = None) -> nn.Sequential:
    """The inpainting-library notebook's ``skip_depth<depth>``: an encoder-decoder without skip
    connections (n_s = 0), widths LIBRARY_WIDTHS[:depth], 5×5 encoder and 3×3 decoder filters,
    no 1×1 decoder convs (SPEC §8.4; 2,996,467 / 1,060,339 / 59,635 parameters at depth 6 / 4 / 2
    with 1 input channel)."""
    if not 1 <= depth <= len(LIBRARY_WIDTHS):
        raise ValueError(f"hourglass depth must be 1 to {len(LIBRARY_WIDTHS)}, got {depth}")
    widths = list(LIBRARY_WIDTHS[:depth])
    return skip(input_depth, n_channels, num_channels_down=widths, num_channels_up=widths,
                num_channels_skip=[0] * depth, filter_size_down=5, filter_size_up=3, filter_skip_size=1,
                need_sigmoid=True, need_bias=True, pad=pad, upsample_mode=upsample_mode, act_fun=act_fun,
                need1x1_up=False, dtype=dtype)


def feature_inversion_net(input_depth: int = 32, n_channels: int = 3,
                          dtype: torch.dtype | None = None) -> nn.Sequential:
    """The feature-inversion notebook's skip network (SPEC §8.7; 2,606,763 parameters)."""
    widths = list(LIBRARY_WIDTHS)
    return skip(input_depth, n_channels, num_channels_down=widths, num_channels_up=widths,
                num_channels_skip=[4] * 6, filter_size_down=[7, 7, 5, 5, 3, 3], filter_size_up=[7, 7, 5, 5, 3, 3],
                upsample_mode="nearest", downsample_mode="avg", need_sigmoid=True, need_bias=True, pad="zero",
                act_fun="LeakyReLU", dtype=dtype)


def activation_maximization_net(input_depth: int = 32, n_channels: int = 3,
                                dtype: torch.dtype | None = None) -> nn.Sequential:
    """The activation-maximisation notebook's skip network (SPEC §8.7; 2,948,567 parameters).
    SPEC gives its skips and filters; the widths (LIBRARY_WIDTHS, as feature inversion) are
    the assumption that reproduces SPEC's parameter count."""
    widths = list(LIBRARY_WIDTHS)
    return skip(input_depth, n_channels, num_channels_down=widths, num_channels_up=widths,
                num_channels_skip=[0, 4, 4, 4, 4, 4], filter_size_down=[5, 3, 5, 5, 3, 5],
                filter_size_up=[5, 3, 5, 3, 5, 3], upsample_mode="bilinear", downsample_mode="avg",
                need_sigmoid=True, need_bias=True, pad="reflection", act_fun="LeakyReLU", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The dispatcher (reference models/__init__.py::get_net)
# ---------------------------------------------------------------------------------------------


def get_net(
    input_depth: int,
    net_type: str = "skip",
    pad: str = "reflection",
    upsample_mode: str | Sequence[str] = "bilinear",
    n_channels: int = 3,
    act_fun: str = "LeakyReLU",
    skip_n33d: int | Sequence[int] = 128,
    skip_n33u: int | Sequence[int] = 128,
    skip_n11: int | Sequence[int] = 4,
    num_scales: int = 5,
    downsample_mode: str | Sequence[str] = "stride",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The reference's ``get_net`` over every type (SPEC §4), same arguments and defaults:

    * 'skip': the §3.4 recipe with the given widths (ints repeated ``num_scales`` times, lists
      used as they are), sigmoid and bias on, 1×1 up convs, 3×3 filters: with the defaults the
      denoising/SR network (2,217,831 parameters);
    * 'skip_depth<N>' (N = 1…6): the library notebook's hourglass (``hourglass``) with this
      ``pad``, ``act_fun`` and ``upsample_mode`` (the notebook: 'nearest');
    * 'UNet': ``UNet(input_depth → 3, feature_scale 4, more_layers 0, concat_x False,
      upsample_mode, pad, BatchNorm, sigmoid, bias)``, as the reference;
    * 'ResNet': 10 blocks × 16 channels, residual, BatchNorm, ``act_fun``, ``pad``, sigmoid.
      The reference calls ``ResNet(input_depth, 3, 10, 16, 1, nn.BatchNorm2d, False)``, which
      puts BatchNorm2d into ``act_fun`` and cannot build; here each value goes to the argument
      it was meant for (need_residual, the norm), and the sigmoid stays, as the reference's
      ResNet adds it whatever ``need_sigmoid`` says;
    * 'texture_nets': ``texture_nets(input_depth, ratios [32, 16, 8, 4, 2, 1], pad)``, no sigmoid;
    * 'identity': an empty Sequential (input_depth must be 3).

    UNet, texture_nets and ResNet ignore the skip-only arguments, as in the reference.
    """
    mode = upsample_mode if isinstance(upsample_mode, str) else upsample_mode[0]
    if net_type == "skip":
        def widths(v: int | Sequence[int]) -> list[int]:
            return [v] * num_scales if isinstance(v, int) else list(v)

        return skip(input_depth, n_channels, num_channels_down=widths(skip_n33d),
                    num_channels_up=widths(skip_n33u), num_channels_skip=widths(skip_n11),
                    upsample_mode=upsample_mode, downsample_mode=downsample_mode, need_sigmoid=True,
                    need_bias=True, pad=pad, act_fun=act_fun, dtype=dtype)
    if net_type.startswith("skip_depth") and net_type[len("skip_depth"):].isdigit():
        return hourglass(int(net_type[len("skip_depth"):]), input_depth, n_channels, pad, mode, act_fun, dtype)
    if net_type == "UNet":
        return UNet(input_depth, 3, feature_scale=4, more_layers=0, concat_x=False, upsample_mode=mode, pad=pad,
                    norm="batch", need_sigmoid=True, need_bias=True, dtype=dtype)
    if net_type == "ResNet":
        return ResNet(input_depth, 3, 10, 16, need_residual=True, act_fun=act_fun, need_sigmoid=True,
                      norm="batch", pad=pad, dtype=dtype)
    if net_type == "texture_nets":
        return texture_nets(input_depth, (32, 16, 8, 4, 2, 1), pad=pad, act_fun=act_fun, dtype=dtype)
    if net_type == "identity":
        if input_depth != 3:
            raise ValueError(f"net_type 'identity' needs input_depth 3, got {input_depth}")
        return nn.Sequential()
    raise ValueError(f"unknown net_type {net_type!r}; expected skip, skip_depth1…skip_depth6, UNet, ResNet, "
                     "texture_nets or identity")


def net_output_size(net: nn.Module, in_channels: int, height: int, width: int) -> tuple[int, int]:
    """(H, W) of ``net``'s output for a [1, in_channels, height, width] input, found by a forward
    on the meta device (no memory, no compute). Raises ValueError when the input is too small
    for the network (a reflection pad wider than a feature map, an empty feature map)."""
    probe = copy.deepcopy(net).to("meta")
    try:
        out = probe(torch.empty(1, in_channels, height, width, device="meta"))
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"a {height}×{width} (H×W) input is too small for this network: {err}") from None
    return int(out.shape[-2]), int(out.shape[-1])
