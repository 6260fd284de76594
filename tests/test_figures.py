"""Figures that explain themselves and a clean console (issue 16).

Labelled sheets (image_io.labelled_sheet, stages.png), stage lines of the loss plot, the one
naming rule of hole metrics, hybrid's scores, the end line without "inf", the progress bar's
wording and a run's stderr without Lightning's known-harmless warnings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from genprior import engine
from genprior.callbacks.files import stage_boundaries
from genprior.callbacks.progress import batch_description
from genprior.cli.train import print_summary
from genprior.config import compose
from genprior.image_io import labelled_sheet, labelled_sheet_size, to_uint8
from genprior.items import ImageBatch
from genprior.methods import build
from genprior.tasks.manipulation import write_categories, write_jitter

REPO_ROOT = Path(__file__).resolve().parents[1]


def _dark_rows(pixels: np.ndarray) -> int:
    """How many rows of an RGB array hold a text pixel (dark on the white sheet)."""
    return int((pixels.min(axis=2) < 128).any(axis=1).sum())


def test_labelled_sheet_has_its_size_labels_and_exact_frames() -> None:
    torch.manual_seed(0)
    frames = [torch.rand(3, 24, 32) for _ in range(5)]
    sheet = labelled_sheet([*frames[:2], None, *frames[2:]], 3, labels=["observation", "stage 1 (it 9)", "",
                           "a", "b", "target"], row_labels=["", "std 0.3"], title="image 7")
    plain = labelled_sheet(frames, 5)
    assert plain.size == (2 + 5 * (32 + 2), 2 + 24 + 2)  # no bands: frames 2 px apart
    pixels = np.asarray(sheet)
    band = sheet.height - 2 - 2 * (24 + 2)  # the title band and two label bands
    assert band > 0 and band % 3 == 0
    band //= 3
    left = sheet.width - 2 - 3 * (32 + 2)  # the row labels' column
    assert left > 0
    assert _dark_rows(pixels[:band]) > 0, "the title band holds no text"
    assert _dark_rows(pixels[band + 2 : 2 * band + 2, left:]) > 0, "the column titles hold no text"
    assert _dark_rows(pixels[:, :left]) > 0, "the row label holds no text"
    # every frame is pasted exactly as save_image writes it (no resampling, no normalisation)
    top = 2 * band + 2
    assert (pixels[top : top + 24, left + 2 : left + 34] == to_uint8(frames[0], value_range=(0, 1))).all()
    assert sheet.size == labelled_sheet_size(2, 3, (24, 32), labelled_rows=2, row_labels=["", "std 0.3"],
                                             title="image 7")
    assert plain.size == labelled_sheet_size(1, 5, (24, 32))
    with pytest.raises(ValueError, match="labels for"):
        labelled_sheet(frames, 2, labels=["one"])


def test_labelled_sheet_resizes_frames_to_the_tile_and_takes_uint8_frames() -> None:
    torch.manual_seed(0)
    signed = torch.rand(3, 8, 8) * 2 - 1  # an image in [-1, 1]
    pixels = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)  # taken as they are
    sheet = labelled_sheet([signed, pixels, None, signed], 2, labels=["a", "b", "", ""],
                           row_labels=["one", "two"], value_range=(-1.0, 1.0), tile=16,
                           resample=Image.Resampling.NEAREST)
    assert sheet.size == labelled_sheet_size(2, 2, 16, labelled_rows=1, row_labels=["one", "two"])
    arr = np.asarray(sheet)
    left, top = sheet.width - 2 * (16 + 2), sheet.height - 2 * (16 + 2)  # the first frame's corner

    def doubled(x: np.ndarray) -> np.ndarray:  # nearest enlargement by 2: every pixel a 2x2 block
        return x.repeat(2, axis=0).repeat(2, axis=1)

    assert (arr[top : top + 16, left : left + 16] == doubled(to_uint8(signed))).all()
    assert (arr[top : top + 16, left + 18 : left + 34] == doubled(pixels.permute(1, 2, 0).numpy())).all()
    assert (arr[top + 18 : top + 34, left : left + 16] == 255).all()  # the None cell stays white
    assert (arr[top + 18 : top + 34, left + 18 : left + 34] == doubled(to_uint8(signed))).all()


def test_stage_boundaries_come_from_the_rows() -> None:
    rows = [{"step": k + 1, "loss": 1.0, "stage": s} for k, s in enumerate([1, 1, 2, 2, 2, 4])]
    assert stage_boundaries(rows) == [(2.5, 2), (5.5, 4)]  # stage 3 was empty: one line, "stage 4"
    assert stage_boundaries([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]) == []


def test_end_line_never_prints_inf_or_nan(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = OmegaConf.create({"prior": {"name": "biggan_tiny"}, "task": {"name": "reconstruct"}})
    rows: list[dict[str, Any]] = [
        {"id": "a", "status": "ok", "observation_psnr": float("inf"), "psnr": 21.5, "ssim": 0.5, "seconds": 1.0},
        {"id": "b", "status": "ok", "observation_psnr": float("inf"), "psnr": float("inf"),
         "ssim": float("nan"), "seconds": 1.0},
        {"id": "c", "status": "ok", "observation_psnr": 12.0, "psnr": float("nan"), "psnr_hole": 9.5, "seconds": 1.0},
        {"id": "d", "status": "ok", "psnr": 20.0, "psnr_hole": 15.25, "ssim": 0.7, "seconds": 1.0},
    ]
    print_summary(rows, Path("."), cfg)
    printed = capsys.readouterr().out.lower()
    assert "inf" not in printed and "nan" not in printed, printed
    assert printed.count("lossless observation") == 2 and "result equals the target" in printed
    assert "result psnr 20.00 db (hole 15.25 db)" in printed


def test_progress_bar_describes_the_batch_of_images() -> None:
    assert batch_description(2, 5, 5, 8, 20) == "batch 2/5 (images 5-8 of 20)"
    assert batch_description(1, 1, 1, 1, 1) == "batch 1/1 (image 1 of 1)"
    assert "epoch" not in batch_description(3, 3, 9, 9, 9).lower()


def _hole_metric_names(overrides: list[str], size: int) -> set[str]:
    cfg = compose([*overrides, "logger=none", "trainer.accelerator=cpu"])
    method = build(cfg)
    torch.manual_seed(0)
    image = torch.rand(1, 3, size, size) * 2 - 1
    method.start(ImageBatch(images=image, classes=torch.tensor([1]), ids=["a"], paths=["a"]))
    engine.step(method, method.make_optimizer(fused=False))  # one step: a result to score
    return set(method.metrics(method.final_output()))


def test_hole_metrics_have_one_name_in_every_method() -> None:
    dgp = _hole_metric_names(["prior=biggan_tiny", "task=inpainting", "dgp.select_num=2"], 128)
    dip = _hole_metric_names(["task=dip_inpainting_vase", "dip.mask_shape=center_square", "dip.hole_size=16",
                              "dip.num_channels_down=[8,8,8,8,8]", "dip.num_channels_up=[8,8,8,8,8]"], 64)
    mgan = _hole_metric_names(["prior=pggan_tiny", "task=mgan_inpainting", "mganprior.z_number=2",
                               "mganprior.vgg_lambda=0", "mganprior.hole_size=16"], 256)
    rule = {"psnr", "ssim", "psnr_hole", "ssim_hole"}
    assert rule <= dgp and rule <= dip and rule <= mgan, (dgp, dip, mgan)


def test_hybrid_is_scored_on_the_whole_image_and_the_hole() -> None:
    names = _hole_metric_names(["prior=biggan_tiny", "task=hybrid", "dgp.select_num=2"], 128)
    assert {"psnr", "ssim", "psnr_hole", "ssim_hole"} <= names


@pytest.fixture(scope="module")
def dgp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """train.py as a user runs it (progress bar on), a tiny BigGAN colorization of the sample."""
    out = tmp_path_factory.mktemp("figures") / "out"
    threads = os.environ.get("GENPRIOR_TEST_THREADS") or "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "prior=biggan_tiny", "task=colorization",
                           "dgp.iterations=[1,1,1,1,1]", "dgp.select_num=2", "logger=none",
                           f"output.dir={out}"],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done, out / "astronaut"


def test_a_run_prints_no_known_harmless_warnings_and_no_epochs(dgp_run: tuple[Any, Path]) -> None:
    done, _ = dgp_run
    for text in ("_pytree", "LeafSpec", "in eval mode", "configure_optimizers"):
        assert text not in done.stderr, done.stderr
    assert "Epoch" not in done.stdout
    assert "batch 1/1 (image 1 of 1)" in done.stdout


def test_stages_sheet_is_labelled_and_ends_with_the_target(dgp_run: tuple[Any, Path]) -> None:
    _, folder = dgp_run
    sheet = np.asarray(Image.open(folder / "stages.png").convert("RGB"))
    target = np.asarray(Image.open(folder / "target.png").convert("RGB"))
    observation = np.asarray(Image.open(folder / "observation.png").convert("RGB"))
    h, w = target.shape[:2]
    # the observation, the end of each of the 5 stages, the target: 7 columns, 2 px apart
    assert sheet.shape[1] == 2 + 7 * (w + 2)
    bands = sheet.shape[0] - (2 + h + 2)  # the title band and the column titles above the frames
    assert bands > 0
    assert _dark_rows(sheet[:bands]) >= 2  # the image id and the column titles
    top = sheet.shape[0] - 2 - h
    assert (sheet[top : top + h, 2 : 2 + w] == observation).all()
    assert (sheet[top : top + h, -2 - w : -2] == target).all()
    assert (folder / "loss_curve.png").is_file()


def test_jitter_and_category_sheets_say_what_each_image_is(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recon, target = torch.rand(3, 32, 32) * 2 - 1, torch.rand(3, 32, 32) * 2 - 1
    write_jitter(tmp_path, recon, torch.rand(2, 3, 3, 32, 32) * 2 - 1, [0.3, 0.7], 3, target=target, title="t")
    sheet = np.asarray(Image.open(tmp_path / "jitters.png").convert("RGB"))
    left = sheet.shape[1] - 2 - 3 * 34  # the column of the "std s" row labels
    assert left > 0 and _dark_rows(sheet[:, :left]) > 0
    # rows: reconstruction + target under their column titles, then one row per std (no titles)
    top = sheet.shape[0] - 3 * 34  # the first row's frames, 2 rows of 32 + 2 px below them
    target_cell = sheet[top : top + 32, left + 36 : left + 68]
    assert (target_cell == to_uint8(target)).all()
    write_categories(tmp_path, recon, torch.rand(2, 3, 32, 32) * 2 - 1, [207, 1], target=None)
    cats = np.asarray(Image.open(tmp_path / "categories.png").convert("RGB"))
    assert cats.shape[1] == 2 + 1 * 34  # isqrt(3) = 1 per row, no title
    assert cats.shape[0] > 2 + 3 * 34 and _dark_rows(cats) > 0  # label bands with the class names
