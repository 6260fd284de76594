"""``trainer.precision=64-true``: DGP through train.py and the checkpoint loader in float64.

The float64 parity proofs are tests/test_faithfulness_{dgp,dip,mganprior}.py; this file checks
that a user's float64 run is one: the config reaches the models, the published float32
weights are copied exactly into float64 modules, and the step runs in float64.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from genprior.cli.train import run_train
from genprior.config import ConfigError, compose
from genprior.perf import perf_settings
from genprior.precision import run_dtype
from genprior.priors.biggan import Discriminator, Generator
from genprior.priors.registry import build_biggan

BASE = ["prior=biggan_tiny", "task=colorization", "dgp.iterations=[2,1,1,1,1]", "dgp.select_num=3",
        "trainer.enable_progress_bar=false", "logger=csv"]


def _first_loss(out: Path, image_id: str) -> float:
    with (out / image_id / "losses.csv").open() as fh:
        return float(next(csv.DictReader(fh))["loss"])


@pytest.mark.shared
def test_dgp_runs_in_float64_through_train_py(shared_dir: Path, tmp_path: Path) -> None:
    image = shared_dir / "data" / "dgp" / "ILSVRC2012_val_00003004.JPEG"
    args = [*BASE, f"data.source={image}", "data.class_id=693"]
    assert run_train([*args, f"output.dir={tmp_path / 'f32'}"]) == 0
    assert run_train([*args, f"output.dir={tmp_path / 'f64'}", "trainer.precision=64-true"]) == 0
    folder = tmp_path / "f64" / "ILSVRC2012_val_00003004"
    for name in ("result.png", "observation.png", "target.png", "stages.png", "metrics.json", "losses.csv"):
        assert (folder / name).is_file(), name
    # The first step is one forward pass at the pretrained weights from the same z: float64
    # and float32 differ by float32's rounding only (measured 2.3e-7 to 3.5e-7 relative at
    # threads 1/2/4; 29x margin), and they do differ (a run that silently stayed float32
    # would give the identical number).
    l32, l64 = _first_loss(tmp_path / "f32", folder.name), _first_loss(tmp_path / "f64", folder.name)
    assert 0 < abs(l64 - l32) / l32 < 1e-5, (l32, l64)


def test_published_float32_weights_load_exactly_into_float64_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g_state = {k: v for k, v in Generator(128, 8).state_dict().items() if ".in1." not in k and ".in2." not in k}
    d_state = Discriminator(128, 8).state_dict()
    torch.save(g_state, tmp_path / "G.pth")
    torch.save(d_state, tmp_path / "D.pth")
    cfg = compose(["prior=biggan_tiny", "task=colorization", "prior.weights=pretrained",
                   f"prior.G_path={tmp_path / 'G.pth'}", f"prior.D_path={tmp_path / 'D.pth'}",
                   "trainer.precision=64-true"])
    G, D = build_biggan(cfg.prior, dtype=run_dtype(cfg), device="cpu")
    assert G.linear.weight.dtype == torch.float64 and D.linear.weight.dtype == torch.float64
    for model, state in ((G, g_state), (D, d_state)):
        loaded = model.state_dict()
        for key, value in state.items():
            expected = value.double() if value.is_floating_point() else value
            assert torch.equal(loaded[key], expected), key  # float32 -> float64 is exact


def test_precision_is_checked_when_the_config_is_composed() -> None:
    with pytest.raises(ConfigError, match=r"trainer\.precision='16-true'.*64-true"):
        compose(["trainer.precision=16-true"])
    assert str(compose(["trainer.precision=64-true"]).trainer.precision) == "64-true"


def test_bf16_autocast_is_switched_off_in_a_float64_run(caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose(["prior=biggan_tiny", "task=colorization", "perf.autocast=bf16", "trainer.precision=64-true"])
    with caplog.at_level(logging.WARNING, logger="genprior"):
        perf = perf_settings(cfg)
    assert perf.autocast == "none"
    assert "perf.autocast=bf16 is switched off" in caplog.text
    # every other option works in float64 and stays as configured (tests/test_performance.py)
    assert perf.fused_attention and perf.sn_scale_outputs and perf.fused_optimizer
    cfg32 = compose(["prior=biggan_tiny", "task=colorization", "perf.autocast=bf16"])
    assert perf_settings(cfg32).autocast == "bf16"


@pytest.mark.shared
def test_manipulation_in_float64_and_its_fit_edited_in_float32(shared_dir: Path, tmp_path: Path) -> None:
    """task=jitter fits and edits in float64; the saved float64 reconstruction is recognised as
    fitted on the same (published float32) weights and renders in a float32 run too."""
    image = shared_dir / "data" / "dgp" / "ILSVRC2012_val_00001172.JPEG"
    common = ["prior=biggan_tiny", "task=jitter", "manipulation.jitter_samples=2",
              "trainer.enable_progress_bar=false", "logger=none"]
    out64 = tmp_path / "f64"
    assert run_train([*common, "dgp.iterations=[2,1,1]", "dgp.select_num=2", "trainer.precision=64-true",
                      f"data.source={image}", "data.class_id=269", f"output.dir={out64}"]) == 0
    saved = torch.load(out64 / image.stem / "reconstruction.pt", weights_only=True)
    assert saved["z"].dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in saved["G_changed"].values() if t.is_floating_point())
    assert (out64 / image.stem / "jitters.png").is_file()
    out32 = tmp_path / "f32"
    assert run_train([*common, f"manipulation.saved=[{out64 / image.stem}]", f"output.dir={out32}"]) == 0
    assert (out32 / image.stem / "jitters.png").is_file()
