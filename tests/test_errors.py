"""User errors end train.py / evaluate.py with one line on stderr and exit code 2 (genprior.errors).

Two cases run ``train.py`` as a subprocess (no traceback on stderr); the others call the entry
point or the failing function in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genprior.cli.evaluate import run_evaluate
from genprior.cli.train import run_train
from genprior.config import ConfigError, compose
from genprior.datamodules import DataSourceError, read_list_file
from genprior.engine import run as engine_run
from genprior.errors import DEBUG_ENV, InvalidSettingError, MissingFileError, UserError
from genprior.items import ImageItem
from genprior.methods import method_class
from genprior.priors.checkpoints import CheckpointError
from genprior.priors.registry import load_biggan
from genprior.weights import read_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]


class _Payload:
    """Unpickling this calls os.getcwd: a code payload."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.getcwd, ())


def _train_subprocess(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args, *QUIET,
                           f"output.dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _one_line(capsys: pytest.CaptureFixture[str], program: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"{program}: error: "), err
    return err


# ------------------------------------------------------------ end to end, as a user runs it
def test_missing_biggan_checkpoint_is_one_line(tmp_path: Path) -> None:
    proc = _train_subprocess(["prior=biggan128", "task=colorization",
                              f"prior.weights_dir={tmp_path / 'nowhere'}"], tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "G_ema_128.pth" in err and "prior.weights_dir" in err and "deep-generative-prior" in err


def test_biggan_without_a_task_says_how_to_pick_one(tmp_path: Path) -> None:
    proc = _train_subprocess(["prior=biggan_tiny"], tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "prior=biggan_tiny" in err and "task=colorization" in err and "'denoising'" in err


# ------------------------------------------------------------------------ weight files
def test_garbage_and_wrong_shape_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 10)
    G, D = load_biggan("biggan_tiny", random_G=True)
    state = G.state_dict()
    state["linear.weight"] = torch.zeros(state["linear.weight"].shape[0] + 1, state["linear.weight"].shape[1])
    torch.save(state, tmp_path / "wrong.pth")
    torch.save(D.state_dict(), tmp_path / "D.pth")
    base = ["prior=biggan_tiny", "task=colorization", "prior.weights=pretrained",
            f"prior.D_path={tmp_path / 'D.pth'}", f"output.dir={tmp_path / 'out'}", *QUIET]
    assert run_train([*base, f"prior.G_path={tmp_path / 'garbage.pth'}"]) == 2
    assert "garbage.pth" in _one_line(capsys, "train.py")
    assert run_train([*base, f"prior.G_path={tmp_path / 'wrong.pth'}"]) == 2
    err = _one_line(capsys, "train.py")
    assert "wrong.pth does not fit" in err and "linear.weight" in err
    # no paths at all: the config keys to set
    assert run_train(base[:3] + base[4:]) == 2
    assert "prior.G_path" in _one_line(capsys, "train.py")


def test_pickled_code_is_refused_as_untrusted(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1), "x": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "evil.pth", "checkpoint of the generator")
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "evil.pth refused" in message and "pickled code" in message and "untrusted" in message
    assert "Accepted:" in message and ".safetensors" in message
    assert "corrupt" not in message and "weights_only=False" not in message


def test_missing_vgg16_stops_mganprior_before_logging(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # pggan_tiny's preset picks the random VGG (needs no file); null asks for the real one
    no_vgg = "mganprior.vgg_weights=null"
    cfg = compose(["prior=pggan_tiny", "task=mgan_inversion", no_vgg, f"output.dir={tmp_path}", *QUIET])
    with pytest.raises(MissingFileError, match=r"mganprior\.vgg_weights=<file>"):
        method_class("pggan").from_config(cfg)  # what tasks.run / evaluate.py build first
    def no_logging(*args: object, **kwargs: object) -> None:
        raise AssertionError("the W&B report started before the method was built")

    monkeypatch.setattr("genprior.cli.evaluate.WandbReport.start", no_logging)
    assert run_evaluate(["prior=pggan_tiny", "task=mgan_inversion", no_vgg, f"output.dir={tmp_path / 'ev'}",
                         *QUIET]) == 2
    err = _one_line(capsys, "evaluate.py")
    assert "vgg16-397923af.pth" in err and "mganprior.vgg_weights" in err


def test_debug_env_keeps_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(InvalidSettingError):
        run_train(["prior=biggan_tiny", f"output.dir={tmp_path}", *QUIET])


# ------------------------------------------------------------------------ data and config
def test_non_utf8_list_line_names_file_and_line(tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"a.png 1\n# comment\nb\xff.png 2\n")
    with pytest.raises(DataSourceError, match=r"images\.txt line 3 is not UTF-8 text"):
        read_list_file(listing)


@pytest.mark.parametrize("override", ["dgp.update_embed=2", "dgp.use_in=[2,0,0,0,0]",
                                      "trainer.deterministic=-1"])
def test_bools_given_other_integers_are_refused(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"config key {key} .* got"):
        compose(["prior=biggan_tiny", "task=colorization", override])


def test_bools_accept_zero_and_one() -> None:
    cfg = compose(["prior=biggan_tiny", "task=colorization", "dgp.update_embed=1", "dgp.update_G=0"])
    assert cfg.dgp.update_embed is True and cfg.dgp.update_G is False


def test_nan_message_names_the_step(tmp_path: Path) -> None:
    cfg = compose(["prior=dip_skip", "task=dip_denoising_quick", "dip.num_iter=3", "trainer.batch_size=2",
                   f"output.dir={tmp_path}", *QUIET])
    good = torch.rand(3, 64, 64) * 2 - 1
    bad = good.clone()
    bad[:, :4, :4] = float("nan")
    items = [ImageItem("good", "mem:good", -1, good), ImageItem("bad", "mem:bad", -1, bad)]
    rows = {r["id"]: r for r in engine_run(cfg, method_class("dip").from_config(cfg), items, tmp_path)}
    assert rows["good"]["status"] == "ok"
    assert rows["bad"]["error"] == "non-finite loss (NaN or inf) at step 1"
