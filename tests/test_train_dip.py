"""train.py's embedded default (DIP denoising of scikit-image's astronaut), shortened."""

from __future__ import annotations

import json
from pathlib import Path

from genprior.train import run_train

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
