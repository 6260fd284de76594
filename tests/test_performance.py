"""Quality guard of the speed options (issue 8, docs/performance.md) on a tiny BigGAN on CPU.

Every option that is on by default must keep each image's result within float rounding of the
plain fp32 path; the opt-in options (bf16 autocast, channels_last, torch.compile) within the
stated tolerances. Speed itself is measured by benchmarks/dgp_throughput.py, never here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from genprior.config import ConfigError, compose
from genprior.degradations import build_degradation
from genprior.engine import choose_batch_size, step
from genprior.items import ImageBatch, ImageItem
from genprior.methods import build
from genprior.methods.dgp import DGP, DGPConfig
from genprior.metrics import restoration_metrics
from genprior.optim import PerImageAdam
from genprior.perf import CPU_AUTO_BATCH, PerfConfig, auto_batch_size, resolve_batch_size
from genprior.priors import biggan
from genprior.priors.biggan import (
    Attention,
    Discriminator,
    Generator,
    SNConv2d,
    SNLinear,
    _SpectralNorm,
    cache_frozen_spectral_norms,
    orthogonal_init_,
    use_fused_attention,
    use_output_scaled_spectral_norms,
)

# Every switch off: the plain fp32 path the options are measured against.
PLAIN = PerfConfig(autocast="none", compile=False, channels_last=False, fused_optimizer=False,
                   cache_frozen_sn=False, sync_free=False, fused_attention=False,
                   sn_scale_outputs=False)
# Final images of the default options against PLAIN after STEPS steps, in float32. Three options
# change no arithmetic (test_each_default_option_alone_matches_the_plain_path); the others sum
# in another order (the CPU gemv spectral norm, the fused attention's online softmax,
# W x / sigma, the fused Adam kernel), and DGP's Adam (beta1 = 0) amplifies that 1e-7 rounding
# over the fit (docs/faithfulness.md). Measured at threads 1/2/4 (any option, all defaults):
# at most 6.4e-4 per pixel, 9.4e-5 dB, per-step totals 4.3e-5 relative. The float64 test
# below is the proof that the options compute the same thing (1e-10); these are smoke checks.
DEFAULT_ATOL = 5e-3  # 7.8x the measured 6.4e-4; a wrong attention or sigma moves pixels by 1e-1
DEFAULT_PSNR_DB = 1e-2  # 100x the measured 9.4e-5 dB
TOTALS_RTOL = 1e-3  # 23x the measured 4.3e-5
# bf16 autocast: the forward passes round to 8 mantissa bits; after a short fit the final
# PSNR of every image stays within this of the fp32 path (measured: 0.05 dB), the first
# step's loss within 1e-2 relative (4.6e-4) and the last one's within 0.1 (0.066).
BF16_PSNR_DB = 0.1
STEPS = 6


def _tiny() -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    G = orthogonal_init_(Generator(resolution=128, G_ch=8)).eval()
    D = orthogonal_init_(Discriminator(resolution=128, D_ch=8)).eval()
    for m in [*G.modules(), *D.modules()]:  # as trained weights have: attention that contributes
        if isinstance(m, Attention):
            m.gamma.data.fill_(0.5)
    return G, D


def _config() -> DGPConfig:
    # colorization's shape: D-feature loss, progressive ft_num and lr_ratio, two stages
    return DGPConfig(iterations=[STEPS // 2] * 2, G_lrs=[5e-5 * 20] * 2, z_lrs=[2e-3 * 5] * 2, ftr_num=[7] * 2,
                     ft_num=[2, 3], lr_ratio=[0.7] * 2, w_D_loss=[1.0] * 2, w_mse=[0.0] * 2, w_percep=[0.0] * 2,
                     use_in=[False] * 2, select_num=0)


def _fit(perf: PerfConfig, B: int = 2, gemv: bool = True,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(final images, final PSNR per image, per-step totals) of a B-image colorization fit."""
    G, D = _tiny()
    G, D = G.to(dtype), D.to(dtype)
    torch.manual_seed(1)
    images = torch.rand(B, 3, 128, 128) * 2 - 1
    z0 = torch.randn(B, G.dim_z) * 0.5
    method = DGP(G, D, _config(), build_degradation("colorization", 128), metric_task="colorization", perf=perf)
    method.start(ImageBatch(images, torch.tensor([3, 7, 11, 13][:B]), [str(b) for b in range(B)],
                            [str(b) for b in range(B)]), initial_z=z0)
    opt = method.make_optimizer(fused=perf.fused_optimizer)
    totals = []
    old = _SpectralNorm.cpu_gemv
    _SpectralNorm.cpu_gemv = gemv
    try:
        while not method.progress.all_done():
            totals.append(step(method, opt)[0].total.clone())  # the engine's one step
    finally:
        _SpectralNorm.cpu_gemv = old
    x = method.final_output()
    psnr = restoration_metrics(x, images, "colorization")["psnr"]
    return x, psnr, totals


@pytest.fixture(scope="module")
def plain() -> tuple[torch.Tensor, torch.Tensor, list]:
    return _fit(PLAIN, gemv=False)


def test_default_options_keep_every_image_to_rounding(plain) -> None:
    x0, psnr0, totals0 = plain
    x, psnr, totals = _fit(PerfConfig())
    assert PerfConfig().autocast == "none" and not PerfConfig().compile  # opt-in only
    torch.testing.assert_close(x, x0, rtol=0, atol=DEFAULT_ATOL)
    torch.testing.assert_close(psnr, psnr0, rtol=0, atol=DEFAULT_PSNR_DB)
    for t, t0 in zip(totals, totals0):
        torch.testing.assert_close(t, t0, rtol=TOTALS_RTOL, atol=0)


@pytest.mark.parametrize("option", ["cache_frozen_sn", "sync_free"])
def test_each_default_option_alone_matches_the_plain_path(plain, option: str) -> None:
    x0, _, totals0 = plain
    x, _, totals = _fit(dataclasses.replace(PLAIN, **{option: True}), gemv=False)
    # These change no arithmetic at all: bit for bit.
    assert torch.equal(x, x0), option
    assert all(torch.equal(t, t0) for t, t0 in zip(totals, totals0)), option


@pytest.fixture(scope="module")
def plain64() -> tuple[torch.Tensor, torch.Tensor, list]:
    return _fit(PLAIN, gemv=False, dtype=torch.float64)


@pytest.mark.parametrize("option", ["defaults", "fused_attention", "sn_scale_outputs", "fused_optimizer",
                                    "gemv", "channels_last"])
def test_every_option_computes_the_same_in_float64(plain64, option: str) -> None:
    """The proof behind the float32 tolerances: in float64 (where rounding is 1e-16 and this
    short fit does not amplify it past 1e-12) each option gives the plain path's images and
    losses to 1e-10, so what they change in float32 is rounding, not the computation."""
    x0, psnr0, totals0 = plain64
    if option == "defaults":
        perf, gemv = PerfConfig(), True
    elif option == "gemv":
        perf, gemv = PLAIN, True
    else:
        perf, gemv = dataclasses.replace(PLAIN, **{option: True}), False
    x, psnr, totals = _fit(perf, gemv=gemv, dtype=torch.float64)
    assert x.dtype == torch.float64
    assert (x - x0).abs().max() <= 1e-10, (x - x0).abs().max()
    assert (psnr - psnr0).abs().max() <= 1e-9
    for t, t0 in zip(totals, totals0):
        assert ((t - t0).abs() / t0.abs()).max() <= 1e-10


def test_cpu_gemv_spectral_norm_is_rounding_only(plain) -> None:
    x0, psnr0, _ = plain
    x, psnr, _ = _fit(PLAIN, gemv=True)
    torch.testing.assert_close(x, x0, rtol=0, atol=DEFAULT_ATOL)
    torch.testing.assert_close(psnr, psnr0, rtol=0, atol=DEFAULT_PSNR_DB)


@pytest.mark.parametrize("option", ["fused_attention", "sn_scale_outputs", "fused_optimizer"])
def test_each_rounding_option_alone_stays_within_tolerance(plain, option: str) -> None:
    # Same math in another summation order (online softmax, W x / sigma, the fused Adam kernel)
    x0, psnr0, totals0 = plain
    x, psnr, totals = _fit(dataclasses.replace(PLAIN, **{option: True}), gemv=False)
    torch.testing.assert_close(x, x0, rtol=0, atol=DEFAULT_ATOL)
    torch.testing.assert_close(psnr, psnr0, rtol=0, atol=DEFAULT_PSNR_DB)
    for t, t0 in zip(totals, totals0):
        torch.testing.assert_close(t, t0, rtol=TOTALS_RTOL, atol=0)


@pytest.mark.parametrize("channels", [16, 64])  # C/8 < C/2 head sizes, padded to one
def test_fused_attention_equals_the_reference_products(channels: int) -> None:
    torch.manual_seed(0)
    layer = Attention(channels, 1e-8).eval()  # eval: the SN power iteration keeps u0
    layer.gamma.data.fill_(0.7)
    x = torch.randn(3, channels, 16, 16, requires_grad=True)
    reference = layer(x)
    grads = torch.autograd.grad(reference.square().sum(), [x, *layer.parameters()])
    alone = layer(x[:1])  # B = 1 before the option: the same computation as below
    use_fused_attention(layer)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention",
                   lambda *a, **k: calls.append(1) or original(*a, **k))
        fused = layer(x)
        fused_grads = torch.autograd.grad(fused.square().sum(), [x, *layer.parameters()])
        assert calls, "B >= 2 with the option on must take the fused kernel"
        calls.clear()
        # B = 1 ignores the option: the same kernels as before it, so bit for bit. (Against
        # reference[:1], a batch-of-3 forward, it would compare two kernels: 4.2e-7 apart on
        # an AMD EPYC.)
        torch.testing.assert_close(layer(x[:1]), alone, rtol=0, atol=0)
        assert not calls
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    for g, g0 in zip(fused_grads, grads):  # sums over all positions: rounding relative to the scale
        assert (g - g0).abs().max() <= 1e-4 * g0.abs().max(), (g - g0).abs().max()


@pytest.mark.parametrize("layer", ["conv8x8", "conv32x32_skipped", "linear"])
def test_output_scaled_spectral_norm_equals_the_weight_scaled_one(layer: str) -> None:
    torch.manual_seed(0)
    B = 3
    if layer == "linear":
        module, x = SNLinear(20, 12), torch.randn(B, 20)
    else:
        size = 8 if layer == "conv8x8" else 32  # 16 x 9 weights per output: >= 64, < 1024 positions
        module, x = SNConv2d(16, 6), torch.randn(B, 16, size, size)
    stacked = {n: torch.stack([t + 0.1 * b * torch.randn_like(t) for b in range(B)]).requires_grad_(t.requires_grad)
               for n, t in module.named_parameters()}
    stacked.update({n: t.expand(B, *t.shape).clone() for n, t in module.named_buffers()})
    weight = stacked["weight"]

    def run() -> tuple[torch.Tensor, ...]:
        out = torch.func.functional_call(module, stacked, (x,))
        return (out, *torch.autograd.grad(out.square().sum(), [weight, stacked["bias"]]))

    module.train()  # the power iteration moves u0 in train mode: restore it between runs
    u0 = stacked["u0"].clone()
    reference = run()
    u0_moved = stacked["u0"].clone()
    stacked["u0"].copy_(u0)
    use_output_scaled_spectral_norms(module)
    calls = []
    original = biggan._divide_per_image
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(biggan, "_divide_per_image", lambda *a: calls.append(1) or original(*a))
        result = run()
    assert bool(calls) == (layer != "conv32x32_skipped")
    calls.clear()
    one = {n: t[:1] for n, t in stacked.items()}
    with pytest.MonkeyPatch.context() as mp:  # B = 1 keeps W / sigma (the parity fixtures)
        mp.setattr(biggan, "_divide_per_image", lambda *a: calls.append(1) or original(*a))
        torch.func.functional_call(module.eval(), one, (x[:1],))
    assert not calls
    for a, b in zip(result, reference):  # output, weight gradient (through sigma too), bias gradient
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()
    torch.testing.assert_close(stacked["u0"], u0_moved, rtol=0, atol=1e-6)  # the same power iteration


def test_bf16_autocast_keeps_psnr_within_tolerance(plain) -> None:
    _, psnr0, totals0 = plain
    x, psnr, totals = _fit(dataclasses.replace(PerfConfig(), autocast="bf16"))
    assert x.dtype == torch.float32
    assert (psnr - psnr0).abs().max() < BF16_PSNR_DB, (psnr, psnr0)
    # bf16 rounds to 8 mantissa bits: measured 6.5e-4 (first step) and 1.9e-2 (last step)
    # relative at threads 1/2/4, 15x and 5x under these bounds
    torch.testing.assert_close(totals[0], totals0[0], rtol=1e-2, atol=0)
    torch.testing.assert_close(totals[-1], totals0[-1], rtol=0.1, atol=0)


def test_channels_last_keeps_results(plain) -> None:
    x0, psnr0, _ = plain
    x, psnr, _ = _fit(dataclasses.replace(PerfConfig(), channels_last=True))
    torch.testing.assert_close(x, x0, rtol=0, atol=DEFAULT_ATOL)
    torch.testing.assert_close(psnr, psnr0, rtol=0, atol=DEFAULT_PSNR_DB)


@pytest.mark.slow
def test_torch_compile_keeps_results(plain) -> None:
    x0, psnr0, _ = plain
    x, psnr, _ = _fit(dataclasses.replace(PerfConfig(), compile=True))
    torch.testing.assert_close(x, x0, rtol=0, atol=DEFAULT_ATOL)
    torch.testing.assert_close(psnr, psnr0, rtol=0, atol=DEFAULT_PSNR_DB)


def test_cached_spectral_norms_do_not_split_a_compiled_graph() -> None:
    # perf.compile: the frozen-SN cache's version check broke D into 39 graphs (38 breaks);
    # inside torch.compile the cache is skipped, so D traces as one graph
    _, D = _tiny()
    for p in D.parameters():
        p.requires_grad_(False)
    cache_frozen_spectral_norms(D)
    x = torch.rand(2, 3, 128, 128)
    eager = D(x)[0]  # fills the cache
    explained = torch._dynamo.explain(D)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch.testing.assert_close(D(x)[0], eager, rtol=0, atol=0)  # eager still uses the cache


# ------------------------------------------------------------------------------ optimizer
def test_fused_adam_equals_the_loop_with_masks_and_frozen_images() -> None:
    torch.manual_seed(0)
    B = 3
    shapes = [(B, 4, 5), (B, 7), (B, 2, 3, 3, 3), (B, 6)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]

    def run(fused: bool) -> tuple[list[torch.Tensor], PerImageAdam]:
        params = [p.clone().requires_grad_(True) for p in start]
        opt = PerImageAdam([
            {"name": "a", "params": params[:2], "lr": 0.0, "mask_keys": [None, "uses_bn"]},
            {"name": "b", "params": params[2:], "lr": 0.0},
        ], batch_size=B, fused=fused)
        for t, step_grads in enumerate(grads):
            opt.set_lrs({"a": torch.tensor([1e-2, 0.0, 3e-3], dtype=torch.float64) * (t + 1),
                         "b": torch.tensor([2e-3, 5e-3, 1e-3], dtype=torch.float64)})
            opt.masks = {"uses_bn": torch.tensor([True, t % 2 == 0, False])}
            opt.active = torch.tensor([True, True, t < 4])  # image 2 finishes after 4 steps
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params], opt

    loop, opt_loop = run(False)
    fused, opt_fused = run(True)  # CPU, B = 3: torch's fused kernel per image
    with pytest.MonkeyPatch.context() as mp:  # the _foreach_* path (B = 1 and other devices)
        mp.setattr(PerImageAdam, "_kernel_update", PerImageAdam._fused_update)
        foreach, _ = run(True)
    for a, b in zip(loop, foreach):
        assert torch.equal(a, b)
    for a, b in zip(loop, fused):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for p_loop, p_fused in zip(opt_loop.state, opt_fused.state):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_fused.state[p_fused][key], opt_loop.state[p_loop][key], rtol=0, atol=1e-6)
    torch.testing.assert_close(opt_fused.image_steps, opt_loop.image_steps)


# ------------------------------------------------------------------- cached spectral norms
def test_cached_spectral_norm_is_exact_and_follows_weight_changes() -> None:
    _, D = _tiny()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    for p in D.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        plain = D(x)[0]
        cache_frozen_spectral_norms(D)
        first, again = D(x)[0], D(x)[0]
        assert torch.equal(first, plain) and torch.equal(again, plain)
        D.linear.weight.mul_(2.0)  # an in-place change (as load_state_dict makes) invalidates it
        changed = D(x)[0]
        cache_frozen_spectral_norms(D, enabled=False)
        assert torch.equal(changed, D(x)[0])


# ---------------------------------------------------------------------- batch size
def test_batch_size_defaults_to_auto_and_resolves_on_cpu() -> None:
    cfg = compose(["prior=biggan_tiny", "task=colorization"])
    assert cfg.trainer.batch_size == "auto"
    assert resolve_batch_size("auto", torch.device("cpu"), 10) == CPU_AUTO_BATCH
    assert resolve_batch_size(8, torch.device("cpu"), 10) == 8
    assert compose(["trainer.batch_size=4"]).trainer.batch_size == 4
    with pytest.raises(ConfigError, match=r"trainer\.batch_size"):
        compose(["trainer.batch_size=0"])
    with pytest.raises(ConfigError, match=r"perf\.autocast"):
        compose(["perf.autocast=fp16"])


def test_auto_batch_size_extrapolates_two_probes_into_free_memory() -> None:
    gib = 2**30
    peaks = {1: 5 * gib, 2: 6 * gib}  # 4 GiB shared + 1 GiB per image
    assert auto_batch_size(peaks.__getitem__, 40 * gib, n_items=1000) == 30  # (0.85*40 - 4) / 1
    assert auto_batch_size(peaks.__getitem__, 40 * gib, n_items=12) == 12  # no more than the images
    assert auto_batch_size(peaks.__getitem__, 400 * gib, n_items=1000) == 64  # the cap
    assert auto_batch_size(peaks.__getitem__, 4 * gib, n_items=1000) == 1  # never below one
    assert auto_batch_size(lambda b: 1 / 0, 40 * gib, n_items=1) == 1  # one image: no probe


def test_auto_on_cuda_reads_free_memory_and_probes(monkeypatch) -> None:
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    seen = []

    def probe(batch: int) -> int:
        seen.append(batch)
        return (2 + batch) * gib

    assert resolve_batch_size("auto", torch.device("cuda"), 100, probe) == 15  # (17 - 2) / 1
    assert seen == [1, 2]


def test_runs_use_the_configured_or_automatic_batch_size() -> None:
    """engine.choose_batch_size (train.py and every evaluate.py shard): "auto" is CPU_AUTO_BATCH
    on a CPU, without probing (the method is never started)."""
    items = [ImageItem(id=str(i), path="") for i in range(5)]
    auto = compose(["prior=biggan_tiny", "task=colorization", "trainer.accelerator=cpu"])
    method = build(auto)  # built, never started
    assert choose_batch_size(auto, method, items, None) == CPU_AUTO_BATCH
    fixed = compose(["prior=biggan_tiny", "task=colorization", "trainer.accelerator=cpu",
                     "trainer.batch_size=3"])
    assert choose_batch_size(fixed, method, items, None) == 3


def test_cpu_malloc_tuning_is_an_option_applied_once() -> None:
    """perf.cpu_malloc_tuning (default on): mallopt on Linux/glibc, a no-op elsewhere."""
    import sys

    from genprior.config import compose
    from genprior.perf import perf_settings, tune_cpu_malloc

    assert perf_settings(compose([])).cpu_malloc_tuning is True
    assert perf_settings(compose(["perf.cpu_malloc_tuning=false"])).cpu_malloc_tuning is False
    applied = tune_cpu_malloc()
    assert applied == tune_cpu_malloc()  # idempotent
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert applied is True
