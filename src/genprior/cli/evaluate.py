"""``evaluate.py``: run a task and prior over a dataset subset, on one GPU or many, resumably.

Reads top to bottom like the evaluation (design and reasons: docs/evaluation.md):

1. Compose the config and start the processes with Lightning Fabric (its own launcher for
   ``trainer.devices=N``, or the processes torchrun / srun started; rank and world size come
   from Lightning's cluster environments). Fabric is used for launching, ranks, one broadcast
   and barriers only: no module is ever wrapped in DDP, so images on different ranks never
   share gradients (../shared/DESIGN.md, "The trap in multi-GPU").
2. Every rank lists the same subset of the data source.
3. Rank 0 reads the finished ids from the results folder and broadcasts them.
4. Every rank removes the finished ids, takes its contiguous shard, and fits it on its own
   device in one ``Trainer.fit`` (the task's, as train.py: ``genprior.tasks.run``), B images at
   a time, each read when its batch comes up, appending one durable row per finished image to
   ``<output.dir>/results/rank<r>.jsonl``.
5. After a barrier, rank 0 merges the rows, writes ``results.jsonl`` and the summary
   (``summary.csv`` / ``.md`` / ``.json``), prints it, and finishes the W&B report.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from genprior import datamodules, errors, tasks
from genprior.callbacks import WandbReport
from genprior.config import ConfigError, compose_or_exit, to_yaml
from genprior.datamodules import ImageRecordDataModule, list_images, select_shard
from genprior.image_io import safe_name
from genprior.items import ImageItem
from genprior.methods import Method, method_class
from genprior.metrics import metric_range
from genprior.results import (
    ResultsWriter,
    atomic_write_text,
    drop_failed_rows,
    iter_rows,
    latest_rows,
    rank_file,
    repair_tail,
    summarize,
    to_jsonable,
    write_summary_files,
)
from genprior.tasks.defense import write_defense_report

__all__ = ["evaluate_main", "evaluate_rank", "list_subset", "make_fabric", "prepare_results",
           "run_evaluate"]

log = logging.getLogger("genprior")

# Config sections that decide an image's result: resuming into results made with other values
# would mix two experiments, so it is refused (docs/evaluation.md, "Resume").
RESULT_SECTIONS = ("prior", "task", "dgp", "dip", "mganprior", "manipulation", "metrics",
                   "defense", "inversion", "mgan_edit")
# ... except keys that only change what is displayed or saved along the way.
DISPLAY_KEYS = frozenset({"dgp.print_interval", "dgp.save_interval", "dip.show_every"})


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    return run_evaluate(sys.argv[1:] if argv is None else list(argv))


def run_evaluate(argv: Sequence[str]) -> int:
    cfg = compose_or_exit(argv, "evaluate.py")
    if cfg is None:
        return 0
    _quiet_lightning()
    fabric = make_fabric(cfg)
    env = getattr(fabric.strategy, "cluster_environment", None)
    spawns_script = (fabric.world_size > 1 and env is not None
                     and not env.creates_processes_externally
                     and type(fabric.strategy.launcher).__name__ == "_SubprocessScriptLauncher")
    if spawns_script and list(argv) != sys.argv[1:]:
        # Fabric's launcher starts the other ranks by re-running this command line, which is
        # not the arguments given here (e.g. a call from Python).
        print("evaluate.py: config error: several processes are started by re-running the "
              "command line; run evaluate.py (or genprior-evaluate, torchrun, srun) from the "
              "shell, or use trainer.strategy=ddp_spawn", file=sys.stderr)
        return 2
    # one line, no traceback (genprior.errors); on a full disk the durable rows written so far stay
    return errors.run_reported("evaluate.py",
                               lambda: int(fabric.launch(evaluate_rank, cfg, "--dry-run" in argv) or 0))


def make_fabric(cfg: DictConfig) -> Fabric:
    """Fabric from ``trainer.accelerator/devices/num_nodes/strategy``, for launching only.

    When the strategy is DDP (as "auto" becomes with several devices), it gets a process-group
    timeout of ``eval.dist_timeout_s``: ranks that finish early wait at the final barrier.
    """
    t = cfg.trainer
    devices = OmegaConf.to_container(t.devices) if OmegaConf.is_config(t.devices) else t.devices
    kwargs = {"accelerator": str(t.accelerator), "devices": devices, "num_nodes": int(t.num_nodes)}
    try:
        fabric = Fabric(strategy=str(t.strategy), **kwargs)
        if type(fabric.strategy) is DDPStrategy:
            # the same DDP (popen / spawn / fork start), with the long timeout
            start = getattr(fabric.strategy, "_start_method", "popen")
            timeout = timedelta(seconds=int(cfg.eval.dist_timeout_s))
            fabric = Fabric(strategy=DDPStrategy(start_method=start, timeout=timeout), **kwargs)
    except (ValueError, RuntimeError, TypeError) as err:
        raise SystemExit(f"evaluate.py: cannot set up trainer.accelerator/devices/num_nodes/"
                         f"strategy = {kwargs['accelerator']}/{devices}/{t.num_nodes}/"
                         f"{t.strategy}: {err}") from None
    return fabric


def evaluate_rank(fabric: Fabric, cfg: DictConfig, dry_run: bool = False) -> int:
    """What every process runs: its shard of the unfinished images, then (rank 0) the summary.
    ``dry_run``: the up-front checks (method files, data), the subset printed, nothing run."""
    rank, world = int(fabric.global_rank), int(fabric.world_size)
    _quiet_lightning()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = Path(cfg.output.dir)
    results_dir = out / str(cfg.eval.results)

    # 2. the subset: the same listing on every rank; the method (prior, VGG-16, ...) is built
    # before anything is written or the W&B run starts: a missing data or weights file ends
    # the run with its one-line error first
    source, subset = list_subset(cfg)
    method = tasks.build_method(cfg) if subset else None
    if dry_run:
        if rank == 0:
            print(f"evaluate.py --dry-run: config, data and the files of {cfg.prior.name} are in "
                  f"order; {len(subset)} image(s) in the subset, results would go to {results_dir}")
            for item in subset[:50]:
                print(f"  {item.id}  {item.path}")
            if len(subset) > 50:
                print(f"  ... and {len(subset) - 50} more")
        return 0

    # 3. rank 0 decides what is finished; an error there stops every rank, not only rank 0
    state = fabric.broadcast(decide_finished(cfg, out, results_dir, subset_ids(subset)), src=0)
    if state.get("error"):
        print(f"evaluate.py: {state['error']}", file=sys.stderr)
        return 2
    finished = set(state["finished"])

    # 4. this rank's shard of what is left, fitted B images at a time in one Trainer.fit
    todo = [item for item in subset if item.id not in finished]
    shard = select_shard(todo, rank, world)
    print(f"genprior evaluate [rank {rank}/{world}]: {len(subset)} image(s) in the subset, "
          f"{len(finished)} finished before, {len(todo)} to do, {len(shard)} on this rank "
          f"({fabric.device})", flush=True)
    report = WandbReport(cfg, out, results_dir, set(subset_ids(subset)))
    report.start(total=len(subset))
    if shard:
        fit_shard(cfg, source, shard, out, results_dir, rank, world, float(state["run_started_at"]),
                  report, method)

    # 5. merge and summarise on rank 0 once every rank is done
    try:
        fabric.barrier()
    except RuntimeError as err:  # gloo/NCCL: a rank died (e.g. its node) or the timeout passed
        print(f"evaluate.py [rank {rank}]: another rank stopped before the end, so no summary: "
              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; this rank's "
              "rows are saved: run the same command again to finish", file=sys.stderr, flush=True)
        return 1
    code = finish(cfg, out, results_dir, subset, finished, report)  # rank 0's; None elsewhere
    fabric.barrier()
    return int(code or 0)


# ------------------------------------------------------------------------------------ data
def subset_ids(items: Sequence[ImageItem]) -> list[str]:
    return [item.id for item in items]


def list_subset(cfg: DictConfig) -> tuple[ImageRecordDataModule | None, list[ImageItem]]:
    """(the datamodule, or None for the embedded sample; the subset's items, unread, in order).

    The subset is computed on the full listing (never on what is left), then ``data.limit``
    keeps its first N: so a resumed run sees the same subset.
    """
    return list_images(cfg, method_class(str(cfg.prior.kind)))  # one-line UserErrors


def build_datamodule(cfg: DictConfig) -> ImageRecordDataModule | None:
    """The datamodule ``data.kind`` names, for the configured method (genprior.datamodules:
    train.py and evaluate.py read ``data.*`` the same way)."""
    return datamodules.build_datamodule(cfg, method_class(str(cfg.prior.kind)))


def image_reader(cfg: DictConfig, source: ImageRecordDataModule | None,
                 items: list[ImageItem]) -> Callable[[ImageItem], ImageItem]:
    """How the engine reads an item of ``items`` when its batch comes up (the datamodule's
    dataset; the embedded sample is prepared as train.py prepares it)."""
    return datamodules.image_reader(cfg, method_class(str(cfg.prior.kind)), source, items)


# ------------------------------------------------------------------------------- results
def config_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The config values that decide an image's result (RESULT_SECTIONS, seed, precision)."""
    values = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in RESULT_SECTIONS if k in cfg}
    values["seed"] = int(cfg.seed)
    values["trainer.precision"] = str(cfg.trainer.precision)
    if "perf" in cfg:  # bf16 autocast changes results beyond rounding (docs/performance.md)
        values["perf.autocast"] = str(cfg.perf.autocast)
    return {k: v for k, v in _flatten(values).items() if k not in DISPLAY_KEYS}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for k, v in node.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        return flat
    return {prefix[:-1]: node}


@rank_zero_only
def decide_finished(cfg: DictConfig, out: Path, results_dir: Path, ids: list[str]) -> dict[str, Any]:
    """Rank 0's ``prepare_results``, its errors as the state's ``error`` (None on other ranks:
    they receive rank 0's state)."""
    try:
        return prepare_results(cfg, out, results_dir, ids)
    except ConfigError as err:
        return {"error": str(err)}
    except Exception as err:  # e.g. an unwritable output.dir
        return {"error": f"cannot prepare the results in {results_dir}: {type(err).__name__}: {err}"}


def prepare_results(cfg: DictConfig, out: Path, results_dir: Path, ids: list[str]) -> dict[str, Any]:
    """Rank 0, before any rank writes: check, repair and read the results; returns the
    broadcast state (finished ids, the run's start time)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    rows_before = any(True for _ in iter_rows(results_dir))
    if rows_before and not cfg.eval.resume:
        aside = results_dir.with_name(f"{results_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        results_dir.rename(aside)
        print(f"genprior evaluate: eval.resume=false: moved the earlier results to {aside}")
        rows_before = False
    results_dir.mkdir(parents=True, exist_ok=True)
    fingerprint_file = results_dir / "config_fingerprint.json"
    current = config_fingerprint(cfg)
    if rows_before and fingerprint_file.is_file():
        saved = json.loads(fingerprint_file.read_text())
        differ = sorted(k for k in current.keys() & saved.keys() if current[k] != saved[k])
        if differ:
            shown = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in differ[:5])
            raise ConfigError(
                f"{results_dir} holds results of a different configuration ({shown}"
                f"{' ...' if len(differ) > 5 else ''}); give another output.dir, or "
                "eval.resume=false to move them aside"
            )
    atomic_write_text(fingerprint_file, json.dumps(current, indent=1, default=str) + "\n")
    for path in results_dir.glob("rank*.jsonl"):
        if repair_tail(path):
            print(f"genprior evaluate: removed a row cut off by an interrupted write in {path}")
    if cfg.eval.retry_failed:
        dropped = drop_failed_rows(results_dir)
        if dropped:
            print(f"genprior evaluate: eval.retry_failed: fitting {len(dropped)} failed "
                  "image(s) again")
    wanted = set(ids)
    finished = sorted(i for i in latest_rows(iter_rows(results_dir)) if i in wanted)
    return {"finished": finished, "run_started_at": time.time(), "error": None}


def fit_shard(cfg: DictConfig, source: ImageRecordDataModule | None, shard: list[ImageItem],
              out: Path, results_dir: Path, rank: int, world: int, run_started_at: float,
              report: WandbReport, method: Method | None = None) -> None:
    """Fit this rank's images in one ``Trainer.fit``, B at a time (``trainer.batch_size``, "auto"
    resolved once for the shard); one durable row per image in ``results/rank<r>.jsonl`` as
    soon as it is done."""
    # Per-step curves go to every image's losses.csv; the run-level logger is the W&B report.
    fit_cfg = cfg.copy()
    fit_cfg.logger.kind = "none"
    listed = {item.id: item for item in shard}
    read_image = image_reader(cfg, source, shard)
    warned: dict[str, str] = {}  # what reading an image warned about goes into its row

    def read(item: ImageItem) -> ImageItem:
        item = read_image(item)
        if item.warning:
            warned[item.id] = item.warning
        return item

    host, pid, done = socket.gethostname(), os.getpid(), 0
    with ResultsWriter(rank_file(results_dir, rank)) as writer:

        def on_row(row: dict[str, Any]) -> None:
            nonlocal done
            item = listed.get(row["id"])
            class_id = item.class_id if item is not None else -1
            row.setdefault("class", class_id)
            row.setdefault("path", item.path if item is not None else "")
            if warned.get(row["id"]):
                row["warning"] = warned[row["id"]]
            row.update(label=class_id, dir=safe_name(row["id"]), rank=rank, world_size=world,
                       host=host, pid=pid, run_started_at=run_started_at, finished_at=time.time())
            writer.append(row)
            done += 1
            print(f"genprior evaluate [rank {rank}] {done}/{len(shard)} {row['id']}: "
                  f"{_brief(row)}", flush=True)

        # the W&B report follows the fit batch by batch (only a report that is on needs to)
        reporting: dict[str, Any] = {"callbacks": [report]} if report.enabled else {}
        if method is not None:
            reporting["method"] = method
        tasks.run(fit_cfg, out, items=shard, on_row=on_row, read=read, **reporting)
    report.progress(results_dir, report.subset)


def _brief(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"FAILED - {row.get('error')}"
    parts = [f"{k} {row[k]:.4g}" for k in ("psnr", "psnr_hole", "ssim", "ssim_hole", "lpips")
             if isinstance(row.get(k), float)]
    if isinstance(row.get("seconds"), float):
        parts.append(f"{row['seconds']:.1f} s")
    return ", ".join(parts) or "ok"


@rank_zero_only
def finish(cfg: DictConfig, out: Path, results_dir: Path, subset: list[ImageItem],
           finished_before: set[str], report: WandbReport) -> int:
    """Rank 0: merged ``results.jsonl``, summary files and printout, the W&B report."""
    best = latest_rows(iter_rows(results_dir))
    rows = [best[i.id] for i in subset if i.id in best]
    atomic_write_text(out / "results.jsonl",
                      "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))
    ok = sum(r.get("status") == "ok" for r in rows)
    counts = {
        "subset": len(subset),
        "finished": len(rows),
        "ok": ok,
        "failed": len(rows) - ok,
        "skipped": len(finished_before),  # finished before this run
        "this_run": len(rows) - len(finished_before),
        "missing": len(subset) - len(rows),
    }
    stats = summarize(rows, metric_range)  # metrics, final losses, seconds; CIs in range
    title = f"{cfg.prior.name} / {cfg.task.name} on {len(subset)} image(s)"
    markdown = write_summary_files(out, stats, counts, title)
    print("\n" + markdown, flush=True)
    if counts["failed"]:
        print("failed images:")
        for r in rows:
            if r.get("status") != "ok":
                print(f"  {r['id']}: {r.get('error')}")
    print(f"results: {(out / 'results.jsonl').resolve()}\nsummary: {(out / 'summary.md').resolve()}")
    if str(cfg.task.name) == "defense":  # the robustness report (docs/defense.md)
        write_defense_report(cfg, out, rows, report)
    try:
        report.finish(rows, stats, counts, out)
    except Exception as err:  # the results and summary are written; W&B is a copy
        print(f"genprior evaluate: the W&B report failed: {type(err).__name__}: {err}",
              file=sys.stderr)
    if counts["missing"]:
        print(f"genprior evaluate: {counts['missing']} image(s) have no result (a rank stopped "
              "early?); run the same command again to finish them", file=sys.stderr)
        return 1
    return 0 if ok or not rows else 1


def _quiet_lightning() -> None:
    # only where Lightning warns, as engine.make_trainer does: the same words from any other
    # library still show
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*",
                    ".*module\\(s\\) in eval mode.*"):
        warnings.filterwarnings("ignore", pattern, module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
