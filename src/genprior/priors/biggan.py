"""BigGAN generator and discriminator as used by Deep Generative Prior (SPEC §3, §4).

The modules keep the reference's exact ``state_dict`` (keys, order, shapes, dtypes; see
``state_dict_manifest.json``), so the published ``G_ema_<s>.pth`` / ``D_<s>.pth`` files load
unchanged, and they reproduce the reference numerically at batch 1.

Stacked per-image parameters
----------------------------
DGP fine-tunes one generator per image. genprior fits B images at once by calling
``torch.func.functional_call(G, stacked, (z, e), {"use_in": ...})`` where ``stacked`` maps
state_dict names to tensors with one extra leading image dimension (``linear.weight``
``[B, 24576, 20]``, attention ``gamma`` ``[B]``, ``in1.weight`` ``[B, C]`` ...). Every layer
looks at its own tensors: one dimension more than its unstacked shape means "stacked", and it
switches to a batched kernel (grouped convolution, batched matmul, per-image row gather for
the class embedding, one spectral-norm power iteration per image). Unstacked tensors are
shared by all images. Sample b of the batch belongs to image b, and its result equals a
batch-1 forward of a generator holding image b's tensors.

Buffers follow the same rule:

* SN ``u0``/``sv0``: eval mode never writes them. In train mode (``random_G``) a stacked
  ``u0`` ``[B, 1, out]`` (and ``sv0`` ``[B, 1]``) is updated per image; an unstacked ``u0`` is
  updated only when its weight is unstacked too (all images share W, so they share u).
* BN ``stored_mean``/``stored_var``: in train mode with stacked tensors every image is
  normalised with its own statistics, exactly like a batch-1 forward. Stacked stats
  ``[B, C]`` are updated per image; unstacked ones are left untouched, since a single copy
  cannot hold B different running averages (they are never read in train mode).
* ``in_initialized`` (one per GBlock, a non-persistent bool buffer): stack it to ``[B]`` so
  that each image has its own instance-norm initialisation state (SPEC §3.4).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genprior.perf import full_precision

__all__ = [
    "Attention",
    "ClassEmbedding",
    "ConditionalBatchNorm",
    "DBlock",
    "Discriminator",
    "GBlock",
    "Generator",
    "OutputBatchNorm",
    "SNConv2d",
    "SNEmbedding",
    "SNLinear",
    "cache_frozen_spectral_norms",
    "fused_attention",
    "orthogonal_init_",
    "stack_per_image",
    "use_fused_attention",
    "use_output_scaled_spectral_norms",
]

# Channel multipliers of ch per block (SPEC §3.1 and §4). G blocks all upsample x2 from 4x4;
# D blocks all downsample /2 except the last one.
_G_ARCH: dict[int, tuple[list[int], list[int]]] = {
    128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]),
    256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1]),
    512: ([16, 16, 8, 8, 4, 2, 1], [16, 8, 8, 4, 2, 1, 1]),
}
_D_ARCH: dict[int, tuple[list[int], list[int]]] = {
    128: ([0, 1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16]),
    256: ([0, 1, 2, 4, 8, 8, 16], [1, 2, 4, 8, 8, 16, 16]),
}
_BOTTOM_WIDTH = 4
# nn.InstanceNorm2d's default, and the eps of the output layer's BN: the reference builds both
# without passing BN_eps (SPEC §3.2, §3.4).
_FIXED_NORM_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Spectral norm (SPEC §3.3)
# --------------------------------------------------------------------------------------------


class _SpectralNorm:
    """Mixin for the reference's SN layers: raw ``weight`` + buffers ``u0`` [1, out], ``sv0`` [1].

    Not ``torch.nn.utils.spectral_norm``: each forward runs exactly one power iteration from the
    stored u0, also in eval mode, and sigma stays differentiable with respect to W.
    """

    weight: Tensor
    u0: Tensor
    sv0: Tensor
    training: bool
    _weight_ndim: int  # dimensions of the unstacked weight

    def _init_sn(self, num_outputs: int, eps: float) -> None:
        self.sn_eps = eps
        self.register_buffer("u0", torch.randn(1, num_outputs))  # type: ignore[attr-defined]
        self.register_buffer("sv0", torch.ones(1))  # type: ignore[attr-defined]

    def sn_weight(self) -> Tensor:
        """W / sigma(W); stacked ([B, *shape]) if the weight or u0 carries an image dimension.

        Always fp32, also inside a bf16 autocast region: sigma from a bf16 power iteration
        would rescale every layer by a 3-digit number. A layer with ``cache_sn`` set (a frozen
        layer in eval mode, see :func:`cache_frozen_spectral_norms`) returns the W / sigma of
        its last forward while its weight and u0 are unchanged: eval mode never moves u0, so
        that is the value a new power iteration would give. Inside ``torch.compile`` the cache
        is skipped: its version check would split the graph at every layer (the power iteration
        of a frozen layer is then part of the compiled graph).
        """
        if torch.compiler.is_compiling():
            with full_precision():
                return self._sn_weight()
        cached = self.__dict__.get("_sn_cached")
        if cached is not None and not self.training:
            weight_ref, versions, value = cached
            if weight_ref is self.weight and versions == (self.weight._version, self.u0._version):
                return value
        with full_precision():
            value = self._sn_weight()
        if self.__dict__.get("cache_sn") and not self.training and not self.weight.requires_grad:
            self.__dict__["_sn_cached"] = (self.weight, (self.weight._version, self.u0._version), value)
        return value

    def _sn_weight(self) -> Tensor:
        weight, u0 = self.weight, self.u0
        w_stacked = weight.dim() == self._weight_ndim + 1
        if not w_stacked and u0.dim() == 2:
            return weight / self._sigma_2d(weight.reshape(weight.shape[0], -1), update=self.training)
        if w_stacked and weight.shape[0] == 1 and u0.dim() == 2:
            # One image: the reference's 2-D products on its matrix, not a batched matmul
            # (another summation order), so that B = 1 computes what the reference computes.
            # A shared u0 is not written by a stacked weight (module docstring).
            return weight / self._sigma_2d(weight[0].reshape(weight.shape[1], -1), update=False)
        return weight / self._stacked_sigma().reshape(-1, *([1] * self._weight_ndim))

    def _sigma_2d(self, w_mat: Tensor, update: bool) -> Tensor:
        """The reference's power iteration from u0 on an [out, rest] matrix: a 0-dim sigma,
        differentiable in W; ``update`` (train mode) writes u0 and sv0 as the reference does."""
        u0, eps = self.u0, self.sn_eps
        with torch.no_grad():
            v = F.normalize(torch.matmul(u0, w_mat), eps=eps)
            u = F.normalize(torch.matmul(v, w_mat.t()), eps=eps)
            if update:
                u0.copy_(u)
        # u and v are constants, W is not: the gradient includes the d(1/sigma) term.
        sigma = torch.squeeze(torch.matmul(torch.matmul(v, w_mat.t()), u.t()))
        if update:
            with torch.no_grad():
                self.sv0.copy_(sigma)
        return sigma

    def _stacked_sigma(self) -> Tensor:
        """sigma(W_b) of a stacked weight [B, *shape] as a [B] vector, differentiable in W."""
        weight, u0, eps = self.weight, self.u0, self.sn_eps
        # One power iteration per image. A shared u0 [1, out] broadcasts over the images.
        w_mat = weight.reshape(*weight.shape[: weight.dim() - self._weight_ndim + 1], -1)
        # (One image with a shared u0 takes the reference's 2-D products, _sn_weight.)
        if (w_mat.dim() == 3 and w_mat.shape[0] > 1 and w_mat.device.type == "cpu" and self.cpu_gemv
                and w_mat[0].numel() >= self.cpu_gemv_min_elements):
            return self._sigma_gemv(w_mat, u0, eps)
        with torch.no_grad():
            v = F.normalize(torch.matmul(u0, w_mat), dim=-1, eps=eps)  # [B, 1, rest]
            u = F.normalize(torch.matmul(v, w_mat.transpose(-1, -2)), dim=-1, eps=eps)
        sigma = torch.matmul(torch.matmul(v, w_mat.transpose(-1, -2)), u.transpose(-1, -2))
        if self.training and u0.dim() == 3:
            with torch.no_grad():
                u0.copy_(u)
                if self.sv0.dim() == 2:
                    self.sv0.copy_(sigma.reshape(-1, 1))
        return sigma.reshape(-1)

    # CPU: B matrix-vector products instead of one batched matmul of [B, 1, out] rows, which
    # MKL runs several times slower than B gemvs for large matrices (7.7 ms vs 1.0 ms for
    # B = 8 at 256 x 2304, one thread; docs/performance.md). Same math, other summation order.
    # Small matrices keep the single batched call: there B small calls cost more than one.
    cpu_gemv = True
    cpu_gemv_min_elements = 1 << 16

    def _sigma_gemv(self, w_mat: Tensor, u0: Tensor, eps: float) -> Tensor:
        n = w_mat.shape[0]
        mats = torch.unbind(w_mat)  # one UnbindBackward stacks the per-image gradients
        rows = u0.reshape(-1, u0.shape[-1])
        us, vs = [], []
        with torch.no_grad():
            for b in range(n):
                row = rows[b] if rows.shape[0] == n else rows[0]
                v = F.normalize(torch.mv(mats[b].t(), row), dim=0, eps=eps)
                us.append(F.normalize(torch.mv(mats[b], v), dim=0, eps=eps))
                vs.append(v)
        sigma = torch.stack([torch.dot(torch.mv(mats[b], vs[b]), us[b]) for b in range(n)])
        if self.training and u0.dim() == 3:
            with torch.no_grad():
                u0.copy_(torch.stack(us).view_as(u0))
                if self.sv0.dim() == 2:
                    self.sv0.copy_(sigma.reshape(-1, 1))
        return sigma

    def scales_outputs(self, weights_per_output: int, outputs_per_channel: int) -> bool:
        """Whether this forward divides its outputs by sigma instead of its weights.

        ``W x / sigma`` equals ``(W / sigma) x``; for a stacked weight of B >= 2 images
        (``perf.sn_scale_outputs``, set by :func:`use_output_scaled_spectral_norms`) it is the
        cheaper order wherever a weight has more values per output channel than the output has
        positions: the 4x4 to 32x32 convolutions and the linear layers of G. The division of the
        weight, and the three weight-sized passes of its backward, become passes over the much
        smaller activations. B = 1 keeps the reference's order (the parity fixtures).
        """
        return (self.__dict__.get("scale_outputs", False) and self.weight.dim() == self._weight_ndim + 1
                and self.weight.shape[0] > 1 and weights_per_output >= outputs_per_channel)

    def output_sigma(self) -> Tensor:
        """[B] sigma for :meth:`scales_outputs`, fp32 also inside an autocast region."""
        with full_precision():
            return self._stacked_sigma()


def _divide_per_image(out: Tensor, sigma: Tensor) -> Tensor:
    """out [B, C, ...] / sigma [B] in sigma's dtype (fp32 when out is bf16 under autocast;
    float64 in a float64 run), back in out's dtype."""
    scale = sigma.reshape(-1, *([1] * (out.dim() - 1)))
    return (out.to(torch.promote_types(out.dtype, sigma.dtype)) / scale).to(out.dtype)


def _check_images(x: Tensor, n_images: int, what: str) -> None:
    if x.shape[0] != n_images:
        raise ValueError(
            f"{what}: stacked parameters hold {n_images} images but the input batch has "
            f"{x.shape[0]} samples; with stacked parameters sample b must belong to image b"
        )


class SNConv2d(_SpectralNorm, nn.Conv2d):
    _weight_ndim = 4

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        bias: bool = True,
        eps: float = 1e-6,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self._init_sn(out_channels, eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.scales_outputs(self.in_channels * self.kernel_size[0] * self.kernel_size[1], x.shape[-2] * x.shape[-1]):
            sigma = self.output_sigma()
            out = _divide_per_image(self._stacked_conv(x, self.weight, None), sigma)
            bias = self.bias
            if bias is None:
                return out
            return out + (bias[:, :, None, None] if bias.dim() == 2 else bias[:, None, None])
        weight, bias = self.sn_weight(), self.bias
        if weight.dim() == 4:
            if bias is not None and bias.dim() == 2:  # only the bias is stacked
                return F.conv2d(x, weight, None, self.stride, self.padding) + bias[:, :, None, None]
            return F.conv2d(x, weight, bias, self.stride, self.padding)
        return self._stacked_conv(x, weight, bias)

    def _stacked_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # Stacked: fold the images into channels and run one grouped convolution.
        n_images, out_ch = weight.shape[:2]
        _check_images(x, n_images, "SNConv2d")
        if bias is not None:
            bias = bias.reshape(-1) if bias.dim() == 2 else bias.repeat(n_images)
        out = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]),
            weight.reshape(n_images * out_ch, *weight.shape[2:]),
            bias,
            self.stride,
            self.padding,
            groups=n_images,
        )
        return out.view(n_images, out_ch, *out.shape[2:])


class SNLinear(_SpectralNorm, nn.Linear):
    _weight_ndim = 2

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-6
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_sn(out_features, eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.scales_outputs(self.in_features, 1):
            out = _divide_per_image(self._stacked_linear(x, self.weight), self.output_sigma())
            return out if self.bias is None else out + self.bias
        weight, bias = self.sn_weight(), self.bias
        if weight.dim() == 3 and weight.shape[0] == 1:
            # One image: the reference's F.linear (one addmm), not a batched matmul.
            weight, bias = weight[0], (bias[0] if bias is not None and bias.dim() == 2 else bias)
        if weight.dim() == 2 and (bias is None or bias.dim() == 1):
            return F.linear(x, weight, bias)
        out = F.linear(x, weight) if weight.dim() == 2 else self._stacked_linear(x, weight)
        return out if bias is None else out + bias

    @staticmethod
    def _stacked_linear(x: Tensor, weight: Tensor) -> Tensor:
        _check_images(x, weight.shape[0], "SNLinear")
        return torch.bmm(weight, x.unsqueeze(-1)).squeeze(-1)


def _embed(y: Tensor, weight: Tensor) -> Tensor:
    if weight.dim() == 2:
        return F.embedding(y, weight)
    # Stacked table [B, n_classes, dim]: image b reads row y[b] of its own table.
    _check_images(y, weight.shape[0], "embedding")
    return weight[torch.arange(weight.shape[0], device=y.device), y]


class SNEmbedding(_SpectralNorm, nn.Embedding):
    """SN embedding (D's projection ``embed``); u0 is [1, num_embeddings] (SPEC §3.3)."""

    _weight_ndim = 2

    def __init__(self, num_embeddings: int, embedding_dim: int, eps: float = 1e-6) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim)
        self._init_sn(num_embeddings, eps)

    def forward(self, y: Tensor) -> Tensor:
        return _embed(y, self.sn_weight())


class ClassEmbedding(nn.Embedding):
    """G's ``shared``: a plain embedding (no SN, SPEC §3.2) that also takes a stacked weight."""

    def forward(self, y: Tensor) -> Tensor:
        return _embed(y, self.weight)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def _per_image_flat(t: Tensor | None, n_images: int) -> Tensor | None:
    """[C] or stacked [B, C] -> [B*C], the layout of images folded into channels."""
    if t is None:
        return None
    return t.reshape(-1) if t.dim() == 2 else t.repeat(n_images)


def _batch_norm(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
    per_image: bool,
) -> Tensor:
    """F.batch_norm (momentum 0.1, as the reference) extended to stacked tensors."""
    stacked = mean.dim() == 2 or (weight is not None and weight.dim() == 2)
    if not stacked and not (training and per_image):
        return F.batch_norm(x, mean, var, weight, bias, training, 0.1, eps)
    # Fold the images into the channel axis: each image is then normalised on its own, like a
    # batch-1 forward (train-mode statistics of a batch of 1, SPEC §9 random_G).
    n = x.shape[0]
    if training:
        # A shared running average cannot absorb B different batch statistics: only stacked
        # stats are updated (they are not read in train mode anyway).
        run_mean = mean.reshape(-1).clone() if mean.dim() == 2 else None
        run_var = var.reshape(-1).clone() if var.dim() == 2 else None
    else:
        run_mean, run_var = _per_image_flat(mean, n), _per_image_flat(var, n)
    out = F.batch_norm(
        x.reshape(1, -1, *x.shape[2:]),
        run_mean,
        run_var,
        _per_image_flat(weight, n),
        _per_image_flat(bias, n),
        training,
        0.1,
        eps,
    )
    if training and run_mean is not None and run_var is not None:
        with torch.no_grad():
            mean.copy_(run_mean.view_as(mean))
            var.copy_(run_var.view_as(var))
    return out.view_as(x)


class ConditionalBatchNorm(nn.Module):
    """ccbn: BN with stored stats, then ``* (1 + gain(c)) + bias(c)`` (SPEC §3.2).

    gain and bias are bias-free SN linears from the condition c = [e, z chunk]; there is no
    other affine.
    """

    def __init__(self, num_features: int, cond_dim: int, eps: float, sn_eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.gain = SNLinear(cond_dim, num_features, bias=False, eps=sn_eps)
        self.bias = SNLinear(cond_dim, num_features, bias=False, eps=sn_eps)
        self.register_buffer("stored_mean", torch.zeros(num_features))
        self.register_buffer("stored_var", torch.ones(num_features))

    def _stacked_buffers(self) -> list[Tensor]:
        pairs = [
            (self.stored_mean, 1),
            (self.stored_var, 1),
            (self.gain.u0, 2),
            (self.gain.sv0, 1),
            (self.bias.u0, 2),
            (self.bias.sv0, 1),
        ]
        return [t for t, base in pairs if t.dim() == base + 1]

    def forward(
        self, x: Tensor, c: Tensor, per_image: bool = False, update: Tensor | None = None
    ) -> Tensor:
        """``update`` ([N] bool, train mode only): images whose stacked buffers may change."""
        saved = []
        if self.training and update is not None:
            saved = [(t, t.clone()) for t in self._stacked_buffers()]
        n = c.shape[0]
        gain = (1 + self.gain(c)).view(n, -1, 1, 1)
        bias = self.bias(c).view(n, -1, 1, 1)
        out = _batch_norm(
            x, self.stored_mean, self.stored_var, None, None, self.training, self.eps, per_image
        )
        if saved:
            assert update is not None
            with torch.no_grad():
                for t, old in saved:
                    keep = update.view(-1, *([1] * (t.dim() - 1)))
                    t.copy_(torch.where(keep, t, old))
        return out * gain + bias


class OutputBatchNorm(nn.Module):
    """Unconditional BN of the output layer: affine ``gain``/``bias`` and stored stats."""

    def __init__(self, num_features: int, eps: float = _FIXED_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("stored_mean", torch.zeros(num_features))
        self.register_buffer("stored_var", torch.ones(num_features))

    def forward(self, x: Tensor, per_image: bool = False) -> Tensor:
        return _batch_norm(
            x,
            self.stored_mean,
            self.stored_var,
            self.gain,
            self.bias,
            self.training,
            self.eps,
            per_image,
        )


def _instance_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    if weight.dim() == 1:
        return F.instance_norm(x, None, None, weight, bias, True, 0.1, eps)
    # Stacked [B, C] affine: fold the images into channels (instance stats are per channel).
    folded = x.reshape(1, -1, *x.shape[2:])
    out = F.instance_norm(folded, None, None, weight.reshape(-1), bias.reshape(-1), True, 0.1, eps)
    return out.view_as(x)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class _UseIn(NamedTuple):
    mask: Tensor  # [N] bool: sample n runs instance norm instead of ccbn
    any: bool
    all: bool


def _as_use_in(use_in: bool | Tensor, n: int, device: torch.device) -> _UseIn:
    if isinstance(use_in, Tensor):
        mask = use_in.to(device=device, dtype=torch.bool).reshape(-1)
        if mask.numel() == 1:
            mask = mask.expand(n)
        elif mask.numel() != n:
            raise ValueError(f"use_in has {mask.numel()} entries for a batch of {n}")
        return _UseIn(mask, bool(mask.any()), bool(mask.all()))
    flag = bool(use_in)
    return _UseIn(torch.full((n,), flag, dtype=torch.bool, device=device), flag, flag)


_IN_BATCH_ERROR = (
    "instance-norm initialisation (use_in=True, SPEC §3.4) writes one set of in1/in2 parameters "
    "per image, so it needs a batch of 1 with unstacked parameters (the reference only supports "
    "batch 1), or stacked [B, C] in1/in2 weights and biases with one sample per image"
)


class GBlock(nn.Module):
    """Upsampling residual block with ccbn, plus DGP's instance-norm option (SPEC §3.2, §3.4)."""

    def __init__(
        self, in_channels: int, out_channels: int, cond_dim: int, bn_eps: float, sn_eps: float
    ) -> None:
        super().__init__()
        self.conv1 = SNConv2d(in_channels, out_channels, 3, 1, eps=sn_eps)
        self.conv2 = SNConv2d(out_channels, out_channels, 3, 1, eps=sn_eps)
        self.conv_sc = SNConv2d(in_channels, out_channels, 1, 0, eps=sn_eps)
        self.bn1 = ConditionalBatchNorm(in_channels, cond_dim, bn_eps, sn_eps)
        self.bn2 = ConditionalBatchNorm(out_channels, cond_dim, bn_eps, sn_eps)
        self.in1 = nn.InstanceNorm2d(in_channels, eps=_FIXED_NORM_EPS, affine=True)
        self.in2 = nn.InstanceNorm2d(out_channels, eps=_FIXED_NORM_EPS, affine=True)
        # The IN affine params are initialised from the BN path and never trained (SPEC §3.4).
        for p in itertools.chain(self.in1.parameters(), self.in2.parameters()):
            p.requires_grad_(False)
        # Non-persistent: not in the reference's state_dict, but stackable to [B].
        self.register_buffer("in_initialized", torch.tensor(False), persistent=False)

    def reset_in_init(self) -> None:
        self.in_initialized.fill_(False)

    def forward(
        self, x: Tensor, c: Tensor, use_in: _UseIn | bool | Tensor = False, per_image: bool = False
    ) -> Tensor:
        if not isinstance(use_in, _UseIn):
            use_in = _as_use_in(use_in, x.shape[0], x.device)
        flags = self.in_initialized
        mixed = use_in.any and not use_in.all
        if flags.dim() == 0 and mixed and x.shape[0] > 1:
            raise ValueError(
                "a per-image use_in mixing True and False needs a per-image IN state: stack "
                "'in_initialized' of every GBlock to [B] (see Generator.in_state_names())"
            )
        need_init = use_in.mask & ~(flags.expand(x.shape[0]) if flags.dim() == 0 else flags)
        init_any = use_in.any and bool(need_init.any())

        h = F.relu(
            self._normalize(self.bn1, self.in1, x, c, use_in, need_init, init_any, per_image)
        )
        h = F.interpolate(h, scale_factor=2)
        x = F.interpolate(x, scale_factor=2)
        h = self.conv1(h)
        # in2 is initialised from conv1's output, which already went through the new in1.
        h = F.relu(
            self._normalize(self.bn2, self.in2, h, c, use_in, need_init, init_any, per_image)
        )
        h = self.conv2(h)

        # After this forward an image is initialised iff it used IN; a BN forward clears it.
        with torch.no_grad():
            if flags.dim() == 0:
                flags.fill_(use_in.all)
            else:
                flags.copy_(use_in.mask)
        return h + self.conv_sc(x)

    def _normalize(
        self,
        bn: ConditionalBatchNorm,
        inorm: nn.InstanceNorm2d,
        x: Tensor,
        c: Tensor,
        use_in: _UseIn,
        need_init: Tensor,
        init_any: bool,
        per_image: bool,
    ) -> Tensor:
        out_bn = None
        if not use_in.all or init_any:
            # The reference calls ccbn only for BN samples and for IN initialisation; in train
            # mode the other images' stacked buffers must not move.
            update = (~use_in.mask | need_init) if (per_image and use_in.any) else None
            with torch.set_grad_enabled(torch.is_grad_enabled() and not use_in.all):
                out_bn = bn(x, c, per_image, update)
        if not use_in.any:
            assert out_bn is not None
            return out_bn
        if init_any:
            assert out_bn is not None
            self._init_instance_norm(inorm, out_bn, need_init)
        # Frozen: the reference's IN params have requires_grad=False and never get a gradient.
        out_in = _instance_norm(x, inorm.weight.detach(), inorm.bias.detach(), inorm.eps)
        if use_in.all:
            return out_in
        assert out_bn is not None
        return torch.where(use_in.mask.view(-1, 1, 1, 1), out_in, out_bn)

    @staticmethod
    @torch.no_grad()
    def _init_instance_norm(inorm: nn.InstanceNorm2d, out_bn: Tensor, need_init: Tensor) -> None:
        # IN weight = unbiased spatial std, bias = spatial mean of the ccbn output, so that IN
        # starts close to (not equal to) the BN path (SPEC §3.4).
        n, ch = out_bn.shape[:2]
        mean = torch.mean(out_bn, (2, 3))
        std = torch.std(out_bn.reshape(n, ch, -1), 2)
        weight, bias = inorm.weight, inorm.bias
        if weight.dim() == 2:
            weight.copy_(torch.where(need_init.view(-1, 1), std, weight))
            bias.copy_(torch.where(need_init.view(-1, 1), mean, bias))
        elif n == 1:
            weight.copy_(torch.where(need_init, std[0], weight))
            bias.copy_(torch.where(need_init, mean[0], bias))
        else:
            raise RuntimeError(_IN_BATCH_ERROR)


class Attention(nn.Module):
    """SA-GAN self-attention with bias-free SN 1x1 convs and a scalar gain ``gamma``."""

    def __init__(self, ch: int, sn_eps: float) -> None:
        super().__init__()
        self.ch = ch
        self.gamma = nn.Parameter(torch.tensor(0.0))
        self.theta = SNConv2d(ch, ch // 8, 1, 0, bias=False, eps=sn_eps)
        self.phi = SNConv2d(ch, ch // 8, 1, 0, bias=False, eps=sn_eps)
        self.g = SNConv2d(ch, ch // 2, 1, 0, bias=False, eps=sn_eps)
        self.o = SNConv2d(ch // 2, ch, 1, 0, bias=False, eps=sn_eps)

    def forward(self, x: Tensor) -> Tensor:
        n, _, height, width = x.shape
        positions = height * width
        theta = self.theta(x).view(n, self.ch // 8, positions)
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(n, self.ch // 8, positions // 4)
        g = F.max_pool2d(self.g(x), [2, 2]).view(n, self.ch // 2, positions // 4)
        if n > 1 and self.__dict__.get("fused", False):
            attended = fused_attention(theta, phi, g)
        elif n > 1 and x.device.type == "cpu":
            # One image at a time on the CPU: a [HW, HW/4] map (4 M values at 64x64) stays in
            # the cache from the product through the softmax to the second product, where the
            # whole batch's maps would not (1.5x faster at B = 8). And beta @ g^T, transposed
            # after, instead of g @ beta^T: CPU bmm copies a transposed 4096 x 1024 operand
            # to make it contiguous (forward and backward), which costs as much as the product.
            # Same math, float rounding apart; B = 1 keeps the reference's order (fixtures).
            attended = torch.cat([
                torch.bmm(_softmax_map(theta[i : i + 1], phi[i : i + 1]), g[i : i + 1].transpose(1, 2)).transpose(1, 2)
                for i in range(n)
            ])
        else:
            attended = torch.bmm(g, _softmax_map(theta, phi).transpose(1, 2))
        o = self.o(attended.view(n, self.ch // 2, height, width))
        gamma = self.gamma if self.gamma.dim() == 0 else self.gamma.view(-1, 1, 1, 1)
        return gamma * o + x


def _softmax_map(theta: Tensor, phi: Tensor) -> Tensor:
    return F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)  # [N, HW, HW/4]


def fused_attention(theta: Tensor, phi: Tensor, g: Tensor) -> Tensor:
    """``g @ softmax(theta^T phi)^T`` through ``F.scaled_dot_product_attention`` (scale 1).

    The fused kernels (flash on the CPU, flash or memory-efficient on CUDA) never hold the
    [HW, HW/4] map: they stream it in tiles with an online softmax, forward and backward.
    They need one head size for queries, keys and values, so theta and phi (C/8 channels) are
    padded with zeros to g's C/2, which leaves every dot product unchanged. Same math as the
    reference's two products, float rounding apart (summation order of the online softmax).
    """
    width = max(theta.shape[1], g.shape[1])
    q, k, v = (
        F.pad(t.transpose(1, 2), (0, width - t.shape[1])).contiguous().unsqueeze(1) for t in (theta, phi, g)
    )
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1)  # [N, HW, width]
    return out[..., : g.shape[1]].transpose(1, 2).contiguous()  # [N, C/2, HW]


class DBlock(nn.Module):
    """D residual block (SPEC §4); the first block has no input ReLU and pools before conv_sc."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        preactivation: bool,
        downsample: bool,
        sn_eps: float,
    ) -> None:
        super().__init__()
        self.preactivation, self.downsample = preactivation, downsample
        self.conv1 = SNConv2d(in_channels, out_channels, 3, 1, eps=sn_eps)
        self.conv2 = SNConv2d(out_channels, out_channels, 3, 1, eps=sn_eps)
        self.conv_sc = (
            SNConv2d(in_channels, out_channels, 1, 0, eps=sn_eps)
            if in_channels != out_channels or downsample
            else None
        )

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.preactivation:
            if self.conv_sc is not None:
                x = self.conv_sc(x)
            return F.avg_pool2d(x, 2) if self.downsample else x
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        return self.conv_sc(x) if self.conv_sc is not None else x

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x) if self.preactivation else x  # out of place: x feeds the shortcut
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + self._shortcut(x)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """BigGAN generator with DGP's additions (SPEC §3).

    ``forward(z, e, use_in)`` takes the already embedded class ``e = G.shared(y)``, as DGP
    does; passing int64 class indices instead embeds them inside the forward (so that a
    stacked ``shared.weight`` given to ``functional_call`` is used). At 256 the latent is
    119-dimensional (7 slots of 17): size z from ``G.dim_z``.
    """

    def __init__(
        self,
        resolution: int = 128,
        G_ch: int = 96,
        dim_z: int = 120,
        shared_dim: int = 128,
        n_classes: int = 1000,
        hier: bool = True,
        bn_eps: float = 1e-5,
        sn_eps: float = 1e-6,
        attn_resolution: int | None = 64,
    ) -> None:
        super().__init__()
        if resolution not in _G_ARCH:
            raise ValueError(
                f"BigGAN G resolution must be one of {sorted(_G_ARCH)}, got {resolution}"
            )
        in_mult, out_mult = _G_ARCH[resolution]
        self.resolution, self.ch, self.n_classes = resolution, G_ch, n_classes
        self.shared_dim, self.hier, self.bottom_width = shared_dim, hier, _BOTTOM_WIDTH
        if hier:
            # dim_z is silently rounded down to a multiple of the slot count (SPEC §3.1).
            self.num_slots = len(in_mult) + 1
            self.z_chunk_size = dim_z // self.num_slots
            self.dim_z = self.z_chunk_size * self.num_slots
        else:
            self.num_slots, self.z_chunk_size, self.dim_z = 1, dim_z, dim_z
        cond_dim = shared_dim + (self.z_chunk_size if hier else 0)

        self.shared = ClassEmbedding(n_classes, shared_dim)
        self.linear = SNLinear(self.z_chunk_size, in_mult[0] * G_ch * _BOTTOM_WIDTH**2, eps=sn_eps)
        blocks = []
        for index, (c_in, c_out) in enumerate(zip(in_mult, out_mult)):
            layers: list[nn.Module] = [GBlock(c_in * G_ch, c_out * G_ch, cond_dim, bn_eps, sn_eps)]
            if _BOTTOM_WIDTH * 2 ** (index + 1) == attn_resolution:
                layers.append(Attention(c_out * G_ch, sn_eps))
            blocks.append(nn.ModuleList(layers))
        self.blocks = nn.ModuleList(blocks)
        self.output_layer = nn.Sequential(
            OutputBatchNorm(out_mult[-1] * G_ch),
            nn.ReLU(),
            SNConv2d(out_mult[-1] * G_ch, 3, 3, 1, eps=sn_eps),
        )
        # Unstacked rank of every tensor: one more at forward time means "per-image stacked".
        self._base_ndim = {name: t.dim() for name, t in self._named_tensors()}

    def _named_tensors(self) -> itertools.chain[tuple[str, Tensor]]:
        return itertools.chain(self.named_parameters(), self.named_buffers())

    def is_stacked(self) -> bool:
        """True if any parameter/buffer currently carries an image dimension (functional_call)."""
        return any(
            t.dim() != self._base_ndim.get(name, t.dim()) for name, t in self._named_tensors()
        )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def embed(self, y: Tensor, weight: Tensor | None = None) -> Tensor:
        """``shared(y)``, with an optional (possibly stacked [B, n_classes, dim]) table."""
        return _embed(y, self.shared.weight if weight is None else weight)

    def forward(self, z: Tensor, e: Tensor, use_in: bool | Tensor = False) -> Tensor:
        if not torch.is_floating_point(e):
            e = self.shared(e)
        if z.dim() != 2 or z.shape[1] != self.dim_z:
            raise ValueError(
                f"z must be [N, {self.dim_z}] for this generator (resolution {self.resolution}), "
                f"got {list(z.shape)}"
            )
        n = z.shape[0]
        per_image = self.is_stacked()
        mode = _as_use_in(use_in, n, z.device)
        if self.training and not per_image and mode.any and not mode.all:
            raise ValueError("train-mode BN with a per-sample use_in needs stacked parameters")
        if self.hier:
            chunks = torch.split(z, self.z_chunk_size, 1)
            h = self.linear(chunks[0])
            # Block i is conditioned on [embedding, chunk i+1], embedding first (SPEC §3.2).
            conds = [torch.cat([e, chunk], 1) for chunk in chunks[1:]]
        else:
            h = self.linear(z)
            conds = [e] * self.num_blocks
        h = h.view(n, -1, self.bottom_width, self.bottom_width)
        for blocklist, cond in zip(self.blocks, conds):
            h = blocklist[0](h, cond, mode, per_image)
            for extra in blocklist[1:]:
                h = extra(h)
        out_bn, act, out_conv = self.output_layer
        return torch.tanh(out_conv(act(out_bn(h, per_image))))

    def reset_in_init(self) -> None:
        """Make the next use_in forward re-initialise every IN layer (DGP's reset_G)."""
        for blocklist in self.blocks:
            blocklist[0].reset_in_init()

    @torch.no_grad()
    def reset_instance_norm_(self) -> None:
        """IN affine params back to their constructor values (ones/zeros) and flags cleared."""
        for blocklist in self.blocks:
            block = blocklist[0]
            for inorm in (block.in1, block.in2):
                inorm.weight.fill_(1.0)
                inorm.bias.fill_(0.0)
            block.reset_in_init()

    def param_group_names(self, update_embed: bool = False) -> list[list[str]]:
        """Names yielded by the reference's ``get_params(i, update_embed)``, i = 0..B+1 (§3.5).

        DGP's optimizer uses i = 0..B only: the output layer is never fine-tuned.
        """
        groups = [[f"linear.{n}" for n, _ in self.linear.named_parameters()]]
        if update_embed:
            groups[0] += [f"shared.{n}" for n, _ in self.shared.named_parameters()]
        for i, blocklist in enumerate(self.blocks):
            groups.append([f"blocks.{i}.{n}" for n, _ in blocklist.named_parameters()])
        groups.append([f"output_layer.{n}" for n, _ in self.output_layer.named_parameters()])
        return groups

    def in_param_names(self) -> list[str]:
        """The DGP-only in1/in2 params, absent from the published checkpoints (SPEC §5)."""
        return [n for n, _ in self.named_parameters() if ".in1." in n or ".in2." in n]

    def in_state_names(self) -> list[str]:
        """The non-persistent per-block ``in_initialized`` flags (stack them to [B])."""
        return [n for n, _ in self.named_buffers() if n.endswith("in_initialized")]

    def ccbn_param_names(self) -> list[str]:
        """ccbn gain/bias weights: under use_in=True the reference gives them no gradient
        (grad None, so Adam leaves their state alone); stacked, those images get zeros."""
        return [n for n, _ in self.named_parameters() if ".bn1." in n or ".bn2." in n]


# --------------------------------------------------------------------------------------------
# Discriminator (its features make the D-feature loss, genprior.losses)
# --------------------------------------------------------------------------------------------


class Discriminator(nn.Module):
    """BigGAN projection discriminator; ``forward`` returns ``(logit, features)`` (SPEC §4)."""

    def __init__(
        self,
        resolution: int = 128,
        D_ch: int = 96,
        n_classes: int = 1000,
        sn_eps: float = 1e-6,
        attn_resolution: int | None = 64,
    ) -> None:
        super().__init__()
        if resolution not in _D_ARCH:
            raise ValueError(
                f"BigGAN D is only defined for resolutions {sorted(_D_ARCH)} (got {resolution}); "
                "the DGP reference has no 512 discriminator, so the D-feature loss cannot run "
                "at 512 (SPEC §4)"
            )
        in_mult, out_mult = _D_ARCH[resolution]
        self.resolution, self.ch = resolution, D_ch
        blocks = []
        size = resolution
        for index, (c_in, c_out) in enumerate(zip(in_mult, out_mult)):
            c_in = c_in * D_ch if index > 0 else 3
            downsample = index < len(in_mult) - 1
            size = size // 2 if downsample else size
            layers: list[nn.Module] = [DBlock(c_in, c_out * D_ch, index > 0, downsample, sn_eps)]
            if size == attn_resolution:
                layers.append(Attention(c_out * D_ch, sn_eps))
            blocks.append(nn.ModuleList(layers))
        self.blocks = nn.ModuleList(blocks)
        self.linear = SNLinear(out_mult[-1] * D_ch, 1, eps=sn_eps)
        self.embed = SNEmbedding(n_classes, out_mult[-1] * D_ch, eps=sn_eps)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        h = x
        features = []
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h)
                features.append(h)
        # The reference's head ReLU is in place and also rectifies the last block output it
        # already stored in the feature list (SPEC §4 quirk, §12.6): reproduce that.
        h = F.relu(h)
        features[-1] = h
        pooled = torch.sum(h, [2, 3])
        features.append(pooled)
        out = self.linear(pooled)
        if y is not None:  # projection term; DGP never passes y
            out = out + torch.sum(self.embed(y) * pooled, 1, keepdim=True)
        return out, features


# --------------------------------------------------------------------------------------------
# Construction helpers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def orthogonal_init_(module: nn.Module) -> nn.Module:
    """The reference's ``init_weights`` ('ortho'): orthogonal conv/linear/embedding weights."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding):
            nn.init.orthogonal_(m.weight)
    return module


def stack_per_image(module: nn.Module, names: Sequence[str], n_images: int) -> dict[str, Tensor]:
    """Independent per-image copies ``[n_images, *shape]`` of the named params/buffers.

    Parameters keep their ``requires_grad`` (so in1/in2 stay frozen) and become leaves, ready
    for ``torch.func.functional_call(module, stacked, ...)`` and a per-image optimizer.
    """
    tensors = dict(itertools.chain(module.named_parameters(), module.named_buffers()))
    stacked = {}
    for name in names:
        t = tensors[name]
        copy = t.detach().unsqueeze(0).repeat(n_images, *([1] * t.dim()))
        stacked[name] = copy.requires_grad_(t.requires_grad)
    return stacked


def use_fused_attention(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Let the attention layers of ``module`` run :func:`fused_attention` for batches of two
    or more (``perf.fused_attention``); off by default, and B = 1 always keeps the reference's
    two products, so the parity fixtures and the sequential baseline are unchanged."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.__dict__["fused"] = enabled
    return module


def use_output_scaled_spectral_norms(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Let the SN convolutions and linear layers of ``module`` divide their outputs instead of
    their stacked per-image weights by sigma where that is cheaper (``perf.sn_scale_outputs``,
    :meth:`_SpectralNorm.scales_outputs`); off by default, never used at B = 1."""
    for m in module.modules():
        if isinstance(m, (SNConv2d, SNLinear)):
            m.__dict__["scale_outputs"] = enabled
    return module


def cache_frozen_spectral_norms(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Let the SN layers of a frozen module (DGP's D, G's output layer) keep W / sigma(W).

    Only a layer whose weight does not require grad, in eval mode and called with its own
    registered weight (not a stacked one from ``functional_call``), uses the cache; any
    in-place change of the weight or u0 (``load_state_dict``) invalidates it.
    """
    for m in module.modules():
        if isinstance(m, _SpectralNorm):
            m.__dict__["cache_sn"] = enabled
            m.__dict__.pop("_sn_cached", None)
    return module
