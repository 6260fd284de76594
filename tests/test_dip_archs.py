"""DIP's other networks (UNet, ResNet, texture_nets, the library hourglasses), their batched
runs, input optimisation, L-BFGS, and the prior-samples task (docs/dip.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from genprior.config import compose
from genprior.engine import choose_batch_size, step
from genprior.errors import InvalidSettingError
from genprior.image_io import labelled_sheet_size
from genprior.items import ImageItem
from genprior.methods.dip import DIP, DIPConfig
from genprior.priors.dip_archs import (
    ResNet,
    UNet,
    activation_maximization_net,
    feature_inversion_net,
    get_net,
    hourglass,
    net_output_size,
    texture_nets,
)
from genprior.priors.dip_nets import StackedNets, skip, to_dtype


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# Architectures (SPEC §3.7, §4)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("build", "expected"), [
    (lambda: UNet(1, 3, feature_scale=8, more_layers=1, concat_x=False, upsample_mode="deconv", pad="zero",
                  norm="instance"), 1_616_315),
    (lambda: ResNet(1, 3, 8, 32, act_fun="LeakyReLU"), 158_979),
    (lambda: hourglass(6), 2_996_467),
    (lambda: hourglass(4), 1_060_339),
    (lambda: hourglass(2), 59_635),
    (feature_inversion_net, 2_606_763),
    (activation_maximization_net, 2_948_567),
], ids=["library_unet", "library_resnet", "skip_depth6", "skip_depth4", "skip_depth2", "feature_inversion",
        "activation_maximization"])
def test_parameter_counts_match_spec(build, expected: int) -> None:
    assert _count(build()) == expected  # SPEC §3.7


def test_texture_nets_shape_and_parameter_count() -> None:
    # Structure of the reference file (SPEC §4): 6 branches of 3 convs (32→8 3×3, 8→8 3×3,
    # 8→8 1×1, each + BN) = 6·3016, a BN(8) on branches 2…6 (5·16), merges j = 2…6 of 3 convs
    # of 8j channels + BNs + BN(8(j−1)) = Σ 1216j² + 88j − 16, a final 1×1 conv 48 → 3 (147).
    net = get_net(32, "texture_nets")
    assert _count(net) == 6 * 3016 + 5 * 16 + sum(1216 * j * j + 88 * j - 16 for j in range(2, 7)) + 147
    assert _count(net) == 129_443
    with torch.no_grad():
        out = net(torch.rand(1, 32, 64, 64))
    assert out.shape == (1, 3, 64, 64)
    assert float(out.min()) < 0  # no sigmoid in the reference's texture_nets
    assert net_output_size(net, 32, 96, 96) == (96, 96)
    assert net_output_size(net, 32, 80, 80) != (80, 80)  # not a multiple of 32: cropped


@pytest.mark.parametrize("net_type", ["skip", "skip_depth2", "skip_depth4", "UNet", "ResNet", "texture_nets"])
def test_get_net_output_shapes(net_type: str) -> None:
    net = get_net(8, net_type, pad="reflection", upsample_mode="nearest")
    with torch.no_grad():
        out = net(torch.rand(1, 8, 64, 64))
    assert out.shape == (1, 3, 64, 64)


def test_get_net_fixes_the_resnet_argument_slots() -> None:
    net = get_net(8, "ResNet", act_fun="LeakyReLU")  # the reference cannot build this one
    blocks = [m for m in net.model if isinstance(m, torch.nn.Sequential) and len(m) == 5]
    assert len(blocks) == 10 and blocks[0][0].weight.shape == (16, 16, 3, 3)
    assert isinstance(blocks[0][1], torch.nn.BatchNorm2d)
    assert isinstance(blocks[0][2], torch.nn.LeakyReLU)
    assert isinstance(net.model[-1], torch.nn.Sigmoid)


def test_get_net_identity_and_errors() -> None:
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(get_net(3, "identity")(x), x)
    with pytest.raises(ValueError, match="input_depth 3"):
        get_net(2, "identity")
    with pytest.raises(ValueError, match="unknown net_type"):
        get_net(3, "dcgan")


def test_state_dict_keys_follow_the_reference() -> None:
    unet = UNet(1, 3, feature_scale=8, more_layers=1)
    keys = list(unet.state_dict())
    assert keys[0] == "start.conv1.0.0.weight"
    assert "more_downs.0.conv.conv1.0.0.weight" in keys and "more_ups.0.up.weight" in keys
    assert "final.0.0.weight" in keys
    resnet = ResNet(1, 3, 2, 8)  # reflection pad: the first conv is child 1 of its block
    assert list(resnet.state_dict())[:2] == ["model.0.1.weight", "model.0.1.bias"]
    assert "model.2.0.weight" in resnet.state_dict()
    texture = texture_nets(2, ratios=(2, 1), conv_num=4)  # zero pad: bare Conv2d children
    assert "1.1.2.weight" in texture.state_dict()


def test_unet_more_layers_beyond_one_builds_and_runs() -> None:
    # The reference crashes for more_layers > 1 (an undefined attribute); SPEC §4.
    net = UNet(2, 3, feature_scale=16, more_layers=2, norm="batch")
    assert net(torch.rand(1, 2, 128, 128)).shape == (1, 3, 128, 128)


_SMALL = {
    "unet_instance": lambda: UNet(2, 3, feature_scale=16, more_layers=1, norm="instance"),
    "unet_batch_concat_x": lambda: UNet(2, 3, feature_scale=16, norm="batch", upsample_mode="bilinear",
                                        concat_x=True),
    "resnet": lambda: ResNet(2, 3, 2, 8),
    "resnet_instance": lambda: ResNet(2, 3, 1, 8, norm="instance"),
    "texture_nets": lambda: texture_nets(2, ratios=(8, 4, 2, 1), conv_num=4, pad="reflection"),
    "hourglass": lambda: hourglass(3, 2),
}


@pytest.mark.parametrize("mode", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(_SMALL))
def test_stacked_batch_gives_each_image_its_single_output(name: str, mode: str) -> None:
    torch.manual_seed(0)
    nets = [to_dtype(_SMALL[name](), torch.float64) for _ in range(2)]
    z = torch.rand(2, 2, 64, 64, dtype=torch.float64)
    batched = StackedNets(nets, mode)(z)
    alone = torch.cat([StackedNets([net], mode)(z[b : b + 1]) for b, net in enumerate(nets)])
    # float64: the batched (grouped) and single convolutions sum in different orders; the
    # measured difference is ≤ 2e-15, far below what a wrong normalisation (another image's
    # statistics) would give (≥ 1e-3).
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# DIP with the other networks, input optimisation and L-BFGS (SPEC §7.5)
# ---------------------------------------------------------------------------------------------

_BASE = {"task": "jpeg_artifacts", "input_depth": 4, "exp_weight": None, "backtracking": "off",
         "reg_noise_std": 0.0, "num_channels_down": [8, 8, 8], "num_channels_up": [8, 8, 8],
         "num_channels_skip": [2, 2, 2]}
_NETS = {
    "skip": {},
    "skip_depth2": {},
    "UNet": {"unet_feature_scale": 16, "unet_more_layers": 0},
    "ResNet": {"resnet_num_blocks": 2, "resnet_num_channels": 8},
    "texture_nets": {"texture_ratios": [8, 4, 2, 1], "texture_conv_num": 4},
}


def _observation() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _fit(settings: DIPConfig, observation: torch.Tensor) -> tuple[DIP, list[float]]:
    method = DIP(settings, seed=0)
    method.start_observed(["image"], observation)
    optimizer = method.make_optimizer()
    losses = []
    while not method.progress.all_done():
        losses.append(float(step(method, optimizer)[0].total[0]))
    return method, losses


@pytest.mark.parametrize("net_type", list(_NETS))
def test_short_fit_lowers_the_loss(net_type: str) -> None:
    settings = DIPConfig(**_BASE, net_type=net_type, num_iter=30, lr=0.01, **_NETS[net_type])
    _, losses = _fit(settings, _observation())
    assert len(losses) == 30
    assert losses[-1] < 0.9 * losses[0]  # measured: 0.30 to 0.85 of the first loss


def test_default_net_type_builds_the_skip_network_of_before() -> None:
    settings = DIPConfig()
    torch.manual_seed(3)
    built = settings.build_net(32, 3).state_dict()
    torch.manual_seed(3)
    expected = skip(**settings.skip_kwargs(32, 3)).state_dict()
    assert built.keys() == expected.keys()
    assert all(torch.equal(built[k], expected[k]) for k in built)


def test_unknown_settings_fail_loudly() -> None:
    for bad in ({"net_type": "dcgan"}, {"opt_over": "input"}, {"optimizer": "sgd"}):
        with pytest.raises(InvalidSettingError):
            DIP(DIPConfig(**bad))


def test_non_skip_network_checks_the_image_size() -> None:
    settings = DIPConfig(**_BASE, net_type="texture_nets", texture_ratios=[8, 4, 2, 1], texture_conv_num=4)
    method = DIP(settings)
    with pytest.raises(ValueError, match="texture_nets network maps a 36×36"):
        method.start_observed(["image"], torch.rand(1, 3, 36, 36))


def test_input_optimisation_changes_z_and_lowers_the_loss() -> None:
    settings = DIPConfig(**_BASE, num_iter=20, opt_over="net,input")
    method = DIP(settings, seed=0)
    method.start_observed(["image"], _observation())
    z0 = method.net_input_saved.detach().clone()
    assert isinstance(method.net_input_saved, torch.nn.Parameter)
    optimizer = method.make_optimizer()
    assert [g["name"] for g in optimizer.param_groups] == ["net", "input"]
    losses = [float(step(method, optimizer)[0].total[0]) for _ in range(20)]
    assert float((method.net_input_saved.detach() - z0).abs().max()) > 1e-3  # Adam moves z by ~lr/step
    assert losses[-1] < 0.9 * losses[0]
    # The default keeps z fixed, a buffer.
    fixed = DIP(DIPConfig(**_BASE, num_iter=2), seed=0)
    fixed.start_observed(["image"], _observation())
    assert "net_input_saved" in dict(fixed.named_buffers())


def test_lbfgs_lowers_the_loss_one_record_per_evaluation() -> None:
    settings = DIPConfig(**_BASE, num_iter=20, optimizer="lbfgs", lbfgs_adam_steps=5, lr=1.0)
    method, losses = _fit(settings, _observation())
    assert len(losses) == 5 + 20  # Adam warm-up, then one L-BFGS evaluation per step
    assert method.lbfgs is not None
    assert losses[-1] < 0.9 * losses[5]  # measured: 0.85 of the first L-BFGS evaluation's loss


def test_stepwise_lbfgs_matches_one_reference_call() -> None:
    # The reference: one LBFGS(max_iter=num_iter).step(closure); here num_iter steps of
    # max_iter=1. Same evaluated points, same updates (float64).
    settings = DIPConfig(**_BASE, num_iter=12, optimizer="lbfgs", lbfgs_adam_steps=0, lr=0.5)
    obs = _observation().double()
    method = DIP(settings, dtype=torch.float64, seed=0)
    method.start_observed(["image"], obs)
    net = to_dtype(settings.build_net(4, 3), torch.float64)
    net.load_state_dict(method.nets.state_dict_for(0))
    z = method.net_input_saved.detach().clone()
    target = method.observation.detach().clone()
    optimizer = method.make_optimizer()
    while not method.progress.all_done():
        step(method, optimizer)

    reference = torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=12, tolerance_grad=-1, tolerance_change=-1)

    def closure() -> torch.Tensor:
        reference.zero_grad()
        loss = torch.nn.functional.mse_loss(net(z), target)
        loss.backward()
        return loss

    reference.step(closure)
    fitted = method.nets.state_dict_for(0)
    for name, p in net.named_parameters():
        # float64; both evaluate the same ops in the same order up to the stacked forward's
        # functional_call, measured identical; 1e-10 leaves room for summation order only.
        torch.testing.assert_close(fitted[name], p.detach(), rtol=0, atol=1e-10)


def test_lbfgs_needs_batch_size_one() -> None:
    with pytest.raises(InvalidSettingError, match=r"trainer\.batch_size=1"):
        DIP.from_config(compose(["prior=dip_skip", "task=dip_denoising_quick", "dip.optimizer=lbfgs",
                                 "trainer.batch_size=2"]))
    cfg = compose(["prior=dip_skip", "task=dip_denoising_quick", "dip.optimizer=lbfgs", "trainer.batch_size=auto"])
    method = DIP.from_config(cfg)
    items = [ImageItem(id=f"i{k}", path=f"i{k}.png") for k in range(3)]
    assert choose_batch_size(cfg, method, items, None) == 1
    assert method.max_batch_size() == 1 and DIP(DIPConfig()).max_batch_size() is None
    with pytest.raises(InvalidSettingError, match="one image at a time"):
        DIP(DIPConfig(**_BASE, optimizer="lbfgs")).start_observed(["a", "b"], torch.rand(2, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# Sampling from the prior (task=dip_prior_samples)
# ---------------------------------------------------------------------------------------------


def test_prior_samples_task_writes_the_sheet(tmp_path: Path) -> None:
    from genprior.cli.train import run_train  # the entry point, as a user runs it

    out = tmp_path / "samples"
    code = run_train(["task=dip_prior_samples", "data.image_size=64", "dip.sample_seeds=[0,1,2]",
                      "dip.sample_nets=[skip_depth2,ResNet,texture_nets]", "dip.resnet_num_blocks=2",
                      "dip.input_depth=4", f"output.dir={out}"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["skip_depth2", "ResNet", "texture_nets"]
    assert all(r["status"] == "ok" and r["parameters"] > 0 for r in rows)
    sheet = Image.open(out / "prior_samples.png")
    # 3 columns and 3 rows of 64-px frames, 2 px apart, a row-label margin on the left, and 4
    # text bands of equal height (title, then one above each row's frames).
    band, rest = divmod(sheet.height - 2 - 3 * 66, 4)
    assert rest == 0 and 5 < band < 40
    assert 3 * 66 + 2 < sheet.width < 3 * 66 + 2 + 200
    assert sheet.size == labelled_sheet_size(3, 3, 64, labelled_rows=3, title="f(z)",
                                             row_labels=[r["label"] for r in rows])
    assert sheet.mode == "RGB"


def test_prior_samples_are_seeded_by_the_weights_seed() -> None:
    from genprior.tasks.prior_samples import draw_input, render

    settings = DIPConfig(input_depth=4, net_type="skip_depth2")
    z = draw_input(settings, 32, seed=0)
    assert z.shape == (1, 4, 32, 32) and torch.equal(z, draw_input(settings, 32, seed=0))
    assert 0 <= float(z.min()) and float(z.max()) < 0.1  # U(0, 0.1), SPEC §6
    a, count = render(settings, z, seed=5)
    b, _ = render(settings, z, seed=5)
    c, _ = render(settings, z, seed=6)
    assert a.shape == (3, 32, 32) and count == _count(hourglass(2, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The global RNG is left as it was.
    state = torch.get_rng_state()
    render(settings, z, seed=7)
    assert torch.equal(state, torch.get_rng_state())


def test_prior_samples_refuse_evaluate_items(tmp_path: Path) -> None:
    from genprior.tasks import prior_samples

    cfg = compose(["task=dip_prior_samples"])
    with pytest.raises(InvalidSettingError, match=r"not evaluate\.py"):
        prior_samples.run(cfg, tmp_path, items=[])
