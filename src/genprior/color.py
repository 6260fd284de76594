"""sRGB <-> CIE Lab conversion in torch, numerically matching skimage's rgb2lab / lab2rgb.

DGP scores colorization on a Lab recombination of the result (SPEC §8): the result's a, b with
the target's L, converted back to RGB and clipped. The reference does this with skimage on the
CPU; doing it in torch keeps the metric on the GPU and batched. The constants are those of
skimage's defaults (sRGB primaries, D65 white, 2° observer), so values agree with
`skimage.color.rgb2lab` / `lab2rgb` to float64 rounding (tested at 1e-6 and typically ~1e-12).

Images are channel-first: [..., 3, H, W] with RGB in [0, 1]. Computation is float64 by default
because the sRGB gamma and the cube root amplify float32 error near 0.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from genprior.degradations import truncate_to_uint8

__all__ = ["lab_to_rgb", "rgb_to_lab", "ycbcr_recombine"]

# Linear sRGB -> CIE XYZ (ITU-R BT.709 primaries), rows X, Y, Z; the matrix skimage uses.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
# Reference white D65 with the 2° observer, as skimage's default illuminant.
_WHITE_D65 = (0.95047, 1.0, 1.08883)

# CIE Lab piecewise constants (skimage uses these rounded forms, not the exact 216/24389).
_LAB_EPS = 0.008856
_LAB_KAPPA = 7.787
_LAB_OFFSET = 16.0 / 116.0
# Inverse-side threshold on f(t): the value of f at _LAB_EPS, as rounded in skimage.
_LAB_F_EPS = 0.2068966


def _apply_matrix(matrix: Tensor, image: Tensor) -> Tensor:
    """Multiply every pixel's 3-vector (channel dim -3) by `matrix`."""
    return torch.einsum("ij,...jhw->...ihw", matrix, image)


def _matrices(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    # Built in float64 and inverted there, as skimage does with numpy.linalg.inv.
    xyz_from_rgb = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64)
    rgb_from_xyz = torch.linalg.inv(xyz_from_rgb)
    white = torch.tensor(_WHITE_D65, dtype=torch.float64).view(3, 1, 1)
    return (
        xyz_from_rgb.to(device=device, dtype=dtype),
        rgb_from_xyz.to(device=device, dtype=dtype),
        white.to(device=device, dtype=dtype),
    )


def _check_rgb_like(image: Tensor, what: str) -> None:
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"{what} must have shape [..., 3, H, W]; got {tuple(image.shape)}")


def rgb_to_lab(rgb: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """sRGB in [0, 1] ([..., 3, H, W]) to CIE Lab (L in [0, 100]); like skimage.color.rgb2lab."""
    _check_rgb_like(rgb, "rgb")
    xyz_from_rgb, _, white = _matrices(rgb.device, dtype)
    c = rgb.to(dtype)
    # sRGB transfer function -> linear light.
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055).pow(2.4), c / 12.92)
    xyz = _apply_matrix(xyz_from_rgb, linear) / white
    # t > eps guarantees t > 0, so the real cube root is pow(t, 1/3); clamp keeps the unused
    # branch of torch.where finite (pow of a negative base is NaN).
    f = torch.where(
        xyz > _LAB_EPS,
        xyz.clamp_min(_LAB_EPS).pow(1.0 / 3.0),
        _LAB_KAPPA * xyz + _LAB_OFFSET,
    )
    fx, fy, fz = f.unbind(-3)
    lightness = 116.0 * fy - 16.0
    a = 500.0 * (fx - fy)
    b = 200.0 * (fy - fz)
    return torch.stack((lightness, a, b), dim=-3)


def lab_to_rgb(lab: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """CIE Lab ([..., 3, H, W]) to sRGB clipped to [0, 1]; like skimage.color.lab2rgb.

    As in skimage, a negative z (possible for out-of-gamut a, b) is set to 0 before the
    inverse transform, and the final RGB is clipped to [0, 1].
    """
    _check_rgb_like(lab, "lab")
    _, rgb_from_xyz, white = _matrices(lab.device, dtype)
    lightness, a, b = lab.to(dtype).unbind(-3)
    fy = (lightness + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp_min(0.0)
    f = torch.stack((fx, fy, fz), dim=-3)
    xyz = torch.where(f > _LAB_F_EPS, f.pow(3), (f - _LAB_OFFSET) / _LAB_KAPPA) * white
    linear = _apply_matrix(rgb_from_xyz, xyz)
    # Inverse sRGB transfer; the clamp keeps the unused pow branch finite for negatives.
    srgb = torch.where(
        linear > 0.0031308,
        1.055 * linear.clamp_min(0.0031308).pow(1.0 / 2.4) - 0.055,
        12.92 * linear,
    )
    return srgb.clamp(0.0, 1.0)


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
