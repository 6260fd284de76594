"""Degradation operators: clean image -> observation, for DGP, DIP and mGANprior.

Every degradation has two views of one transform (SPEC §7 of the DGP reference):

* ``target(x)`` makes the **observation** from a clean image. It may be non-differentiable
  (DGP's super-resolution target goes through uint8 and PIL) and always runs without grad.
* ``apply(x)`` is the **differentiable forward model** applied to generated images inside the
  loss.

For most kinds the two are the same op. They differ for Lanczos super-resolution (PIL path vs a
Lanczos2 convolution, a deliberate mismatch in both DGP and DIP), for additive noise and JPEG
(the observation is corrupted, the model is the identity: DIP fits the corrupted image directly).

Batches are [B, C, H, W]. Values follow ``value_range``: (-1, 1) is the DGP / mGANprior
convention and the default; pass (0, 1) for DIP. Every op works per image, so image i of a batch
gets exactly what it would get alone. Random degradations (pixel masks, noise) draw from a
generator seeded by (seed, image id), so an image's mask or noise does not depend on which batch
it lands in; pass ``ids`` (e.g. the datamodule's image ids) to both views. Without ``ids`` the
image's position in the batch is used.

Use ``build_degradation(name, resolution, **params)`` to make one from a config.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "DEGRADATION_NAMES",
    "DGP_GRAY_WEIGHTS",
    "JPEG",
    "MGANPRIOR_GRAY_WEIGHTS",
    "AdditiveGaussianNoise",
    "Box",
    "CenterHole",
    "CenterSquareMask",
    "Compose",
    "Degradation",
    "Downsample",
    "Gray",
    "Identity",
    "MaskImage",
    "Masking",
    "RandomPixelMask",
    "build_degradation",
    "center_hole_box",
    "lanczos_kernel",
    "replication_pad_size",
    "truncate_to_uint8",
]

ValueRange = tuple[float, float]
Ids = Sequence[Hashable] | None
# (top, bottom, left, right), bottom/right exclusive: image[..., top:bottom, left:right].
Box = tuple[int, int, int, int]

_VALUE_RANGES: tuple[ValueRange, ...] = ((-1.0, 1.0), (0.0, 1.0))

# DGP's gray weights sum to 0.9999 and are applied to [-1, 1] values (SPEC §7, §12.13).
DGP_GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.5870, 0.1140)
# mGANprior uses the exact BT.601 weights (mGANprior SPEC §3.5).
MGANPRIOR_GRAY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


def _check_value_range(value_range: Sequence[float]) -> ValueRange:
    vr = (float(value_range[0]), float(value_range[1])) if len(value_range) == 2 else None
    if vr not in _VALUE_RANGES:
        raise ValueError(
            f"value_range={tuple(value_range)!r} is not supported; valid options: "
            f"{[list(r) for r in _VALUE_RANGES]}"
        )
    return vr


def _check_batch(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a batch [B, C, H, W]; got shape {tuple(x.shape)}")


def _batch_ids(x: Tensor, ids: Ids) -> list[Hashable]:
    if ids is None:
        return list(range(x.shape[0]))
    ids = list(ids)
    if len(ids) != x.shape[0]:
        raise ValueError(f"got {len(ids)} ids for a batch of {x.shape[0]} images")
    return ids


def _seed_for(seed: int, image_id: Hashable) -> int:
    # Python's hash() of a str is salted per process; a digest is stable across runs and ranks.
    digest = hashlib.sha256(f"{seed}\x00{image_id!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Degradation:
    """Base class. Subclasses implement ``apply``; ``target`` defaults to ``apply`` without grad."""

    def __init__(self, value_range: Sequence[float] = (-1.0, 1.0)) -> None:
        self.value_range = _check_value_range(value_range)

    # -- value-range helpers, written with the reference's op order for [-1, 1] (SPEC §7) --
    def _to_unit(self, x: Tensor) -> Tensor:
        return (x + 1) / 2 if self.value_range == (-1.0, 1.0) else x

    def _from_unit(self, x: Tensor) -> Tensor:
        return x * 2 - 1 if self.value_range == (-1.0, 1.0) else x

    @property
    def _span(self) -> float:
        return self.value_range[1] - self.value_range[0]

    def apply(self, x: Tensor, ids: Ids = None) -> Tensor:
        """Differentiable forward model, applied to generated images [B, C, H, W]."""
        raise NotImplementedError

    def target(self, x: Tensor, ids: Ids = None) -> Tensor:
        """The observation made from clean images [B, C, H, W]; never tracks gradients."""
        with torch.no_grad():
            return self.apply(x.detach(), ids)

    def __call__(self, x: Tensor, ids: Ids = None) -> Tensor:
        return self.apply(x, ids)

    def metric_box(self, height: int, width: int) -> Box | None:
        """The region DGP-style inpainting metrics are computed on (SPEC §8), or None."""
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"

    def _repr_fields(self) -> dict[str, Any]:
        return {}


class Identity(Degradation):
    """No degradation: reconstruction, and DGP's defence/jitter/morphing/category modes."""

    def apply(self, x: Tensor, ids: Ids = None) -> Tensor:
        return x


class Gray(Degradation):
    """Weighted channel sum copied to 3 channels, on the values as given.

    DGP applies 0.2989/0.5870/0.1140 (sum 0.9999) to [-1, 1] values, so its gray is not
    exactly the [0, 1] luma mapped to [-1, 1] (SPEC §7, §12.13); mGANprior's weights sum to 1.
    """

    def __init__(
        self,
        weights: Sequence[float] = DGP_GRAY_WEIGHTS,
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__(value_range)
        if len(weights) != 3:
            raise ValueError(f"Gray weights must be 3 numbers (R, G, B); got {weights!r}")
        self.weights = tuple(float(w) for w in weights)

    def apply(self, x: Tensor, ids: Ids = None) -> Tensor:
        _check_batch(x)
        wr, wg, wb = self.weights
        gray = wr * x[:, 0:1] + wg * x[:, 1:2] + wb * x[:, 2:3]
        # A view, as the reference's expand: its backward sums the three channels' gradients
        # the reference's way.
        return gray.expand(-1, 3, -1, -1)

    def _repr_fields(self) -> dict[str, Any]:
        return {"weights": self.weights}


# --------------------------------------------------------------------------------------------
# Masks: the observation and the model are both x * known, known in [0, 1] (1 = observed).
# Multiplication reproduces every reference: DGP's hole is 0 on [-1, 1] (mid-gray, SPEC §7),
# mGANprior's x * (1 - m) likewise, DIP's x * m on [0, 1] (black).
# --------------------------------------------------------------------------------------------


class Masking(Degradation):
    """Base for masking degradations: ``apply(x) = x * known_mask(x)``."""

    def known_mask(self, x: Tensor, ids: Ids = None) -> Tensor:
        """Weights broadcastable to x, [B or 1, 1 or C, H, W], 1 = observed, 0 = missing."""
        raise NotImplementedError

    def apply(self, x: Tensor, ids: Ids = None) -> Tensor:
        _check_batch(x)
        return x * self.known_mask(x, ids)


def center_hole_box(height: int, width: int) -> Box:
    """DGP's inpainting hole (SPEC §7): side floor(min(h, w)/3), centred, per axis.

    begin = floor((n - hole)/2) and end = n - begin, so the hole is one pixel wider than
    `hole` when n - hole is odd: 42x42 at 128 but 86x86 at 256. The reference derives both
    axes from h; it only runs on square images, where this is the same.
    """
    hole = min(height, width) // 3
    top = (height - hole) // 2
    left = (width - hole) // 2
    return top, height - top, left, width - left


class CenterHole(Masking):
    """DGP's centre hole (mode inpainting, and the last step of hybrid)."""

    def known_mask(self, x: Tensor, ids: Ids = None) -> Tensor:
        h, w = x.shape[-2:]
        return _box_mask(self.metric_box(h, w), h, w, x)

    def metric_box(self, height: int, width: int) -> Box:
        return center_hole_box(height, width)


class CenterSquareMask(Masking):
    """A centred size x size hole (mGANprior's quantitative setting: 64x64 at 256, rows and
    columns [96, 160); mGANprior SPEC §3.5)."""

    def __init__(self, size: int = 64, value_range: Sequence[float] = (-1.0, 1.0)) -> None:
        super().__init__(value_range)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"CenterSquareMask size must be a positive int; got {size!r}")
        self.size = size

    def metric_box(self, height: int, width: int) -> Box:
        if self.size > min(height, width):
            raise ValueError(f"hole size {self.size} does not fit a {height}x{width} image")
        top = (height - self.size) // 2
        left = (width - self.size) // 2
        return top, top + self.size, left, left + self.size

    def known_mask(self, x: Tensor, ids: Ids = None) -> Tensor:
        h, w = x.shape[-2:]
        return _box_mask(self.metric_box(h, w), h, w, x)

    def _repr_fields(self) -> dict[str, Any]:
        return {"size": self.size}


def _box_mask(box: Box, height: int, width: int, like: Tensor) -> Tensor:
    top, bottom, left, right = box
    mask = torch.ones(1, 1, height, width, device=like.device, dtype=like.dtype)
    mask[..., top:bottom, left:right] = 0
    return mask


class RandomPixelMask(Masking):
    """I.i.d. per-pixel mask shared by all channels, one per image, reproducible per image id.

    A pixel is observed when a U[0, 1) draw exceeds ``drop_fraction`` (DIP's restoration
    notebook: known when the draw > 0.5, or > 0.98 for kate, DIP SPEC §8.5). mGANprior's
    "random 80 %" setting is drop_fraction=0.8 (an interpretation; mGANprior SPEC §3.5).
    The draw uses a CPU generator seeded from (seed, image id), so a mask does not depend on the
    device, the batch size or the image's position in the batch.
    """

    def __init__(
        self,
        keep_fraction: float | None = None,
        drop_fraction: float | None = None,
        seed: int = 0,
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__(value_range)
        if (keep_fraction is None) == (drop_fraction is None):
            raise ValueError(
                "RandomPixelMask needs exactly one of keep_fraction or drop_fraction; got "
                f"keep_fraction={keep_fraction!r}, drop_fraction={drop_fraction!r}"
            )
        drop = 1.0 - float(keep_fraction) if drop_fraction is None else float(drop_fraction)
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1); got {drop!r}")
        self.drop_fraction = drop
        self.seed = int(seed)
        # One-batch cache: apply() is called every step with the same images.
        self._cache_key: tuple[Any, ...] | None = None
        self._cache: Tensor | None = None

    def mask_for(self, image_id: Hashable, height: int, width: int) -> Tensor:
        """The [1, H, W] float32 0/1 mask of one image, on the CPU."""
        generator = torch.Generator().manual_seed(_seed_for(self.seed, image_id))
        draw = torch.rand(1, height, width, generator=generator, dtype=torch.float32)  # whatever the default dtype
        return (draw > self.drop_fraction).float()

    def known_mask(self, x: Tensor, ids: Ids = None) -> Tensor:
        h, w = x.shape[-2:]
        batch_ids = _batch_ids(x, ids)
        key = (tuple(batch_ids), h, w, x.device, x.dtype)
        if key != self._cache_key:
            masks = torch.stack([self.mask_for(i, h, w) for i in batch_ids])
            self._cache = masks.to(device=x.device, dtype=x.dtype)
            self._cache_key = key
        assert self._cache is not None
        return self._cache

    def _repr_fields(self) -> dict[str, Any]:
        return {"drop_fraction": self.drop_fraction, "seed": self.seed}


class MaskImage(Masking):
    """A user mask file, resized to the working size with PIL nearest.

    Values are v/255 of the file (soft edges kept, as mGANprior's anti-aliased masks need);
    a single-channel file gives one mask for all channels, an RGB(A) file one per channel (the
    alpha band is dropped, as in mGANprior). ``white_is_known=True`` follows DIP (white =
    observed); mGANprior's masks mark **missing** pixels white, so pass False for them.
    ``resize='error'`` refuses a mask whose size differs from the image instead.
    """

    def __init__(
        self,
        path: str | Path,
        white_is_known: bool = True,
        resize: Literal["nearest", "error"] = "nearest",
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__(value_range)
        if resize not in ("nearest", "error"):
            raise ValueError(f"resize={resize!r} is not valid; valid options: ['nearest', 'error']")
        self.path = Path(path)
        self.white_is_known = bool(white_is_known)
        self.resize = resize
        try:
            with Image.open(self.path) as img:
                img.load()
                mask = img.convert("L") if img.mode in ("1", "L", "I", "I;16", "F") else img
                self._image = mask if mask.mode == "L" else mask.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read mask image {str(self.path)!r}: {err}") from err
        self._cache_key: tuple[Any, ...] | None = None
        self._cache: Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        """The file's (height, width)."""
        return self._image.height, self._image.width

    def mask_array(self, height: int, width: int) -> np.ndarray:
        """[C, H, W] float32 known-weights in [0, 1] at the given size."""
        img = self._image
        if (img.height, img.width) != (height, width):
            if self.resize == "error":
                raise ValueError(
                    f"mask image {str(self.path)!r} is {img.height}x{img.width} (HxW) but the "
                    f"image is {height}x{width}; resize the mask or use resize='nearest'"
                )
            img = img.resize((width, height), Image.Resampling.NEAREST)
        values = np.asarray(img, dtype=np.float32) / 255.0
        values = values[None] if values.ndim == 2 else values.transpose(2, 0, 1)
        return values if self.white_is_known else 1.0 - values

    def known_mask(self, x: Tensor, ids: Ids = None) -> Tensor:
        h, w = x.shape[-2:]
        key = (h, w, x.device, x.dtype)
        if key != self._cache_key:
            mask = torch.from_numpy(self.mask_array(h, w))[None]
            if mask.shape[1] not in (1, x.shape[1]):
                raise ValueError(
                    f"mask image {str(self.path)!r} has {mask.shape[1]} channels; images have "
                    f"{x.shape[1]}"
                )
            self._cache = mask.to(device=x.device, dtype=x.dtype)
            self._cache_key = key
        assert self._cache is not None
        return self._cache

    def _repr_fields(self) -> dict[str, Any]:
        return {"path": str(self.path), "white_is_known": self.white_is_known}


# --------------------------------------------------------------------------------------------
# Super-resolution
# --------------------------------------------------------------------------------------------

_LANCZOS_SUPPORT = {"lanczos2": 2, "lanczos3": 3}


def _lanczos_distances(factor: int, support: int, phase: float) -> np.ndarray:
    # DIP's Downsampler (DIP SPEC §5.1): nominal width 2*a*f + 1, centre (width + 1)/2, 1-based
    # taps; phase 0.5 drops one tap and shifts the taps by half a pixel.
    width = 2 * support * factor + 1
    center = (width + 1) / 2
    taps = width - 1 if phase == 0.5 else width
    return np.abs(np.arange(1, taps + 1) + phase - center) / factor


def _lanczos_step(value: np.ndarray, d: np.ndarray, support: int) -> np.ndarray:
    """Multiply `value` by L(d), grouped as the reference does: ((v*a*sin(pi d))*sin(pi d/a))
    / (pi*pi*d*d), and left unchanged where d == 0 (L(0) = 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = value * support * np.sin(np.pi * d) * np.sin(np.pi * d / support)
        scaled = scaled / (np.pi * np.pi * d * d)
    return np.where(d == 0, value, scaled)


def lanczos_kernel(
    factor: int, kernel: Literal["lanczos2", "lanczos3"] = "lanczos2", phase: float = 0.5
) -> Tensor:
    """The float64 [K, K] Lanczos kernel of DIP's Downsampler (also DGP's, SPEC §7).

    K = 2*a*f for phase 0.5 (16x16 for Lanczos2 x4), 2*a*f + 1 for phase 0; entry (i, j) is
    L(d_i) L(d_j), normalised to sum 1. It equals the outer product of normalised 1-D taps up
    to float64 rounding; applying the row factor then the column factor in the reference's
    grouping, and normalising with numpy's (pairwise) sum, makes it bit-identical to the
    fixtures' kernels.
    """
    if kernel not in _LANCZOS_SUPPORT:
        raise ValueError(
            f"kernel={kernel!r} is not a Lanczos kernel; valid: {list(_LANCZOS_SUPPORT)}"
        )
    if phase not in (0.0, 0.5):
        raise ValueError(f"phase={phase!r} is not valid; valid options: [0, 0.5]")
    support = _LANCZOS_SUPPORT[kernel]
    d = _lanczos_distances(factor, support, phase)
    rows = _lanczos_step(np.ones((d.size, 1)), d[:, None], support)
    k2d = _lanczos_step(rows, d[None, :], support)
    return torch.from_numpy(k2d / k2d.sum())


def replication_pad_size(kernel_size: int, factor: int) -> int:
    """preserve_size padding of the Downsampler: (K - f)/2 for even K, (K - 1)/2 for odd K."""
    return (kernel_size - factor) // 2 if kernel_size % 2 == 0 else (kernel_size - 1) // 2


def truncate_to_uint8(unit: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 as the references do: x255, clip, then a **truncating** cast.

    Not rounding (DGP SPEC §12.11): for DGP's [-1, 1] images, (v/255 - 0.5)/0.5 mapped back
    lands just below the integer for about 36 % of values, which then drop one level. For
    uint8/255 images on [0, 1] the cast is exact.
    """
    return (unit * 255).clamp(0, 255).to(torch.uint8)


class Downsample(Degradation):
    """Super-resolution degradation by an integer ``factor``.

    Lanczos kernels (DGP, DIP):

    * ``apply``: map to [0, 1], replicate-pad, depthwise Lanczos conv with stride ``factor``
      (DIP's Downsampler, DIP SPEC §5), map back.
    * ``target``: the reference's PIL path (DGP SPEC §7, DIP SPEC §7.2): map to [0, 1], x255,
      clip, **truncate** to uint8 (§12.11: ~36 % of DGP's [-1, 1] values drop one level; for
      uint8/255 inputs on [0, 1] truncation is exact), PIL LANCZOS resize to (W//f, H//f),
      /255, map back. Looped over images.

    ``kernel='bilinear'`` is mGANprior's model (mGANprior SPEC §3.5): F.interpolate with
    scale 1/f, align_corners=False, no antialias, on both views.

    ``upsample=True`` (DGP) brings both views back to full size with bilinear interpolation
    (align_corners=False), so the loss compares full-size images; DIP and mGANprior compare in
    low-resolution space (``upsample=False``).
    """

    def __init__(
        self,
        factor: int = 4,
        kernel: Literal["lanczos2", "lanczos3", "bilinear"] = "lanczos2",
        phase: float = 0.5,
        upsample: bool = True,
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__(value_range)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"SR factor must be an integer >= 2 (e.g. 2, 4, 8); got {factor!r}")
        valid_kernels = [*_LANCZOS_SUPPORT, "bilinear"]
        if kernel not in valid_kernels:
            raise ValueError(f"kernel={kernel!r} is not valid; valid options: {valid_kernels}")
        self.factor = factor
        self.kernel = kernel
        self.phase = float(phase)
        self.upsample = bool(upsample)
        if kernel == "bilinear":
            self.weight64: Tensor | None = None
            self.pad = 0
        else:
            self.weight64 = lanczos_kernel(factor, kernel, self.phase)
            self.pad = replication_pad_size(self.weight64.shape[-1], factor)
        self._weights: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}

    def _weight(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype, x.shape[1])
        if key not in self._weights:
            assert self.weight64 is not None
            # The reference casts the float64 kernel to its tensors' type: float32 (DIP SPEC
            # §5.2), or float64 itself in a float64 run (no float32 rounding of the taps).
            via = torch.float64 if x.dtype == torch.float64 else torch.float32
            k = self.weight64.to(via).to(device=x.device, dtype=x.dtype)
            # The reference's Downsampler is a full C -> C convolution whose off-diagonal
            # filters are zero (DIP SPEC §5.2): the same sum as a depthwise convolution, but
            # it is the kernel the reference runs, so its rounding is the reference's too.
            channels = x.shape[1]
            weight = k.new_zeros(channels, channels, *k.shape)
            for c in range(channels):
                weight[c, c] = k
            self._weights[key] = weight
        return self._weights[key]

    def _check_size(self, x: Tensor) -> None:
        _check_batch(x)
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the SR factor {self.factor}")

    def _up(self, x: Tensor) -> Tensor:
        if not self.upsample:
            return x
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)

    def downsample(self, x: Tensor) -> Tensor:
        """The differentiable low-resolution image, before any upsampling back."""
        self._check_size(x)
        if self.kernel == "bilinear":
            return F.interpolate(
                x,
                scale_factor=1 / self.factor,
                mode="bilinear",
                align_corners=False,
                antialias=False,
            )
        unit = F.pad(self._to_unit(x), (self.pad,) * 4, mode="replicate")
        low = F.conv2d(unit, self._weight(x), stride=self.factor)
        return self._from_unit(low)

    def apply(self, x: Tensor, ids: Ids = None) -> Tensor:
        return self._up(self.downsample(x))

    def target(self, x: Tensor, ids: Ids = None) -> Tensor:
        if self.kernel == "bilinear":
            return super().target(x, ids)
        self._check_size(x)
        with torch.no_grad():
            return self._up(self._from_unit(self._pil_lanczos(self._to_unit(x.detach()))))

    def _pil_lanczos(self, unit: Tensor) -> Tensor:
        """PIL LANCZOS resize of each image's truncated uint8 version; returns [0, 1] float."""
        h, w = unit.shape[-2:]
        size = (w // self.factor, h // self.factor)
        as_uint8 = truncate_to_uint8(unit).permute(0, 2, 3, 1).cpu().numpy()
        lows = []
        for image in as_uint8:
            pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            low = np.asarray(pil.resize(size, Image.Resampling.LANCZOS))
            lows.append(low[..., None] if low.ndim == 2 else low)
        low = torch.from_numpy(np.stack(lows)).permute(0, 3, 1, 2)
        # torchvision's ToTensor: uint8 -> float32, then /255 (in float64 in a float64 run,
        # DGP TRACES_F64.md §3: the reference's pil_to_np divides in the run's dtype there).
        via = torch.float64 if unit.dtype == torch.float64 else torch.float32
        return low.to(device=unit.device, dtype=via).div(255).to(unit.dtype)

    def _repr_fields(self) -> dict[str, Any]:
        return {"factor": self.factor, "kernel": self.kernel, "upsample": self.upsample}


# --------------------------------------------------------------------------------------------
# Observation-only corruptions (DIP): the model is the identity.
# --------------------------------------------------------------------------------------------


class AdditiveGaussianNoise(Degradation):
    """Observation = clip(x + n, range), n ~ N(0, sigma^2) per pixel and channel (DIP §8.1).

    ``sigma`` is on the [0, 1] scale (DIP's sigma = 25/255) and scaled to ``value_range``. As in
    DIP the sum is formed in float64 and the result is not re-quantised. The noise is drawn per
    image from a generator seeded by (seed, image id). ``apply`` is the identity: DIP fits the
    noisy image itself.
    """

    def __init__(
        self,
        sigma: float,
        seed: int = 0,
        clip: bool = True,
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__(value_range)
        if not sigma >= 0:
            raise ValueError(f"noise sigma must be >= 0 (on the [0, 1] scale); got {sigma!r}")
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.clip = bool(clip)

    def noise_for(self, image_id: Hashable, shape: Sequence[int]) -> Tensor:
        """float64 noise (on ``value_range``'s scale) for one image, on the CPU."""
        generator = torch.Generator().manual_seed(_seed_for(self.seed, image_id))
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * (
            self.sigma * self._span
        )

    def apply(self, x: Tensor, ids: Ids = None) -> Tensor:
        return x

    def target(self, x: Tensor, ids: Ids = None) -> Tensor:
        _check_batch(x)
        noise = torch.stack([self.noise_for(i, x.shape[1:]) for i in _batch_ids(x, ids)])
        with torch.no_grad():
            noisy = x.detach().double() + noise.to(x.device)
            if self.clip:
                noisy = noisy.clamp(*self.value_range)
            return noisy.to(x.dtype)

    def _repr_fields(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "seed": self.seed}


class JPEG(Degradation):
    """Observation = the image JPEG-compressed by PIL at ``quality``; the model is the identity.

    DIP's JPEG-artifact task fits a JPEG file directly (DIP SPEC §8.1) and has no reference
    compression step; this makes such observations from clean images. The uint8 conversion
    rounds (there is no reference quirk to reproduce here), PIL's default chroma subsampling.
    """

    def __init__(self, quality: int = 10, value_range: Sequence[float] = (-1.0, 1.0)) -> None:
        super().__init__(value_range)
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be an int in [1, 100]; got {quality!r}")
        self.quality = quality

    def apply(self, x: Tensor, ids: Ids = None) -> Tensor:
        return x

    def target(self, x: Tensor, ids: Ids = None) -> Tensor:
        _check_batch(x)
        with torch.no_grad():
            unit = self._to_unit(x.detach()).clamp(0, 1)
            as_uint8 = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            outs = []
            for image in as_uint8:
                buffer = io.BytesIO()
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
                    buffer, format="JPEG", quality=self.quality
                )
                buffer.seek(0)
                with Image.open(buffer) as decoded:
                    out = np.asarray(decoded.convert("L" if image.shape[-1] == 1 else "RGB"))
                outs.append(out[..., None] if out.ndim == 2 else out)
            out = torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2)
            return self._from_unit(out.to(device=x.device, dtype=torch.float32).div(255)).to(
                x.dtype
            )

    def _repr_fields(self) -> dict[str, Any]:
        return {"quality": self.quality}


class Compose(Degradation):
    """Apply degradations in order, on both views (DGP's hybrid: x2 SR, gray, hole; SPEC §7)."""

    def __init__(self, degradations: Sequence[Degradation]) -> None:
        degradations = list(degradations)
        if not degradations:
            raise ValueError("Compose needs at least one degradation")
        ranges = {d.value_range for d in degradations}
        if len(ranges) != 1:
            raise ValueError(f"Compose parts disagree on value_range: {sorted(ranges)}")
        super().__init__(ranges.pop())
        self.degradations = degradations

    def apply(self, x: Tensor, ids: Ids = None) -> Tensor:
        for d in self.degradations:
            x = d.apply(x, ids)
        return x

    def target(self, x: Tensor, ids: Ids = None) -> Tensor:
        for d in self.degradations:
            x = d.target(x, ids)
        return x

    def metric_box(self, height: int, width: int) -> Box | None:
        for d in self.degradations:
            box = d.metric_box(height, width)
            if box is not None:
                return box
        return None

    def __repr__(self) -> str:
        return f"Compose({self.degradations!r})"


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

# name -> (allowed keyword params); aliases map onto canonical names.
_PARAMS: dict[str, tuple[str, ...]] = {
    "identity": (),
    "gray": ("weights",),
    "inpainting": (),
    "random_mask": ("keep_fraction", "drop_fraction", "seed"),
    "mask_image": ("path", "white_is_known", "resize"),
    "center_square": ("size",),
    "sr": ("factor", "kernel", "phase", "upsample"),
    "hybrid": ("factor",),
    "noise": ("sigma", "seed", "clip"),
    "jpeg": ("quality",),
}
_ALIASES: dict[str, str] = {
    "reconstruct": "identity",
    # DGP modes without a degradation (SPEC §7 table, last row).
    "defence": "identity",
    "jitter": "identity",
    "morphing": "identity",
    "category_transfer": "identity",
    "colorization": "gray",
}
DEGRADATION_NAMES: tuple[str, ...] = tuple(sorted([*_PARAMS, *_ALIASES]))


def build_degradation(name: str, resolution: int, **params: Any) -> Degradation:
    """Make a degradation by its config name for square images of side ``resolution``.

    Names: identity/reconstruct (and DGP's defence, jitter, morphing, category_transfer),
    gray/colorization, inpainting (DGP centre hole), random_mask, mask_image, center_square,
    sr, hybrid, noise, jpeg. Every kind also takes ``value_range`` ((-1, 1) default, (0, 1) for
    DIP). Unknown names or parameters raise ValueError listing the valid ones.
    """
    key = name.lower() if isinstance(name, str) else name
    key = _ALIASES.get(key, key)
    if key not in _PARAMS:
        raise ValueError(f"unknown degradation {name!r}; valid options: {list(DEGRADATION_NAMES)}")
    allowed = (*_PARAMS[key], "value_range")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"degradation {name!r} got unknown parameter(s) {unknown}; valid: {sorted(allowed)}"
        )
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int; got {resolution!r}")
    vr = params.pop("value_range", (-1.0, 1.0))

    if key == "identity":
        return Identity(value_range=vr)
    if key == "gray":
        return Gray(value_range=vr, **params)
    if key == "inpainting":
        return CenterHole(value_range=vr)
    if key == "random_mask":
        return RandomPixelMask(value_range=vr, **params)
    if key == "mask_image":
        if "path" not in params:
            raise ValueError("degradation 'mask_image' needs path=<mask file>")
        mask_image = MaskImage(value_range=vr, **params)
        mask_image.mask_array(resolution, resolution)  # a size mismatch fails at start-up
        return mask_image
    if key == "center_square":
        mask = CenterSquareMask(value_range=vr, **params)
        mask.metric_box(resolution, resolution)  # fails early if it does not fit
        return mask
    if key == "sr":
        return _check_divides(Downsample(value_range=vr, **params), resolution)
    if key == "hybrid":
        # DGP's factor is 2 in hybrid mode and 4 otherwise (SPEC §6).
        sr = _check_divides(Downsample(params.get("factor", 2), value_range=vr), resolution)
        return Compose([sr, Gray(value_range=vr), CenterHole(value_range=vr)])
    if key == "noise":
        if "sigma" not in params:
            raise ValueError("degradation 'noise' needs sigma=<std on the [0, 1] scale>")
        return AdditiveGaussianNoise(value_range=vr, **params)
    assert key == "jpeg"
    return JPEG(value_range=vr, **params)


def _check_divides(sr: Downsample, resolution: int) -> Downsample:
    if resolution % sr.factor:
        raise ValueError(f"SR factor {sr.factor} does not divide the resolution {resolution}")
    return sr
