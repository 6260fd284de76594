"""``sweep.py``: run a W&B sweep YAML (``configs/sweep/*.yaml``) locally with Optuna, no server.

    python sweep.py configs/sweep/dip_denoising.yaml [--storage URL] [--trials N] [--study NAME]
                    [key=value ...]

The sweep definition is the one ``wandb sweep`` reads (docs/evaluation.md, "Sweeps"):

- ``method``: grid -> ``optuna.samplers.GridSampler``, random -> ``RandomSampler``,
  bayes -> ``TPESampler``;
- ``parameters``: ``value`` (fixed), ``values`` (a choice; lists are allowed), ``min``/``max``
  with ``distribution`` uniform (the default for floats), int_uniform (the default for ints) or
  log_uniform_values;
- ``metric``: ``name`` and ``goal`` (maximize | minimize). ``mean/<m>`` (or a bare ``<m>``) is
  the mean of field ``<m>`` over the run's ``ok`` result rows that hold a finite number for it,
  exactly the ``mean/<m>`` a W&B run reports (``genprior.results.summarize``); a run where no
  row has it is an error that stops the sweep;
- ``command``: its fixed ``key=value`` arguments compose each trial's config (``${env}``,
  ``${interpreter}``, ``${program}``, ``${args}`` are the agent's and are dropped), then the
  trial's values, then the overrides given here (they win).

Each trial is a normal genprior run in this process, through ``genprior.tasks.run`` as
train.py does, in ``<output.dir>/trial_<n>``: with ``program: evaluate.py`` it fits the images
evaluate.py would (its data presets and ``data.subset``, one process), with ``program: train.py``
the ones train.py reads. Its rows are in the trial folder's ``results.jsonl``. The study lives in Optuna's RDB storage (SQLite by default, a
PostgreSQL URL on a cluster): several workers (one per GPU or node) can share it, and a killed
sweep started again with the same storage and study name skips the trials already COMPLETE;
``--trials`` is the number of COMPLETE trials the study should reach.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import yaml

from genprior import tasks
from genprior.cli.evaluate import image_reader, list_subset
from genprior.cli.train import write_results
from genprior.config import ConfigError, compose, to_yaml
from genprior.errors import UserError
from genprior.results import summarize

__all__ = ["Sweep", "SweepError", "load_sweep", "metric_value", "run_sweep", "sweep_main"]

AGENT_MACROS = frozenset({"${env}", "${interpreter}", "${program}", "${args}",
                          "${args_no_hyphens}", "${args_json}", "${args_json_file}",
                          "${args_no_boolean_flags}"})
DEFAULT_TRIALS = 10


class SweepError(ValueError):
    """A sweep definition or a trial result that the sweep cannot use (a one-line message)."""


@dataclass
class Sweep:
    name: str
    method: str
    metric: str
    goal: str  # maximize | minimize
    parameters: dict[str, dict[str, Any]]
    fixed_args: list[str]
    program: str = "evaluate.py"
    run_cap: int | None = None


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    method = str(spec.get("method", "random"))
    if method not in ("grid", "random", "bayes"):
        raise SweepError(f"{path}: method {method!r} is not grid, random or bayes")
    metric = spec.get("metric") or {}
    if "name" not in metric:
        raise SweepError(f"{path}: the sweep has no metric.name")
    goal = str(metric.get("goal", "minimize"))
    if goal not in ("maximize", "minimize"):
        raise SweepError(f"{path}: metric.goal {goal!r} is not maximize or minimize")
    parameters = spec.get("parameters") or {}
    for name, p in parameters.items():
        if not isinstance(p, dict) or not ({"value", "values"} & p.keys() or {"min", "max"} <= p.keys()):
            raise SweepError(f"{path}: parameter {name!r} needs value, values or min/max")
        if method == "grid" and "value" not in p and "values" not in p:
            raise SweepError(f"{path}: a grid sweep needs values for every parameter ({name!r})")
    command = spec.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    fixed = [str(a) for a in command if str(a) not in AGENT_MACROS]
    run_cap = spec.get("run_cap")
    program = Path(str(spec.get("program", "evaluate.py"))).name
    if program not in ("evaluate.py", "train.py"):
        raise SweepError(f"{path}: program {program!r} is not evaluate.py or train.py")
    return Sweep(path.stem, method, str(metric["name"]), goal, dict(parameters), fixed, program,
                 int(run_cap) if run_cap else None)


def _encode(value: Any) -> Any:
    """Optuna's categorical choices are scalars: lists travel as their JSON text."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def suggest(trial: optuna.Trial, sweep: Sweep) -> dict[str, Any]:
    """The trial's value of every parameter, as the W&B agent would pass it."""
    values: dict[str, Any] = {}
    for name, p in sweep.parameters.items():
        if "value" in p:
            values[name] = p["value"]
        elif "values" in p:
            values[name] = _decode(trial.suggest_categorical(name, [_encode(v) for v in p["values"]]))
        else:
            kind = p.get("distribution")
            low, high = p["min"], p["max"]
            if kind is None:
                kind = "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform"
            if kind == "uniform":
                values[name] = trial.suggest_float(name, float(low), float(high))
            elif kind == "log_uniform_values":
                values[name] = trial.suggest_float(name, float(low), float(high), log=True)
            elif kind == "int_uniform":
                values[name] = trial.suggest_int(name, int(low), int(high))
            else:
                raise SweepError(f"parameter {name!r}: distribution {kind!r} is not supported "
                                 "(uniform, log_uniform_values, int_uniform)")
    return values


def make_sampler(sweep: Sweep, seed: int | None) -> optuna.samplers.BaseSampler:
    if sweep.method == "grid":
        space = {name: [_encode(v) for v in p["values"]]
                 for name, p in sweep.parameters.items() if "values" in p}
        return optuna.samplers.GridSampler(space, seed=seed)
    if sweep.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def grid_size(sweep: Sweep) -> int:
    return math.prod(len(p["values"]) for p in sweep.parameters.values() if "values" in p)


def metric_value(rows: Sequence[dict[str, Any]], metric: str) -> float:
    """``mean/<m>`` (or ``<m>``): the mean of ``<m>`` over the ``ok`` rows with a finite number."""
    field = metric.removeprefix("mean/")
    if "/" in field:
        raise SweepError(f"metric {metric!r}: the local runner optimises mean/<field> of the "
                         "result rows")
    stats = {s.metric: s for s in summarize(rows)}
    if field not in stats or stats[field].n == 0:
        ok = sum(r.get("status") == "ok" for r in rows)
        have = ", ".join(sorted(stats)) or "none"
        raise SweepError(f"metric {metric!r}: no result row has {field!r} ({ok} of {len(rows)} "
                         f"row(s) ok; numeric fields: {have})")
    return float(stats[field].mean)


def trial_args(sweep: Sweep, values: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    return [*sweep.fixed_args, *(f"{k}={v}" for k, v in values.items()), *overrides]


def run_trial(sweep: Sweep, trial: optuna.Trial, overrides: Sequence[str], base_dir: Path) -> float:
    values = suggest(trial, sweep)
    out = base_dir / f"trial_{trial.number}"
    cfg = compose([*trial_args(sweep, values, overrides), f"output.dir={out}"])
    trial.set_user_attr("output_dir", str(out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        if sweep.program == "evaluate.py":  # evaluate.py's images: its data presets and subset
            try:
                source, items = list_subset(cfg)
            except UserError as err:  # evaluate.py's one-line data error
                raise SweepError(str(err)) from None
            rows = tasks.run(cfg, out, items=items, read=image_reader(cfg, source, items))
        else:
            rows = tasks.run(cfg, out)
    finally:
        if str(cfg.logger.kind) == "wandb":  # each trial its own W&B run
            finish_wandb_run()
    write_results(rows, out)
    return metric_value(rows, sweep.metric)


def finish_wandb_run() -> None:
    """End the trial's W&B run: Lightning's WandbLogger leaves it open, and the next trial's
    logger would reuse it."""
    import wandb  # optional at run time: only a logger=wandb sweep gets here

    if wandb.run is not None:
        wandb.finish()


def complete_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def run_sweep(sweep: Sweep, storage: str, trials: int, study_name: str | None = None,
              overrides: Sequence[str] = (), seed: int | None = None) -> optuna.Study:
    """Run trials until the study holds ``trials`` COMPLETE ones; write the summary table."""
    base_dir = Path(compose([*sweep.fixed_args, *overrides]).output.dir)
    fixed = sorted({o.split("=", 1)[0].lstrip("-+") for o in overrides} & set(sweep.parameters))
    if fixed:
        print(f"sweep.py: the overrides fix swept parameter(s) {', '.join(fixed)}: the runs use "
              "the override, the table shows the sampled values", file=sys.stderr)
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if sweep.method == "grid":
        trials = min(trials, grid_size(sweep))
    study = optuna.create_study(storage=storage, study_name=study_name or sweep.name,
                                sampler=make_sampler(sweep, seed), direction=sweep.goal,
                                load_if_exists=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = complete_count(study)
    if done:
        print(f"sweep {study.study_name}: {done} trial(s) already complete in {storage}")
    ran: list[tuple[int, float]] = []

    def objective(trial: optuna.Trial) -> float:
        value = run_trial(sweep, trial, overrides, base_dir)
        ran.append((trial.number, value))
        return value

    while complete_count(study) < trials:
        # one trial per call: the count is read again from the storage, which other workers
        # share; an exception (or Ctrl-C) marks the trial FAIL and ends the sweep
        study.optimize(objective, n_trials=1, catch=())
        if not ran:  # the grid sampler stopped the study: every point is done
            break
        number, value = ran.pop()
        best = study.best_trial
        print(f"trial {complete_count(study)}/{trials} (#{number}): {sweep.metric} = "
              f"{value:.4f}; best {best.value:.4f} (#{best.number})", flush=True)
    write_summary(study, sweep, base_dir)
    return study


def write_summary(study: optuna.Study, sweep: Sweep, base_dir: Path) -> None:
    """``sweep_summary.csv`` / ``.md`` in the sweep's output folder: one row per trial."""
    names = list(sweep.parameters)
    header = ["trial", "state", sweep.metric, *names, "output_dir"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = "" if t.value is None else f"{t.value:.6g}"
        params = [json.dumps(_decode(t.params[n])) if n in t.params else
                  json.dumps(sweep.parameters[n].get("value", "")) for n in names]
        rows.append([str(t.number), t.state.name, value, *params, t.user_attrs.get("output_dir", "")])
    base_dir.mkdir(parents=True, exist_ok=True)
    with (base_dir / "sweep_summary.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    lines = [f"# sweep {study.study_name} ({sweep.method}, {sweep.goal} {sweep.metric})", ""]
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        lines += [f"best: trial {best.number}, {sweep.metric} = {best.value:.6g}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    (base_dir / "sweep_summary.md").write_text(markdown)
    print("\n" + markdown + f"summary: {(base_dir / 'sweep_summary.md').resolve()}")


def sweep_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sweep.py", description="Run a W&B sweep YAML locally with Optuna (no W&B server).")
    parser.add_argument("sweep", help="a sweep YAML, e.g. configs/sweep/dip_denoising.yaml")
    parser.add_argument("--storage", help="Optuna RDB URL (default sqlite:///outputs/sweeps/<name>.db)")
    parser.add_argument("--trials", type=int, help="COMPLETE trials to reach (default: the "
                        f"YAML's run_cap, the grid's size, or {DEFAULT_TRIALS})")
    parser.add_argument("--study", help="study name (default: the YAML's file name)")
    parser.add_argument("--seed", type=int, help="the sampler's seed")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.source=img/")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    try:
        sweep = load_sweep(args.sweep)
        trials = args.trials or sweep.run_cap or (grid_size(sweep) if sweep.method == "grid"
                                                  else DEFAULT_TRIALS)
        storage = args.storage or f"sqlite:///outputs/sweeps/{sweep.name}.db"
        run_sweep(sweep, storage, trials, args.study, args.overrides, args.seed)
    except (SweepError, ConfigError) as err:
        print(f"sweep.py: error: {err}", file=sys.stderr)
        return 2
    return 0
