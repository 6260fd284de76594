"""mGANprior as a method: the released loss and optimiser, batching, one code vs N, the tasks,
train.py end to end on LSUN images, and the latent-only GAN-inversion baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.testing import assert_close

from genprior import engine
from genprior.cli.train import run_train
from genprior.color import ycbcr_recombine
from genprior.config import compose
from genprior.datamodules import load_items
from genprior.degradations import (
    AdditiveGaussianNoise,
    CenterSquareMask,
    Downsample,
    Gray,
    Identity,
    MaskImage,
    RandomPixelMask,
)
from genprior.image_io import load_image, to_tensor
from genprior.items import ImageBatch, ImageItem
from genprior.losses import IMAGENET_MEAN, IMAGENET_STD
from genprior.methods import build
from genprior.methods.dgp import DGP, DGPConfig
from genprior.methods.mganprior import (
    MGAN_TASKS,
    MGANConfig,
    MGANMaskImage,
    MGANPrior,
    VGGFeatureLoss,
    build_mgan_degradation,
    images_in_dtype,
)
from genprior.optim import PerImageSGD
from genprior.priors.biggan import Generator
from genprior.priors.checkpoints import CheckpointError
from genprior.priors.pggan import PGGANGenerator

LSUN_COLOR = ("data", "lsun", "colorization", "bedroom")


def _images(n: int, size: int = 32, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _batch(images: Tensor, ids: list[str], classes: list[int] | None = None) -> ImageBatch:
    """The engine's batch of these images, as they are (no copy: float64 images stay float64)."""
    return ImageBatch(images=images, classes=torch.tensor(classes or [-1] * len(ids)), ids=ids,
                      paths=[f"memory:{i}" for i in ids])


def _fit(method: MGANPrior | DGP, steps: int | None = None) -> list[Tensor]:
    """``steps`` optimisation steps (all of the schedule: None) through engine.step, as
    Reconstruction takes them; returns the per-step losses [B]."""
    optimizer = method.make_optimizer()
    losses = []
    while (len(losses) < steps) if steps is not None else not method.progress.all_done():
        record, _, _ = engine.step(method, optimizer)
        losses.append(record.total.clone())
    return losses


def _group_names(method: MGANPrior | DGP) -> list[str]:
    return [g["name"] for g in method.make_optimizer().param_groups]


def _features() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


# ------------------------------------------------------------------------------ loss and optimiser
def test_loss_is_the_released_combine_loss(small_pggan: PGGANGenerator) -> None:
    config = MGANConfig(composing_layer=3, z_number=3, iterations=1, l1_lambda=0.5, vgg_lambda=0.1)
    vgg = VGGFeatureLoss(_features(), image_size=64)
    method = MGANPrior(small_pggan, config, Gray((0.299, 0.587, 0.114)), perceptual=vgg, task="colorization")
    y = _images(1)
    method.start(_batch(y, ["a"]))
    total, record, x = method.loss()

    # The reference's formula, written out (mGANprior SPEC §3.2, §3.5).
    def gray(t: Tensor) -> Tensor:
        return (t[:, 0:1] * 0.299 + t[:, 1:2] * 0.587 + t[:, 2:3] * 0.114).expand(-1, 3, -1, -1)

    def phi(t: Tensor) -> Tensor:
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        return vgg.features(F.interpolate((t * 0.5 + 0.5).sub(mean).div(std), size=64, mode="nearest"))

    z, alpha = method.z.detach(), method.alpha.detach()
    feats = [small_pggan.head(z[:, n], 3) * alpha[:, n, :, None, None] for n in range(3)]
    x_ref = small_pggan.tail(sum(feats) / 3, 3)
    # the N codes batched through G1 against one code at a time (other conv kernels, amplified
    # by the pixel norms over 4 channels of this random net): measured max 6.3e-6 (threads 1/2/4)
    assert_close(x, x_ref, rtol=0, atol=2e-5)
    gx, gy = gray(x_ref), gray(y)
    expected = 0.5 * F.l1_loss(gx, gy) + F.mse_loss(gx, gy) + 0.1 * (F.l1_loss(phi(gx), phi(gy)) * 0.001)
    # the same formula on x and x_ref: measured 0 with these codes, 8.2e-8 relative with others
    # (threads 1/2/4)
    assert_close(total, expected, rtol=1e-5, atol=0)
    # VGG on repeated gray (identical channels either way): measured 0 (threads 1/2/4)
    assert_close(record.terms["vgg_loss"][0], F.l1_loss(phi(gx), phi(gy)) * 0.001, rtol=1e-5, atol=0)
    # Initial values: α = 1/N, z from the image's own stream.
    assert torch.equal(alpha, torch.full((1, 3, small_pggan.feature_shape(3)[0]), 1 / 3))


def test_gd_is_plain_sgd_on_codes_and_importances(small_pggan: PGGANGenerator) -> None:
    config = MGANConfig(composing_layer=4, z_number=4, iterations=3, vgg_lambda=0.0)
    method = MGANPrior(small_pggan, config, Identity())
    y = _images(1)
    method.start(_batch(y, ["a"]))
    z, alpha = method.z.detach().clone().requires_grad_(True), method.alpha.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([z, alpha], lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(small_pggan.multi_code(z, alpha, 4), y).backward()
        opt.step()
    _fit(method)
    # torch.optim.SGD with F.mse_loss against PerImageSGD with the per-image mean: measured 0
    # (threads 1/2/4)
    assert_close(method.z.detach(), z.detach(), rtol=0, atol=1e-6)
    assert_close(method.alpha.detach(), alpha.detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(alpha, torch.full_like(alpha, 0.25))  # α really moves


def test_per_image_sgd_has_per_image_rates_and_freezes_finished_images() -> None:
    p = torch.ones(3, 2, requires_grad=True)
    opt = PerImageSGD([{"name": "z", "params": [p]}], batch_size=3)
    opt.set_lrs({"z": torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)})
    opt.active = torch.tensor([True, True, False])
    p.grad = torch.tensor([[1.0, 2.0], [1.0, 2.0], [float("nan"), 1.0]])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([[0.0, -1.0], [0.5, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="not stacked over 4 images"):
        PerImageSGD([{"name": "z", "params": [p]}], batch_size=4)


def test_adam_option(small_pggan: PGGANGenerator) -> None:
    config = MGANConfig(composing_layer=2, z_number=2, iterations=2, vgg_lambda=0.0,
                        optimization="Adam", lr=0.01)
    method = MGANPrior(small_pggan, config, Identity())
    method.start(_batch(_images(1), ["a"]))
    z0 = method.z.detach().clone()
    _fit(method)
    # Adam's first step moves every element by about lr.
    assert float((method.z.detach() - z0).abs().max()) == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="'GD' or 'Adam'"):
        MGANConfig(optimization="SGD")


def test_batch_of_two_gives_each_image_its_own_result(small_pggan: PGGANGenerator) -> None:
    config = MGANConfig(composing_layer=4, z_number=3, iterations=4, vgg_lambda=0.0)
    ids = ["a", "b"]
    y = _images(2)
    both = MGANPrior(small_pggan, config, Identity())
    both.start(_batch(y, ids))
    losses2 = torch.stack(_fit(both))
    for b, image_id in enumerate(ids):
        one = MGANPrior(small_pggan, config, Identity())
        one.start(_batch(y[b : b + 1], [image_id]))
        losses1 = torch.stack(_fit(one))[:, 0]
        # batch 2 against batch 1 (other conv kernels), four SGD steps: measured max 2.2e-7
        # relative on losses, 2.4e-7 absolute on z, 3.0e-6 on the output (threads 1/2/4)
        assert_close(losses2[:, b], losses1, rtol=1e-5, atol=0)
        assert_close(both.z[b].detach(), one.z[0].detach(), rtol=0, atol=1e-4)
        assert_close(both.final_output()[b], one.final_output()[0], rtol=0, atol=1e-4)


def test_one_code_versus_n_codes(small_pggan: PGGANGenerator) -> None:
    y = _images(1)
    single = MGANPrior(small_pggan, MGANConfig(composing_layer=0, z_number=1, train_alpha=False,
                                           iterations=5, vgg_lambda=0.0), Identity())
    single.start(_batch(y, ["a"]))
    assert _group_names(single) == ["z"]
    single_losses = _fit(single)
    # The single-code baseline is the plain generator: x = G(z), α stays 1.
    with torch.no_grad():
        assert torch.equal(single.final_output(), small_pggan(single.z[:, 0]))
    assert torch.equal(single.alpha, torch.ones_like(single.alpha))

    multi = MGANPrior(small_pggan, MGANConfig(composing_layer=4, z_number=8, iterations=5,
                                          vgg_lambda=0.0), Identity())
    multi.start(_batch(y, ["a"]))
    assert _group_names(multi) == ["z", "alpha"]
    multi_losses = _fit(multi)
    assert multi.z.shape == (1, 8, 512) and multi.alpha.shape == (1, 8, 16)
    assert float(multi_losses[-1][0]) < float(multi_losses[0][0])
    assert float(single_losses[-1][0]) <= float(single_losses[0][0])
    info = multi.image_info(0)
    assert info == {"z_number": 8, "composing_layer": 4, "train_alpha": True}


# ------------------------------------------------------------------------------ tasks
def test_every_task_builds_its_degradation(tmp_path: Path) -> None:
    mask_file = tmp_path / "mask.png"
    arr = np.zeros((256, 256, 3), np.uint8)
    arr[10:20, 30:50] = 255
    Image.fromarray(arr).save(mask_file)
    kinds = {
        "inversion": Identity, "reconstruct": Identity, "colorization": Gray,
        "inpainting": CenterSquareMask, "random_mask": RandomPixelMask, "mask_image": MaskImage,
        "sr": Downsample, "denoising": AdditiveGaussianNoise,
    }
    assert set(kinds) == set(MGAN_TASKS)
    for task, cls in kinds.items():
        deg = build_mgan_degradation(task, 256, mask_path=str(mask_file))
        assert isinstance(deg, cls), task
    x = _images(1, 256)
    assert build_mgan_degradation("inpainting", 256).metric_box(256, 256) == (96, 160, 96, 160)
    # White = missing in mGANprior's masks: the loss sees x * (1 - m).
    masked = build_mgan_degradation("mask_image", 256, mask_path=str(mask_file)).apply(x)
    assert torch.equal(masked[..., 10:20, 30:50], torch.zeros(1, 3, 10, 20))
    assert torch.equal(masked[..., 20:, :], x[..., 20:, :])
    # x16 bilinear without antialiasing: the mean of the central 2x2 of every 16x16 block.
    low = build_mgan_degradation("sr", 256, sr_factor=16).apply(x)
    assert low.shape == (1, 3, 16, 16)
    blocks = x.view(1, 3, 16, 16, 16, 16)[:, :, :, 7:9, :, 7:9].mean(dim=(3, 5))
    # interpolation weights (0.5, 0.5) against a mean: measured max 6.0e-8 (threads 1/2/4)
    assert_close(low, blocks, rtol=0, atol=1e-6)
    drop = build_mgan_degradation("random_mask", 256, mask_fraction=0.8).known_mask(x, ids=["a"])
    assert 0.78 < 1 - float(drop.mean()) < 0.82
    with pytest.raises(ValueError, match="not an mGANprior task"):
        build_mgan_degradation("hybrid", 256)
    with pytest.raises(ValueError, match=r"task\.mask_path"):
        build_mgan_degradation("mask_image", 256)


def test_sr_observation_is_shown_at_full_size(small_pggan: PGGANGenerator) -> None:
    method = MGANPrior(small_pggan, MGANConfig(composing_layer=2, z_number=2, iterations=1, vgg_lambda=0.0),
                       build_mgan_degradation("sr", 32, sr_factor=4), task="sr")
    method.start(_batch(_images(2), ["a", "b"]))
    assert method.target.shape == (2, 3, 8, 8)
    shown = method.observation_for_display()
    assert shown.shape == (2, 3, 32, 32)
    assert torch.equal(shown[..., ::4, ::4], method.display(method.target))
    _fit(method)
    metrics = method.metrics(method.final_output())
    assert set(metrics) == {"psnr", "ssim"} and metrics["psnr"].shape == (2,)


def test_inpainting_reports_hole_metrics_and_a_composite(small_pggan: PGGANGenerator) -> None:
    method = MGANPrior(small_pggan, MGANConfig(composing_layer=2, z_number=2, iterations=1, vgg_lambda=0.0),
                       CenterSquareMask(16), task="inpainting")
    y = _images(1)
    method.start(_batch(y, ["a"]))
    x = method.final_output()
    assert {"psnr", "ssim", "psnr_hole", "ssim_hole"} <= set(method.metrics(x))
    composite = method.extra_images(x, 0)["composited"]
    assert torch.allclose(composite[:, :8], method.display(y)[0, :, :8])
    assert torch.allclose(composite[:, 8:24, 8:24], method.display(x)[0, :, 8:24, 8:24])


def test_colorization_result_keeps_the_targets_luma() -> None:
    target = (_images(2, 16) + 1) / 2
    result = (_images(2, 16, seed=7) + 1) / 2
    out = ycbcr_recombine(result, target)
    assert out.shape == target.shape and out.dtype == torch.float32

    def luma(t: Tensor) -> Tensor:
        return 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]

    # RGB is clipped after the YCbCr -> RGB conversion, so compare where nothing clipped.
    inside = ((out > 1 / 255) & (out < 254 / 255)).all(1)
    assert float((luma(out) - luma(target))[inside].abs().max()) < 2.5 / 255
    # PIL keeps Cb, Cr in 8 bits: the RGB -> YCbCr -> RGB round trip alone moves a few levels.
    assert float((ycbcr_recombine(target, target) - target).abs().max()) < 6 / 255


def test_vgg_weights_missing_says_what_to_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"mganprior\.vgg_weights"):
        VGGFeatureLoss.from_file(None)
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth"):
        VGGFeatureLoss.from_file(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="conv4_3"):
        VGGFeatureLoss.from_file(tmp_path / "x.pth", layer="conv9_9")


# ------------------------------------------------------------------------------ config and train.py
def test_presets_compose_and_missing_weights_fail_clearly(tmp_path: Path) -> None:
    expected = {
        "mgan_inversion": ("inversion", 8, 20, 3000),
        "mgan_inversion_single_code": ("inversion", 0, 1, 3000),
        "mgan_colorization": ("colorization", 6, 20, 1500),
        "mgan_inpainting": ("inpainting", 4, 30, 3000),
        "mgan_inpainting_random": ("random_mask", 4, 30, 3000),
        "mgan_inpainting_mask": ("mask_image", 4, 30, 3000),
        "mgan_sr": ("sr", 6, 20, 2000),
        "mgan_denoising": ("denoising", 6, 20, 3000),
    }
    for preset, (task, layer, n, iters) in expected.items():
        cfg = compose(["prior=pggan_church", f"task={preset}"])
        m = cfg.mganprior
        assert (cfg.task.name, m.composing_layer, m.z_number, m.iterations) == (task, layer, n, iters)
        assert m.optimization == "GD" and m.lr == 1.0
        assert m.vgg_lambda == (0.1 if "inpainting" in preset else 1.0)
    assert compose(["prior=pggan_celebahq"]).prior.resolution == 1024
    cfg = compose(["prior=pggan_bedroom", "task=mgan_inversion", f"prior.weights_dir={tmp_path}",
                   "mganprior.vgg_lambda=0"])
    with pytest.raises(CheckpointError, match=r"pggan_bedroom256_generator\.pth"):
        build(cfg)


def _losses(folder: Path) -> list[list[float]]:
    lines = (folder / "losses.csv").read_text().splitlines()
    return [[float(v) for v in line.split(",")] for line in lines[1:]]


@pytest.mark.shared
def test_train_py_on_lsun_images_batch_of_two_equals_one(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir.joinpath(*LSUN_COLOR)
    base = ["prior=pggan_tiny", "task=mgan_colorization", "mganprior.iterations=2",
            "mganprior.z_number=3", "mganprior.vgg_lambda=0", "mganprior.print_interval=1",
            f"data.source={source}", "trainer.enable_progress_bar=false", "logger=none"]
    two, one = tmp_path / "b2", tmp_path / "b1"
    assert run_train([*base, "trainer.batch_size=2", f"output.dir={two}"]) == 0
    # The first image alone (B = 1) must get the codes and losses it got inside the batch.
    assert run_train([*base, "trainer.batch_size=1", "data.limit=1", f"output.dir={one}"]) == 0
    rows = {r["id"]: r for r in map(json.loads, (two / "results.jsonl").read_text().splitlines())}
    assert len(rows) == 2
    for image_id, row in rows.items():
        folder = two / image_id
        for name in ("result.png", "observation.png", "target.png", "colorization.png",
                     "progress.png", "metrics.json", "losses.csv", "loss_curve.png"):
            assert (folder / name).is_file(), name
        assert row["status"] == "ok" and row["steps"] == 2 and row["z_number"] == 3
        assert 0 < row["psnr"] < 100 and "observation_psnr" in row
        assert Image.open(folder / "result.png").size == (256, 256)
    (first,) = [json.loads(line)["id"] for line in (one / "results.jsonl").read_text().splitlines()]
    batched, alone = _losses(two / first), _losses(one / first)
    assert len(batched) == len(alone) == 2
    for r2, r1 in zip(batched, alone):
        # batch 2 against batch 1 through train.py, as written to losses.csv: measured max 1.1e-7
        # relative, 6.0e-8 absolute (0 at one thread; threads 1/2/4)
        assert_close(torch.tensor(r2, dtype=torch.float64), torch.tensor(r1, dtype=torch.float64),
                     rtol=1e-4, atol=1e-7)
    assert "pggan_tiny" in (two / "config.yaml").read_text()


@pytest.mark.shared
def test_lsun_lmdb_source_feeds_train_py(shared_dir: Path, tmp_path: Path) -> None:
    files = sorted(shared_dir.joinpath(*LSUN_COLOR).glob("*.png"))
    path = tmp_path / "bedroom_val_lmdb"
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for f in files:
            txn.put(f.stem.encode(), f.read_bytes())
    env.close()
    items = load_items(compose(["prior=pggan_tiny", f"data.source={path}", "data.limit=1"]), MGANPrior)
    assert [i.id for i in items] == [files[0].stem]  # the first key in LMDB order
    assert torch.equal(items[0].image, to_tensor(load_image(files[0])))  # 256x256: no resize
    # evaluate.py's form: the data=lsun_* preset with data.lmdb.
    items = load_items(compose(["prior=pggan_tiny", "data=lsun_bedroom", f"data.lmdb={path}"]), MGANPrior)
    assert [i.id for i in items] == [f.stem for f in files]


# ------------------------------------------------------------------------------ float64
def _soft_mask(path: Path, size: int = 256) -> np.ndarray:
    """An RGBA mask with anti-aliased edges (like mask-1.png): white = missing."""
    arr = np.zeros((size, size, 4), np.uint8)
    arr[..., 3] = 255
    rows, cols = slice(size // 6, size // 3), slice(size // 4, size - size // 4)
    arr[rows, cols, :3] = 255
    arr[size // 6 - 1, cols, :3] = 97  # soft edges: k/255 is not exact in float32
    arr[size // 3, cols, :3] = 31
    Image.fromarray(arr, mode="RGBA").save(path)
    return arr[..., :3]


def test_method_follows_its_generators_dtype(small_pggan: PGGANGenerator, tmp_path: Path) -> None:
    """A float64 PGGAN makes a float64 method (TRACES_F64.md): codes, importances, targets,
    masks, the VGG term, losses, optimizer updates and metrics, from float64 inputs as given."""
    G64 = PGGANGenerator(32, fmaps_base=256, fmaps_max=16).double()
    G64.load_state_dict(small_pggan.state_dict())
    G64.requires_grad_(False)
    vgg = VGGFeatureLoss(_features().double(), image_size=32)
    config = MGANConfig(composing_layer=4, z_number=3, iterations=2, vgg_lambda=1.0, l1_lambda=0.5)
    method = MGANPrior(G64, config, CenterSquareMask(16), perceptual=vgg, task="inpainting")
    assert method.dtype == torch.float64
    with pytest.raises(ValueError, match="VGG network's dtype must be the generator's"):
        MGANPrior(G64, config, CenterSquareMask(16), perceptual=VGGFeatureLoss(_features()))
    y = _images(2).double()  # float64 images are used as they are
    method.start(_batch(y, ["a", "b"]))
    assert method.target_origin is y
    assert all(t.dtype == torch.float64 for t in (method.z, method.alpha, method.target, method.target_features))
    assert torch.equal(method.alpha, torch.full_like(method.alpha, 1 / 3))
    record, _, _ = engine.step(method, method.make_optimizer())
    assert {v.dtype for v in record.reported().values()} == {torch.float64}
    assert method.z.dtype == method.alpha.dtype == torch.float64
    # The same codes as a float32 method draws from the same streams (drawn in float32).
    m32 = MGANPrior(small_pggan, config, CenterSquareMask(16), perceptual=VGGFeatureLoss(_features(), image_size=32))
    m32.start(_batch(y.float(), ["a", "b"]))
    method.start(_batch(y, ["a", "b"]))
    assert torch.equal(method.z, m32.z.double())
    x = method.final_output()
    assert x.dtype == torch.float64 and method.display(x).dtype == torch.float64
    assert {v.dtype for v in method.metrics(x).values()} == {torch.float64}
    assert method.extra_images(x, 0)["composited"].dtype == torch.float64


def test_images_in_dtype_divides_uint8_pixels_in_float64() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    float32 = pixels.float().div(255).sub(0.5).div(0.5)  # image_io.to_tensor's arithmetic
    wide = images_in_dtype(float32, torch.float64)
    # mGANprior's to_tensor under a float64 default dtype (TRACES_F64.md, dtype rules)
    assert torch.equal(wide, (pixels.double() / 255 - 0.5) * 2)
    assert not torch.equal(wide, float32.double())  # float32 /255 differs in the last bits
    # the same images already widened to float64 (Lightning's 64-true input conversion)
    assert torch.equal(images_in_dtype(float32.double(), torch.float64), wide)
    assert images_in_dtype(float32, torch.float32) is float32
    other = float32 + 1e-3  # not 8-bit images: widened as they are
    assert torch.equal(images_in_dtype(other, torch.float64), other.double())


def test_mask_file_is_divided_in_the_images_dtype(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    pixels = _soft_mask(path, 64)
    mask = build_mgan_degradation("mask_image", 64, mask_path=str(path))
    assert isinstance(mask, MGANMaskImage)
    x32 = _images(1, 64)
    # float32: MaskImage's float32 path, unchanged
    plain = MaskImage(path, white_is_known=False, resize="error")
    assert torch.equal(mask.known_mask(x32), plain.known_mask(x32))
    # float64: 1 - u8/255 in float64, as parsing_mask's to_tensor under a float64 default
    known = mask.known_mask(x32.double())
    expected = 1 - torch.from_numpy(pixels.transpose(2, 0, 1).copy()).double() / 255
    assert known.dtype == torch.float64 and torch.equal(known[0], expected)
    assert not torch.equal(known, plain.known_mask(x32).double())
    with pytest.raises(ValueError, match="is 64x64"):
        mask.known_mask(_images(1, 32).double())


def test_vgg_normalisation_is_made_in_the_inputs_dtype() -> None:
    vgg = VGGFeatureLoss(_features()).double()
    mean, std = vgg.normalization(torch.zeros(1, dtype=torch.float64))
    # the reference's torch.Tensor([0.485, ...]) under a float64 default: the decimal constants
    assert torch.equal(mean.flatten(), torch.tensor(IMAGENET_MEAN, dtype=torch.float64))
    assert torch.equal(std.flatten(), torch.tensor(IMAGENET_STD, dtype=torch.float64))
    mean32, _ = vgg.normalization(torch.zeros(1))
    assert torch.equal(mean32.flatten(), torch.tensor(IMAGENET_MEAN))


def test_from_config_builds_the_prior_and_vgg_in_the_runs_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    def small(weights: Any, layer: str = "relu3_3", **kwargs: Any) -> VGGFeatureLoss:
        return VGGFeatureLoss(_features(), **kwargs)  # float32, as from_file builds it

    monkeypatch.setattr(VGGFeatureLoss, "from_file", staticmethod(small))
    for precision, dtype in (("64-true", torch.float64), ("32-true", torch.float32)):
        cfg = compose(["prior=pggan_tiny", "task=mgan_inversion", f"trainer.precision={precision}"])
        method = build(cfg)
        assert isinstance(method, MGANPrior) and method.dtype == dtype and method.perceptual is not None
        assert {p.dtype for p in [*method.G.parameters(), *method.perceptual.parameters()]} == {dtype}


def test_float64_run_through_train_py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.precision=64-true end to end through the CLI path, against the float32 run."""
    rng = np.random.default_rng(3)
    image = tmp_path / "data" / "church.png"
    image.parent.mkdir()
    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    mask = tmp_path / "mask.png"
    _soft_mask(mask)
    seen: list[MGANPrior] = []
    from_config = MGANPrior.from_config.__func__  # type: ignore[attr-defined]

    def keep(cls: type[MGANPrior], cfg: Any) -> MGANPrior:
        seen.append(from_config(cls, cfg))
        return seen[-1]

    monkeypatch.setattr(MGANPrior, "from_config", classmethod(keep))
    base = ["prior=pggan_tiny", "task=mgan_inpainting_mask", f"task.mask_path={mask}", "mganprior.iterations=2",
            "mganprior.z_number=3", "mganprior.vgg_lambda=0", "mganprior.print_interval=1",
            f"data.source={image.parent}", "trainer.enable_progress_bar=false", "logger=none"]
    out64, out32 = tmp_path / "f64", tmp_path / "f32"
    assert run_train([*base, "trainer.precision=64-true", f"output.dir={out64}"]) == 0
    assert run_train([*base, f"output.dir={out32}"]) == 0
    m64, m32 = seen
    assert m64.dtype == torch.float64 and m32.dtype == torch.float32
    assert {p.dtype for p in m64.G.parameters()} == {torch.float64}
    _, record, _ = m64.loss()  # the fitted codes' loss, computed as in the fit
    for t in (m64.z, m64.alpha, m64.target_origin, m64.target, record.total, record.terms["l2_loss"]):
        assert t.dtype == torch.float64
    # the target as mGANprior reads it in float64, and the soft mask divided in float64
    u8 = torch.from_numpy(pixels).permute(2, 0, 1).double()
    assert torch.equal(m64.target_origin[0], (u8 / 255 - 0.5) * 2)
    assert torch.equal(m64.target[0], m64.target_origin[0] * m64.degradation.known_mask(m64.target)[0])
    row = json.loads((out64 / "results.jsonl").read_text())
    assert row["status"] == "ok" and row["steps"] == 2
    for name in ("result.png", "observation.png", "target.png", "composited.png", "metrics.json", "losses.csv"):
        assert (out64 / "church" / name).is_file(), name
    # Both runs start from the same codes and weights (float32 values widened), so they agree
    # to float32 rounding: measured max 1.2e-7 relative (threads 1/2/4). And they differ: a run
    # that silently stayed float32 would write the identical numbers.
    l64, l32 = _losses(out64 / "church"), _losses(out32 / "church")
    assert_close(torch.tensor(l64, dtype=torch.float64), torch.tensor(l32, dtype=torch.float64), rtol=1e-5, atol=0)
    assert l64[0] != l32[0]


# ------------------------------------------------------------------------------ BigGAN baseline
def test_latent_only_dgp_optimises_only_z() -> None:
    """DGP with update_G=false: z is the only trained tensor; G and its class embedding stay
    fixed even with update_embed (the embedding is in G's optimizer, DGP SPEC §6.2.6)."""
    torch.manual_seed(0)
    G = Generator(resolution=128, G_ch=8).eval()
    config = DGPConfig(iterations=[2], G_lrs=[1e-3], z_lrs=[1e-2], ftr_num=[0], ft_num=[6], lr_ratio=[1.0],
                       w_D_loss=[0.0], w_mse=[1.0], w_percep=[0.0], use_in=[False], select_num=1,
                       update_G=False, update_embed=True)
    method = DGP(G, None, config, Identity())
    method.start(_batch(_images(1, 128), ["img"], classes=[3]))
    assert _group_names(method) == ["z"]
    assert method.trainable == {} and method.embed_weight is None
    z0 = method.z.detach().clone()
    _fit(method)
    assert not torch.equal(method.z.detach(), z0)
    state = G.state_dict()
    assert all(torch.equal(state[k], v) for k, v in method.G_weight.items())


def test_latent_only_preset_is_dgp_reconstruct_with_a_fixed_generator() -> None:
    latent = compose(["prior=biggan_tiny", "task=inversion_latent_only"]).dgp
    dgp = compose(["prior=biggan_tiny", "task=reconstruct"]).dgp
    assert latent.update_G is False and dgp.update_G is True
    for key in ("iterations", "z_lrs", "ftr_num", "w_D_loss", "w_mse", "w_nll", "select_num", "sample_std"):
        assert latent[key] == dgp[key], key


@pytest.mark.slow
def test_latent_only_inversion_on_biggan_through_the_engine(tmp_path: Path) -> None:
    cfg = compose(["prior=biggan_tiny", "task=inversion_latent_only", "dgp.iterations=[2,1,1]",
                   "dgp.select_num=2", "dgp.update_embed=true", "trainer.enable_progress_bar=false",
                   "logger=none", f"output.dir={tmp_path}"])
    method = build(cfg)
    assert isinstance(method, DGP)
    method.start(_batch(_images(1, 128), ["img"], classes=[3]))
    assert _group_names(method) == ["z"]  # no G groups, no embedding
    z0 = method.z.detach().clone()
    item = ImageItem("img", "memory:img", class_id=3, image=_images(1, 128)[0])
    rows = engine.run(cfg, method, [item], tmp_path, batch_size=1)
    assert rows[0]["status"] == "ok" and rows[0]["steps"] == 4
    assert not torch.equal(method.z.detach(), z0)
    state = method.G.state_dict()
    assert all(torch.equal(state[k], v) for k, v in method.G_weight.items())


@pytest.mark.slow
@pytest.mark.shared
def test_vgg_variants_from_a_local_file_and_a_fit_with_them(shared_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    vgg = timm.create_model("vgg16", pretrained=False)
    weights = tmp_path / "vgg16_random.pth"
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, weights)
    code = VGGFeatureLoss.from_file(weights, "relu3_3")
    paper = VGGFeatureLoss.from_file(weights, "conv4_3")
    # The code's --vgg_layer 16: modules 0..15, ending in relu3_3; the paper's conv4_3: 0..21.
    assert len(code.features) == 16 and isinstance(code.features[-1], nn.ReLU)
    assert len(paper.features) == 22 and isinstance(paper.features[-1], nn.Conv2d)
    x = _images(1, 64)
    assert code.features_of(x).shape == (1, 256, 64, 64)  # resized to 256, then 1/4
    image = shared_dir / "data" / "lsun" / "inpainting" / "bedroom" / "00007eb364fb2e3b3c8f3673ff888dfa82cf4261.png"
    out = tmp_path / "run"
    args = ["prior=pggan_tiny", "task=mgan_inpainting", "mganprior.iterations=2", "mganprior.z_number=2",
            f"mganprior.vgg_weights={weights}", "mganprior.vgg_layer=conv4_3", f"data.source={image}",
            "trainer.enable_progress_bar=false", "logger=none", f"output.dir={out}"]
    assert run_train(args) == 0
    row = json.loads((out / image.stem / "metrics.json").read_text())
    assert row["status"] == "ok" and row["final_vgg_loss"] > 0 and "psnr_hole" in row
    assert (out / image.stem / "composited.png").is_file()
