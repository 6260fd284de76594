"""train.py's embedded default (DIP denoising of scikit-image's astronaut), shortened."""

from __future__ import annotations

import json
from pathlib import Path

from genprior.cli.train import run_train

SHORT = ["dip.num_iter=40", "dip.show_every=10", "trainer.enable_progress_bar=false", "logger=csv"]


def test_default_job_runs_and_writes_outputs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_train([*SHORT, "data.image_size=64", f"output.dir={out}"]) == 0
    folder = out / "astronaut"
    for name in ("result.png", "observation.png", "target.png", "progress.png", "metrics.json",
                 "losses.csv", "loss_curve.png", "result_last_iterate.png"):
        assert (folder / name).is_file(), name
    row = json.loads((folder / "metrics.json").read_text())
    assert row["status"] == "ok" and row["steps"] == 40
    assert 10 < row["observation_psnr"] < 30 and row["psnr"] > 5
    assert "dip_denoising_quick" in (out / "config.yaml").read_text()


def test_size_dip_cannot_take_fails_with_a_clear_message(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_train([*SHORT, "data.image_size=40", f"output.dir={out}"]) == 1
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["status"] == "failed"
    assert "32" in row["error"] and "64" in row["error"], row["error"]


def test_generated_centre_holes_and_hole_metrics(tmp_path: Path) -> None:
    """dip.mask_shape: DGP's centre hole and mGANprior's square, scored on the hole (the DIP
    columns of the DGP and mGANprior tables)."""
    import numpy as np
    from PIL import Image

    from genprior.degradations import center_hole_box

    small = ["dip.num_channels_down=[8,8,8,8,8]", "dip.num_channels_up=[8,8,8,8,8]", "dip.num_iter=3"]
    for shape, box in (("dgp_center_hole", center_hole_box(64, 64)), ("center_square", (24, 40, 24, 40))):
        out = tmp_path / shape
        args = [*SHORT, *small, "task=dip_inpainting_vase", f"dip.mask_shape={shape}", "dip.hole_size=16",
                "data.image_size=64", f"output.dir={out}"]
        assert run_train(args) == 0
        row = json.loads((out / "astronaut" / "metrics.json").read_text())
        assert row["status"] == "ok" and {"psnr_hole", "ssim_hole", "ssim"} <= row.keys()
        observed, target = (np.asarray(Image.open(out / "astronaut" / f"{n}.png")).astype(int)
                            for n in ("observation", "target"))
        top, bottom, left, right = box
        hole = np.zeros(observed.shape[:2], dtype=bool)
        hole[top:bottom, left:right] = True
        assert (observed[hole] == 0).all() and (observed[~hole] == target[~hole]).all()
        assert target[hole].sum() > 0
    assert run_train([*SHORT, *small, "task=dip_inpainting_vase", "dip.mask_shape=ring",
                      "data.image_size=64", f"output.dir={tmp_path / 'bad'}"]) == 1


def test_colorization_fits_the_gray_image_and_keeps_the_targets_luma(tmp_path: Path) -> None:
    """task=dip_colorization (mGANprior Table 2's DIP row): gray observation, result = the
    target's Y with the output's CbCr, scored by the colorization AuC of metrics.extra."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "color"
    args = [*SHORT, "task=dip_colorization", "dip.num_channels_down=[8,8,8,8,8]",
            "dip.num_channels_up=[8,8,8,8,8]", "dip.num_iter=5", "data.image_size=64",
            "metrics.extra=[colorization_auc]", f"output.dir={out}"]
    assert run_train(args) == 0
    folder = out / "astronaut"
    row = json.loads((folder / "metrics.json").read_text())
    assert row["status"] == "ok" and 0 < row["colorization_auc"] < 100
    observed = np.asarray(Image.open(folder / "observation.png")).astype(int)
    assert (observed[..., 0] == observed[..., 1]).all() and (observed[..., 1] == observed[..., 2]).all()
    import torch

    from genprior.color import ycbcr_recombine

    def load(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(Image.open(folder / f"{name}.png"))).permute(2, 0, 1)[None] / 255

    expected = ycbcr_recombine(load("result_last_iterate"), load("target"))
    # the raw output went through an 8-bit PNG here (truncated to 8 bits in the run)
    assert ((expected - load("result")).abs() <= 3 / 255).float().mean() > 0.99
    luma = np.asarray(Image.open(folder / "target.png").convert("YCbCr"))[..., 0].astype(int)
    assert np.abs(observed[..., 0] - luma).max() <= 2


def test_sr_rows_hold_the_bicubic_baseline(tmp_path: Path) -> None:
    """The DIP paper's SR "bicubic" row: PIL bicubic upsampling of the LR observation."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata
    from skimage.metrics import peak_signal_noise_ratio

    out = tmp_path / "sr"
    args = [*SHORT, "task=dip_sr4", "dip.num_channels_down=[8,8,8,8,8]", "dip.num_channels_up=[8,8,8,8,8]",
            "dip.num_iter=2", "data.image_size=64", f"output.dir={out}"]
    assert run_train(args) == 0
    row = json.loads((out / "astronaut" / "metrics.json").read_text())
    hr = Image.fromarray(skdata.astronaut()).resize((64, 64), Image.Resampling.LANCZOS)
    lr = hr.resize((16, 16), Image.Resampling.LANCZOS)
    bicubic = np.asarray(lr.resize((64, 64), Image.Resampling.BICUBIC))
    expected = peak_signal_noise_ratio(np.asarray(hr), bicubic, data_range=255)
    # measured 8.0e-8 dB over threads 1/2/4 (and in float64): the run's images are k/255 rounded
    # to float32, as the notebooks' are, skimage's here are exact integers
    assert abs(row["bicubic_psnr"] - expected) < 1e-6
    assert row["bicubic_psnr"] > row["observation_psnr"]  # bicubic beats nearest upsampling


def test_float64_run_end_to_end(tmp_path: Path) -> None:
    """trainer.precision=64-true: the whole DIP fit runs in float64, starting from the float32
    run's numbers (the same seeded draws and float32-prepared observation, cast exactly), and
    writes the usual outputs."""
    import torch

    from genprior.config import compose
    from genprior.methods.dip import DIP
    from genprior.tasks import restore

    tiny = [*SHORT, "dip.num_iter=3", "dip.num_channels_down=[8,8,8,8,8]", "dip.num_channels_up=[8,8,8,8,8]",
            "data.image_size=64"]
    rows, methods = {}, {}
    for precision in ("32-true", "64-true"):
        out = tmp_path / precision
        cfg = compose([*tiny, f"trainer.precision={precision}", f"output.dir={out}"])
        methods[precision] = DIP.from_config(cfg)  # train.py's restoration, holding on to the method
        restore.run(cfg, out, method=methods[precision])
        rows[precision] = json.loads((out / "astronaut" / "metrics.json").read_text())
    for name in ("result.png", "observation.png", "target.png", "losses.csv", "result_last_iterate.png"):
        assert (tmp_path / "64-true" / "astronaut" / name).is_file(), name
    f32, f64 = methods["32-true"], methods["64-true"]
    assert f32.dtype == torch.float32 and f64.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in f64.parameters())
    assert f64.output_ema is not None and f64.output_ema.dtype == torch.float64
    assert torch.equal(f64.observation, f32.observation.double())
    assert torch.equal(f64.net_input_saved, f32.net_input_saved.double())
    row32, row64 = rows["32-true"], rows["64-true"]
    assert row64["status"] == "ok" and row64["steps"] == 3
    # The same observation and clean image (cast exactly, checked above), but PSNR differences
    # them in the run's dtype, as skimage does (genprior.metrics.psnr): measured 1.7e-8 dB
    # apart (threads 1/2/4), so 1e-6 is a 60x margin.
    assert abs(row64["observation_psnr"] - row32["observation_psnr"]) < 1e-6
    # Not the float32 run, but near it: measured 1.1e-5 dB (psnr of the EMA) and 9.3e-4 dB
    # (last iterate); more than rounding, because Adam's first step divides near-zero gradients
    # by eps, so their float32 rounding noise moves some weights by up to lr.
    assert row64["psnr"] != row32["psnr"]
    assert abs(row64["psnr"] - row32["psnr"]) < 1e-3
    assert abs(row64["final_psnr_observed"] - row32["final_psnr_observed"]) < 1e-2
