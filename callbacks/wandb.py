"""W&B: the loggers' run for train.py, and the report of an evaluation (rank 0 only).

The run is offline unless the user is logged in (``resolve_mode``); the API key is never read
into logs, configs or the mirror.

The report of an evaluation (``WandbReport``): evaluate.py makes one on every rank and passes
it to the fit of the rank's shard as a callback, but only rank 0 touches W&B (its methods are
Lightning's ``rank_zero_only``). Other ranks' rows reach rank 0 through the results files,
which rank 0 reads (after each of its own batches for the progress curves, and after the final
barrier for the report). What is logged:

- the resolved config as the run config (at start);
- ``progress/*``: images finished / ok / failed and running means of the metrics (while running);
- ``stages/<id>``: the stage sheet (``stages.png``: observation, then the result at the end of
  every stage) of the first ``eval.wandb_sheets_first_k`` images of the subset that have one;
- ``results``: a ``wandb.Table`` with one row per image: id, class, status, error, thumbnails of
  the observation and the result, and every metric;
- the summary: ``mean/<m>``, ``std/<m>``, ``ci95_low/<m>``, ``ci95_high/<m>``, ``n/<m>`` for
  every metric, and ``images/<count>``.

Everything logged is also written, as plain JSON, to
``<output.dir>/wandb_mirror.json`` (image cells as file paths), so that tests and scripts can
check a run without W&B.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from genprior.results import MetricStats, atomic_write_text, iter_rows, latest_rows, to_jsonable

__all__ = ["WandbReport", "make_wandb_logger", "resolve_mode", "wandb_logged_in"]


def wandb_logged_in() -> bool:
    """True if an API key is available (env var or ~/.netrc entry), without reading it out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if wandb_logged_in() else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode must be auto, online, offline or disabled, got {mode!r}")
    return mode


def make_wandb_logger(cfg: DictConfig, out: Path) -> Any:
    """Lightning's WandbLogger for a train.py run, its files under ``out``."""
    return WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, save_dir=str(out),
                       mode=resolve_mode(str(cfg.logger.mode)),
                       config=OmegaConf.to_container(cfg, resolve=True))


class WandbReport(L.Callback):
    """Rank-zero W&B run of one evaluate.py invocation (a no-op unless ``logger.kind=wandb``).

    evaluate.py calls ``start`` before the fit of its shard, ``progress`` once more after it
    (images that could not be read after the last batch have rows but no batch of their own),
    and ``finish`` after the final barrier, with every rank's rows. In between, as a callback
    of that fit, it logs the progress of the whole evaluation (every rank's rows in
    ``results_dir``, counted within ``subset``) after every batch.
    """

    def __init__(self, cfg: DictConfig, out: str | Path, results_dir: Path | None = None,
                 subset: set[str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.out = Path(out)
        self.results_dir = results_dir
        self.subset = subset or set()
        self.enabled = str(cfg.logger.kind) == "wandb"
        self.sheets_first_k = int(cfg.eval.wandb_sheets_first_k)
        self.thumbnail = int(cfg.eval.wandb_thumbnail_size)
        self.run: Any = None
        self.total = 0
        self.mirror: dict[str, Any] = {}

    @property
    def mirror_path(self) -> Path:
        return self.out / "wandb_mirror.json"

    @rank_zero_only
    def start(self, total: int) -> None:
        if not self.enabled:
            return
        import wandb  # optional heavy dependency, only for logger.kind=wandb

        mode = resolve_mode(str(self.cfg.logger.mode))
        if mode == "disabled":
            self.enabled = False
            return
        self.total = total
        self.out.mkdir(parents=True, exist_ok=True)
        config = OmegaConf.to_container(self.cfg, resolve=True)
        # A sweep agent sets WANDB_RUN_ID/WANDB_SWEEP_ID in the environment; wandb.init reads them.
        try:
            self.run = wandb.init(
                project=str(self.cfg.logger.project), entity=self.cfg.logger.entity,
                dir=str(self.out), mode=mode, config=config, job_type="evaluate",
                group=self.out.resolve().name,
            )
        except Exception as err:  # W&B trouble must not cost an evaluation of GPU-days
            rank_zero_warn(f"W&B report disabled, wandb.init failed: {err}")
            self.enabled = False
            return
        run_dir = Path(self.run.dir).parent  # <out>/wandb/<offline-|>run-<time>-<id>
        self.mirror = {
            "run": {"id": self.run.id, "project": str(self.cfg.logger.project), "mode": mode,
                    "dir": str(run_dir)},
            "config": config,
            "history": [],
            "images": [],
            "table": None,
            "summary": {},
        }
        self._write_mirror()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.results_dir is not None:  # a batch of images is done
            self.progress(self.results_dir, self.subset)

    @rank_zero_only
    def progress(self, results_dir: Path, subset: set[str]) -> None:
        """Counts and running means over every rank's rows so far (logged when they changed)."""
        if self.run is None:
            return
        rows = [r for i, r in latest_rows(iter_rows(results_dir)).items() if i in subset]
        ok = [r for r in rows if r.get("status") == "ok"]
        values: dict[str, float] = {
            "progress/finished": len(rows), "progress/ok": len(ok),
            "progress/failed": len(rows) - len(ok),
            "progress/fraction": len(rows) / max(1, self.total),
        }
        for key in ("psnr", "ssim", "lpips", "seconds"):
            vals = [float(r[key]) for r in ok if isinstance(r.get(key), int | float)]
            if vals:
                values[f"running_mean/{key}"] = math.fsum(vals) / len(vals)
        if self.mirror["history"] and self.mirror["history"][-1] == values:
            return
        try:
            self.run.log(values)
        except Exception as err:
            rank_zero_warn(f"W&B progress not logged: {err}")
            return
        self.mirror["history"].append(values)
        self._write_mirror()

    @rank_zero_only
    def finish(self, rows: list[dict[str, Any]], stats: list[MetricStats],
               counts: dict[str, int], out: Path) -> None:
        """Stage sheets, the per-image table and the summary; closes the run."""
        if self.run is None:
            return
        import wandb  # optional heavy dependency, only for logger.kind=wandb

        logged: dict[str, Any] = {}
        for row in rows:
            if len(self.mirror["images"]) >= self.sheets_first_k:
                break
            sheet = self.out / str(row.get("dir", row["id"])) / "stages.png"
            if row.get("status") == "ok" and sheet.is_file():
                key = f"stages/{row['id']}"
                logged[key] = wandb.Image(str(sheet), caption=f"{row['id']}: observation, then "
                                                             "the result after every stage")
                self.mirror["images"].append({"key": key, "path": str(sheet)})
        metrics = [s.metric for s in stats]
        columns = ["id", "class", "status", "error", "observation", "result", *metrics]
        table = wandb.Table(columns=columns)
        mirror_rows = []
        for row in rows:
            folder = self.out / str(row.get("dir", row["id"]))
            cells: list[Any] = [row["id"], row.get("class"), row.get("status"), row.get("error")]
            mirror_cells: list[Any] = list(cells)
            for name in ("observation", "result"):
                image = self._thumbnail(folder / f"{name}.png")
                cells.append(None if image is None else wandb.Image(image, caption=row["id"]))
                mirror_cells.append(None if image is None else
                                    {"_type": "image", "path": str(folder / f"{name}.png"),
                                     "size": list(image.size)})
            values = [row.get(m) if isinstance(row.get(m), int | float) else None for m in metrics]
            table.add_data(*cells, *values)
            mirror_rows.append(mirror_cells + values)
        logged["results"] = table
        self.run.log(logged)
        self.mirror["table"] = {"key": "results", "columns": columns, "rows": mirror_rows}

        summary: dict[str, Any] = {f"images/{k}": v for k, v in counts.items()}
        for s in stats:
            summary.update({f"mean/{s.metric}": s.mean, f"std/{s.metric}": s.std,
                            f"ci95_low/{s.metric}": s.ci95_low,
                            f"ci95_high/{s.metric}": s.ci95_high, f"n/{s.metric}": s.n})
        summary = {k: v for k, v in summary.items()
                   if not (isinstance(v, float) and not math.isfinite(v))}
        self.run.summary.update(summary)
        self.mirror["summary"] = summary
        self._write_mirror()
        self.run.finish()
        self.run = None

    @rank_zero_only
    def log_table(self, key: str, columns: list[str], data: list[list[Any]],
                  summary: dict[str, Any] | None = None) -> None:
        """One more table (and summary values) on the run, e.g. task=defense's accuracy table;
        call before ``finish``."""
        if self.run is None:
            return
        import wandb  # optional heavy dependency, only for logger.kind=wandb

        self.run.log({key: wandb.Table(columns=columns, data=data)})
        if summary:
            self.run.summary.update(summary)
        self.mirror.setdefault("tables", {})[key] = {"columns": columns, "rows": data,
                                                     "summary": summary or {}}
        self._write_mirror()

    def _thumbnail(self, path: Path) -> Any:
        if not path.is_file():
            return None
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((self.thumbnail, self.thumbnail))
            return img

    def _write_mirror(self) -> None:
        atomic_write_text(self.mirror_path,
                          json.dumps(to_jsonable(self.mirror), indent=1) + "\n")
