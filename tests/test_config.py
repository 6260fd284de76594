"""Config composition: presets, both override forms, sweep-agent arguments, clear errors."""

import pytest

from genprior.config import ConfigError, compose, help_text


def test_group_presets_and_both_override_forms() -> None:
    cfg = compose(["prior=biggan128", "task=colorization", "dgp.w_nll=0.5", "--dgp.select_num=7",
                   "--trainer.batch_size", "4"])
    assert cfg.prior.name == "biggan128" and cfg.prior.G_ch == 96
    assert cfg.task.name == "colorization"
    assert list(cfg.dgp.ft_num) == [2, 3, 4, 5, 6]  # from the preset (SPEC §10.2)
    assert cfg.dgp.w_nll == 0.5 and cfg.dgp.select_num == 7 and cfg.trainer.batch_size == 4
    assert cfg.output.dir == "outputs/biggan128-colorization"


def test_sweep_agent_command_line() -> None:
    # What `wandb agent` passes: --key=value, lists in Python repr, plus its own --_wandb arg.
    cfg = compose(["prior=biggan_tiny", "task=colorization", "--dgp.G_lrs=[5e-05, 5e-05, 2e-05, 1e-05, 1e-05]",
                   "--dgp.w_nll=0.001", "--_wandb=sweep-id"])
    assert list(cfg.dgp.G_lrs) == [5e-05, 5e-05, 2e-05, 1e-05, 1e-05]
    assert cfg.dgp.w_nll == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["dgp.w_nl=0.1"], "'dgp.w_nll'"),
        (["dgp.w_nll=abc"], "dgp.w_nll"),
        (["prior=biggan12"], "'biggan128'"),
        (["prior=biggan_tiny", "dgp.G_lrs=[1e-3]"], "dgp.G_lrs has 1 entries"),
        (["trainer.batch_size=two"], "trainer.batch_size"),
        (["nonsense"], "key=value"),
    ],
)
def test_errors_name_the_key_and_suggest(args: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose(args)
    assert needle in str(err.value)


def test_help_lists_groups_and_presets() -> None:
    text = help_text("train.py")
    for word in ("prior:", "task:", "biggan128", "colorization", "sr4_mse_biased", "dip_skip"):
        assert word in text


def test_unknown_extra_metric_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"metrics.extra: unknown metric 'lpip'.*Did you mean 'lpips'"):
        compose(["metrics.extra=[lpip]"])
    assert list(compose(["metrics.extra=[lpips,niqe]"]).metrics.extra) == ["lpips", "niqe"]
