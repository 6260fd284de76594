"""``evaluate.py``: run a task and prior over a dataset subset, on one GPU or many, resumably.

Reads top to bottom like the evaluation (design and reasons: docs/evaluation.md):

1. Compose the config and start the processes with Lightning Fabric (its own launcher for
   ``trainer.devices=N``, or the processes torchrun / srun started; rank and world size come
   from Lightning's cluster environments). Fabric is used for launching, ranks, one broadcast
   and barriers only: no module is ever wrapped in DDP, so images on different ranks never
   share gradients (../shared/DESIGN.md, "The trap in multi-GPU").
2. Every rank lists the same subset of the data source.
3. Rank 0 reads the finished ids from the results folder and broadcasts them.
4. Every rank removes the finished ids, takes its contiguous shard, and fits it batch by batch
   on its own device (a Lightning Trainer per batch, as train.py), appending one durable row
   per finished image to ``<output.dir>/results/rank<r>.jsonl``.
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
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from genprior.config import ConfigError, compose_or_exit, to_yaml
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

__all__ = ["evaluate_rank", "list_subset", "make_fabric", "prepare_results", "run_evaluate"]

log = logging.getLogger("genprior")

# Config sections that decide an image's result: resuming into results made with other values
# would mix two experiments, so it is refused (docs/evaluation.md, "Resume").
RESULT_SECTIONS = ("prior", "task", "dgp", "dip", "mganprior", "manipulation", "metrics",
                   "defense")
# ... except keys that only change what is displayed or saved along the way.
DISPLAY_KEYS = frozenset({"dgp.print_interval", "dgp.save_interval", "dip.show_every"})


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
    return int(fabric.launch(evaluate_rank, cfg) or 0)


def make_fabric(cfg: DictConfig) -> Any:
    """Fabric from ``trainer.accelerator/devices/num_nodes/strategy``, for launching only.

    When the strategy is DDP (as "auto" becomes with several devices), it gets a process-group
    timeout of ``eval.dist_timeout_s``: ranks that finish early wait at the final barrier.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

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


def evaluate_rank(fabric: Any, cfg: DictConfig) -> int:
    """What every process runs: its shard of the unfinished images, then (rank 0) the summary."""
    import lightning as L

    from genprior.callbacks.wandb_report import WandbReport

    rank, world = int(fabric.global_rank), int(fabric.world_size)
    _quiet_lightning()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = Path(cfg.output.dir)
    results_dir = out / str(cfg.eval.results)

    # 2. the subset: the same listing on every rank
    source, subset = list_subset(cfg)

    # 3. rank 0 decides what is finished; an error there stops every rank, not only rank 0
    state: dict[str, Any] = {}
    if rank == 0:
        try:
            state = prepare_results(cfg, out, results_dir, [item.id for item in subset])
        except ConfigError as err:
            state = {"error": str(err)}
        except Exception as err:  # e.g. an unwritable output.dir
            state = {"error": f"cannot prepare the results in {results_dir}: "
                              f"{type(err).__name__}: {err}"}
    state = fabric.broadcast(state, src=0)
    if state.get("error"):
        print(f"evaluate.py: {state['error']}", file=sys.stderr)
        return 2
    finished = set(state["finished"])

    # 4. this rank's shard of what is left, fitted batch by batch
    from genprior.datamodules import select_shard

    todo = [item for item in subset if item.id not in finished]
    shard = select_shard(todo, rank, world)
    print(f"genprior evaluate [rank {rank}/{world}]: {len(subset)} image(s) in the subset, "
          f"{len(finished)} finished before, {len(todo)} to do, {len(shard)} on this rank "
          f"({fabric.device})", flush=True)
    report = WandbReport(cfg, out)
    report.start(total=len(subset))
    if shard:
        fit_shard(cfg, source, shard, out, rank_file(results_dir, rank), rank, world,
                  float(state["run_started_at"]), report, results_dir, set(subset_ids(subset)))

    # 5. merge and summarise on rank 0 once every rank is done
    fabric.barrier()
    code = 0
    if rank == 0:
        code = finish(cfg, out, results_dir, subset, finished, report)
    fabric.barrier()
    return code


# ------------------------------------------------------------------------------------ data
def subset_ids(items: Sequence[Any]) -> list[str]:
    return [item.id for item in items]


def list_subset(cfg: DictConfig) -> tuple[Any, list[Any]]:
    """(the datamodule, or None for the embedded sample; the subset's items in order).

    The subset is computed on the full listing (never on what is left), then ``data.limit``
    keeps its first N: so a resumed run sees the same subset.
    """
    from genprior.datamodules import ImageItem

    dm = build_datamodule(cfg)
    if dm is None:
        items = [ImageItem("astronaut", "skimage.data.astronaut", int(cfg.data.class_id))]
    else:
        try:
            items = dm.select_items()
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"evaluate.py: data error: {err}") from None
    if cfg.data.limit is not None:
        items = items[: int(cfg.data.limit)]
    return dm, items


def build_datamodule(cfg: DictConfig) -> Any:
    """The datamodule ``data.kind`` names (rank 0 of 1: evaluate shards the list itself)."""
    from genprior.datamodules import ImageFolderDataModule, ImageNetValDataModule, LSUNDataModule
    from genprior.factory import _resolution

    d = cfg.data
    kind = str(d.kind)
    if kind == "auto" and str(d.source) == "sample":
        return None
    spec = OmegaConf.to_container(d.subset, resolve=True)
    subset = {k: v for k, v in spec.items() if v is not None} or None  # type: ignore[union-attr]
    common: dict[str, Any] = {
        "subset": subset, "batch_size": _fixed_batch_size(cfg),
        "num_workers": int(d.num_workers), "rank": 0, "world_size": 1,
    }
    preprocessing = _preprocessing(cfg)
    if preprocessing is not None:
        common["preprocessing"] = preprocessing
    n_classes = int(cfg.prior.n_classes) if cfg.prior.kind == "biggan" else None
    resolution = _resolution(cfg)
    if kind in ("auto", "image", "folder", "list"):
        return ImageFolderDataModule(
            str(d.source), resolution, root=d.root, kind=kind, default_class=int(d.class_id),
            n_classes=n_classes, **common,
        )
    if kind == "imagenet_val":
        return ImageNetValDataModule(
            str(d.root or ""), resolution, labels=d.labels, devkit_meta=d.devkit_meta,
            n_classes=n_classes, **common,
        )
    if kind == "lsun":
        if not d.lmdb:
            raise SystemExit("evaluate.py: data.kind=lsun needs data.lmdb=<category>_<split>_lmdb")
        return LSUNDataModule(str(d.lmdb), resolution, **common)
    raise SystemExit(f"evaluate.py: config error: data.kind must be auto, image, folder, list, "
                     f"imagenet_val or lsun, got {kind!r}")


def _preprocessing(cfg: DictConfig) -> str | None:
    if cfg.data.preprocessing:
        return str(cfg.data.preprocessing)
    # As train.py: DIP fits images at their own size, PGGAN uses its LSUN recipe.
    return {"dip": "none", "pggan": "pggan"}.get(str(cfg.prior.kind))


def records_for(cfg: DictConfig, source: Any, items: list[Any]) -> Any:
    """Lazily read records (image, class, id, path, error) of ``items``."""
    if source is not None:
        return source.make_dataset(items)
    from genprior.factory import load_items

    sample = load_items(cfg)[0]
    return [{"image": sample.image, "class": sample.class_id, "id": sample.id,
             "path": sample.path, "error": "", "warning": ""}]


def _as_list(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return records


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


def fit_shard(cfg: DictConfig, source: Any, shard: list[Any], out: Path, path: Path, rank: int,
              world: int, run_started_at: float, report: Any, results_dir: Path,
              subset: set[str]) -> None:
    """Fit this rank's images B at a time; one durable row per image as soon as it is done."""
    from torch.utils.data import DataLoader

    from genprior.callbacks.outputs import _safe
    from genprior.factory import build_runner
    from genprior.train import ImageItem

    # Per-step curves go to every image's losses.csv; the run-level logger is the W&B report.
    runner_cfg = cfg.copy()
    runner_cfg.logger.kind = "none"
    runner = build_runner(runner_cfg)
    records = records_for(cfg, source, shard)
    B = _shard_batch_size(cfg, runner, records)
    runner_cfg.trainer.batch_size = B  # resolved once: run_batches must not probe again
    loader = DataLoader(records, batch_size=B, shuffle=False,
                        num_workers=int(cfg.data.num_workers), collate_fn=_as_list)
    host, pid, done = socket.gethostname(), os.getpid(), 0
    with ResultsWriter(path) as writer:
        for records in loader:
            items = [ImageItem(id=r["id"], path=r["path"],
                               image=None if r["error"] else r["image"],
                               class_id=int(r["class"]), error=r["error"] or None)
                     for r in records]
            rows = runner.run(items, out)
            by_id = {r["id"]: r for r in records}
            for row in rows:
                record = by_id.get(row["id"], {})
                row.setdefault("class", int(record.get("class", -1)))
                row.setdefault("path", record.get("path", ""))
                if record.get("warning"):
                    row["warning"] = record["warning"]
                row.update(label=int(record.get("class", -1)), dir=_safe(row["id"]), rank=rank,
                           world_size=world, host=host, pid=pid,
                           run_started_at=run_started_at, finished_at=time.time())
                writer.append(row)
                done += 1
                print(f"genprior evaluate [rank {rank}] {done}/{len(shard)} {row['id']}: "
                      f"{_brief(row)}", flush=True)
            report.progress(results_dir, subset)


def _fixed_batch_size(cfg: DictConfig) -> int:
    value = cfg.trainer.batch_size
    return 1 if str(value) == "auto" else max(1, int(value))


def _shard_batch_size(cfg: DictConfig, runner: Any, records: Any) -> int:
    """trainer.batch_size for this rank; "auto" (the default) measures the GPU (genprior.perf)."""
    from genprior.perf import batch_size_for
    from genprior.train import ImageItem

    # The GPU probe (batch_size_for decides whether to run it) fits the first readable image.
    first = next((r for r in records if not r["error"]), None)
    items = [ImageItem(id=first["id"], path=first["path"], image=first["image"],
                       class_id=int(first["class"]))] * len(records) if first is not None else []
    return batch_size_for(cfg, items, getattr(runner, "prepare", None))


def _brief(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"FAILED - {row.get('error')}"
    parts = [f"{k} {row[k]:.4g}" for k in ("psnr", "ssim", "lpips") if isinstance(row.get(k), float)]
    if isinstance(row.get("seconds"), float):
        parts.append(f"{row['seconds']:.1f} s")
    return ", ".join(parts) or "ok"


def finish(cfg: DictConfig, out: Path, results_dir: Path, subset: list[Any],
           finished_before: set[str], report: Any) -> int:
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
    stats = summarize(rows)
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
        from genprior.defense import write_defense_report

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
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
