"""Reading, preprocessing and writing images the way the reference implementations do.

Every image that enters genprior goes through `load_image` (decode to 8-bit RGB, with clear
errors for files that cannot be used) and `preprocess` (square crop, resize, [-1, 1] tensor).
Two preprocessing recipes exist because the priors were trained on differently prepared data:

* ``"dgp"`` (DGP SPEC §2, the default): torchvision-style centre crop of the long edge with
  Python's round-half-to-even offsets, then a PIL *bilinear* resize (skipped when the crop
  already has the target size). This reproduces the DGP parity fixtures bit for bit.
* ``"pggan"``: the crop of PGGAN's ``dataset_tool.py create_lsun`` (floor offsets) followed by
  a PIL *Lanczos* ("ANTIALIAS") resize, which is how the LSUN training sets of the PGGAN priors
  used by mGANprior were made. On the 256x256 targets that mGANprior expects it is the identity,
  matching mGANprior's "never resize" behaviour (mGANprior SPEC §3.4).
* ``"none"``: no crop and no resize, for methods that work at the image's own size (DIP crops
  to a multiple of 32 or 64 itself, DIP SPEC §7.1); the result is [3, H, W].

Outputs are written with `save_image`, which truncates to uint8 like the reference
(uint8(255 * (x + 1) / 2), DGP SPEC §11).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "SmallImageWarning",
    "center_crop_long_edge",
    "crop_box_long_edge",
    "decode_image",
    "image_grid",
    "labelled_sheet",
    "labelled_sheet_size",
    "load_image",
    "preprocess",
    "safe_name",
    "save_image",
    "to_tensor",
    "to_uint8",
    "write_grid_sheet",
]

#: File suffixes treated as images when a folder is scanned (compared in lower case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)

AlphaPolicy = Literal["drop", "white"]
MinSizePolicy = Literal["upsample", "error"]
PreprocessMethod = Literal["dgp", "pggan", "none"]


class ImageLoadError(Exception):
    """An image that cannot be used: missing, empty, not an image, corrupt, or too small.

    ``path`` names the file (or the LMDB record) and ``reason`` says what is wrong, so that an
    evaluation can record the failure per image and carry on with the others.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot use image {self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Keep the two-argument constructor picklable across DataLoader worker processes.
        return (type(self), (self.path, self.reason))


class SmallImageWarning(UserWarning):
    """An image whose square crop is smaller than the working resolution and gets upsampled."""


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike[str], *, alpha: AlphaPolicy = "drop") -> Image.Image:
    """Open an image file and return it as an 8-bit RGB PIL image (fully decoded).

    Raises `ImageLoadError` naming the file when it is missing, a directory, empty, not a
    recognised image format, truncated/corrupt, or holds pixel values that cannot be mapped to
    8 bits (NaN). See `to_rgb8` for how every PIL mode becomes RGB.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file does not exist")
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageLoadError(path, f"cannot stat file ({err.strerror or err})") from err
    if size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ImageLoadError(path, f"cannot read file ({err.strerror or err})") from err
    return decode_image(data, name=str(path), alpha=alpha)


def decode_image(data: bytes, *, name: str = "<bytes>", alpha: AlphaPolicy = "drop") -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) to an 8-bit RGB PIL image.

    ``name`` is only used in error messages and warnings (a path, or an LMDB key).
    """
    if len(data) == 0:
        raise ImageLoadError(name, "file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise ImageLoadError(name, "not a recognised image format") from err
    except Image.DecompressionBombError as err:
        raise ImageLoadError(name, f"refused by PIL's decompression-bomb check ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:
        # Some decoders (WebP) decode everything on open, so a truncated body fails here too.
        raise ImageLoadError(name, f"corrupt or truncated image ({err})") from err
    try:
        # Image.open only reads the header; force the full decode here so that a truncated
        # or corrupt body fails now, with the file's name, and not later inside a transform.
        img.load()
    except Image.DecompressionBombError as err:
        raise ImageLoadError(name, f"refused by PIL's decompression-bomb check ({err})") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageLoadError(name, f"corrupt or truncated image data ({err})") from err
    return to_rgb8(img, name=name, alpha=alpha)


def to_rgb8(img: Image.Image, *, name: str = "<image>", alpha: AlphaPolicy = "drop") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    * RGB, L, 1, YCbCr, LAB, HSV, CMYK and palette images: PIL's own ``convert("RGB")``, which
      is what the reference does (``Image.open(p).convert('RGB')``), so results stay identical
      for every image the reference can read. CMYK uses PIL's plain (profile-free) formula;
      embedded ICC profiles are ignored for all modes, as in the reference.
    * Alpha (RGBA, LA, PA, P with a transparency entry): ``alpha="drop"`` (default) discards
      it like the reference's ``convert('RGB')``, keeping whatever colour lies under
      transparent pixels; ``alpha="white"`` composites onto white instead. A warning is
      emitted when the alpha channel is not fully opaque, because then the two differ.
    * 16/32-bit integer modes (I;16*, I) and float (F): PIL would clip values above 255 to
      white; instead they are rescaled to 8 bits (see `_wide_to_l`).
    """
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_to_l(img, name).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        lo, _ = rgba.getextrema()[3]
        if lo < 255:
            if alpha == "white":
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            warnings.warn(
                f"{name}: alpha channel is not opaque; it is dropped (the colour under "
                "transparent pixels is kept), as the reference's convert('RGB') does",
                stacklevel=3,
            )
        if mode == "P":
            # Convert via RGBA so that palette transparency is handled consistently.
            return rgba.convert("RGB")
    return img.convert("RGB") if mode != "RGB" else img


def _wide_to_l(img: Image.Image, name: str) -> Image.Image:
    """Map a 16-bit, 32-bit or float single-channel image to 8-bit L.

    * I;16 variants are 16-bit by construction: v8 = round(v16 / 257), so 65535 -> 255 and an
      8-bit value stored as v*257 comes back exactly.
    * I (int32) does not say its bit depth (old Pillow opened 16-bit PNGs as I), so it is
      inferred from the maximum: <= 255 is taken as 8-bit, <= 65535 as 16-bit, else 32-bit.
      Negative values are clipped to 0.
    * F: values in [0, 1] are scaled by 255 (the usual float-image convention); otherwise they
      are taken as 0..255 and clipped, with a warning. NaN or inf is an error.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ImageLoadError(name, "float image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif lo < 0.0 or hi > 255.0:
            warnings.warn(
                f"{name}: float image has values in [{lo:g}, {hi:g}], outside [0, 1] and "
                "[0, 255]; clipped to [0, 255]",
                stacklevel=4,
            )
        out = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(out, mode="L")
    arr = arr.astype(np.int64)
    arr = np.clip(arr, 0, None)
    hi = int(arr.max()) if arr.size else 0
    if img.mode.startswith("I;16") or 255 < hi <= 65535:
        scale = 257
    elif hi <= 255:
        scale = 1
    else:
        scale = 16843009  # (2**32 - 1) / 255
    # Integer round-half-up of v / scale, exact for the 8-bit-in-16-bit case.
    out = (arr + scale // 2) // scale
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="L")


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def crop_box_long_edge(
    size_wh: tuple[int, int], *, rounding: Literal["half_even", "floor"] = "half_even"
) -> tuple[int, int, int, int]:
    """Box (left, top, right, bottom) of the centred square of side min(w, h).

    ``half_even`` is torchvision's ``center_crop`` (offsets ``int(round((h - s) / 2))`` with
    Python's banker's rounding; DGP SPEC §2: 375x500 -> (0, 62, 375, 437)). ``floor`` is
    PGGAN's ``create_lsun`` (``(h - s) // 2``). They differ only when h - s is odd and
    (h - s) / 2 rounds up, e.g. 375x501 gives top 63 vs 62.
    """
    w, h = size_wh
    s = min(w, h)
    if rounding == "half_even":
        # Python 3 round() is half-to-even and returns an int, as torchvision relies on.
        left, top = round((w - s) / 2.0), round((h - s) / 2.0)
    elif rounding == "floor":
        left, top = (w - s) // 2, (h - s) // 2
    else:
        raise ValueError(f"unknown rounding {rounding!r}; use 'half_even' or 'floor'")
    return (left, top, left + s, top + s)


def center_crop_long_edge(
    img: Image.Image, *, rounding: Literal["half_even", "floor"] = "half_even"
) -> Image.Image:
    """Crop the centred square of side min(w, h) (the reference's CenterCropLongEdge)."""
    box = crop_box_long_edge(img.size, rounding=rounding)
    if box == (0, 0, *img.size):
        return img
    return img.crop(box)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL image -> float32 [3, H, W] in [-1, 1].

    The arithmetic is torchvision's ToTensor (divide by 255) followed by Normalize(0.5, 0.5)
    (subtract, then divide), in that order, so values match the reference to the last bit.
    """
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}")
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    x = arr.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return x.sub_(0.5).div_(0.5)


def preprocess(
    img: Image.Image,
    resolution: int,
    *,
    method: PreprocessMethod = "dgp",
    min_size_policy: MinSizePolicy = "upsample",
    name: str = "<image>",
) -> torch.Tensor:
    """RGB PIL image -> float32 [3, R, R] in [-1, 1], as the reference prepares its targets.

    ``method`` selects the recipe (see the module docstring; ``"none"`` returns [3, H, W] and
    ignores ``resolution``). An image whose square crop is
    smaller than ``resolution`` is upsampled like the reference does, but with a
    `SmallImageWarning` that names the image and both sizes (``min_size_policy="upsample"``),
    or rejected with `ImageLoadError` (``"error"``).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    img = to_rgb8(img, name=name)
    if method == "none":
        return to_tensor(img)
    w, h = img.size
    if min(w, h) < resolution:
        msg = (
            f"{name}: image is {w}x{h}, its square crop ({min(w, h)}px) is smaller than the "
            f"resolution {resolution}"
        )
        if min_size_policy == "error":
            raise ImageLoadError(name, msg.split(": ", 1)[1])
        if min_size_policy != "upsample":
            raise ValueError(f"unknown min_size_policy {min_size_policy!r}")
        warnings.warn(msg + "; it is upsampled", SmallImageWarning, stacklevel=2)
    if method == "dgp":
        square = center_crop_long_edge(img, rounding="half_even")
        resample = Image.Resampling.BILINEAR
    elif method == "pggan":
        square = center_crop_long_edge(img, rounding="floor")
        resample = Image.Resampling.LANCZOS
    else:
        raise ValueError(f"unknown preprocessing method {method!r}; use 'dgp', 'pggan' or 'none'")
    if square.size != (resolution, resolution):
        square = square.resize((resolution, resolution), resample)
    return to_tensor(square)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def save_image(
    tensor: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> None:
    """Write a [3, H, W] (or [1, 3, H, W], or [H, W] gray) tensor as an 8-bit image.

    The conversion is the reference's truncating one: uint8(255 * (x - lo) / (hi - lo)), i.e.
    uint8(255 * (x + 1) / 2) for the default [-1, 1] range (DGP SPEC §11) and uint8(255 * x)
    for ``value_range=(0, 1)``. Values are clipped to [0, 255] first, because a float to
    uint8 cast of an out-of-range value wraps around. The format follows the suffix.
    """
    arr = to_uint8(tensor, value_range=value_range)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def to_uint8(tensor: torch.Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """[3, H, W] (or [1, 3, H, W], or [H, W] gray) -> HWC (or HW) uint8, as `save_image` writes it."""
    x = tensor.detach().to("cpu", torch.float32)
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"save_image takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    lo, hi = value_range
    if hi <= lo:
        raise ValueError(f"value_range must be increasing, got {value_range}")
    # Same operation order as the reference for [-1, 1]: (x + 1) / 2, then * 255.
    arr = ((x - lo) / (hi - lo) * 255.0).numpy()
    # A diverged fit's NaN pixels are written black (a NaN has no uint8 value).
    arr = np.clip(np.nan_to_num(arr, nan=0.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3:
        if arr.shape[0] == 1:
            arr = arr[0]
        elif arr.shape[0] == 3:
            arr = np.ascontiguousarray(arr.transpose(1, 2, 0))
        else:
            raise ValueError(f"expected 1 or 3 channels, got shape {tuple(tensor.shape)}")
    elif arr.ndim != 2:
        raise ValueError(f"expected [3,H,W], [1,3,H,W] or [H,W], got {tuple(tensor.shape)}")
    return arr


def safe_name(name: str) -> str:
    """An image id as a folder name: anything but letters, digits, '-', '_', '.' becomes '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "image"


def image_grid(frames: list[torch.Tensor], ncol: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Tile [3, H, W] frames (any range) into one [3, H', W'] image, 2 px apart; with
    ``normalize``, min-max normalised over the whole sheet like the reference's sheets."""
    n = len(frames)
    ncol = ncol or max(1, math.isqrt(n))
    nrow = math.ceil(n / ncol)
    _, h, w = frames[0].shape
    pad = 2
    grid = torch.zeros(3, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for k, f in enumerate(frames):
        r, c = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, top : top + h, left : left + w] = f.detach().float().cpu()
    if normalize:
        lo, hi = grid.min(), grid.max()
        grid = (grid - lo) / (hi - lo).clamp(min=1e-8)
    return grid


# Labelled sheets: PIL's built-in font, so that no font file has to ship with genprior.
_TEXT = (0, 0, 0)
_SHEET_BACKGROUND = (255, 255, 255)
_SHEET_PAD = 2


def labelled_sheet(
    frames: Sequence[torch.Tensor | None],
    ncol: int,
    *,
    labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    tile: int | tuple[int, int] | None = None,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """Tile [3, H, W] frames ``ncol`` per row on a white sheet that says what each one is.

    ``labels`` (one per frame) are written in a band above their frame (column titles; a row
    whose labels are all empty has no band),
    ``row_labels`` (one per row of the sheet) left of their row and ``title`` in a band on top,
    with PIL's default font; a label wider than its frame is shortened with "...". A ``None``
    frame leaves its cell empty (to start a new row). Frames are converted as `save_image`
    writes them (``value_range``, truncation; a uint8 frame is taken as its pixels), so every
    frame's pixels are those of its own PNG, unless ``tile`` (an int, or (height, width)) has
    every frame resized to that size with ``resample``. Returns an RGB image:
    ``labelled_sheet(...).save(path)``; its size is `labelled_sheet_size`. `image_grid` stays
    the reference's unlabelled sheet (progress.png).
    """
    cells = list(frames)
    shown = [f for f in cells if f is not None]
    if not shown:
        raise ValueError("labelled_sheet needs at least one frame")
    if labels is not None and len(labels) != len(cells):
        raise ValueError(f"{len(labels)} labels for {len(cells)} frames")
    ncol = max(1, int(ncol))
    nrow = math.ceil(len(cells) / ncol)
    if row_labels is not None and len(row_labels) != nrow:
        raise ValueError(f"{len(row_labels)} row labels for {nrow} rows")
    pictures = [None if f is None else _sheet_picture(f, value_range, tile, resample) for f in cells]
    w, h = next(p for p in pictures if p is not None).size
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    band = _band_height(measure, font)
    # a row has a band for its column titles when one of its frames has a label
    label_band = [band if labels is not None and any(labels[r * ncol : (r + 1) * ncol]) else 0
                  for r in range(nrow)]
    title_band = band if title else 0
    names = [str(r) for r in row_labels] if row_labels is not None else []
    left0 = _row_label_column(measure, font, names) + _SHEET_PAD
    tops = [title_band + _SHEET_PAD + sum(label_band[:r]) + r * (h + _SHEET_PAD) for r in range(nrow + 1)]
    pitch_x = w + _SHEET_PAD
    sheet = Image.new("RGB", (left0 + ncol * pitch_x, tops[-1]), _SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k, picture in enumerate(pictures):
        r, c = divmod(k, ncol)
        left, top = left0 + c * pitch_x, tops[r]
        if picture is not None:
            sheet.paste(picture, (left, top + label_band[r]))
        if labels is not None and labels[k]:
            text = _fit_text(measure, str(labels[k]), font, w)
            x = left + (w - measure.textlength(text, font=font)) / 2
            draw.text((x, top + 1), text, fill=_TEXT, font=font)
    for r, name in enumerate(names):
        if name:
            draw.text((_SHEET_PAD, tops[r] + label_band[r] + (h - band) / 2), name, fill=_TEXT, font=font)
    if title:
        draw.text((_SHEET_PAD, 1), _fit_text(measure, title, font, sheet.width - 2 * _SHEET_PAD),
                  fill=_TEXT, font=font)
    return sheet


def write_grid_sheet(
    rows: Sequence[Sequence[torch.Tensor | None]],
    col_labels: Sequence[str],
    row_labels: Sequence[str],
    path: str | os.PathLike[str],
    **kwargs: Any,
) -> Path:
    """``labelled_sheet`` of a grid given row by row, a title above every column (over the first
    row) and a label left of every row, saved as ``path`` (its folder made); ``kwargs`` go to
    ``labelled_sheet`` (``value_range``, ``tile``, ``resample``). Returns ``path``."""
    ncol = len(col_labels)
    if any(len(row) != ncol for row in rows):
        raise ValueError(f"every row of the sheet needs {ncol} images, one per column label")
    frames = [x for row in rows for x in row]
    labels = [*col_labels, *[""] * (len(frames) - ncol)]
    sheet = labelled_sheet(frames, ncol, labels=labels, row_labels=row_labels, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def labelled_sheet_size(
    nrow: int,
    ncol: int,
    tile: int | tuple[int, int],
    *,
    labelled_rows: int = 0,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> tuple[int, int]:
    """(width, height) of a `labelled_sheet` of ``nrow`` x ``ncol`` frames of size ``tile``
    (an int, or (height, width)) whose labels fill ``labelled_rows`` rows' bands."""
    h, w = (tile, tile) if isinstance(tile, int) else tile
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    band = _band_height(measure, font)
    names = [str(r) for r in row_labels] if row_labels is not None else []
    width = _row_label_column(measure, font, names) + _SHEET_PAD + ncol * (w + _SHEET_PAD)
    height = (band if title else 0) + _SHEET_PAD + labelled_rows * band + nrow * (h + _SHEET_PAD)
    return width, height


def _sheet_picture(frame: torch.Tensor, value_range: tuple[float, float],
                   tile: int | tuple[int, int] | None, resample: Image.Resampling) -> Image.Image:
    """One frame of a sheet as an RGB image (uint8 frames as they are), resized to ``tile``."""
    if frame.dtype == torch.uint8:
        arr = frame.detach().cpu().numpy()
        arr = np.ascontiguousarray(arr.transpose(1, 2, 0)) if arr.ndim == 3 else arr
    else:
        arr = to_uint8(frame, value_range=value_range)
    picture = Image.fromarray(arr).convert("RGB")
    if tile is not None:
        h, w = (tile, tile) if isinstance(tile, int) else tile
        if picture.size != (w, h):
            picture = picture.resize((w, h), resample)
    return picture


def _band_height(measure: ImageDraw.ImageDraw, font: Any) -> int:
    """The height of a band of text (a title, a row's column titles)."""
    return int(measure.textbbox((0, 0), "Agjy(|", font=font)[3]) + 4


def _row_label_column(measure: ImageDraw.ImageDraw, font: Any, names: Sequence[str]) -> int:
    """The width of the row labels' column (0 without row labels)."""
    width = max((int(measure.textlength(r, font=font)) for r in names if r), default=-1) + 1
    return width + 4 if width > 0 else 0


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, or its longest prefix + "..." that is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    for end in range(len(text) - 1, 0, -1):
        short = text[:end].rstrip() + "..."
        if draw.textlength(short, font=font) <= width:
            return short
    return ""
