"""BigGAN G/D: reference state_dict layout, parity with the DGP fixtures, stacked per-image use.

Fixture outputs were produced by the reference on another CPU; float32 convolutions round
differently across machines and thread counts (about 2e-6 here, against float64 both sides are
~5e-7 off), so forward passes are compared with ``ATOL`` rather than bit-exactly (SPEC §13).
Stacked (grouped-conv) and batched forwards are other kernels than a batch-1 forward and are
compared with the same ``ATOL``; only the same computation twice, copies and pure data ops
(embedding lookups, state-dict round trips) are compared exactly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.func import functional_call

from genprior.losses import d_feature_loss, feature_l1_terms
from genprior.priors.biggan import (
    Discriminator,
    Generator,
    SNLinear,
    stack_per_image,
)
from genprior.priors.registry import build_discriminator, build_generator

MANIFEST_CONFIGS = {
    "biggan128_ch96": (128, 96),
    "biggan256_ch96": (256, 96),
    "biggan256_ch64": (256, 64),
    "biggan512_ch96": (512, 96),
}
# G/D float32 outputs in [-1, 1] against the fixture, and stacked/batched against batch-1
# forwards: measured max 1.8e-6 (threads 1/2/4); 11x margin. A wrong tensor, layer or per-image
# mix-up moves outputs by 1e-3 or more.
ATOL = 2e-5


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def manifest(dgp_ref: Path) -> dict:
    return json.loads((dgp_ref / "state_dict_manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny(dgp_ref: Path) -> dict:
    return torch.load(dgp_ref / "biggan_tiny_parity.pt", weights_only=True)


@pytest.fixture(scope="module")
def pipeline(dgp_ref: Path) -> dict:
    return torch.load(dgp_ref / "dgp_pipeline_parity.pt", weights_only=True)


@pytest.fixture
def G(tiny: dict) -> Generator:
    """A fresh tiny generator (IN initialisation writes into it)."""
    g = build_generator("biggan_tiny")
    g.load_state_dict(tiny["G_state_dict"])
    return g.eval()


@pytest.fixture(scope="module")
def D(tiny: dict) -> Discriminator:
    d = build_discriminator("biggan_tiny")
    d.load_state_dict(tiny["D_state_dict"])
    return d.eval()


def _layout(module: torch.nn.Module) -> list[tuple[str, list[int], str, str]]:
    params = {n for n, _ in module.named_parameters()}
    return [
        (
            k,
            list(v.shape),
            str(v.dtype).removeprefix("torch."),
            "parameter" if k in params else "buffer",
        )
        for k, v in module.state_dict().items()
    ]


def _manifest_layout(entries: list[dict]) -> list[tuple[str, list[int], str, str]]:
    return [(e["key"], e["shape"], e["dtype"], e["kind"]) for e in entries]


# ------------------------------------------------------------------------------ layout
@pytest.mark.shared
@pytest.mark.parametrize("config", list(MANIFEST_CONFIGS))
def test_generator_state_dict_matches_manifest(manifest: dict, config: str) -> None:
    resolution, ch = MANIFEST_CONFIGS[config]
    ref = manifest["configs"][config]["generator"]
    with torch.device("meta"):  # shapes and dtypes only: no 80M-parameter allocation
        g = Generator(resolution, ch)
    assert _layout(g) == _manifest_layout(ref["state_dict"])
    assert g.dim_z == ref["dim_z_effective"]
    assert (g.num_slots, g.z_chunk_size) == (ref["num_slots"], ref["z_chunk_size"])
    assert g.num_blocks == ref["num_blocks"]
    assert sum(p.numel() for p in g.parameters()) == ref["num_parameters"]
    assert (
        sum(p.numel() for p in g.parameters() if p.requires_grad) == ref["num_trainable_parameters"]
    )
    for update_embed in (False, True):
        assert (
            g.param_group_names(update_embed)
            == ref["get_params_groups"][f"update_embed={update_embed}"]
        )
    out = g(torch.zeros(1, g.dim_z, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    assert list(out.shape) == ref["output_shape"]


@pytest.mark.shared
@pytest.mark.parametrize("config", [c for c in MANIFEST_CONFIGS if c != "biggan512_ch96"])
def test_discriminator_state_dict_matches_manifest(manifest: dict, config: str) -> None:
    resolution, ch = MANIFEST_CONFIGS[config]
    ref = manifest["configs"][config]["discriminator"]
    with torch.device("meta"):
        d = Discriminator(resolution, ch)
    assert _layout(d) == _manifest_layout(ref["state_dict"])
    assert sum(p.numel() for p in d.parameters()) == ref["num_parameters"]
    logit, feats = d(torch.zeros(1, 3, resolution, resolution, device="meta"))
    assert list(logit.shape) == ref["logit_shape"]
    assert [list(f.shape) for f in feats] == [f["shape"] for f in ref["feature_list"]]


def test_discriminator_512_is_rejected() -> None:
    with pytest.raises(ValueError, match="512"):
        Discriminator(512, 8)


def test_latent_size_per_resolution() -> None:
    with torch.device("meta"):
        dims = {r: Generator(r, 4).dim_z for r in (128, 256, 512)}
    assert dims == {128: 120, 256: 119, 512: 120}  # SPEC §3.1: 7 slots of 17 at 256


@pytest.mark.shared
def test_wrong_latent_size_is_reported(G: Generator) -> None:
    with pytest.raises(ValueError, match=r"z must be \[N, 120\]"):
        G(torch.zeros(1, 119), torch.zeros(1, dtype=torch.long))


# ------------------------------------------------------------------------------ G parity
@pytest.mark.shared
def test_tiny_state_dict_round_trip(tiny: dict, G: Generator, D: Discriminator) -> None:
    assert list(G.state_dict()) == list(tiny["G_state_dict"])
    assert list(D.state_dict()) == list(tiny["D_state_dict"])


@pytest.mark.shared
def test_generator_output_use_in_false(tiny: dict, G: Generator) -> None:
    with torch.no_grad():
        e = G.shared(tiny["y"])
        torch.testing.assert_close(e, tiny["y_embedding"], rtol=0, atol=0)
        torch.testing.assert_close(G(tiny["z"], e), tiny["G_out_use_in_false"], rtol=0, atol=ATOL)
        # class indices are embedded inside the forward as well
        torch.testing.assert_close(
            G(tiny["z"], tiny["y"]), tiny["G_out_use_in_false"], rtol=0, atol=ATOL
        )


@pytest.mark.shared
def test_generator_use_in_first_call_initialises(tiny: dict, G: Generator) -> None:
    ref = tiny["G_out_use_in_true"]
    with torch.no_grad():
        G.reset_in_init()
        out = G(tiny["z"][:1], G.shared(tiny["y"][:1]), use_in=True)
    torch.testing.assert_close(out, ref["first_call_z0_initializes_in"], rtol=0, atol=ATOL)
    state = G.state_dict()
    for name, value in ref["in_params_after_first_call"].items():
        # IN means/stds (|v| 0.01-0.6) from float32 activations against the fixture: measured
        # max 6.0e-7 abs (threads 1/2/4), 0.06 of this tolerance; a wrong statistic is off by >1e-3
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-5)
    # the IN output only approximates the BN output (SPEC §3.4: ~0.03-0.04 on this fixture)
    gap = (out - tiny["G_out_use_in_false"][:1]).abs().max()
    assert 1e-3 < gap < 0.1


@pytest.mark.shared
def test_generator_use_in_reuse_and_reset(tiny: dict, pipeline: dict, G: Generator) -> None:
    ref = pipeline["G_use_in_extra"]
    z, e = tiny["z"], G.shared(tiny["y"]).detach()
    with torch.no_grad():
        G.reset_in_init()
        G(z[:1], e[:1], use_in=True)
        second = G(z[1:2], e[1:2], use_in=True)  # reuses the IN params of the z[0] call
        G.reset_in_init()
        fresh = G(z[1:2], e[1:2], use_in=True)
        # a use_in=False forward also clears the flag, so the next IN call re-initialises
        G(z[:1], e[:1], use_in=False)
        after_bn = G(z[1:2], e[1:2], use_in=True)
    torch.testing.assert_close(
        second, ref["second_call_z1_reuses_in_params_from_z0_call"], rtol=0, atol=ATOL
    )
    torch.testing.assert_close(fresh, ref["fresh_call_z1_after_reset_in_init"], rtol=0, atol=ATOL)
    # the same batch-1 computation twice (re-initialised IN from z[1] both times): bit for bit
    torch.testing.assert_close(after_bn, fresh, rtol=0, atol=0)


@pytest.mark.shared
def test_unstacked_batch_in_init_needs_batch_one(tiny: dict, G: Generator) -> None:
    z, e = tiny["z"], G.shared(tiny["y"]).detach()
    with torch.no_grad():
        G.reset_in_init()
        with pytest.raises(RuntimeError, match="batch of 1"):
            G(z, e, use_in=True)
        G.reset_in_init()
        G(z[:1], e[:1], use_in=True)
        # once initialised, a batch shares the IN params and stays per-sample independent
        both = G(z, e, use_in=True)
        second = G(z[1:2], e[1:2], use_in=True)
    # batch 2 against batch 1: other kernels; measured max 1.3e-6 (threads 1/2/4), see ATOL
    torch.testing.assert_close(both[1:2], second, rtol=0, atol=ATOL)


@pytest.mark.shared
def test_param_groups_match_fixture(tiny: dict, G: Generator) -> None:
    for update_embed in (False, True):
        assert (
            G.param_group_names(update_embed)
            == tiny["G_param_groups"][f"update_embed={update_embed}"]
        )
    # the reference's IN affine params are frozen
    assert all(not G.get_parameter(n).requires_grad for n in G.in_param_names())
    assert len(G.in_param_names()) == 4 * G.num_blocks


# ------------------------------------------------------------------------------ D parity
@pytest.mark.shared
@pytest.mark.parametrize(("which", "y"), [("real", 863), ("fake", 207)])
def test_discriminator_logits_and_features(
    tiny: dict, D: Discriminator, which: str, y: int
) -> None:
    x, ref = tiny["D_images"][which], tiny[f"D_out_{which}"]
    with torch.no_grad():
        logit, feats = D(x)
        logit_y, _ = D(x, torch.tensor([y]))
    torch.testing.assert_close(logit, ref["logit_no_y"], rtol=0, atol=ATOL)
    torch.testing.assert_close(logit_y, ref[f"logit_with_y_{y}"], rtol=0, atol=ATOL)
    assert len(feats) == len(ref["features"]) == 8
    for mine, theirs in zip(feats, ref["features"]):
        # measured max 2.9e-6 abs (threads 1/2/4) on features up to ~1e2: 0.06 of the tolerance
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=ATOL)
    # the in-place ReLU quirk: the second-to-last feature is rectified (SPEC §4)
    assert feats[-2].min() == 0.0
    # the same torch.sum D's head runs on the same tensor: bit for bit
    torch.testing.assert_close(feats[-1], feats[-2].sum((2, 3)), rtol=0, atol=0)


@pytest.mark.shared
def test_d_feature_loss_matches_reference(tiny: dict, D: Discriminator) -> None:
    with torch.no_grad():
        _, real = D(tiny["D_images"]["real"])
        _, fake = D(tiny["D_images"]["fake"])
    terms = feature_l1_terms(fake, real)
    assert terms.shape == (1, 8)
    # float32 feature means against the fixture: measured max 1.8e-7 relative (threads 1/2/4);
    # 55x margin
    torch.testing.assert_close(
        terms[0], torch.tensor(tiny["D_ftr_loss_per_feature_from_end"]), rtol=1e-5, atol=0
    )
    for k, value in tiny["D_ftr_loss"].items():
        loss = d_feature_loss(fake, real, int(k))
        assert loss.shape == (1,)
        # measured max 9.6e-8 relative (threads 1/2/4); 20x margin. One feature term more or
        # less changes the sum by >1e-2 relative.
        torch.testing.assert_close(
            loss.double(), torch.tensor([value], dtype=torch.float64), rtol=2e-6, atol=0
        )
    with pytest.raises(ValueError, match="ftr_num"):
        d_feature_loss(fake, real, 9)


@pytest.mark.shared
def test_d_feature_loss_gradient(tiny: dict, pipeline: dict, D: Discriminator) -> None:
    with torch.no_grad():
        _, real = D(tiny["D_images"]["real"])
    fake = tiny["D_images"]["fake"].clone().requires_grad_(True)
    d_feature_loss(D(fake)[1], real, 8).sum().backward()
    ref = pipeline["D_ftr_loss8_grad_wrt_fake"]
    # SPEC §13's 1e-5-relative trace tolerance, 10x: measured max 1.5e-10 abs, 3e-7 of the
    # gradient's scale (threads 1/2/4), 0.003 of the tolerance
    torch.testing.assert_close(fake.grad, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.shared
def test_feature_terms_are_per_image(tiny: dict, D: Discriminator) -> None:
    images = torch.cat([tiny["D_images"]["fake"], tiny["D_images"]["real"].flip(-1)])
    with torch.no_grad():
        _, real = D(tiny["D_images"]["real"])  # batch 1 broadcasts against the batch
        _, fake = D(images)
        alone = [feature_l1_terms(D(images[b : b + 1])[1], real) for b in range(2)]
    # D at batch 2 against batch 1 (other kernels): measured max 1.2e-7 abs (threads 1/2/4),
    # 0.03 of the tolerance
    torch.testing.assert_close(feature_l1_terms(fake, real), torch.cat(alone), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        d_feature_loss(fake, real, 5), torch.cat(alone)[:, :5].sum(1), rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------ spectral norm
def test_spectral_norm_power_iteration_and_modes() -> None:
    torch.manual_seed(0)
    layer = SNLinear(5, 4, eps=1e-6).double()
    w, u0 = layer.weight.detach().clone(), layer.u0.clone()
    # one power iteration from the stored u0 (SPEC §3.3)
    v = torch.nn.functional.normalize(u0 @ w, eps=1e-6)
    u = torch.nn.functional.normalize(v @ w.t(), eps=1e-6)
    sigma = (v @ w.t() @ u.t()).squeeze()
    layer.eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (w / sigma).t() + layer.bias.detach())
    assert torch.equal(layer.u0, u0) and layer.sv0.item() == 1.0  # eval never writes buffers
    # sigma is differentiable: the gradient includes the d(1/sigma) term
    layer(x).sum().backward()
    w_req = w.clone().requires_grad_(True)
    (x @ (w_req / (v @ w_req.t() @ u.t()).squeeze()).t()).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_req.grad)
    assert not torch.allclose(layer.weight.grad, (x.sum(0, keepdim=True) / sigma).expand(4, 5))
    layer.train()
    layer(x)
    torch.testing.assert_close(layer.u0, u)
    torch.testing.assert_close(layer.sv0, sigma.view(1))


# ------------------------------------------------------------------------------ stacked images
def _trained_names(g: Generator) -> list[str]:
    """What a DGP step stacks: groups 0..B with the embedding, the IN params and flags."""
    groups = g.param_group_names(update_embed=True)[: g.num_blocks + 1]
    return [n for names in groups for n in names] + g.in_state_names()


def _perturbed_stack(g: Generator, names: list[str], n_images: int) -> dict[str, Tensor]:
    """Stacked copies where image b > 0 has its own (perturbed) values."""
    gen = torch.Generator().manual_seed(1)
    stacked = stack_per_image(g, names, n_images)
    with torch.no_grad():
        for t in stacked.values():
            if not t.is_floating_point():
                continue
            for b in range(1, n_images):
                scale = t[b].std() if t[b].numel() > 1 else t[b].abs() + 0.1
                t[b] += 0.05 * scale * torch.randn(t[b].shape, generator=gen)
    return stacked


def _image_copy(g: Generator, stacked: dict[str, Tensor], b: int) -> Generator:
    """A plain generator holding image b's tensors (the batch-1 reference)."""
    single = copy.deepcopy(g)
    own = dict(single.named_parameters()) | dict(single.named_buffers())
    with torch.no_grad():
        for name, t in stacked.items():
            own[name].copy_(t[b])
    return single


def _assert_grads_close(stacked: dict[str, Tensor], single: Generator, b: int) -> None:
    own = dict(single.named_parameters())
    for name, t in stacked.items():
        if name not in own:
            continue
        ref = own[name].grad
        if t.grad is None:  # in1/in2: never trained, no gradient at all (SPEC §3.4)
            assert ref is None, name
            continue
        ref = torch.zeros_like(t.grad[b]) if ref is None else ref
        # atol from the tensor's scale: conv1.bias feeds an instance norm under use_in, so its
        # exact gradient is 0 and both sides hold rounding noise only (float64: measured max
        # 5.7e-13 abs, 0.03 of this tolerance at threads 1/2/4). A gradient bug is O(1e-2) of
        # the scale.
        atol = 1e-8 * max(ref.abs().max().item(), 1e-3)
        torch.testing.assert_close(t.grad[b], ref, rtol=1e-7, atol=atol, msg=name)


@pytest.mark.shared
@pytest.mark.parametrize(
    "use_in_steps",
    [[[False, False]], [[True, True], [True, True]], [[True, False], [False, True]]],
    ids=["bn", "in-init-then-reuse", "mixed"],
)
def test_stacked_images_match_batch_one(tiny: dict, G: Generator, use_in_steps: list) -> None:
    """B=2 images with their own tensors give their batch-1 outputs, IN state and gradients.

    Run in float64: in float32 the attention's 2x2 max-pools meet near-ties whose argmax
    depends on the kernel's rounding (grouped vs plain convolution, thread count), which moves
    whole gradient entries; in float64 both paths agree to ~1e-12.
    """
    G = G.double()
    names = _trained_names(G)
    stacked = _perturbed_stack(G, names, 2)
    singles = [_image_copy(G, stacked, b) for b in range(2)]
    z, y = tiny["z"].double(), tiny["y"]
    weights = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2)).double()
    for step, use_in in enumerate(use_in_steps):
        z_step = z if step == 0 else z.flip(0)  # a later step sees another latent
        out = functional_call(G, stacked, (z_step, y), {"use_in": torch.tensor(use_in)})
        for b, single in enumerate(singles):
            ref = single(z_step[b : b + 1], single.shared(y[b : b + 1]), use_in=use_in[b])
            torch.testing.assert_close(out[b : b + 1], ref, rtol=0, atol=1e-10)
            if step == len(use_in_steps) - 1:
                (ref * weights[b]).sum().backward()
        assert stacked["blocks.0.0.in_initialized"].tolist() == use_in
    # IN params were initialised per image, from each image's own input
    for b, single in enumerate(singles):
        for name in G.in_param_names():
            torch.testing.assert_close(
                stacked[name][b], single.get_parameter(name), rtol=1e-10, atol=1e-12
            )
    (out * weights).sum().backward()
    for b, single in enumerate(singles):
        _assert_grads_close(stacked, single, b)


@pytest.mark.shared
def test_stacked_float32_forward_and_gradient(tiny: dict, G: Generator) -> None:
    """The float32 kernels the engine runs: outputs to 1e-5, gradients to float32 precision."""
    names = _trained_names(G)
    stacked = _perturbed_stack(G, names, 2)
    z, y = tiny["z"], tiny["y"]
    out = functional_call(G, stacked, (z, y), {"use_in": torch.tensor([False, True])})
    out.square().sum().backward()
    for b, use_in in enumerate([False, True]):
        single = _image_copy(G, stacked, b)
        ref = single(z[b : b + 1], single.shared(y[b : b + 1]), use_in=use_in)
        # stacked (grouped) against batch-1 kernels: measured max 1.8e-6 (threads 1/2/4)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=0, atol=ATOL)
        ref.square().sum().backward()
        # linear.weight sits upstream of everything but the attention's max-pools, which may
        # flip on near-ties in float32 (see the float64 test above): measured max 1.1e-4 of its
        # scale with a flip (threads 1), 1.5e-6 without (threads 2/4); 3e-3 of the scale is a
        # 27x margin and still far below the O(1) error of a wrong per-image gradient.
        grad, ref_grad = stacked["linear.weight"].grad[b], single.linear.weight.grad
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=3e-3 * ref_grad.abs().max().item())


@pytest.mark.shared
def test_stacked_embedding_and_partial_stacking(tiny: dict, G: Generator) -> None:
    # Only some tensors stacked: the rest (output layer, attention, ...) is shared.
    names = ["shared.weight", "linear.weight", "blocks.1.0.conv1.weight", "blocks.3.1.gamma"]
    stacked = _perturbed_stack(G, names, 2)
    z, y = tiny["z"], tiny["y"]
    with torch.no_grad():
        out = functional_call(G, stacked, (z, y))
        e = G.embed(y, stacked["shared.weight"])
        out_e = functional_call(G, stacked, (z, e))
        for b in range(2):
            single = _image_copy(G, stacked, b)
            ref = single(z[b : b + 1], single.shared(y[b : b + 1]))
            # stacked against batch-1 kernels: measured max 1.5e-6 (threads 1/2/4), see ATOL
            torch.testing.assert_close(out[b : b + 1], ref, rtol=0, atol=ATOL)
    # class indices embedded inside the forward or outside it: the same lookup (a data op)
    # and the same batch-2 kernels, so bit for bit
    torch.testing.assert_close(out, out_e, rtol=0, atol=0)
    assert not G.is_stacked()  # functional_call restored the module's own tensors


@pytest.mark.shared
def test_stacked_train_mode_matches_batch_one(tiny: dict, G: Generator) -> None:
    """random_G: train-mode BN per image, per-image buffer updates when buffers are stacked."""
    G.train()
    names = [n for n, _ in G.named_parameters()] + [n for n, _ in G.named_buffers()]
    stacked = _perturbed_stack(G, names, 2)
    singles = [_image_copy(G, stacked, b) for b in range(2)]
    z, y = tiny["z"], tiny["y"]
    with torch.no_grad():
        for use_in in ([False, False], [True, False], [True, True]):
            out = functional_call(G, stacked, (z, y), {"use_in": torch.tensor(use_in)})
            for b, single in enumerate(singles):
                ref = single(z[b : b + 1], single.shared(y[b : b + 1]), use_in=use_in[b])
                # train-mode BN at 4x4 with batch 1 amplifies rounding differences: measured
                # max 9.4e-6 (threads 1/2/4); 21x margin. Batch statistics shared between the
                # images would move outputs by >1e-2.
                torch.testing.assert_close(out[b : b + 1], ref, rtol=0, atol=2e-4)
    for b, single in enumerate(singles):
        own = dict(single.named_buffers())
        for name in ("linear.u0", "blocks.2.0.bn1.stored_var", "blocks.4.0.bn2.gain.u0"):
            assert not torch.equal(stacked[name][b], tiny["G_state_dict"][name])
            # buffers updated from stacked vs batch-1 activations: measured max 1.2e-7 abs
            # (threads 1/2/4), 0.01 of the tolerance
            torch.testing.assert_close(stacked[name][b], own[name], rtol=1e-4, atol=1e-5)


@pytest.mark.shared
def test_unstacked_buffers_stay_put_in_per_image_train_mode(tiny: dict, G: Generator) -> None:
    G.train()
    stacked = _perturbed_stack(G, ["linear.weight", "linear.bias"], 2)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    with torch.no_grad():
        functional_call(G, stacked, (tiny["z"], tiny["y"]))
    after = G.state_dict()
    # linear's u0 belongs to a stacked weight; BN stats would need one copy per image
    assert torch.equal(after["linear.u0"], before["linear.u0"])
    assert torch.equal(after["blocks.0.0.bn1.stored_mean"], before["blocks.0.0.bn1.stored_mean"])
    # an unstacked layer shares W and hence u: it still takes its power-iteration step
    assert not torch.equal(after["blocks.0.0.conv1.u0"], before["blocks.0.0.conv1.u0"])


@pytest.mark.shared
def test_mixed_use_in_needs_stacked_flags(tiny: dict, G: Generator) -> None:
    stacked = _perturbed_stack(G, G.in_param_names(), 2)  # flags deliberately left unstacked
    with pytest.raises(ValueError, match="in_initialized"):
        functional_call(G, stacked, (tiny["z"], tiny["y"]), {"use_in": torch.tensor([True, False])})
