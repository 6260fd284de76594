"""Deep Image Prior: network parity with the reference fixtures, batched nets, the DIP loop
(``DIP`` driven by ``genprior.engine.step``, the step every run takes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genprior.engine import step
from genprior.items import StepRecord
from genprior.methods.dip import (
    DIP,
    PRESETS,
    DIPConfig,
    check_input_size,
    crop_box,
    crop_to_multiple,
    load_image,
    load_preset,
    noisy_observation,
    pil_to_tensor,
    sr_baselines,
    sr_pair,
)
from genprior.metrics import psnr
from genprior.priors.dip_nets import (
    Downsampler,
    StackedNets,
    get_kernel,
    get_noise,
    skip,
    skip_output_size_for,
    to_dtype,
    tv_loss,
)

# Train-mode outputs of the 128-channel nets on 64×64 / 34×46 inputs: the deepest BatchNorms
# normalise over 4 pixels or fewer, which amplifies float32 summation-order noise. The fixture
# itself is up to 9e-5 away from a float64 evaluation of the same weights; this implementation
# is 1.8e-5 … 1.3e-4 away from the fixture depending on thread count and oneDNN ISA (max abs),
# and ≤ 2.1e-5 in mean. Real structural mistakes (BN eps 2e-5, align_corners=True, slope 0.01)
# give 0.2–0.5. Narrow nets reach ≤ 1e-6 and eval mode ≤ 1.2e-7. See docs/dip.md.
TRAIN_ATOL = 5e-4
TRAIN_MEAN_ATOL = 5e-5
EVAL_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def skip_fixture(dip_ref: Path) -> dict:
    return torch.load(dip_ref / "skip_parity.pt", weights_only=True)


@pytest.fixture(scope="module")
def variants_fixture(dip_ref: Path) -> dict:
    return torch.load(dip_ref / "skip_variants_parity.pt", weights_only=True)


@pytest.fixture(scope="module")
def preprocess_fixture(dip_ref: Path) -> dict:
    return torch.load(dip_ref / "preprocess_parity.pt", weights_only=True)


def _skip_kwargs(config: dict) -> dict:
    config = dict(config)
    builder = config.pop("builder")
    return dict(config["equivalent_skip_kwargs"]) if builder == "get_net" else config


def _float32(state_dict: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def _entries(skip_fixture: dict, variants_fixture: dict) -> dict:
    return {"skip_main": skip_fixture["skip_main"], **variants_fixture["skip_variants"]}


ENTRY_NAMES = [
    "skip_main",
    "snail_dejpeg",
    "hourglass_nearest_k5_no1x1",
    "avg_down_bilinear",
    "max_down_zero_pad_mixed",
    "lanczos2_down_skip",
    "flash_mixed_upsample",
]


def _tiny_settings(**overrides) -> DIPConfig:
    base = {
        "num_channels_down": [8, 8, 8],
        "num_channels_up": [8, 8, 8],
        "num_channels_skip": [2, 2, 2],
        "input_depth": 4,
        "num_iter": 5,
    }
    return DIPConfig(**{**base, **overrides})


def _started(settings: DIPConfig, observation: torch.Tensor, dtype: torch.dtype = torch.float32,
             seed: int = 0, **kwargs) -> DIP:
    """A DIP of the run's ``dtype`` and ``seed``, started on the given observations."""
    method = DIP(settings, dtype=dtype, seed=seed)
    method.start_observed([f"image{b}" for b in range(observation.shape[0])], observation, **kwargs)
    return method


def _fit(method: DIP, steps: int | None = None, fused: bool = True) -> list[StepRecord]:
    """``steps`` engine steps (None: until every image is done) with the method's optimizer."""
    optimizer = method.make_optimizer(fused=fused)
    records = []
    while not method.progress.all_done() and (steps is None or len(records) < steps):
        records.append(step(method, optimizer)[0])
    return records


# ---------------------------------------------------------------------------------------------
# skip network parity (SPEC §3, §11)
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize("name", ENTRY_NAMES)
def test_skip_construction_order_and_keys(name, skip_fixture, variants_fixture):
    entry = _entries(skip_fixture, variants_fixture)[name]
    torch.manual_seed(entry["seed_used_for_construction"])
    net = skip(**_skip_kwargs(entry["config"]))
    assert sum(p.numel() for p in net.parameters()) == entry["num_params"]
    state = net.state_dict()
    assert list(state) == list(entry["state_dict"])
    # Initial weights under the same seed = reference construction order (SPEC §3.6).
    for key, stats in entry["init_stats_raw"].items():
        t = state[key].double()
        ours = torch.stack([t.sum(), t.abs().sum(), t.flatten()[0]])
        torch.testing.assert_close(ours, stats, rtol=1e-9, atol=1e-9, msg=key)


@pytest.mark.shared
@pytest.mark.parametrize("name", ENTRY_NAMES)
def test_skip_forward_parity(name, skip_fixture, variants_fixture):
    entry = _entries(skip_fixture, variants_fixture)[name]
    kwargs = _skip_kwargs(entry["config"])
    for case in entry["cases"]:
        net = skip(**kwargs)
        net.load_state_dict(_float32(entry["state_dict"]), strict=True)
        with torch.no_grad():
            net.eval()
            out_eval = net(case["input"])
            net.train()
            out_train = net(case["input"])
        assert out_train.shape == case["output_train"].shape
        torch.testing.assert_close(out_eval, case["output_eval"], rtol=0, atol=EVAL_ATOL)
        torch.testing.assert_close(out_train, case["output_train"], rtol=0, atol=TRAIN_ATOL)
        assert (out_train - case["output_train"]).abs().mean() < TRAIN_MEAN_ATOL
        state = net.state_dict()
        for key, value in case["running_stats_after_one_train_forward"].items():
            # measured max 5.4e-6 over threads 1/2/4 and the MKL/ATen AVX2 and COMPATIBLE paths
            torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)
        size = skip_output_size_for(*case["input"].shape[-2:], kwargs)
        assert size == tuple(case["output_train"].shape[-2:])


@pytest.mark.shared
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_stacked_nets_reproduce_fixture(mode, variants_fixture):
    # Two copies of the fixture net (B = 2 takes the real batched path in both modes), on the
    # 32×32 case and on the 30×42 case whose output is centre-cropped to 24×40.
    entry = variants_fixture["skip_variants"]["max_down_zero_pad_mixed"]
    net = skip(**_skip_kwargs(entry["config"]))
    net.load_state_dict(_float32(entry["state_dict"]))
    stacked = StackedNets([net, net], mode=mode)
    for case in entry["cases"]:
        with torch.no_grad():
            out = stacked(case["input"].expand(2, -1, -1, -1))
        for b in range(2):
            # the fixture is another machine's float32: measured max 7.9e-7 (loop) / 2.1e-6
            # (vmap) over threads 1/2/4 and the MKL/ATen AVX2 and COMPATIBLE code paths
            torch.testing.assert_close(out[b : b + 1], case["output_train"], rtol=0, atol=1e-5)
    # The per-image state_dict is in reference format.
    skip(**_skip_kwargs(entry["config"])).load_state_dict(stacked.state_dict_for(1), strict=True)


@pytest.mark.shared
def test_downsampler_parity(skip_fixture):
    for name, entry in skip_fixture["downsampler"].items():
        if "kernel_type" not in entry:  # the phase-0 kernel, not used by the notebooks
            kernel = get_kernel(4, "lanczos", 0, 17, support=2)
            np.testing.assert_allclose(kernel, entry["kernel_float64"].numpy(), rtol=0, atol=1e-15)
            continue
        down = Downsampler(
            3,
            entry["factor"],
            entry["kernel_type"],
            entry["phase"],
            preserve_size=entry["preserve_size"],
        )
        np.testing.assert_allclose(
            down.kernel, entry["kernel_float64"].numpy(), rtol=0, atol=1e-15, err_msg=name
        )
        assert [down.pad] * 4 == entry["replication_pad"]
        with torch.no_grad():
            # measured 0 (bit for bit) over threads 1/2/4 and the MKL/ATen AVX2 and COMPATIBLE
            # code paths; 1e-6 (~8 ulp at 1) leaves another CPU its own summation order
            torch.testing.assert_close(down(entry["input"]), entry["output"], rtol=0, atol=1e-6)


@pytest.mark.shared
def test_tv_loss_and_meshgrid(skip_fixture):
    misc = skip_fixture["misc"]
    # measured 0 (bit for bit) over threads 1/2/4; assert_close's float32 default rtol 1.3e-6
    torch.testing.assert_close(tv_loss(misc["tv_loss_input"]), misc["tv_loss_beta0.5"])
    torch.testing.assert_close(tv_loss(misc["tv_loss_input"], beta=2), misc["tv_loss_beta2"])
    torch.testing.assert_close(
        get_noise(2, "meshgrid", (5, 7)), misc["meshgrid_2x5x7"], rtol=0, atol=0
    )


def test_get_noise_is_uniform_times_var():
    z = get_noise(32, "noise", (16, 24), generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 32, 16, 24)
    assert 0 <= z.min() and z.max() < 0.1 and abs(z.mean().item() - 0.05) < 0.005


# ---------------------------------------------------------------------------------------------
# batched nets = per-image nets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_stacked_nets_equal_independent_nets(mode):
    torch.manual_seed(0)
    kwargs = {
        "num_input_channels": 4,
        "num_channels_down": [8, 16, 16],
        "num_channels_up": [8, 16, 16],
        "num_channels_skip": [2, 2, 2],
        "upsample_mode": "bilinear",
        "pad": "reflection",
    }
    nets = [skip(**kwargs) for _ in range(2)]
    stacked = StackedNets(nets, mode=mode)
    z = torch.rand(2, 4, 32, 32) * 0.1
    target = torch.rand(2, 3, 32, 32)
    out = stacked(z)
    (out - target).square().flatten(1).mean(1).sum().backward()
    grads = stacked.stacked()
    for b, net in enumerate(nets):
        single = net(z[b : b + 1])
        (single - target[b : b + 1]).square().mean().backward()
        if mode == "loop":
            # each image runs through the single net's kernels: bit for bit (measured equal
            # over threads 1/2/4 and the MKL/ATen AVX2 and COMPATIBLE code paths)
            assert torch.equal(out[b], single[0])
            for name, p in net.named_parameters():
                assert torch.equal(grads[name].grad[b], p.grad), name
            continue
        # vmap: grouped convolutions, other kernels. Measured max 1.5e-6 on the outputs and
        # 2.8e-8 on the gradients over threads 1/2/4 and the AVX2 and COMPATIBLE paths.
        torch.testing.assert_close(out[b], single[0], rtol=0, atol=1e-5)
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[name].grad[b], p.grad, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(out[0], out[1])


# ---------------------------------------------------------------------------------------------
# preprocessing (SPEC §7.1, §7.2, §11.3)
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_preprocess_parity(preprocess_fixture, shared_dir):
    data = shared_dir / "data" / "dip"
    for repo_path, info in preprocess_fixture["images"].items():
        path = data / Path(repo_path).relative_to("data")
        img = load_image(path)
        if "cropped_WxH" in info:
            # SR loader (flash) rounds, crop_image floors; identical for these images.
            rounding = "round" if "flash" in repo_path else "floor"
            d = 64 if "inpainting" in repo_path else 32
            assert list(crop_to_multiple(img, d, rounding).size) == info["cropped_WxH"]
        if "mask_shape_CHW" in info:
            mask = pil_to_tensor(load_image(str(path).replace(".png", "_mask.png")))
            assert list(mask.shape) == info["mask_shape_CHW"]
            assert set(mask.unique().tolist()) == {0.0, 1.0}
            assert mask.mean().item() == pytest.approx(info["mask_fraction_known"], abs=1e-6)
        if "after_reflection_pad1" in info:
            x = pil_to_tensor(img)
            padded = torch.nn.functional.pad(x[None], (1, 1, 1, 1), mode="reflect")[0]
            assert list(x.shape) == info["np_shape"]
            assert list(padded.shape) == info["after_reflection_pad1"]
    assert crop_box(584, 388, 32, "round") == (4, 2, 580, 386)
    assert crop_box(774, 706, 32, "round") == (3, 1, 771, 705)
    assert crop_box(400, 261) == (8, 2, 392, 258)

    for key, info in preprocess_fixture["sr"].items():
        name, factor = key.rsplit("_x", 1)
        hr, lr = sr_pair(load_image(data / "sr" / f"{name}.png"), int(factor))
        assert list(hr.size) == info["HR_WxH"] and list(lr.size) == info["LR_WxH"]
        np.testing.assert_array_equal(np.asarray(lr), info["LR_uint8_HWC"].numpy())
        base = sr_baselines(lr, hr.size)
        hr_t = pil_to_tensor(hr)[None]
        # PSNRs: measured 0 from the fixture (threads 1/2/4): genprior.metrics.psnr differences
        # float32 images in float32, as skimage did (differencing in float64 was 6.5e-8 dB off)
        assert psnr(base["bicubic"][None], hr_t).item() == pytest.approx(
            info["psnr_bicubic_rgb"], abs=1e-6
        )
        assert psnr(base["nearest"][None], hr_t).item() == pytest.approx(
            info["psnr_nearest_rgb"], abs=1e-6
        )


# ---------------------------------------------------------------------------------------------
# presets and input checks
# ---------------------------------------------------------------------------------------------

# SPEC §3.7: parameter counts of the notebook networks.
PRESET_PARAMS = {
    "denoising": (3, 2217831),
    "jpeg_snail": (3, 572827),
    "sr4": (3, 2217831),
    "sr8": (3, 2217831),
    "sr4_prior_effect": (3, 2184307),
    "inpainting_vase": (3, 2157955),
    "inpainting_kate": (3, 3002627),
    "inpainting_library": (3, 2996467),
    "restoration_barbara": (1, 2217573),
    "restoration_kate": (3, 1027379),
    "flash_no_flash": (3, 2184307),
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_the_notebook_networks(name):
    settings = load_preset(name)
    if name not in PRESET_PARAMS:
        return
    out_channels, params = PRESET_PARAMS[name]
    in_channels = {"meshgrid": 2, "image": 3}.get(settings.input_type, settings.input_depth)
    net = skip(**settings.skip_kwargs(in_channels, out_channels))
    assert sum(p.numel() for p in net.parameters()) == params


def test_preset_typo_fails():
    with pytest.raises(Exception, match="num_iters"):
        load_preset("denoising", num_iters=3)


def test_input_size_errors_name_size_and_multiple():
    with pytest.raises(ValueError, match=r"32×32.*smallest square input it takes is 64×64"):
        check_input_size(32, 32, DIPConfig())
    with pytest.raises(ValueError, match=r"100×60.*104×64.*multiples of 32"):
        check_input_size(100, 60, load_preset("jpeg_snail"))
    check_input_size(514, 514, load_preset("restoration_barbara"))  # Concat crops, SPEC §8.5
    with pytest.raises(ValueError, match="multiples of 32"):
        _started(load_preset("jpeg_snail"), torch.rand(1, 3, 100, 60))


# ---------------------------------------------------------------------------------------------
# the DIP loop
# ---------------------------------------------------------------------------------------------


def test_ema_is_initialised_with_the_first_output_and_not_bias_corrected():
    settings = _tiny_settings(exp_weight=0.9, backtracking="off")
    method = _started(settings, torch.rand(1, 3, 32, 32), seed=3)
    outputs = []
    method.nets.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    _fit(method, 3)
    expected = outputs[0]
    for out in outputs[1:]:
        expected = expected * 0.9 + out * (1 - 0.9)  # the method's arithmetic: bit for bit
    assert torch.equal(method.output_ema, expected)
    assert not torch.allclose(outputs[0], outputs[2])


def _corrupt(method: DIP, image: int) -> None:
    # Drive image's output to saturation: a large bias on the last conv before the sigmoid.
    name = [n for n in method.nets.stacked() if n.endswith("bias")][-1]
    with torch.no_grad():
        method.nets.stacked()[name][image] += 50.0


def test_backtracking_restores_the_last_checkpoint_for_the_bad_image_only():
    settings = _tiny_settings(backtracking="denoising", show_every=100, exp_weight=None)
    method = _started(settings, torch.rand(2, 3, 32, 32) * 0.5 + 0.25)
    optimizer = method.make_optimizer()
    for _ in range(3):
        record, _, _ = step(method, optimizer)
        assert record.terms["fell_back"].sum() == 0
    # Step 2 (i = 2, not a multiple of show_every) checkpointed the parameters it used.
    checkpoint = [s.clone() for s in method.snapshot]
    _corrupt(method, image=1)
    corrupted = [p.detach().clone() for p in method.nets.parameters()]
    seen: dict = {}

    def before_update(optimizer, args, kwargs) -> None:  # after backward and the restore
        seen["parameters"] = [p.detach().clone() for p in method.nets.parameters()]
        seen["iteration"] = method.iteration.tolist()

    handle = optimizer.register_step_pre_hook(before_update)
    record, _, _ = step(method, optimizer)
    handle.remove()
    assert record.terms["fell_back"].tolist() == [0.0, 1.0]
    assert seen["iteration"] == [4, 3]  # the reference does not advance i on fall-back
    for p, old, snap in zip(seen["parameters"], corrupted, checkpoint):
        assert torch.equal(p[1], snap[1])  # image 1 restored (a copy) …
        assert torch.equal(p[0], old[0])  # … image 0 untouched
    # Adam still applies the gradient of the bad step on top of the restored weights.
    moved = max(
        (p[1] - s[1]).abs().max().item() for p, s in zip(method.nets.parameters(), checkpoint)
    )
    assert 0 < moved < 10 * settings.lr


def test_backtracking_rules_follow_the_counter():
    def fell_back(method: DIP, optimizer) -> float:
        return step(method, optimizer)[0].terms["fell_back"].item()

    # denoising rule: nothing is checked when i is a multiple of show_every.
    settings = _tiny_settings(backtracking="denoising", show_every=2, exp_weight=None)
    method = _started(settings, torch.rand(1, 3, 32, 32))
    optimizer = method.make_optimizer()
    fell_back(method, optimizer)
    fell_back(method, optimizer)  # i = 1: checked, checkpoint
    _corrupt(method, 0)
    assert fell_back(method, optimizer) == 0  # i = 2: not checked
    assert fell_back(method, optimizer) == 1  # i = 3: checked, drop
    # restoration rule: checked only on multiples (including i = 0).
    settings = _tiny_settings(task="restoration", backtracking="restoration", show_every=2,
                              exp_weight=None)
    method = _started(settings, torch.rand(1, 3, 32, 32), mask=torch.ones(1, 1, 32, 32))
    optimizer = method.make_optimizer()
    fell_back(method, optimizer)
    _corrupt(method, 0)
    assert fell_back(method, optimizer) == 0  # i = 1: not checked
    assert fell_back(method, optimizer) == 1  # i = 2: checked, drop
    assert fell_back(method, optimizer) == 0  # i stays 2: checked again


def test_image_results_do_not_depend_on_the_batch():
    settings = _tiny_settings(backtracking="denoising", exp_weight=0.99, batched_forward="loop")
    images = torch.rand(2, 3, 32, 32)
    pair = _started(settings, images, seed=7)
    alone = _started(settings, images[1:], seed=7)
    # The optimizer's per-image loop (perf.fused_optimizer=false): torch's fused kernel, the
    # default for B >= 2 on the CPU, rounds differently from the loop that B = 1 takes.
    _fit(pair, 3, fused=False)
    _fit(alone, 3, fused=False)
    # The CPU loop runs every image through the same kernels whatever the batch, and Adam is
    # element-wise: bit for bit (measured equal over threads 1/2/4).
    assert torch.equal(pair.result()[0][1:], alone.result()[0])
    assert torch.equal(pair.result()[1][1:], alone.result()[1])


def test_inpainting_loss_ignores_holes_and_sr_output_is_high_resolution():
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 8:16, 8:16] = 0
    image = torch.rand(1, 3, 32, 32)
    settings = _tiny_settings(task="inpainting", exp_weight=None, backtracking="off",
                              final_input="saved")
    a = _started(settings, image, mask=mask)
    b = _started(settings, torch.where(mask.bool(), image, 0.5), mask=mask)
    assert torch.equal(a.loss()[0], b.loss()[0])  # the same targets, exactly

    settings = _tiny_settings(task="super_resolution", exp_weight=None, backtracking="off",
                              sr_factor=4)
    sr = _started(settings, torch.rand(2, 3, 8, 8), clean=torch.rand(2, 3, 32, 32))
    history = _fit(sr, 4)
    assert set(history[0].reported()) >= {"loss", "psnr_observed", "psnr_gt"}
    assert sr.result()[0].shape == (2, 3, 32, 32) and sr.result()[1] is None


def test_short_denoising_fit_improves_psnr():
    from skimage import data

    # 64×64 crop of the astronaut's face area, AWGN σ = 50/255.
    crop = np.ascontiguousarray(data.astronaut()[60:188:2, 180:308:2])
    clean = pil_to_tensor(Image.fromarray(crop))[None]
    noisy = noisy_observation(clean, 50 / 255, torch.Generator().manual_seed(0))
    settings = load_preset(
        "denoising", num_iter=150, num_channels_down=[16] * 5, num_channels_up=[16] * 5
    )
    method = _started(settings, noisy, clean=clean, seed=0)
    # One thread: 150 small steps take ~10 s on one core, while 2 OpenMP threads on a busy
    # 2-core runner were measured 4–15× slower than one (docs/dip.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert len(_fit(method)) == 150
    finally:
        torch.set_num_threads(threads)
    output, output_ema = method.result()
    noisy_psnr = psnr(noisy, clean).item()
    assert psnr(output, clean).item() > noisy_psnr + 2.0
    assert psnr(output_ema, clean).item() > noisy_psnr


def test_stop_mse_ends_an_images_fit_and_freezes_it():
    """dip.stop_mse (DGP Table 5's early stop): an image whose MSE drops below it is done, and
    the optimizer leaves its weights alone from then on; the other image carries on."""
    settings = _tiny_settings(task="jpeg_artifacts", exp_weight=None, backtracking="off",
                              num_iter=4, stop_mse=0.5)
    observation = torch.cat([torch.full((1, 3, 32, 32), 0.5), torch.full((1, 3, 32, 32), 8.0)])
    method = _started(settings, observation, seeds=[1, 2])
    records = _fit(method, 1)
    stopped = [p[0].detach().clone() for p in method.nets.parameters()]
    records += _fit(method)
    assert [r.active.tolist() for r in records] == [[True, True], [False, True], [False, True],
                                                    [False, True]]
    assert method.progress.stopped_early == [[0], []] and method.progress.done == [True, True]
    assert all(torch.equal(p[0], q) for p, q in zip(method.nets.parameters(), stopped))


# ---------------------------------------------------------------------------------------------
# float64 (trainer.precision=64-true) and replaying recorded values
# ---------------------------------------------------------------------------------------------


def test_a_float64_run_fits_in_float64_from_the_float32_draws():
    settings = _tiny_settings(backtracking="denoising", exp_weight=0.9)
    images = torch.rand(2, 3, 32, 32)
    f32 = _started(settings, images, clean=images, seeds=[3, 4])
    f64 = _started(settings, images, dtype=torch.float64, clean=images, seeds=[3, 4])
    assert f32.observation.dtype == torch.float32 and f64.observation.dtype == torch.float64
    assert torch.equal(f64.observation, images.double())
    # Weights, z and ε are drawn in float32 in both runs: the float64 run starts from the float32
    # run's numbers, cast exactly.
    for p32, p64 in zip(f32.parameters(), f64.parameters()):
        assert p64.dtype == torch.float64 and torch.equal(p64, p32.double())
    assert torch.equal(f64.net_input_saved, f32.net_input_saved.double())
    assert torch.equal(f64.perturbation(5), f32.perturbation(5).double())
    assert f64.clean.dtype == torch.float64
    optimizer = f64.make_optimizer()
    for _ in range(2):
        record, _, _ = step(f64, optimizer)
        assert all(v.dtype == torch.float64 for v in record.reported().values())
    assert all(
        s[k].dtype == torch.float64 for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")
    )
    output, output_ema = f64.result()
    assert output.dtype == output_ema.dtype == torch.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        DIP(settings, dtype=torch.half)


def test_sr_draws_z_before_the_net_and_float64_keeps_the_unrounded_kernel():
    settings = _tiny_settings(task="super_resolution", sr_factor=4, exp_weight=None,
                              backtracking="off")
    dip = _started(settings, torch.rand(1, 3, 8, 8), dtype=torch.float64, seed=5)
    # The SR notebook draws z before building the net (its float64 trace's seed reproduces its
    # weights and z only in this order); the other notebooks build the net first.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        z = get_noise(4, "noise", (32, 32), dtype=torch.float32)
        net = skip(**settings.skip_kwargs(4, 3), dtype=torch.float32)
    assert torch.equal(dip.net_input_saved, z.double())
    for name, p in dip.nets.stacked().items():
        assert torch.equal(p[0], net.state_dict()[name].double()), name
    # The forward model's Lanczos2 kernel in float64 is the float64 kernel, not its float32
    # rounding (TRACES_F64.md), and so are the kernels inside a skip net after to_dtype.
    kernel = torch.from_numpy(dip.downsampler.kernel)
    assert torch.equal(dip.downsampler.downsampler_.weight[2, 2], kernel)
    lanczos = _tiny_settings(downsample_mode=["lanczos2"]).skip_kwargs(4, 3)
    inner = [m for m in to_dtype(skip(**lanczos), torch.float64).modules() if isinstance(m, Downsampler)]
    assert inner and all(torch.equal(m.downsampler_.weight[0, 0], torch.from_numpy(m.kernel)) for m in inner)
    rounded = [m for m in skip(**lanczos).double().modules() if isinstance(m, Downsampler)]
    assert not torch.equal(rounded[0].downsampler_.weight[0, 0], torch.from_numpy(rounded[0].kernel))


def test_recorded_initial_state_and_perturbations_replace_the_draws():
    settings = _tiny_settings(exp_weight=None, backtracking="off")
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    eps = torch.randn(4, 2, 4, 32, 32, dtype=torch.float64)
    dip = _started(settings, images, dtype=torch.float64, seeds=[1, 2],
                   perturbations=lambda step: eps[step])
    fresh = _started(settings, images, dtype=torch.float64, seeds=[1, 2])
    net = skip(**settings.skip_kwargs(4, 3), dtype=torch.float64)
    z = torch.rand(1, 4, 32, 32, dtype=torch.float64) * 0.1
    dip.load_initial_state(1, net.state_dict(), z)
    for (name, p), snap, p_fresh in zip(dip.nets.stacked().items(), dip.snapshot, fresh.parameters()):
        assert torch.equal(p[1], net.state_dict()[name]) and torch.equal(snap[1], p[1])
        assert torch.equal(p[0], p_fresh[0])  # the other image keeps its seeded draws
    assert torch.equal(dip.net_input_saved[1:], z)
    assert torch.equal(dip.net_input_saved[:1], fresh.net_input_saved[:1])
    # z̃ = z + ε·σ_p with the given ε, computed as the notebooks do (product first)
    assert torch.equal(dip.network_input(3), dip.net_input_saved + eps[3] * settings.reg_noise_std)
    with pytest.raises(KeyError, match="missing"):
        dip.load_initial_state(0, {k: v for k, v in net.state_dict().items() if k != "2.weight"})
    _fit(dip, 1)
    with pytest.raises(RuntimeError, match="before the first step"):
        dip.load_initial_state(0, net.state_dict())
    bad = _started(settings, images, dtype=torch.float64, perturbations=lambda step: eps[step][:1])
    with pytest.raises(ValueError, match="perturbations"):
        bad.loss()
