"""sweep.py: the W&B sweep YAMLs run locally with Optuna (docs/evaluation.md, "Sweeps")."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from genprior.cli import sweep as sweep_cli
from genprior.cli.sweep import SweepError, load_sweep, metric_value, run_sweep, sweep_main
from genprior.config import compose, presets_root

SWEEPS = sorted(p.stem for p in (presets_root() / "sweep").glob("*.yaml"))
# Tiny settings per sweep: the sweep's own command, prior, task and metric, on the embedded
# sample image, fitted for a few steps on the CPU.
TINY: dict[str, list[str]] = {
    "dip_denoising": [
        "dip.num_iter=3", "dip.num_channels_down=[8,8,8,8,8]", "dip.num_channels_up=[8,8,8,8,8]",
        "data.image_size=64", "data.source=sample",
    ],
    "dgp_colorization_lr": [
        "prior=biggan_tiny", "dgp.iterations=[1,1,0,0,0]", "dgp.select_num=2",
        "data.kind=auto", "data.source=sample",
    ],
}
COMMON = ["logger=none", "trainer.batch_size=1", "trainer.enable_progress_bar=false"]


def _storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sweep.db'}"


def test_every_sweep_has_tiny_settings_and_the_portable_trainer() -> None:
    assert set(SWEEPS) == set(TINY)
    for name in SWEEPS:
        sweep = load_sweep(presets_root() / "sweep" / f"{name}.yaml")
        assert "trainer=auto" in sweep.fixed_args and "trainer=gpu" not in sweep.fixed_args
        assert compose(sweep.fixed_args).trainer.accelerator == "auto"
        assert not any(a.startswith("${") for a in sweep.fixed_args)  # the agent's macros


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_metric_is_what_a_short_run_logs(name: str, tmp_path: Path) -> None:
    sweep = load_sweep(presets_root() / "sweep" / f"{name}.yaml")
    out = tmp_path / "out"
    study = run_sweep(sweep, _storage(tmp_path), 1, overrides=[*COMMON, *TINY[name],
                                                              f"output.dir={out}"], seed=0)
    rows = [json.loads(line) for line in (out / "trial_0" / "results.jsonl").read_text().splitlines()]
    field = sweep.metric.removeprefix("mean/")
    assert rows and all(r["status"] == "ok" and math.isfinite(r[field]) for r in rows)
    assert study.best_value == pytest.approx(sum(r[field] for r in rows) / len(rows))


def test_metric_maps_to_the_mean_over_ok_rows_and_errors_when_absent() -> None:
    rows = [{"id": "a", "status": "ok", "psnr": 20.0}, {"id": "b", "status": "ok", "psnr": 22.0},
            {"id": "c", "status": "failed", "psnr": 99.0}, {"id": "d", "status": "ok"}]
    assert metric_value(rows, "mean/psnr") == 21.0 == metric_value(rows, "psnr")
    with pytest.raises(SweepError, match=r"no result row has 'psnr_gt_ema'.*numeric fields: psnr"):
        metric_value(rows, "mean/psnr_gt_ema")
    with pytest.raises(SweepError, match="mean/<field>"):
        metric_value(rows, "std/psnr")


def _dip_args(tmp_path: Path) -> list[str]:
    return [*COMMON, *TINY["dip_denoising"], f"output.dir={tmp_path / 'out'}"]


def test_local_sweep_runs_end_to_end(tmp_path: Path, capsys) -> None:
    yaml_path = presets_root() / "sweep" / "dip_denoising.yaml"
    assert sweep_main([str(yaml_path), "--trials", "2", "--storage", _storage(tmp_path),
                       "--seed", "0", *_dip_args(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "trial 1/2 (#0): mean/final_psnr_gt_ema = " in printed
    assert "trial 2/2 (#1): mean/final_psnr_gt_ema = " in printed and "best " in printed
    study = optuna.load_study(study_name="dip_denoising", storage=_storage(tmp_path))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert {t.params["dip.num_iter"] for t in study.trials} <= {600, 1200, 1800, 2400, 3000}
    table = (tmp_path / "out" / "sweep_summary.csv").read_text().splitlines()
    assert table[0] == "trial,state,mean/final_psnr_gt_ema,dip.num_iter,dip.lr,output_dir"
    assert len(table) == 3 and (tmp_path / "out" / "sweep_summary.md").is_file()
    assert (tmp_path / "out" / "trial_1" / "results.jsonl").is_file()


def test_killed_sweep_resumes_without_redoing_finished_trials(tmp_path: Path, monkeypatch) -> None:
    sweep = load_sweep(presets_root() / "sweep" / "dip_denoising.yaml")
    real_run = sweep_cli.tasks.run
    started: list[str] = []

    def killed_in_second_trial(cfg: Any, out: Path, **kwargs: Any) -> list[dict[str, Any]]:
        started.append(out.name)
        if len(started) == 2:
            raise KeyboardInterrupt  # the sweep is killed during its second trial
        return real_run(cfg, out, **kwargs)

    monkeypatch.setattr(sweep_cli.tasks, "run", killed_in_second_trial)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, _storage(tmp_path), 2, overrides=_dip_args(tmp_path), seed=0)
    first = tmp_path / "out" / "trial_0" / "results.jsonl"
    stamp = first.stat().st_mtime_ns

    def recorded(cfg: Any, out: Path, **kwargs: Any) -> list[dict[str, Any]]:
        started.append(out.name)
        return real_run(cfg, out, **kwargs)

    started.clear()
    monkeypatch.setattr(sweep_cli.tasks, "run", recorded)
    study = run_sweep(sweep, _storage(tmp_path), 2, overrides=_dip_args(tmp_path), seed=0)
    assert started == ["trial_2"]  # one new trial; the finished trial 0 is not run again
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert first.stat().st_mtime_ns == stamp
    study = run_sweep(sweep, _storage(tmp_path), 2, overrides=_dip_args(tmp_path), seed=0)
    assert started == ["trial_2"] and len(study.trials) == 3  # the budget is already met


def _fake_run(calls: list[dict[str, Any]]):
    """Stands in for tasks.run: one ok row whose psnr is dip.lr (no fitting)."""

    def run(cfg: Any, out: Path, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append({"lr": cfg.dip.lr, "num_iter": cfg.dip.num_iter, "input_depth": cfg.dip.input_depth,
                      "down": list(cfg.dip.num_channels_down), "out": out.name})
        return [{"id": "astronaut", "status": "ok", "psnr": float(cfg.dip.lr)}]

    return run


def test_methods_and_parameter_kinds_map_onto_optuna(tmp_path: Path, monkeypatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(sweep_cli.tasks, "run", _fake_run(calls))
    command = ["${env}", "${interpreter}", "${program}", "prior=dip_skip", "task=dip_denoising",
               "data.source=sample", f"output.dir={tmp_path}/out/${{oc.env:WANDB_RUN_ID,local}}",
               "${args}"]
    base = ("program: evaluate.py\nmetric: {name: mean/psnr, goal: minimize}\n"
            f"command: {json.dumps(command)}\n")
    grid = tmp_path / "grid.yaml"
    grid.write_text(base + "method: grid\nparameters:\n  dip.lr: {values: [0.01, 0.02]}\n"
                    "  dip.num_channels_down: {values: [[8, 8, 8, 8, 8], [16, 16, 16, 16, 16]]}\n"
                    "  dip.input_depth: {value: 4}\n")
    study = run_sweep(load_sweep(grid), _storage(tmp_path), 10, study_name="g")  # capped at 4
    assert len(study.trials) == 4 and len(calls) == 4
    assert sorted((c["lr"], c["down"][0]) for c in calls) == [(0.01, 8), (0.01, 16), (0.02, 8),
                                                              (0.02, 16)]
    assert {c["input_depth"] for c in calls} == {4} and study.best_value == 0.01  # minimize
    assert calls[0]["out"] == "trial_0" and (tmp_path / "out" / "local" / "trial_3").is_dir()

    calls.clear()
    rnd = tmp_path / "random.yaml"
    rnd.write_text(base + "method: bayes\nparameters:\n"
                   "  dip.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-1}\n"
                   "  dip.num_iter: {min: 2, max: 5}\n")
    sweep = load_sweep(rnd)
    study = run_sweep(sweep, _storage(tmp_path), 3, study_name="r", seed=1)
    assert isinstance(study.sampler, optuna.samplers.TPESampler) and len(calls) == 3
    assert all(1e-4 <= c["lr"] <= 0.1 and c["num_iter"] in range(2, 6) for c in calls)
    with pytest.raises(SweepError, match="no result row has 'ssim'"):
        sweep.metric = "mean/ssim"
        run_sweep(sweep, _storage(tmp_path), 4, study_name="r")
