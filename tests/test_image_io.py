"""image_io: decoding of every awkward input, reference-exact preprocessing, truncating save."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genprior.image_io import (
    ImageLoadError,
    SmallImageWarning,
    center_crop_long_edge,
    crop_box_long_edge,
    decode_image,
    load_image,
    preprocess,
    save_image,
    to_tensor,
)

# --------------------------------------------------------------------------------------------
# Decoding: modes
# --------------------------------------------------------------------------------------------


def _ramp(h: int = 24, w: int = 32) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def test_rgb_jpeg_is_returned_unchanged(tmp_path: Path) -> None:
    rgb = np.stack([_ramp(), _ramp()[::-1], 255 - _ramp()], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgb)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    Image.fromarray(_ramp(), mode="L").save(tmp_path / "g.jpg", quality=100)
    img = load_image(tmp_path / "g.jpg")
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (24, 32, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_bilevel_image(tmp_path: Path) -> None:
    Image.fromarray(_ramp() > 127).save(tmp_path / "b.png")
    arr = np.asarray(load_image(tmp_path / "b.png"))
    assert set(np.unique(arr)) <= {0, 255}


def _rgba(opaque: bool) -> np.ndarray:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red under every pixel
    rgba[..., 3] = 255
    if not opaque:
        rgba[:4, :, 3] = 0  # top half fully transparent
    return rgba


def test_rgba_alpha_dropped_by_default_with_warning(tmp_path: Path) -> None:
    Image.fromarray(_rgba(opaque=False), mode="RGBA").save(tmp_path / "t.png")
    with pytest.warns(UserWarning, match=r"t\.png: alpha channel is not opaque"):
        img = load_image(tmp_path / "t.png")
    # Like the reference's convert('RGB'): the colour under transparent pixels is kept.
    assert np.asarray(img)[0, 0].tolist() == [200, 0, 0]


def test_rgba_composited_on_white_on_request(tmp_path: Path) -> None:
    Image.fromarray(_rgba(opaque=False), mode="RGBA").save(tmp_path / "t.png")
    arr = np.asarray(load_image(tmp_path / "t.png", alpha="white"))
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[7, 7].tolist() == [200, 0, 0]


def test_opaque_rgba_does_not_warn(tmp_path: Path) -> None:
    Image.fromarray(_rgba(opaque=True), mode="RGBA").save(tmp_path / "o.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(load_image(tmp_path / "o.png"))[0, 0].tolist() == [200, 0, 0]


def test_la_and_palette_with_transparency(tmp_path: Path) -> None:
    la = Image.merge("LA", [Image.fromarray(_ramp()), Image.new("L", (32, 24), 0)])
    la.save(tmp_path / "la.png")
    arr = np.asarray(load_image(tmp_path / "la.png", alpha="white"))
    assert (arr == 255).all()
    pal = Image.fromarray(_ramp() % 4).convert("P")
    pal.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120] + [0] * 756)
    pal.save(tmp_path / "p.png", transparency=0)
    with pytest.warns(UserWarning, match="alpha"):
        img = load_image(tmp_path / "p.png")
    assert img.mode == "RGB"
    assert np.asarray(img)[0, 0].tolist() == [10, 20, 30]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    src = Image.open(tmp_path / "c.jpg")
    assert src.mode == "CMYK"
    arr = np.asarray(load_image(tmp_path / "c.jpg"))
    # Pure "red" in CMYK (no cyan, full magenta and yellow) is red in RGB.
    assert arr[8, 8, 0] > 240 and arr[8, 8, 1] < 15 and arr[8, 8, 2] < 15


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    v8 = _ramp()
    Image.fromarray(v8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    arr = np.asarray(load_image(tmp_path / "g16.png"))
    # 8-bit values stored as v * 257 come back exactly (PIL's convert would clip to 255).
    np.testing.assert_array_equal(arr[..., 0], v8)
    half = np.full((4, 4), 32768, np.uint16)
    Image.fromarray(half).save(tmp_path / "half.png")
    assert np.asarray(load_image(tmp_path / "half.png"))[0, 0, 0] == 128


def test_32bit_int_and_float_images(tmp_path: Path) -> None:
    Image.fromarray(_ramp().astype(np.int32) * 257, mode="I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "i.tif"))[..., 0], _ramp())
    f = _ramp().astype(np.float32) / 255.0
    Image.fromarray(f, mode="F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "f.tif"))[..., 2], _ramp())
    nan = np.full((4, 4), np.nan, np.float32)
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(tmp_path / "nan.tif")


# --------------------------------------------------------------------------------------------
# Decoding: unusable files
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"nope\.jpg: file does not exist") as info:
        load_image(tmp_path / "nope.jpg")
    assert info.value.path.endswith("nope.jpg") and info.value.reason == "file does not exist"


def test_directory_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png: file is empty"):
        load_image(tmp_path / "empty.png")


def test_non_image_file(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not a JPEG\n")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg: not a recognised image format"):
        load_image(tmp_path / "notes.jpg")


def test_truncated_jpeg(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(tmp_path / "cut.jpg")


def test_decode_image_names_the_record_and_pickles() -> None:
    with pytest.raises(ImageLoadError, match="lmdb#abc") as info:
        decode_image(b"\x00garbage", name="lmdb#abc")
    err = pickle.loads(pickle.dumps(info.value))
    assert (err.path, err.reason) == (info.value.path, info.value.reason)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def test_crop_box_rounding() -> None:
    # DGP SPEC §2: 375x500 -> top 62 (round half to even of 62.5), not 63.
    assert crop_box_long_edge((375, 500)) == (0, 62, 375, 437)
    assert crop_box_long_edge((500, 496)) == (2, 0, 498, 496)
    # 1.5 rounds to 2 (half to even), PGGAN's floor gives 1.
    assert crop_box_long_edge((378, 375)) == (2, 0, 377, 375)
    assert crop_box_long_edge((378, 375), rounding="floor") == (1, 0, 376, 375)
    img = Image.new("RGB", (10, 10))
    assert center_crop_long_edge(img) is img


def test_to_tensor_range_and_layout() -> None:
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = (0, 255, 51)
    x = to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1], abs=1e-7)


def test_small_image_upsampled_with_warning_or_refused() -> None:
    tiny = Image.new("RGB", (40, 30), (10, 20, 30))
    with pytest.warns(
        SmallImageWarning, match=r"tiny\.png: image is 40x30.*smaller than the resolution 64"
    ):
        x = preprocess(tiny, 64, name="tiny.png")
    assert x.shape == (3, 64, 64)
    with pytest.raises(ImageLoadError, match=r"tiny\.png.*40x30"):
        preprocess(tiny, 64, name="tiny.png", min_size_policy="error")


def test_pggan_preprocessing() -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    # Identity on a 256x256 target at 256, as mGANprior's no-resize path.
    x = preprocess(Image.fromarray(arr), 256, method="pggan")
    assert torch.equal(x, to_tensor(Image.fromarray(arr)))
    wide = Image.fromarray(rng.integers(0, 256, (300, 401, 3), dtype=np.uint8))
    expected = wide.crop((50, 0, 350, 300)).resize((128, 128), Image.Resampling.LANCZOS)
    assert torch.equal(preprocess(wide, 128, method="pggan"), to_tensor(expected))


def test_no_preprocessing_keeps_the_native_size() -> None:
    arr = np.random.default_rng(2).integers(0, 256, (30, 45), dtype=np.uint8)
    x = preprocess(Image.fromarray(arr), 256, method="none")  # no crop, no resize, no warning
    assert x.shape == (3, 30, 45)
    assert torch.equal(x[1], torch.from_numpy(arr).float().div(255).sub(0.5).div(0.5))


@pytest.mark.shared
def test_preprocess_matches_dgp_fixtures(shared_dir: Path, dgp_ref: Path) -> None:
    pipeline = torch.load(dgp_ref / "dgp_pipeline_parity.pt", weights_only=True)["preprocess"]
    d_images = torch.load(dgp_ref / "biggan_tiny_parity.pt", weights_only=True)["D_images"]
    data = shared_dir / "data" / "dgp"
    for name in ("ILSVRC2012_val_00000525", "ILSVRC2012_val_00003004"):
        img = load_image(data / f"{name}.JPEG")
        info = pipeline[f"{name}_crop_info"]
        assert list(img.size) == info["orig_size_wh"]
        assert list(crop_box_long_edge(img.size)) == info["crop_box_ltrb"]
    x3004 = preprocess(load_image(data / "ILSVRC2012_val_00003004.JPEG"), 128)
    # Data ops only: PIL decodes and resizes uint8 images in integer arithmetic, and to_tensor's
    # /255, -0.5, /0.5 are correctly rounded elementwise ops, so the fixture (made on another
    # CPU) is matched bit for bit at any thread count.
    assert torch.equal(x3004, pipeline["ILSVRC2012_val_00003004_128"][0])
    x525 = preprocess(load_image(data / "ILSVRC2012_val_00000525.JPEG"), 128)
    assert torch.equal(x525, d_images["real"][0])
    assert d_images["real_crop_info"]["crop_box_ltrb"] == [0, 62, 375, 437]


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def test_save_image_truncates_like_the_reference(tmp_path: Path) -> None:
    v = torch.arange(256, dtype=torch.float32).reshape(1, 16, 16).expand(3, 16, 16)
    x = (v / 255 - 0.5) / 0.5
    save_image(x, tmp_path / "x.png")
    back = torch.from_numpy(np.array(Image.open(tmp_path / "x.png"))).permute(2, 0, 1)
    expected = ((x + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)  # truncation
    assert torch.equal(back, expected)
    # Truncation after the float round trip lands some values one level below (SPEC §7).
    assert ((v - back.float()) >= 0).all() and ((v - back.float()) <= 1).all()
    assert (back.float() < v).any()


def test_save_image_ranges_clipping_and_shapes(tmp_path: Path) -> None:
    x = torch.tensor([[-3.0, -1.0], [0.0, 3.0]]).expand(1, 3, 2, 2)
    save_image(x, tmp_path / "clip.png")
    arr = np.asarray(Image.open(tmp_path / "clip.png"))[..., 0]
    assert arr.tolist() == [[0, 0], [127, 255]]
    save_image(torch.full((3, 2, 2), 0.5), tmp_path / "unit.png", value_range=(0.0, 1.0))
    assert np.asarray(Image.open(tmp_path / "unit.png"))[0, 0].tolist() == [127, 127, 127]
    save_image(torch.zeros(4, 4), tmp_path / "sub" / "gray.png")
    assert Image.open(tmp_path / "sub" / "gray.png").mode == "L"
    with pytest.raises(ValueError, match="batch"):
        save_image(torch.zeros(2, 3, 4, 4), tmp_path / "b.png")
