"""PGGAN generator as converted to PyTorch by genforce and used by mGANprior (SPEC §1, §2).

The module keeps the converted checkpoints' ``state_dict`` exactly (keys, registration order,
shapes; ``state_dict_manifest.json``): a 0-dim ``lod``, then per block ``layer{2b}``,
``layer{2b+1}`` and the block's toRGB ``output{b}``, each holding ``conv.weight`` (stored
unscaled) and ``wscale.bias``. The intermediate toRGBs are kept because the files contain
them, although only the last one is ever used.

Every module is one conv block (SPEC §1.1): pixel norm, optional nearest x2 upsampling, a
bias-free convolution, the equalized-learning-rate constant gain/sqrt(fan_in), the bias, and
LeakyReLU 0.2 (identity for toRGB). The pixel norm sits at the *start* of each block, toRGB
included. That placement decides what a feature map at a split is: the un-normalised
post-LeakyReLU activation (SPEC §6, fact 1).

mGANprior's "derivable" view (SPEC §2) is the sequence ``layer0 .. layer{2K-1}, output{K-1}``
(15 modules for 256-pixel models, 19 for 1024). ``head(z, l)`` runs modules [0, l) and
``tail(f, l)`` runs [l, end), so ``tail(head(z, l), l) == G(z)`` for every l, and the feature
at l is the input of ``layer{l}`` (``feature_shape(l)``). ``multi_code`` is mGANprior's
composition: N codes per image through the head, the N feature maps weighted channel-wise by
α and averaged, then the tail.

The generator is never fine-tuned by mGANprior, so its layers take no stacked per-image
weights (unlike ``genprior.priors.biggan``); per-image tensors are the codes and α, which are
inputs. Images and codes are simply batched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INIT_RESOLUTION",
    "RESOLUTIONS",
    "ConvBlock",
    "PGGANGenerator",
    "compose_features",
    "pggan_channels",
    "pixel_norm",
]

INIT_RESOLUTION = 4
RESOLUTIONS = (8, 16, 32, 64, 128, 256, 512, 1024)
PIXEL_NORM_EPS = 1e-8
LRELU_SLOPE = 0.2


def pggan_channels(resolution: int, fmaps_base: int = 16384, fmaps_max: int = 512) -> int:
    """Channel width at ``resolution``: min(fmaps_base // r, fmaps_max) (SPEC §1.1)."""
    return min(fmaps_base // resolution, fmaps_max)


def pixel_norm(x: Tensor, eps: float = PIXEL_NORM_EPS) -> Tensor:
    """x / sqrt(mean over channels of x² + eps), per pixel."""
    return x / torch.sqrt(torch.mean(x.square(), dim=1, keepdim=True) + eps)


class _Weight(nn.Module):
    """Holds the stored (unscaled) conv weight under the key ``conv.weight``."""

    def __init__(self, out_channels: int, in_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))


class _Bias(nn.Module):
    """Holds the per-channel bias under the key ``wscale.bias``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))


class ConvBlock(nn.Module):
    """pixel norm → (nearest x2) → conv → × gain/sqrt(fan_in) + bias → LeakyReLU 0.2 (or linear)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        upsample: bool = False,
        gain: float = math.sqrt(2.0),
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.conv = _Weight(out_channels, in_channels, kernel_size)
        self.wscale = _Bias(out_channels)
        self.padding = padding
        self.upsample = upsample
        self.activation = activation
        # The equalized-learning-rate constant, applied to the conv output at runtime.
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)

    @property
    def in_channels(self) -> int:
        return self.conv.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.conv.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        x = pixel_norm(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.conv2d(x, self.conv.weight, None, 1, self.padding)
        x = x * self.scale + self.wscale.bias.view(1, -1, 1, 1)
        return F.leaky_relu(x, LRELU_SLOPE) if self.activation else x

    def extra_repr(self) -> str:
        k = self.conv.weight.shape[-1]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={k}, padding={self.padding}, "
                f"upsample={self.upsample}, scale={self.scale:.6f}, activation="
                f"{'lrelu' if self.activation else 'linear'}")


def compose_features(features: Tensor, alpha: Tensor, average: bool = True) -> Tensor:
    """mGANprior's composition (SPEC §3.1): Σ_n F_n ⊙ α_n, divided by N when ``average``.

    features [B, N, C, H, W], alpha [B, N, C] → [B, C, H, W]. The sum runs over n in order,
    as the reference's Python ``sum`` does. The released code divides by N; the paper does not.
    Because the next module starts with a pixel norm, the factor changes nothing but rounding.
    """
    if features.dim() != 5 or alpha.shape != features.shape[:3]:
        raise ValueError(
            f"expected features [B, N, C, H, W] and alpha [B, N, C]; got {tuple(features.shape)} "
            f"and {tuple(alpha.shape)}"
        )
    n_codes = features.shape[1]
    composed = features[:, 0] * alpha[:, 0, :, None, None]
    for n in range(1, n_codes):
        composed = composed + features[:, n] * alpha[:, n, :, None, None]
    return composed / n_codes if average else composed


class PGGANGenerator(nn.Module):
    """genforce's PGGANGeneratorNet (fused_scale=False), with mGANprior's split and composition.

    ``resolution`` 8..1024; ``fmaps_base``/``fmaps_max`` set the widths (16384/512 for every
    published model; the parity fixture uses 1024/32).
    """

    def __init__(
        self,
        resolution: int = 256,
        z_dim: int = 512,
        image_channels: int = 3,
        fmaps_base: int = 16384,
        fmaps_max: int = 512,
    ) -> None:
        super().__init__()
        if resolution not in RESOLUTIONS:
            raise ValueError(f"PGGAN resolution must be one of {list(RESOLUTIONS)}; got {resolution!r}")
        self.resolution = resolution
        self.z_dim = z_dim
        self.image_channels = image_channels
        self.fmaps_base = fmaps_base
        self.fmaps_max = fmaps_max
        self.num_blocks = int(math.log2(resolution)) - 1  # one per resolution 4, 8, ..., R
        # Registered first, as in the checkpoints. Never trained; the published files hold 0.
        self.lod = nn.Parameter(torch.zeros(()), requires_grad=False)
        for b in range(self.num_blocks):
            res = INIT_RESOLUTION * 2**b
            width = self.channels(res)
            if b == 0:
                # z (as a 1x1 map) to 4x4: a 4x4 conv with padding 3, the TF dense layer.
                first = ConvBlock(z_dim, width, kernel_size=INIT_RESOLUTION, padding=INIT_RESOLUTION - 1)
            else:
                first = ConvBlock(self.channels(res // 2), width, upsample=True)
            self.add_module(f"layer{2 * b}", first)
            self.add_module(f"layer{2 * b + 1}", ConvBlock(width, width))
            self.add_module(f"output{b}", ConvBlock(width, image_channels, kernel_size=1, padding=0,
                                                    gain=1.0, activation=False))
        self.sequence_names: list[str] = [f"layer{i}" for i in range(2 * self.num_blocks)]
        self.sequence_names.append(f"output{self.num_blocks - 1}")

    # ------------------------------------------------------------------ structure
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network computes in (float64 for ``trainer.precision=64-true``)."""
        return self.get_submodule("layer0").conv.weight.dtype

    def channels(self, resolution: int) -> int:
        return pggan_channels(resolution, self.fmaps_base, self.fmaps_max)

    @property
    def num_layers(self) -> int:
        """Length of the derivable sequence: 2K conv layers plus the last toRGB."""
        return len(self.sequence_names)

    def sequence(self) -> list[ConvBlock]:
        return [self.get_submodule(name) for name in self.sequence_names]

    def check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(
                f"composing layer must be an int in 0..{self.num_layers - 1} for a "
                f"{self.resolution}-pixel PGGAN (an index into "
                f"{self.sequence_names[0]}..{self.sequence_names[-1]}); got {layer!r}"
            )
        return layer

    def feature_shape(self, layer: int) -> tuple[int, int, int]:
        """(C, H, W) of the input of module ``layer`` of the sequence (SPEC §2 table)."""
        self.check_layer(layer)
        if layer == 0:
            return (self.z_dim, 1, 1)
        res = INIT_RESOLUTION * 2 ** ((layer - 1) // 2)
        return (self.channels(res), res, res)

    # ------------------------------------------------------------------ forward passes
    def _check_lod(self) -> None:
        if float(self.lod.detach()) != 0.0:
            raise ValueError(
                f"this PGGAN has lod={float(self.lod.detach())}; genprior runs only lod=0, the "
                "final-training value stored in the converted checkpoints (mGANprior never "
                "changes it)"
            )

    def _as_map(self, z: Tensor) -> Tensor:
        if z.dim() == 2 and z.shape[1] == self.z_dim:
            return z.view(z.shape[0], self.z_dim, 1, 1)
        if z.dim() == 4 and tuple(z.shape[1:]) == (self.z_dim, 1, 1):
            return z
        raise ValueError(f"expected z of shape [B, {self.z_dim}] (or [B, {self.z_dim}, 1, 1]); "
                         f"got {tuple(z.shape)}")

    def head(self, z: Tensor, layer: int) -> Tensor:
        """Modules [0, layer) applied to z: the feature map at ``layer`` (un-normalised)."""
        self.check_layer(layer)
        self._check_lod()
        x = self._as_map(z)
        for name in self.sequence_names[:layer]:
            x = self.get_submodule(name)(x)
        return x

    def tail(self, x: Tensor, layer: int) -> Tensor:
        """Modules [layer, end) applied to a feature map of ``feature_shape(layer)``: an image."""
        self.check_layer(layer)
        self._check_lod()
        if layer == 0:
            x = self._as_map(x)
        elif tuple(x.shape[1:]) != self.feature_shape(layer):
            raise ValueError(f"layer {layer} takes features of shape [B, "
                             f"{', '.join(map(str, self.feature_shape(layer)))}]; got {tuple(x.shape)}")
        for name in self.sequence_names[layer:]:
            x = self.get_submodule(name)(x)
        return x

    def forward(self, z: Tensor) -> Tensor:
        """G(z): raw RGB in nominally [-1, 1], not clamped (there is no tanh)."""
        return self.tail(z, 0)

    def multi_code(self, z: Tensor, alpha: Tensor, layer: int, average: bool = True) -> Tensor:
        """mGANprior's x = G2(Σ_n G1(z_n) ⊙ α_n / N) for a batch of images.

        z [B, N, z_dim], alpha [B, N, C] with C the channel count at ``layer``. The N·B codes
        go through G1 as one batch.
        """
        if z.dim() != 3 or z.shape[-1] != self.z_dim:
            raise ValueError(f"expected codes z of shape [B, N, {self.z_dim}]; got {tuple(z.shape)}")
        B, N = z.shape[:2]
        C = self.feature_shape(layer)[0]
        if tuple(alpha.shape) != (B, N, C):
            raise ValueError(f"expected alpha of shape [{B}, {N}, {C}] (channels at composing layer "
                             f"{layer}); got {tuple(alpha.shape)}")
        features = self.head(z.reshape(B * N, self.z_dim), layer)
        features = features.view(B, N, *features.shape[1:])
        return self.tail(compose_features(features, alpha, average), layer)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Random images G(z), z ~ N(0, I)."""
        # drawn in float32 whatever G's dtype, so a float64 G renders the same codes
        z = torch.randn(n, self.z_dim, generator=generator, dtype=torch.float32)
        return self(z.to(self.lod.device, self.dtype))

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        used = sum(p.numel() for m in self.sequence() for p in m.parameters())
        return {"total": total, "derivable": used}

