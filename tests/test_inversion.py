"""DIP's network inversion (docs/inversion.md): feature extractors, the Inversion method, the tasks.

Everything runs on random-weight classifiers (``classifier_weights=random`` or a random state
dict saved in tmp_path) and 64x64 images with a few optimisation steps: no network, no
published weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from genprior import engine
from genprior.cli.train import run_train
from genprior.config import compose
from genprior.errors import UserError
from genprior.features import FeatureExtractor, build_classifier, layer_names, select_unit
from genprior.items import ImageBatch, ImageItem
from genprior.methods import Inversion, build, method_class
from genprior.methods.inversion import InversionConfig, enhance
from genprior.priors.dip_nets import skip

# A 4-level net (the paper's 6 levels need 128-256 px): fast enough for a few CPU steps.
SMALL_NET = dict(num_channels_down=[8, 8, 8, 8], num_channels_up=[8, 8, 8, 8], num_channels_skip=[4, 4, 4, 4],
                 filter_size_down=[3], filter_size_up=[3], input_depth=8)
QUICK = ["trainer.accelerator=cpu", "trainer.batch_size=1", "trainer.enable_progress_bar=false", "logger=none"]


@pytest.fixture(scope="module")
def alexnet() -> torch.nn.Module:
    return build_classifier("alexnet", "random", seed=0)


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, size, size), generator=gen) * 2 - 1  # [-1, 1], as the loaders give


def _batch(images: torch.Tensor, classes: list[int] | None = None) -> ImageBatch:
    n = images.shape[0]
    return ImageBatch(images=images, classes=torch.tensor(classes or [-1] * n),
                      ids=[f"im{k}" for k in range(n)], paths=[""] * n)


def _method(alexnet: torch.nn.Module, kind: str, objective: str = "preimage", layer: str = "conv3",
            dtype: torch.dtype = torch.float32, **overrides) -> Inversion:
    settings = InversionConfig(objective=objective, layer=layer, **{"lr": 0.01, "tv_lr": 0.02, **SMALL_NET, **overrides})
    extractor = FeatureExtractor("alexnet", alexnet, layer) if objective != "reconstruction" else None
    return Inversion(settings, kind, extractor, dtype=dtype, seed=3)


def _fit(method: Inversion, batch: ImageBatch, steps: int) -> list[torch.Tensor]:
    method.start(batch)
    optimizer = method.make_optimizer(fused=False)
    data = []
    for _ in range(steps):
        record, _, _ = engine.step(method, optimizer)
        data.append(record.terms["data"])
    return data


# ------------------------------------------------------------------ feature extractors
@pytest.mark.parametrize(("net", "layers"), [
    ("alexnet", {"conv1": (64, 15, 15), "pool2": (192, 3, 3), "conv5": (256, 3, 3), "fc6": (4096,),
                 "fc7": (4096,), "fc8": (1000,)}),
    ("vgg16", {"conv1_1": (64, 64, 64), "relu3_3": (256, 16, 16), "pool5": (512, 2, 2), "fc8": (1000,)}),
    ("vgg19", {"conv3_4": (256, 16, 16), "conv5_4": (512, 4, 4), "fc7": (4096,)}),
])
def test_feature_extractor_layer_shapes(net: str, layers: dict[str, tuple[int, ...]]) -> None:
    model = build_classifier(net, "random", seed=0)
    x = torch.rand(1, 3, 64, 64)
    for layer, shape in layers.items():
        assert tuple(FeatureExtractor(net, model, layer)(x).shape) == (1, *shape), layer
    # fc8 is the classifier's own output on the normalised image (the layer bookkeeping is right)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(FeatureExtractor(net, model, "fc8")(x), model((x - mean) / std),
                               rtol=0, atol=0)
    convs = sum(name.startswith("conv") for name in layer_names(net))
    assert convs == {"alexnet": 5, "vgg16": 13, "vgg19": 16}[net]


def test_unknown_layer_is_a_user_error(alexnet: torch.nn.Module) -> None:
    with pytest.raises(UserError, match="conv1_1"):
        FeatureExtractor("alexnet", alexnet, "conv1_1")


def test_select_unit_fc_and_conv_centre() -> None:
    fc = torch.arange(12.0).view(2, 6)
    assert select_unit(fc, torch.tensor([1, 4])).tolist() == [1.0, 10.0]
    conv = torch.zeros(2, 3, 5, 4)
    conv[0, 2, 2, 2], conv[1, 0, 2, 2] = 7.0, 9.0  # centre pixel (H//2, W//2)
    assert select_unit(conv, torch.tensor([2, 0])).tolist() == [7.0, 9.0]


def test_weights_file_round_trips(tmp_path: Path) -> None:
    source = build_classifier("alexnet", "random", seed=5)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(source.state_dict(), path)
    loaded = build_classifier("alexnet", str(path))
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_missing_weights_file_is_one_line_with_url_and_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError) as info:
        build_classifier("vgg16", None)
    text = str(info.value)
    assert "\n" not in text
    expected = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(expected) in text and "https://download.pytorch.org/models/vgg16-397923af.pth" in text
    with pytest.raises(UserError, match=r"missing\.pth"):
        build_classifier("alexnet", str(tmp_path / "missing.pth"))


def test_a_missing_classifier_stops_train_py_before_it_writes_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("GENPRIOR_DEBUG", raising=False)
    out = tmp_path / "out"
    code = run_train(["task=dip_preimage_quick", f"inversion.classifier_weights={tmp_path / 'alexnet.pth'}",
                      f"output.dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "alexnet.pth" in err and "Traceback" not in err
    assert not out.exists()  # checked before the output folder is made: a rerun is not refused
    # the image is listed (its file checked) by train.py too, before anything is written
    code = run_train(["task=dip_preimage_quick", f"data.source={tmp_path / 'missing.png'}", f"output.dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "missing.png" in err and not out.exists()


# ------------------------------------------------------------------ the method
@pytest.mark.parametrize("kind", ["dip", "tv"])
def test_preimage_fit_lowers_the_feature_loss(alexnet: torch.nn.Module, kind: str) -> None:
    data = _fit(_method(alexnet, kind), _batch(_images(1)), steps=12)
    # the normalised loss starts near 1 for an unrelated image; 12 Adam steps must cut it clearly
    assert float(data[-1][0]) < 0.8 * float(data[0][0])


@pytest.mark.parametrize("kind", ["dip", "tv"])
def test_activation_fit_raises_the_unit(alexnet: torch.nn.Module, kind: str) -> None:
    method = _method(alexnet, kind, objective="activation", layer="fc8", reg_noise_std=0.03)
    data = _fit(method, _batch(_images(1), classes=[130]), steps=12)
    # data = -unit; a random AlexNet's logits are ~5e-3, so the rise is asked relative to it
    first, last = -float(data[0][0]), -float(data[-1][0])
    assert last > first + 0.05 * abs(first)
    assert float(method.metrics(method.final_output())["unit_activation"][0]) > first


def test_tv_pixels_stay_in_range(alexnet: torch.nn.Module) -> None:
    method = _method(alexnet, "tv", objective="activation", layer="fc8", tv_lr=0.5)
    _fit(method, _batch(_images(1), classes=[3]), steps=3)
    pixels = method.pixels.detach()
    assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1


@pytest.mark.parametrize(("kind", "objective"), [("dip", "preimage"), ("tv", "preimage"), ("dip", "activation"),
                                                 ("dip", "reconstruction")])
def test_batch_of_two_equals_one_at_a_time(alexnet: torch.nn.Module, kind: str, objective: str) -> None:
    images, classes = _images(2, seed=1), [7, 400]
    layer = "fc8" if objective == "activation" else "conv3"
    extra = {"reg_noise_std": 0.03, "frames": [2, 5], "num_iter": 5}
    batched = _method(alexnet, kind, objective, layer, dtype=torch.float64, **extra)
    _fit(batched, _batch(images, classes), steps=5)
    together = batched.final_output()
    assert not torch.allclose(together[0], together[1])  # two different fits, not one shared
    for b in range(2):
        single = _method(alexnet, kind, objective, layer, dtype=torch.float64, **extra)
        one = ImageBatch(images=images[b : b + 1], classes=torch.tensor([classes[b]]), ids=[f"im{b}"], paths=[""])
        _fit(single, one, steps=5)
        # float64: the only difference is the batched kernels summing in another order (~1e-16
        # relative), carried through 5 Adam steps (Adam's m/sqrt(v) magnifies it where a
        # gradient is near 0). Measured max |B=2 - B=1| over the four cases: 0 at 1 thread,
        # 3.5e-10 at 2 threads (dip preimage), 1.3e-11 at 4 threads. 1e-8 is 28x that and far
        # below any real coupling between the images (which would show at 1e-3).
        torch.testing.assert_close(single.final_output()[0], together[b], rtol=1e-8, atol=1e-8)
        if objective == "reconstruction":
            torch.testing.assert_close(single.frames[2][0], batched.frames[2][b], rtol=1e-8, atol=1e-8)


def test_enhancement_formula() -> None:
    x0, coarse = torch.tensor([0.5, 0.9, 0.1]), torch.tensor([0.4, 0.5, 0.3])
    torch.testing.assert_close(enhance(x0, coarse), torch.tensor([0.6, 1.0, 0.0]))  # x0 + (x0 - xc), clipped


def test_method_selection() -> None:
    assert method_class("tv") is Inversion
    assert method_class("dip", "dip_preimage") is Inversion
    assert method_class("dip", "denoising").__name__ == "DIP"
    cfg = compose(["task=dip_enhancement_quick"])
    assert isinstance(build(cfg), Inversion)


# ------------------------------------------------------------------ the tasks, end to end
def _sheet(path: str | Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_preimage_task_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "pre"
    args = ["task=dip_preimage_quick", "inversion.layers=[conv1,fc8]", "inversion.num_iter=3",
            f"inversion.num_channels_down={SMALL_NET['num_channels_down']}",
            f"inversion.num_channels_up={SMALL_NET['num_channels_up']}",
            f"inversion.filter_size_down={SMALL_NET['filter_size_down']}",
            f"inversion.filter_size_up={SMALL_NET['filter_size_up']}", f"output.dir={out}", *QUICK]
    assert run_train(args) == 0
    row = json.loads((out / "results.jsonl").read_text())
    assert row["status"] == "ok"
    assert {"dip_conv1_feature_loss", "dip_fc8_feature_loss", "tv_conv1_feature_loss", "tv_fc8_feature_loss"} <= set(row)
    sheet = _sheet(out / "astronaut" / "preimage.png")
    assert sheet.width > 3 * 128 and sheet.height > 2 * 128  # 3 columns, 2 rows of >=128 px cells
    assert (out / "fits" / "tv_fc8" / "astronaut" / "result.png").is_file()


def test_activation_task_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "act"
    assert run_train(["task=dip_activation_maximization_quick", "inversion.num_iter=3", "inversion.classes=[1,2]",
                      f"output.dir={out}", *QUICK]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["class"] for r in rows] == [1, 2] and all(r["status"] == "ok" for r in rows)
    assert rows[0]["id"] == "class0001_goldfish"
    sheet = _sheet(out / "activation_maximization.png")
    assert sheet.width > 2 * 128 and sheet.height > 2 * 128


def test_enhancement_task_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "enh"
    assert run_train(["task=dip_enhancement_quick", "inversion.num_iter=4", "inversion.frames=[2,4]",
                      "inversion.num_channels_down=[8,8,8,8,8]", "inversion.num_channels_up=[8,8,8,8,8]",
                      f"output.dir={out}", *QUICK]) == 0
    row = json.loads((out / "results.jsonl").read_text())
    assert row["status"] == "ok" and "dip_psnr" in row
    folder = out / "fits" / "dip" / "astronaut"
    assert (folder / "enhanced_2.png").is_file() and (folder / "coarse_4.png").is_file()
    sheet = _sheet(out / "astronaut" / "enhancement.png")
    assert sheet.width > 3 * 128 and sheet.height > 2 * 128


def test_frames_beyond_num_iter_are_refused(tmp_path: Path) -> None:
    assert run_train(["task=dip_enhancement_quick", "inversion.num_iter=4", "inversion.frames=[2,8]",
                      f"output.dir={tmp_path / 'bad'}", *QUICK]) == 2


def test_evaluate_runs_the_preimage_task(tmp_path: Path, evaluate_one_thread) -> None:
    out = tmp_path / "eval"
    args = ["task=dip_preimage_quick", "inversion.layers=[fc8]", "inversion.priors=[tv]", "inversion.num_iter=3",
            f"output.dir={out}", *QUICK]
    assert evaluate_one_thread(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["astronaut"] and rows[0]["status"] == "ok"
    assert "tv_fc8_feature_loss" in rows[0] and (out / "astronaut" / "preimage.png").is_file()
    # a second run resumes: nothing is fitted again (no second row)
    assert evaluate_one_thread(args) == 0
    assert len((out / "results" / "rank0.jsonl").read_text().splitlines()) == 1


def test_config_section_is_typed() -> None:
    cfg = compose(["task=dip_preimage"])
    assert OmegaConf.to_container(cfg.inversion.layers) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6",
                                                            "fc7", "fc8"]
    assert cfg.inversion.filter_size_down == [7, 7, 5, 5, 3, 3] and cfg.inversion.pad == "zero"
    # the notebook's AlexNet input 227 runs in a 256 net (SPEC §8.7); 64 needs 128 for 6 levels
    assert InversionConfig().net_size(227) == 256 and InversionConfig().net_size(64) == 128
    with pytest.raises(UserError):
        compose(["task=dip_preimage", "inversion.layerz=[fc8]"])


def test_items_need_square_images(alexnet: torch.nn.Module) -> None:
    method = _method(alexnet, "tv")
    item = ImageItem("wide", "", image=torch.zeros(3, 64, 96))
    with pytest.raises(ValueError, match="square"):
        method.start(ImageBatch.of([item]))


@pytest.mark.parametrize(("task", "params"), [("dip_preimage", 2_606_763), ("dip_activation_maximization", 2_948_567)])
def test_preset_networks_have_the_notebooks_parameter_counts(task: str, params: int) -> None:
    """SPEC §3.7's counts of the feature-inversion and activation-maximisation networks."""
    cfg = compose([f"task={task}"])
    settings = InversionConfig(**OmegaConf.to_container(cfg.inversion, resolve=True))
    assert sum(p.numel() for p in skip(**settings.skip_kwargs(3)).parameters()) == params


def test_a_garbage_or_misfitting_classifier_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("GENPRIOR_DEBUG", raising=False)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    other = tmp_path / "vgg16_as_alexnet.pth"
    torch.save(build_classifier("vgg16", "random").state_dict(), other)
    for path, words in ((garbage, "corrupt"), (other, "do not fit torchvision's alexnet")):
        out = tmp_path / path.stem
        args = ["task=dip_preimage_quick", f"inversion.classifier_weights={path}", f"output.dir={out}"]
        assert run_train(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and words in err and "Traceback" not in err
        # found when the fit starts, before any image finished: the same command runs again
        assert run_train(args) == 2 and "earlier run" not in capsys.readouterr().err
