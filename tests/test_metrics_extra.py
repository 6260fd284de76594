"""LPIPS, NIQE, classifier accuracy and colorization AuC (genprior.metrics).

Published weights are not available here, so the networks get random weights written to
tmp_path in the layout of the real files; values are checked against independent
computations (torchmetrics' LPIPS code, a numpy MATLAB imresize, skimage Lab), against
definitions (a perfect colorization scores 100, a model fitted on an image's own patches
gives NIQE 0), and against known distributions (AGGD fits of sampled data).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageFilter
from scipy.io import savemat
from skimage.color import rgb2lab
from torch import Tensor, nn

from genprior.config import MetricsConfig
from genprior.metrics import (
    EXTRA_METRICS,
    LPIPS,
    NIQE,
    ClassifierAccuracy,
    ColorizationAuC,
    LPIPSNetwork,
    NIQEModel,
    UnavailableMetric,
    WeightsUnavailable,
    aggd_fit,
    build_classifier,
    build_metrics,
    colorization_auc,
    fit_niqe_model,
    load_lpips_network,
    lpips,
    matlab_imresize_half,
    metric_status,
    niqe,
    niqe_features,
    niqe_gray,
    score_batch,
    topk_correct,
)

# LPIPS runs its float32 network at the batch it is given, so per-image values from batches of
# different sizes come from different kernels. Measured here they agree bit for bit (threads
# 1/2/4), but another CPU may pick other convolution kernels per batch size: oneDNN against
# PyTorch's native convolution moves these distances (~0.13) by at most 3.0e-8 (threads 1/2/4),
# so 1e-6 is a 33x margin; pairing the wrong images changes LPIPS by >1e-2.
LPIPS_ATOL = 1e-6


def _images(b: int, h: int = 64, w: int = 64, seed: int = 0) -> Tensor:
    """Smooth random colour images in [-1, 1] (low-frequency noise, upsampled)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, h // 8, w // 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(b, 3, h, w, generator=g)
    return (x.clamp(0, 1) * 2 - 1).float()


# ------------------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A torchvision AlexNet checkpoint (every key of alexnet-owt-7be5be79.pth, random values)
    whose features are those of torchmetrics' LPIPS with a random backbone."""
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    reference = _LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()  # no download
    state = torchvision.models.alexnet(weights=None).state_dict()
    for slice_ in reference.net.children():
        for key, value in slice_.state_dict().items():
            state[f"features.{key}"] = value
    path = tmp_path_factory.mktemp("weights") / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    return path, reference


def test_lpips_matches_the_lpips_definition_in_torchmetrics(alexnet_file) -> None:
    path, reference = alexnet_file
    network = load_lpips_network("alex", backbone_weights=path)  # linear layers: torchmetrics' copy
    x, y = _images(3, seed=1), _images(3, seed=2)
    ours = lpips(x, y, network)
    with torch.no_grad():
        theirs = reference(x, y).flatten().double()
    assert ours.dtype == torch.float64 and ours.shape == (3,)
    # The only difference: lpips' eps (1e-10) is added to the norm, torchmetrics' (1e-8) inside it.
    # Same backbone and batch on both sides: measured 0 apart (threads 1/2/4); rtol 1e-5 is 40x
    # the 2.3e-7 relative spread between convolution kernels (see LPIPS_ATOL).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert torch.all(lpips(x, x, network) == 0)  # the same features on both sides
    # [0, 1] images give the same distances when value_range says so: both calls hand the
    # network the same [-1, 1] tensors (measured 0 apart, threads 1/2/4)
    torch.testing.assert_close(lpips((x + 1) / 2, (y + 1) / 2, network, value_range=(0, 1)), ours)


def test_lpips_vgg_from_safetensors_features(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    features = {f"features.{k}": v for k, v in LPIPSNetwork("vgg").features.state_dict().items()}
    path = tmp_path / "vgg16.safetensors"  # timm's file keeps torchvision's features.* keys
    save_file(features, str(path))
    network = load_lpips_network("vgg", backbone_weights=path)
    torch.testing.assert_close(network.features[0].weight, features["features.0.weight"])
    x, y = _images(2, 32, 32), _images(2, 32, 32, seed=3)
    d = lpips(x, y, network)
    assert d.shape == (2,) and torch.all(d > 0)
    # symmetric: the same two batch-2 forwards, squared differences (measured 0, threads 1/2/4)
    torch.testing.assert_close(lpips(y, x, network), d)


def test_lpips_rejects_files_of_the_wrong_kind(tmp_path: Path, alexnet_file) -> None:
    path, _ = alexnet_file
    bad_lin = tmp_path / "lin.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, bad_lin)
    with pytest.raises(ValueError, match="linear-layer"):
        load_lpips_network("alex", lin_weights=bad_lin, backbone_weights=path)
    with pytest.raises(ValueError, match="not a torchvision alex checkpoint"):
        load_lpips_network("alex", backbone_weights=bad_lin)
    with pytest.raises(WeightsUnavailable, match=r"metrics\.lpips_backbone_weights"):
        load_lpips_network("alex", backbone_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="net must be"):
        LPIPSNetwork("squeezenet")


def test_lpips_metric_is_the_mean_over_images(alexnet_file) -> None:
    network = load_lpips_network("alex", backbone_weights=alexnet_file[0])
    x, y = _images(3, seed=4), _images(3, seed=5)
    metric = LPIPS(network)
    values = metric.score(x[:2], y[:2])["lpips"]
    per_image = lpips(x, y, network)  # batches of 2 and 1 against a batch of 3: LPIPS_ATOL
    torch.testing.assert_close(values, per_image[:2], rtol=0, atol=LPIPS_ATOL)
    torch.testing.assert_close(metric.compute(), per_image[:2].mean(), rtol=0, atol=LPIPS_ATOL)
    metric.score(x[2:], y[2:])  # score() goes through update(): the cached result is dropped
    torch.testing.assert_close(metric.compute(), per_image.mean(), rtol=0, atol=LPIPS_ATOL)
    metric.update(x[:1], y[:1])
    torch.testing.assert_close(metric.compute(), torch.cat([per_image, per_image[:1]]).mean(),
                               rtol=0, atol=LPIPS_ATOL)


# -------------------------------------------------------------------------------------- NIQE
def _sample_aggd(n: int, alpha: float, beta_l: float, beta_r: float, seed: int) -> Tensor:
    """Samples of the AGGD: |x| / beta ~ Gamma(1/alpha)^(1/alpha), left with prob. bl/(bl+br)."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.tensor(1 / alpha, dtype=torch.float64), 1.0)
    torch.manual_seed(seed)
    magnitude = gamma.sample((n,)) ** (1 / alpha)
    left = torch.rand(n, generator=g, dtype=torch.float64) < beta_l / (beta_l + beta_r)
    return torch.where(left, -beta_l * magnitude, beta_r * magnitude)


@pytest.mark.parametrize(("alpha", "beta_l", "beta_r"), [(0.6, 0.5, 0.5), (1.5, 0.8, 1.2), (2.0, 1.0, 0.7)])
def test_aggd_fit_recovers_known_parameters(alpha: float, beta_l: float, beta_r: float) -> None:
    values = _sample_aggd(400_000, alpha, beta_l, beta_r, seed=int(alpha * 10))
    a, bl, br = (t.item() for t in aggd_fit(values[None]))
    assert a == pytest.approx(alpha, rel=0.03)
    assert bl == pytest.approx(beta_l, rel=0.02)
    assert br == pytest.approx(beta_r, rel=0.02)


def test_aggd_fit_of_a_gaussian_and_of_one_signed_data() -> None:
    g = torch.Generator().manual_seed(0)
    a, bl, br = aggd_fit(3.0 * torch.randn(1, 400_000, generator=g, dtype=torch.float64))
    assert a.item() == pytest.approx(2.0, abs=0.03)  # a Gaussian is the GGD with alpha 2 ...
    assert bl.item() == pytest.approx(3.0 * 2**0.5, rel=0.01)  # ... and beta = sigma * sqrt(2)
    assert br.item() == pytest.approx(3.0 * 2**0.5, rel=0.01)
    # No negative samples: MATLAB gets a NaN left std, and min() skips NaN -> first grid point.
    a, bl, br = aggd_fit(torch.rand(1, 100, generator=g, dtype=torch.float64))
    assert a.item() == pytest.approx(0.2) and bl.isnan().all() and br.isfinite().all()


def _cubic(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a <= 1, 1.5 * a**3 - 2.5 * a**2 + 1,
                    np.where(a <= 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, 0.0))


def _matlab_imresize_numpy(image: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB imresize (bicubic, antialiasing) for any scale < 1, transcribed from the general
    algorithm (contributions with symmetric index wrapping), one dimension at a time."""

    def resize_rows(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        out_len = int(np.ceil(n * scale))
        width = 4.0 / scale
        u = np.arange(1, out_len + 1) / scale + 0.5 * (1 - 1 / scale)
        left = np.floor(u - width / 2)
        idx = left[:, None] + np.arange(int(np.ceil(width)) + 2)[None, :]
        w = scale * _cubic(scale * (u[:, None] - idx))
        w = w / w.sum(axis=1, keepdims=True)
        aux = np.concatenate([np.arange(1, n + 1), np.arange(n, 0, -1)])
        idx = aux[np.mod(idx - 1, aux.size).astype(int)]
        keep = np.any(w != 0, axis=0)
        w, idx = w[:, keep], idx[:, keep]
        return np.einsum("ok,ok...->o...", w, x[idx - 1])

    return resize_rows(resize_rows(image).T).T


def test_matlab_imresize_half_matches_the_general_algorithm_and_pil() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 30, 44, generator=g, dtype=torch.float64) * 255
    ours = matlab_imresize_half(x)
    for image, result in zip(x, ours):
        expected = _matlab_imresize_numpy(image.numpy(), 0.5)
        np.testing.assert_allclose(result.numpy(), expected, rtol=0, atol=1e-10)
        # PIL's bicubic uses the same kernel and centres; only its edge handling differs.
        pil = np.asarray(Image.fromarray(image.numpy().astype(np.float32), mode="F").resize((22, 15), Image.BICUBIC))
        np.testing.assert_allclose(result.numpy()[2:-2, 2:-2], pil[2:-2, 2:-2], atol=1e-3)
    assert torch.allclose(matlab_imresize_half(torch.full((1, 8, 8), 7.0, dtype=torch.float64)), torch.tensor(7.0, dtype=torch.float64))


def test_niqe_gray_is_matlab_rgb2gray_of_the_uint8_image() -> None:
    x = _images(1, 16, 16)
    rgb = np.floor(((x[0].double().numpy() + 1) / 2).clip(0, 1) * 255 + 0.5)
    expected = np.floor(0.298936021293775 * rgb[0] + 0.587043074451121 * rgb[1] + 0.114020904255103 * rgb[2] + 0.5)
    np.testing.assert_array_equal(niqe_gray(x)[0].numpy(), expected)


def test_niqe_is_zero_against_a_model_of_the_image_itself() -> None:
    x = _images(2, 192, 288, seed=6)
    model = fit_niqe_model([x[:1]], sharpness_threshold=0.0)  # all 6 patches of image 0
    values = niqe(x, model)
    assert values[0].item() == pytest.approx(0.0, abs=1e-6)
    assert values[1].item() > 0.1


def test_niqe_model_keeps_only_sharp_patches() -> None:
    # Four 96x96 patches: the top two textured, the bottom two nearly flat.
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 3, 192, 192)
    x[..., :96, :] = torch.rand(1, 1, 96, 192, generator=g)
    x[..., 96:, :] = 0.5 + 0.01 * torch.rand(1, 1, 96, 192, generator=g)
    feats, sharpness = niqe_features(niqe_gray(x, value_range=(0, 1)))
    assert feats.shape == (1, 4, 36) and sharpness.shape == (1, 4)
    sharp = sharpness[0] > 0.75 * sharpness[0].max()
    assert sharp.sum() == 2
    model = fit_niqe_model([x], value_range=(0, 1))
    torch.testing.assert_close(model.mu, feats[0, sharp].mean(0))
    torch.testing.assert_close(model.cov, torch.cov(feats[0, sharp].T))


def test_niqe_model_files(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(36, 36, generator=g, dtype=torch.float64)
    model = NIQEModel(torch.randn(36, generator=g, dtype=torch.float64), a @ a.T)
    # the MATLAB release's layout: modelparameters.mat with a 1x36 mean
    savemat(tmp_path / "modelparameters.mat", {"mu_prisparam": model.mu.numpy()[None], "cov_prisparam": model.cov.numpy()})
    model.save(tmp_path / "niqe_pris_params.npz")  # BasicSR's / pyiqa's layout
    for name in ("modelparameters.mat", "niqe_pris_params.npz"):
        loaded = NIQEModel.load(tmp_path / name)
        torch.testing.assert_close(loaded.mu, model.mu)
        torch.testing.assert_close(loaded.cov, model.cov)
    np.savez(tmp_path / "other.npz", mean=model.mu.numpy())
    with pytest.raises(ValueError, match="holds no NIQE model"):
        NIQEModel.load(tmp_path / "other.npz")
    with pytest.raises(WeightsUnavailable, match=r"metrics\.niqe_model"):
        NIQEModel.load(tmp_path / "missing.mat")
    with pytest.raises(ValueError, match="shape"):
        NIQEModel(model.mu[:18], model.cov)


def test_niqe_needs_two_patches() -> None:
    model = NIQEModel(torch.zeros(36, dtype=torch.float64), torch.eye(36, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least two 96x96 patches"):
        niqe(_images(1, 128, 128), model)
    assert niqe(_images(1, 128, 128), model, block_size=64).shape == (1,)


def _center_crop(path: Path, size: int) -> Image.Image:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _tensor(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.mark.shared
def test_niqe_scores_a_natural_image_better_than_its_noisy_and_blurred_versions(shared_dir: Path) -> None:
    # A pristine model from nine ImageNet photos; three held-out photos, each clean, with
    # Gaussian noise (sigma 25/255) and blurred (sigma 2 px).
    photos = sorted((shared_dir / "data" / "dgp").glob("*.JPEG"))
    assert len(photos) >= 11
    model = fit_niqe_model([_tensor(_center_crop(p, 288)) for p in photos[:-3]], value_range=(0, 1))
    g = torch.Generator().manual_seed(0)
    for path in photos[-3:]:
        image = _center_crop(path, 288)
        clean = _tensor(image)
        noisy = (clean + 25 / 255 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
        blurred = _tensor(image.filter(ImageFilter.GaussianBlur(2)))
        scores = niqe(torch.cat([clean, noisy, blurred]), model, value_range=(0, 1))
        assert scores[0] < scores[1] and scores[0] < scores[2], (path.name, scores)


# ---------------------------------------------------------------------------- classifier
def test_topk_correct_known_values() -> None:
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4, 3],  # label 0: top-1
        [9.0, 8, 7, 6, 5, 4, 3],  # label 4: 5th -> top-5 only
        [9.0, 8, 7, 6, 5, 4, 3],  # label 5: neither
        [1.0, 1, 1, 1, 1, 1, 1],  # ties count in the label's favour
        [9.0, 8, 7, 6, 5, 4, 3],  # unknown label
    ])
    labels = torch.tensor([0, 4, 5, 3, -1])
    out = topk_correct(logits, labels, (1, 5))
    torch.testing.assert_close(out["top1"][:4], torch.tensor([100.0, 0, 0, 100], dtype=torch.float64))
    torch.testing.assert_close(out["top5"][:4], torch.tensor([100.0, 100, 0, 100], dtype=torch.float64))
    assert out["top1"][4].isnan() and out["top5"][4].isnan()


class _FixedLogits(nn.Module):
    """A 'classifier' whose logits are stored per image; picks them by the image's mean pixel."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: Tensor) -> Tensor:
        index = images[:, 0, 0, 0].round().long()  # the test writes the image index there
        return self.logits[index]


def _indexed_images(indices: list[int]) -> Tensor:
    x = torch.zeros(len(indices), 3, 8, 8)
    x[:, 0, 0, 0] = torch.tensor(indices, dtype=torch.float32)
    return x


def test_classifier_accuracy_counts_images_with_labels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g)
    labels = torch.tensor([int(logits[0].argmax()), 3, 7, int(logits[3].argmax()), 1, -1])
    metric = ClassifierAccuracy(_FixedLogits(logits))
    values = metric.score(_indexed_images([0, 1, 2]), labels=labels[:3])
    metric.update(_indexed_images([3, 4, 5]), labels[3:])
    expected = topk_correct(logits, labels)
    torch.testing.assert_close(values["top1"], expected["top1"][:3])
    result = metric.compute()
    assert set(result) == {"top1", "top5"}
    torch.testing.assert_close(result["top1"], expected["top1"][:5].mean())  # the unlabelled one is left out
    torch.testing.assert_close(result["top5"], expected["top5"][:5].mean())
    with pytest.raises(ValueError, match="labels"):
        metric.score(_indexed_images([0]))


def test_build_classifier_loads_a_torchvision_file_and_normalises_inside(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18-f37072fd.pth"  # torchvision's layout, as resnet50-0676ba61.pth
    torch.save(reference.state_dict(), path)
    classifier = build_classifier("resnet18.tv_in1k", path, input_size=64)
    x = _images(2, 48, 48)
    unit = torch.nn.functional.interpolate((x + 1) / 2, size=(64, 64), mode="bilinear", antialias=True).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        # the same resize and normalisation ops on both sides, timm's resnet18 against
        # torchvision's: measured 0 apart (threads 1/2/4). Other convolution kernels move these
        # logits (|l| <= 2.2) by up to 9.5e-7 (oneDNN against native, threads 1/2/4): 20x margin.
        torch.testing.assert_close(classifier(x), reference((unit - mean) / std), rtol=0, atol=2e-5)
    classifier.train()
    assert not classifier.model.training  # batch norm stays in inference mode
    with pytest.raises(WeightsUnavailable, match=r"metrics\.classifier_weights"):
        build_classifier("resnet18.tv_in1k", tmp_path / "missing.pth")


# ---------------------------------------------------------------------------- colorization
def _auc_numpy(pred: np.ndarray, true: np.ndarray) -> float:
    """AuC of HWC [0, 1] images with skimage Lab and a loop over the thresholds."""
    d = np.linalg.norm(rgb2lab(pred)[..., 1:] - rgb2lab(true)[..., 1:], axis=-1).ravel()
    thresholds = np.arange(151.0)
    acc = np.array([np.mean(d <= t) for t in thresholds])
    area = np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(thresholds))
    return 100.0 * area / 150.0


def test_colorization_auc_known_values() -> None:
    target = _images(2, 32, 32, seed=7)
    torch.testing.assert_close(colorization_auc(target, target), torch.full((2,), 100.0, dtype=torch.float64))
    # The 'grayscale input' baseline: every pixel gray (a = b = 0).
    gray = target.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    ours = colorization_auc(gray, target)
    for k in range(2):
        expected = _auc_numpy(
            ((gray[k] + 1) / 2).permute(1, 2, 0).double().numpy(),
            ((target[k] + 1) / 2).permute(1, 2, 0).double().numpy(),
        )
        assert ours[k].item() == pytest.approx(expected, abs=1e-6)
    assert torch.all(ours < 100)
    # A colour error the size of the whole ab range scores near 0.
    red = torch.tensor([1.0, -1, -1]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    green = torch.tensor([-1.0, 1, -1]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert colorization_auc(red, green).item() == 0.0  # |ab difference| ~ 170 > 150


# ----------------------------------------------------------------- aggregation, factory
def test_metric_states_merge_like_ddp_ranks(alexnet_file) -> None:
    # Two "ranks" with 1 and 3 images: the merged result is the mean over all 4 images.
    x, y = _images(4, 64, 64, seed=8), _images(4, 64, 64, seed=9)
    network = load_lpips_network("alex", backbone_weights=alexnet_file[0])
    model = fit_niqe_model([y[:1]], block_size=32, sharpness_threshold=0.0)  # small and quick
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2, int(logits[2].argmax()), 4])
    cases = [
        (lambda: LPIPS(network), lambda m, s: m.update(x[s], y[s]), lpips(x, y, network)),
        (lambda: NIQE(model, block_size=32), lambda m, s: m.update(x[s]), niqe(x, model, block_size=32)),
        (lambda: ColorizationAuC(), lambda m, s: m.update(x[s], y[s]), colorization_auc(x, y)),
        (lambda: ClassifierAccuracy(_FixedLogits(logits)),
         lambda m, s: m.update(_indexed_images(list(range(4))[s]), labels[s]),
         topk_correct(logits, labels)["top1"]),
    ]
    for make, update, per_image in cases:
        rank0, rank1 = make(), make()
        update(rank0, slice(0, 1))
        update(rank1, slice(1, 4))
        assert set(rank0._reductions) == {"value_sum", "num_images"}
        rank0.merge_state(rank1)
        result = rank0.compute()
        result = result["top1"] if isinstance(result, dict) else result
        # LPIPS: batches of 1 and 3 against a batch of 4 (LPIPS_ATOL); NIQE and AuC are float64
        # per image, the accuracy is exact (all measured 0 apart, threads 1/2/4)
        torch.testing.assert_close(result, per_image.mean(), rtol=0, atol=LPIPS_ATOL,
                                   msg=type(rank0).__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x, y = _images(4, 32, 32, seed=10), _images(4, 32, 32, seed=11)
        logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
        labels = torch.tensor([int(logits[0].argmax()), 2, -1, 5])
        shard = slice(0, 1) if rank == 0 else slice(1, 4)  # uneven shards
        auc, acc = ColorizationAuC(), ClassifierAccuracy(_FixedLogits(logits))
        auc.update(x[shard], y[shard])
        acc.update(_indexed_images(list(range(4))[shard]), labels[shard])
        result = {"auc": auc.compute(), **acc.compute()}
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh Python processes: about a minute on a loaded 2-core machine
@pytest.mark.distributed
def test_metrics_sync_across_gloo_ranks(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    x, y = _images(4, 32, 32, seed=10), _images(4, 32, 32, seed=11)
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    correct = topk_correct(logits, torch.tensor([int(logits[0].argmax()), 2, -1, 5]))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["auc"], colorization_auc(x, y).mean())
        torch.testing.assert_close(result["top1"], correct["top1"].nanmean())
        torch.testing.assert_close(result["top5"], correct["top5"].nanmean())


def test_build_metrics_reports_missing_weights_instead_of_failing(tmp_path: Path, caplog) -> None:
    cfg = MetricsConfig(
        extra=list(EXTRA_METRICS),
        lpips_backbone_weights=str(tmp_path / "alexnet.pth"),
        niqe_model=None,
        classifier_weights=str(tmp_path / "resnet50.pth"),
    )
    with caplog.at_level(logging.WARNING, logger="genprior.metrics"):
        metrics = build_metrics(cfg)
    assert list(metrics) == list(EXTRA_METRICS)
    status = metric_status(metrics)
    assert status["colorization_auc"] == "ok"
    for name, key in (("lpips", "metrics.lpips_backbone_weights"), ("niqe", "metrics.niqe_model"),
                      ("accuracy", "metrics.classifier_weights")):
        assert isinstance(metrics[name], UnavailableMetric)
        assert key in status[name] and "download" in status[name].lower()
        assert sum(name in r.getMessage() for r in caplog.records) == 1  # logged once, at build
    x, y = _images(2, 32, 32), _images(2, 32, 32, seed=1)
    values = score_batch(metrics, x, y, labels=torch.tensor([1, 2]))
    assert set(values) == {"lpips", "niqe", "top1", "top5", "colorization_auc"}
    assert values["lpips"].isnan().all() and values["top5"].isnan().all()
    torch.testing.assert_close(values["colorization_auc"], colorization_auc(x, y))
    assert metrics["niqe"].compute().isnan()
    assert metrics["accuracy"].compute()["top1"].isnan()
    with pytest.raises(ValueError, match="unknown metric"):
        build_metrics(cfg, ["lpips", "fid"])


def test_build_metrics_with_local_files(tmp_path: Path, alexnet_file) -> None:
    model_path = tmp_path / "niqe.npz"
    NIQEModel(torch.zeros(36, dtype=torch.float64), torch.eye(36, dtype=torch.float64)).save(model_path)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    cfg = MetricsConfig(
        extra=["lpips", "niqe", "accuracy"],
        lpips_backbone_weights=str(alexnet_file[0]),
        niqe_model=str(model_path),
        classifier="resnet18",
        classifier_weights=str(tmp_path / "r18.pth"),
        classifier_input_size=32,
    )
    metrics = build_metrics(cfg, value_range=(0, 1))
    assert set(metric_status(metrics).values()) == {"ok"}
    x, y = (_images(2, 192, 192) + 1) / 2, (_images(2, 192, 192, seed=1) + 1) / 2
    values = score_batch(metrics, x, y, labels=torch.tensor([0, 1]))
    assert all(v.shape == (2,) and v.dtype == torch.float64 for v in values.values())
    assert torch.isfinite(values["lpips"]).all() and torch.isfinite(values["niqe"]).all()


@pytest.mark.gpu
def test_metrics_on_cuda_match_cpu(alexnet_file) -> None:
    x, y = _images(2, 192, 192, seed=12), _images(2, 192, 192, seed=13)
    network = load_lpips_network("alex", backbone_weights=alexnet_file[0])
    cpu = lpips(x, y, network)
    gpu = lpips(x.cuda(), y.cuda(), network.cuda())
    assert gpu.device.type == "cuda"
    # float32 convolutions on another device: not measurable on the CPU-only test machines
    # (threads play no part); 1e-4 relative is ~400x the CPU kernel-to-kernel spread
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)
    model = fit_niqe_model([y[:1]], sharpness_threshold=0.0)
    torch.testing.assert_close(niqe(x.cuda(), model).cpu(), niqe(x, model), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(colorization_auc(x.cuda(), y.cuda()).cpu(), colorization_auc(x, y))
    for metric, args in ((NIQE(model).cuda(), (x.cuda(),)), (ColorizationAuC().cuda(), (x.cuda(), y.cuda()))):
        metric.update(*args)
        assert metric.compute().device.type == "cuda"


# ------------------------------------------------------------------ in evaluate.py's rows
def test_evaluate_rows_and_summary_hold_the_extra_metrics(tmp_path: Path, alexnet_file) -> None:
    """metrics.extra puts per-image LPIPS / AuC / accuracy into every row and the summary; a
    metric without its file (NIQE, the classifier here) is NaN (null), and the run succeeds."""
    import json

    from genprior.cli.evaluate import run_evaluate

    path, _ = alexnet_file
    out = tmp_path / "eval"
    args = [
        "prior=biggan_tiny", "task=colorization", "dgp.iterations=[2,0,0,0,0]", "dgp.select_num=2",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=none",
        "metrics.extra=[lpips,niqe,accuracy,colorization_auc]", f"metrics.lpips_backbone_weights={path}",
        f"metrics.classifier_weights={tmp_path / 'missing_resnet50.pth'}", "data.class_id=3",
        f"output.dir={out}",
    ]
    assert run_evaluate(args) == 0
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["status"] == "ok"
    # scored on the float result; recomputed here from the saved 8-bit PNGs
    folder = out / row["dir"]
    result, target = (torch.from_numpy(np.array(Image.open(folder / f"{n}.png").convert("RGB")))
                      .permute(2, 0, 1)[None].float() / 255 for n in ("result", "target"))
    network = load_lpips_network("alex", backbone_weights=path)
    # The gap is the 8-bit truncation of result.png and target.png, not rounding: measured
    # 6.4e-4 for LPIPS (0.278) and 0.052 for AuC (67.9) at threads 1/2/4, where the thread count
    # moves the row's values by <1e-6 and <2e-4. 5e-3 and 0.5 leave 8x and 10x; scoring another
    # image than the result would be off by >0.05 and several points.
    assert abs(row["lpips"] - float(lpips(result, target, network, value_range=(0, 1)))) < 5e-3
    assert abs(row["colorization_auc"] - float(colorization_auc(result, target, value_range=(0, 1)))) < 0.5
    assert 0 < row["colorization_auc"] < 100
    for key in ("niqe", "top1", "top5"):  # no NIQE model, no classifier file
        assert row[key] is None or not np.isfinite(row[key])
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    # the mean of one value is that value (measured 0 apart through JSON, threads 1/2/4)
    assert summary["lpips"]["n"] == 1 and abs(summary["lpips"]["mean"] - row["lpips"]) < 1e-9
    assert "colorization_auc" in summary and "niqe" not in summary
    assert json.loads((folder / "metrics.json").read_text())["colorization_auc"] == row["colorization_auc"]
