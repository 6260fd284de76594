"""W&B for train.py, and the evaluation summary's columns and intervals.

``train.py logger=wandb`` runs offline (WANDB_MODE in the environment, the run's folder in
WANDB_DIR) with the tiny random BigGAN, two images and two steps each; the run is read back
from the mirror and from its own ``.wandb`` file, as tests/test_evaluate.py reads evaluate.py's.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from run_helpers import of_type, read_wandb_records, synthetic_folder
from scipy import stats

from genprior.callbacks import WandbReport, make_wandb_logger, wandb_init_args
from genprior.cli.train import run_train
from genprior.config import compose
from genprior.engine import make_loggers
from genprior.metrics import METRIC_RANGES, metric_range
from genprior.results import summarize, t_interval

TINY = [
    "prior=biggan_tiny", "task=colorization", "dgp.iterations=[1,1,0,0,0]", "dgp.select_num=2",
    "trainer.accelerator=cpu", "trainer.batch_size=1", "trainer.enable_progress_bar=false",
    "data.class_id=7",
]
# W&B settings that must not leak in from the developer's shell
WANDB_VARS = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_TAGS",
              "WANDB_RUN_GROUP", "WANDB_NOTES", "WANDB_JOB_TYPE", "WANDB_DIR", "WANDB_DATA_DIR",
              "WANDB_API_KEY", "WANDB_RUN_ID")


def _clean_wandb_env(mp: pytest.MonkeyPatch) -> None:
    for name in WANDB_VARS:
        mp.delenv(name, raising=False)
    mp.setenv("WANDB_SILENT", "true")


def _finish_wandb() -> None:
    import wandb

    if wandb.run is not None:  # train.py leaves the WandbLogger's run to the process's exit
        wandb.finish()


@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One offline ``train.py logger=wandb`` run of two images, its settings from both the
    command line and the environment."""
    base = tmp_path_factory.mktemp("wandb_train")
    images = synthetic_folder(base / "images", good=2)
    out, wandb_dir = base / "out", base / "wandb_dir"
    mp = pytest.MonkeyPatch()
    _clean_wandb_env(mp)
    mp.setenv("WANDB_MODE", "offline")  # wins over logger.mode=auto
    mp.setenv("WANDB_DIR", str(wandb_dir))  # wins over the default (output.dir)
    mp.setenv("WANDB_PROJECT", "genprior-env")  # wins over the default project
    mp.setenv("WANDB_RUN_GROUP", "env-group")  # no logger.group: the environment's
    mp.setenv("WANDB_NOTES", "from the env")  # loses to logger.notes
    try:
        code = run_train([*TINY, "logger=wandb", f"data.source={images}", f"output.dir={out}",
                          "logger.name=wb-train", "logger.tags=[tiny,test]",
                          "logger.notes=from the config", "logger.job_type=fit"])
        _finish_wandb()
    finally:
        mp.undo()
        import wandb

        wandb.teardown()  # wandb keeps the environment it first saw: none of this one stays
    assert code == 0
    return {"out": out, "wandb_dir": wandb_dir}


def _mirror(out: Path) -> dict[str, Any]:
    return json.loads((out / "wandb_mirror.json").read_text())


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_train_wandb_logs_sheets_table_and_final_metrics_and_keeps_the_csv_log(
    train_run: dict[str, Path],
) -> None:
    out = train_run["out"]
    rows, mirror = _rows(out), _mirror(out)
    assert mirror["run"]["mode"] == "offline"
    # the CSV log is kept next to W&B
    with (out / "logs" / "metrics.csv").open() as fh:
        assert "train/loss" in next(csv.reader(fh))
    # the stage sheet of each image, as its batch ended
    assert [i["key"] for i in mirror["images"]] == ["stages/img0", "stages/img1"]
    # each image's result as each of its stages ended (dgp.iterations=[1,1,0,0,0]: two stages
    # of one step; batch_size=1, so img1's steps come after img0's two; the run's step counts
    # from 0, as the losses are logged)
    ends = [(e["key"], e["stage"], e["iteration"], e["step"]) for e in mirror["stage_ends"]]
    assert ends == [("stage_end/img0", 1, 1, 0), ("stage_end/img0", 2, 1, 1),
                    ("stage_end/img1", 1, 1, 2), ("stage_end/img1", 2, 1, 3)]
    assert all(Path(e["path"]).is_file() and Path(e["path"]).is_relative_to(out / "wandb_media")
               for e in mirror["stage_ends"])
    # the results table, its thumbnails staged under output.dir
    table = mirror["table"]
    assert table["columns"][:6] == ["id", "class", "status", "error", "observation", "result"]
    assert [r[0] for r in table["rows"]] == ["img0", "img1"]
    for row in table["rows"]:
        for cell in row[4:6]:
            thumb = Path(cell["path"])
            assert thumb.is_file() and thumb.is_relative_to(out / "wandb_media")
            assert max(Image.open(thumb).size) <= 96  # eval.wandb_thumbnail_size
    psnr_col = table["columns"].index("psnr")
    assert table["rows"][1][psnr_col] == rows["img1"]["psnr"]
    # the final metrics and images as summary values
    summary = mirror["summary"]
    assert summary["final/img0/psnr"] == rows["img0"]["psnr"]
    assert summary["final/img1/ssim"] == rows["img1"]["ssim"]
    assert summary["final/img0/result"]["path"] == str(out / "img0" / "result.png")
    assert summary["images/ok"] == 2
    assert summary["mean/psnr"] == pytest.approx((rows["img0"]["psnr"] + rows["img1"]["psnr"]) / 2)

    # the offline run itself (its folder in WANDB_DIR): records and media files
    run_dir = Path(mirror["run"]["dir"])
    assert run_dir.parent == train_run["wandb_dir"] / "wandb"
    assert run_dir.name.startswith("offline-run-") and run_dir.name.endswith(mirror["run"]["id"])
    records = read_wandb_records(next(run_dir.glob("run-*.wandb")))
    history_keys = {item.nested_key[0] if item.nested_key else item.key
                    for h in of_type(records, "history") for item in h.item}
    assert {"results", "stages/img0", "stages/img1", "stage_end/img0", "stage_end/img1",
            "train/loss"} <= history_keys
    summary_keys = {u.nested_key[0] if u.nested_key else u.key
                    for s in of_type(records, "summary") for u in s.update}
    assert {"mean/psnr", "ci95_high/ssim", "final/img0/psnr", "final/img1/result"} <= summary_keys
    media = run_dir / "files" / "media"
    assert len(list((media / "images" / "stages").glob("img*.png"))) == 2
    assert list((media / "table").glob("results_*.table.json"))
    # the table's run_table artifact (its thumbnails) is staged under output.dir too
    artifacts = of_type(records, "artifact")
    assert [a.type for a in artifacts] == ["run_table"]
    staged = [Path(c.local_path) for c in artifacts[0].manifest.contents]
    assert sum(c.path.endswith(("observation.png", "result.png"))
               for c in artifacts[0].manifest.contents) == 4
    assert staged and all(p.is_relative_to(out) and p.is_file() for p in staged)


def test_train_wandb_run_gets_name_tags_group_notes_job_type_by_precedence(
    train_run: dict[str, Path],
) -> None:
    mirror = _mirror(train_run["out"])["run"]
    run_dir = Path(mirror["dir"])
    record = of_type(read_wandb_records(next(run_dir.glob("run-*.wandb"))), "run")[0]
    got = {"name": record.display_name, "tags": list(record.tags), "group": record.run_group,
           "notes": record.notes, "job_type": record.job_type, "project": record.project}
    assert got == {"name": "wb-train", "tags": ["tiny", "test"], "group": "env-group",
                   "notes": "from the config", "job_type": "fit", "project": "genprior-env"}
    assert {k: mirror[k] for k in got} == got


def test_train_wandb_summary_covers_metrics_only_with_intervals_in_range(
    train_run: dict[str, Path],
) -> None:
    out = train_run["out"]
    summary, rows = _mirror(out)["summary"], list(_rows(out).values())
    columns = {k.split("/", 1)[1] for k in summary if k.startswith("mean/")}
    assert {"psnr", "ssim", "observation_psnr", "final_loss", "seconds"} <= columns
    assert all(metric_range(c) or c.startswith("final_") or c == "seconds" for c in columns)
    assert "class" not in columns and "steps" not in columns
    # two SSIMs: the t-interval (t(0.975, 1) = 12.7) reaches far past 1, and is clipped there
    ssim = [r["ssim"] for r in rows]
    half = stats.t.ppf(0.975, 1) * stats.tstd(ssim) / math.sqrt(2)
    assert sum(ssim) / 2 + half > 1 and summary["ci95_high/ssim"] == 1.0
    assert summary["ci95_low/psnr"] >= 0.0


def test_wandb_env_mode_wins_over_auto_and_an_explicit_mode_wins_over_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clean_wandb_env(monkeypatch)
    monkeypatch.setenv("WANDB_API_KEY", "local-0000genprior-test-secret-key-00000000")
    auto = compose([*TINY, "logger=wandb", f"output.dir={tmp_path}"])
    assert wandb_init_args(auto, tmp_path)["mode"] == "online"  # logged in: auto is online
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_init_args(auto, tmp_path)["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's older spelling
    assert wandb_init_args(auto, tmp_path)["mode"] == "offline"
    explicit = compose([*TINY, "logger=wandb", "logger.mode=disabled", f"output.dir={tmp_path}"])
    assert wandb_init_args(explicit, tmp_path)["mode"] == "disabled"
    # tags from the environment are comma-separated; a config value equal to its default
    # (project=genprior) leaves the choice to the environment
    monkeypatch.setenv("WANDB_TAGS", "a, b")
    monkeypatch.setenv("WANDB_PROJECT", "p-env")
    args = wandb_init_args(compose([*TINY, "logger=wandb", "logger.project=genprior"]), tmp_path)
    assert args["tags"] == ["a", "b"] and args["project"] == "p-env" and args["dir"] == str(tmp_path)

    # The run a disabled mode from the environment gives: a no-op run, no mirror, no run folder.
    import wandb

    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = make_wandb_logger(auto, tmp_path)
    try:
        assert logger.experiment.disabled
    finally:
        _finish_wandb()
    report = WandbReport(auto, tmp_path, tmp_path / "results", {"img0"})
    try:
        report.start(total=1)
        assert not report.enabled and report.run is None
        assert wandb.run is None  # its disabled run is ended: no later WandbLogger reuses it
    finally:
        _finish_wandb()
    assert not (tmp_path / "wandb_mirror.json").exists() and not (tmp_path / "wandb").exists()


def test_logger_wandb_keeps_the_csv_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_wandb_env(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose([*TINY, "logger=wandb", f"output.dir={tmp_path}"])
    kinds = [type(lg).__name__ for lg in make_loggers(cfg, tmp_path)]
    assert kinds == ["CSVLogger", "WandbLogger"]


# ---------------------------------------------------------------------------- the summary
def test_summary_leaves_out_config_constants_and_clips_intervals_to_metric_ranges() -> None:
    rows = [
        {"id": f"i{k}", "status": "ok", "ssim": s, "psnr": p, "top1": t, "observation_psnr": 1.0 + k,
         "final_loss": 0.1 * k, "seconds": 2.0 + k, "purifier_runs": 3.0 + k, "z_number": 20, "composing_layer": 6,
         "class": 7, "steps": 5, "train_alpha": True}
        for k, (s, p, t) in enumerate([(0.999, 0.5, 100.0), (0.93, 40.0, 100.0), (0.998, 1.0, 0.0)])
    ]
    rows.append({"id": "bad", "status": "failed", "ssim": 0.1, "z_number": 20})
    got = {s.metric: s for s in summarize(rows, metric_range)}
    assert sorted(got) == ["final_loss", "observation_psnr", "psnr", "purifier_runs", "seconds", "ssim",
                           "top1"]
    for name, s in got.items():
        low, high = metric_range(name) or ((0.0, math.inf) if name in ("seconds", "purifier_runs") else
                                           (-math.inf, math.inf))
        raw = t_interval([r[name] for r in rows[:3]])  # the same statistics, unclipped
        assert (s.n, s.mean, s.std) == (raw.n, raw.mean, raw.std)
        assert s.ci95_low == max(raw.ci95_low, low) and s.ci95_high == min(raw.ci95_high, high)
    # SSIMs near 1: the unclipped interval passes 1 (as in the summary that reported 1.16)
    assert t_interval([r["ssim"] for r in rows[:3]]).ci95_high > 1 and got["ssim"].ci95_high == 1.0
    assert metric_range("observation_psnr") == METRIC_RANGES["psnr"]
    assert got["psnr"].ci95_low == 0.0 and got["observation_psnr"].ci95_low == 0.0
    assert got["top1"].ci95_high == 100.0 and got["top1"].ci95_low == 0.0  # accuracy in %
    # without the ranges every numeric column is summarised, as before (sweep.py's metric lookup)
    assert "z_number" in {s.metric for s in summarize(rows)}
