"""W&B: the run of train.py and of evaluate.py, and what both log on it (rank 0 only).

Every W&B call goes through a Lightning ``WandbLogger``'s experiment (``make_wandb_logger``):
train.py's loggers hold one (``logger.kind=wandb`` gives ``[CSVLogger, WandbLogger]``),
evaluate.py's report makes its own. The run's settings (``wandb_init_args``) come, each, from a
``logger.*`` value that differs from its default, else from the W&B environment variable
(``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_NAME``, ``WANDB_TAGS``,
``WANDB_RUN_GROUP``, ``WANDB_NOTES``, ``WANDB_JOB_TYPE``, ``WANDB_DIR``), else from the default
(``logger.mode=auto``: offline unless the user is logged in; the run's folder is output.dir).
The API key is never read into logs, configs or the mirror.

``WandbReport`` is the one callback that logs a run's images and results:

- train.py (added by ``engine.output_callbacks``, with the fit's ``ResultRows``): as each stage
  of an image ends, its result then (``stage_end/<id>``); as each batch of images ends, their
  stage sheets; at the end of the fit, the results table and the summary,
  with each image's final metrics and result image;
- evaluate.py makes one on every rank and passes it to the fit of the rank's shard, but only
  rank 0 touches W&B (its methods are Lightning's ``rank_zero_only``). Other ranks' rows reach
  rank 0 through the results files, which rank 0 reads (after each of its own batches for the
  progress curves, and after the final barrier for the sheets, table and summary).

What is logged:

- the resolved config as the run config (at start);
- ``progress/*``: images finished / ok / failed and running means of the metrics (evaluate.py,
  while running);
- ``stage_end/<id>`` (train.py): the image's result at the end of each stage, logged at that
  step (W&B's step slider walks through the stages), first ``eval.wandb_sheets_first_k`` images;
- ``stages/<id>``: the stage sheet (``stages.png``: observation, then the result at the end of
  every stage) of the first ``eval.wandb_sheets_first_k`` images that have one;
- ``results``: a ``wandb.Table`` with one row per image: id, class, status, error, thumbnails of
  the observation and the result (``eval.wandb_thumbnail_size`` px), and every summarised
  column (``genprior.results.summarize``: metrics, final losses, seconds);
- the summary: ``mean/<m>``, ``std/<m>``, ``ci95_low/<m>``, ``ci95_high/<m>``, ``n/<m>`` for
  every summarised column, ``images/<count>``; for train.py also ``final/<id>/<m>`` and the
  result image ``final/<id>/result`` of every image.

The media are staged under ``<output.dir>/wandb_media/``: the thumbnails, and the table's
``run_table`` artifact (``wandb_media/data/artifacts/staging``, unless ``WANDB_DATA_DIR`` is
set), so that the output folder holds every file its offline run refers to.

Everything logged is also written, as plain JSON, to ``<output.dir>/wandb_mirror.json`` (image
cells as file paths), so that tests and scripts can check a run without W&B.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from genprior.config import ConfigError, LoggerConfig
from genprior.image_io import safe_name, save_image
from genprior.metrics import metric_range
from genprior.results import (
    MetricStats,
    atomic_write_text,
    iter_rows,
    latest_rows,
    summarize,
    to_jsonable,
)

from .rows import ResultRows
from .snapshots import StageSnapshots

__all__ = ["WANDB_ENV", "WandbReport", "make_wandb_logger", "resolve_mode", "wandb_init_args",
           "wandb_logged_in"]

#: The W&B environment variable of each run setting (``logger.<key>``; ``dir`` has no config
#: key: its default is output.dir).
WANDB_ENV: dict[str, str] = {
    "mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY",
    "name": "WANDB_NAME", "tags": "WANDB_TAGS", "group": "WANDB_RUN_GROUP",
    "notes": "WANDB_NOTES", "job_type": "WANDB_JOB_TYPE", "dir": "WANDB_DIR",
}
# WANDB_MODE's older spellings, as wandb itself reads them
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


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
    """``logger.mode`` as a W&B mode: "auto" is online when logged in, offline otherwise."""
    mode = _MODE_ALIASES.get(mode, mode)
    if mode == "auto":
        return "online" if wandb_logged_in() else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode (or WANDB_MODE) must be auto, online, offline or disabled, "
                          f"got {mode!r}")
    return mode


def wandb_init_args(cfg: DictConfig, out: str | Path,
                    defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The W&B run's settings (``wandb.init`` keywords): mode, project, entity, name, tags,
    group, notes, job_type and dir.

    Each comes from the first of: its ``logger.*`` value when that differs from LoggerConfig's
    default; its W&B environment variable (``WANDB_ENV``; ``WANDB_TAGS`` comma-separated); the
    default (LoggerConfig's, else ``defaults``: evaluate.py's job type and group; ``dir``:
    ``out``). They are all passed explicitly, so the environment is read when the run starts
    (wandb itself reads it once per process). Settings that end up None are left out.
    """
    schema, section = LoggerConfig(), cfg.logger
    args: dict[str, Any] = {}
    for key, env_name in WANDB_ENV.items():
        value = section.get(key) if key != "dir" else None
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        default = getattr(schema, key, None)
        env = os.environ.get(env_name, "").strip()
        if value is not None and value != default:
            chosen = value
        elif env:
            chosen = [t.strip() for t in env.split(",") if t.strip()] if key == "tags" else env
        elif value is not None:
            chosen = value
        elif key == "dir":
            chosen = str(out)
        else:
            chosen = (defaults or {}).get(key)
        if chosen is not None:
            args[key] = chosen
    args["mode"] = resolve_mode(str(args.get("mode", "auto")))
    return args


def make_wandb_logger(cfg: DictConfig, out: str | Path,
                      defaults: Mapping[str, Any] | None = None) -> WandbLogger:
    """Lightning's WandbLogger for a run of ``cfg`` (settings: ``wandb_init_args``), with the
    resolved config as the run config. The run starts at the first use of its experiment."""
    args = wandb_init_args(cfg, out, defaults)
    save_dir = args.pop("dir")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, config=OmegaConf.to_container(cfg, resolve=True), **args)


class WandbReport(L.Callback):
    """The W&B report of a run: a no-op unless ``logger.kind=wandb`` (and rank 0).

    train.py: ``WandbReport(cfg, out, rows=<the fit's ResultRows>, snapshots=<its
    StageSnapshots>)`` as a callback of the fit, after them;
    it uses the trainer's WandbLogger (none: it does nothing).

    evaluate.py: ``WandbReport(cfg, out, results_dir, subset)``; evaluate.py calls ``start``
    before the fit of its shard, ``progress`` once more after it (images that could not be read
    after the last batch have rows but no batch of their own), and ``finish`` after the final
    barrier, with every rank's rows. In between, as a callback of that fit, it logs the
    progress of the whole evaluation (every rank's rows in ``results_dir``, counted within
    ``subset``) after every batch.
    """

    def __init__(self, cfg: DictConfig, out: str | Path, results_dir: Path | None = None,
                 subset: set[str] | None = None, rows: ResultRows | None = None,
                 snapshots: StageSnapshots | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.out = Path(out)
        self.results_dir = results_dir
        self.subset = subset or set()
        self.results = rows  # train.py: the fit's rows, as they come
        self.enabled = str(cfg.logger.kind) == "wandb"
        self.sheets_first_k = int(cfg.eval.wandb_sheets_first_k)
        self.thumbnail = int(cfg.eval.wandb_thumbnail_size)
        self.logger: WandbLogger | None = None
        self.run: Any = None
        self.total = 0
        self.mirror: dict[str, Any] = {}
        self._rows_seen = 0
        self.snapshots = snapshots  # train.py: the fit's StageSnapshots (the stage-end frames)
        self._stage_ids: set[str] = set()  # train.py: the images whose stage ends are logged

    @property
    def mirror_path(self) -> Path:
        return self.out / "wandb_mirror.json"

    @property
    def media_dir(self) -> Path:
        """Where the run's media are staged (thumbnails), under output.dir."""
        return self.out / "wandb_media"

    # ------------------------------------------------------------------ evaluate.py
    @rank_zero_only
    def start(self, total: int) -> None:
        if not self.enabled:
            return
        self.total = total
        # one run per invocation, grouped by the output folder (a resumed evaluation's runs)
        logger = make_wandb_logger(self.cfg, self.out, defaults={
            "job_type": "evaluate", "group": self.out.resolve().name})
        # A sweep agent sets WANDB_RUN_ID/WANDB_SWEEP_ID in the environment; wandb.init reads them.
        self._open(logger)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """train.py: each image's result as each of its stages ends (``stage_end/<id>``, one
        W&B image per stage at the run's step: W&B's slider walks through the stages), for the
        first ``eval.wandb_sheets_first_k`` images of the run. The frame and its stage come from
        the fit's StageSnapshots, which runs before this callback."""
        ended = getattr(pl_module, "last_stage_ended", None)
        if self.results is None or self.run is None or self.snapshots is None or not ended or not any(ended):
            return
        self._stage_ends(pl_module, ended)

    @rank_zero_only
    def _stage_ends(self, pl_module: Any, ended: list[bool]) -> None:
        import wandb  # optional heavy dependency, only for logger.kind=wandb

        snapshots = self.snapshots
        step = int(pl_module.steps_run) - 1  # the run's step, as LossLogger logs the losses
        images: dict[str, Any] = {}
        for b, stage_ended in enumerate(ended):
            image_id = str(pl_module.method.ids[b])
            if not stage_ended or not snapshots.stage_ends.get(b) or (
                    image_id not in self._stage_ids and len(self._stage_ids) >= self.sheets_first_k):
                continue
            self._stage_ids.add(image_id)
            stage, i = snapshots.stage_ends[b][-1]
            key = f"stage_end/{image_id}"
            path = self.media_dir / safe_name(image_id) / f"stage{stage}.png"
            save_image(snapshots.stage_frames[b][-1], path, value_range=(0.0, 1.0))
            images[key] = wandb.Image(str(path), caption=f"{image_id}: {snapshots.stage_labels[b][-1]}")
            self.mirror.setdefault("stage_ends", []).append(
                {"key": key, "stage": stage, "iteration": i, "path": str(path), "step": step})
        if not images:
            return
        try:  # on Lightning's x-axis for this logger's metrics
            self.run.log({**images, "trainer/global_step": step})
        except Exception as err:  # W&B is a copy: the files are written
            rank_zero_warn(f"W&B stage images not logged: {err}")
        self._write_mirror()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.results_dir is not None:  # evaluate.py: a batch of images is done
            self.progress(self.results_dir, self.subset)
        elif self.results is not None:  # train.py
            self._batch_done()

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
        for key in ("psnr", "psnr_hole", "ssim", "ssim_hole", "lpips", "seconds"):
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
        self._report(rows, stats, counts, self._sheets(rows))
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

    # ------------------------------------------------------------------ train.py
    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.results is None or self.run is not None or not self.enabled:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if logger is not None:
            self._attach(logger)

    @rank_zero_only
    def _attach(self, logger: WandbLogger) -> None:
        self._open(logger)

    @rank_zero_only
    def _batch_done(self) -> None:
        """The stage sheets of the batch's images (train.py), as soon as their batch ends."""
        if self.run is None or self.results is None:
            return
        rows = self.results.rows[self._rows_seen:]
        self._rows_seen = len(self.results.rows)
        try:
            images = self._sheets(rows)
            if images:
                self.run.log(images)
        except Exception as err:  # W&B is a copy: the files are written
            rank_zero_warn(f"W&B stage sheets not logged: {err}")
        self._write_mirror()

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.results is not None:
            self._fit_done()

    @rank_zero_only
    def _fit_done(self) -> None:
        """train.py: the table and the summary, with every image's final metrics and result.
        The run stays open (the WandbLogger's: a manipulation logs its sheets after the fit)."""
        if self.run is None or self.results is None:
            return
        rows = list(self.results.rows)
        ok = sum(r.get("status") == "ok" for r in rows)
        counts = {"finished": len(rows), "ok": ok, "failed": len(rows) - ok}
        try:
            self._report(rows, summarize(rows, metric_range), counts, per_image=True)
        except Exception as err:  # W&B is a copy: the results are written
            rank_zero_warn(f"W&B results not logged: {err}")

    # ------------------------------------------------------------------ shared
    def _open(self, logger: WandbLogger) -> None:
        """Start (or join) the logger's run and the mirror; a disabled run turns the report off."""
        try:
            run = logger.experiment
        except Exception as err:  # W&B trouble must not cost a run of GPU-days
            rank_zero_warn(f"W&B report disabled, the W&B run could not start: {err}")
            self.enabled = False
            return
        if getattr(run, "disabled", False):  # WANDB_MODE=disabled or logger.mode=disabled
            self.enabled = False
            if self.results is None:  # evaluate.py's own run: ended, so no later logger reuses it
                run.finish()
            return
        self.logger, self.run = logger, run
        self.out.mkdir(parents=True, exist_ok=True)
        self.mirror = {
            "run": {"id": run.id, "project": run.project, "mode": str(run.settings.mode),
                    # <dir>/wandb/<offline-|>run-<time>-<id>
                    "dir": str(Path(run.dir).parent), "name": run.name,
                    "tags": list(run.tags or ()), "group": run.group, "notes": run.notes,
                    "job_type": run.job_type},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "history": [],
            "images": [],
            "table": None,
            "summary": {},
        }
        self._write_mirror()

    def _folder(self, row: dict[str, Any]) -> Path:
        return self.out / str(row.get("dir") or safe_name(row["id"]))

    def _sheets(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``stages/<id>`` images of the ok rows with a sheet, up to the first K of the run."""
        import wandb  # optional heavy dependency, only for logger.kind=wandb

        images: dict[str, Any] = {}
        for row in rows:
            if len(self.mirror["images"]) >= self.sheets_first_k:
                break
            sheet = self._folder(row) / "stages.png"
            if row.get("status") == "ok" and sheet.is_file():
                key = f"stages/{row['id']}"
                images[key] = wandb.Image(str(sheet), caption=f"{row['id']}: observation, then "
                                                            "the result after every stage")
                self.mirror["images"].append({"key": key, "path": str(sheet)})
        return images

    def _report(self, rows: list[dict[str, Any]], stats: list[MetricStats],
                counts: dict[str, int], logged: dict[str, Any] | None = None,
                per_image: bool = False) -> None:
        """The ``results`` table (with ``logged``, e.g. stage sheets) and the summary."""
        import wandb  # optional heavy dependency, only for logger.kind=wandb

        metrics = [s.metric for s in stats]
        columns = ["id", "class", "status", "error", "observation", "result", *metrics]
        table = wandb.Table(columns=columns)
        mirror_rows = []
        summary: dict[str, Any] = {f"images/{k}": v for k, v in counts.items()}
        summary_images: dict[str, Path] = {}
        for row in rows:
            folder = self._folder(row)
            cells: list[Any] = [row["id"], row.get("class"), row.get("status"), row.get("error")]
            mirror_cells: list[Any] = list(cells)
            for name in ("observation", "result"):
                thumb = self._thumbnail(folder / f"{name}.png", folder.name, name)
                cells.append(None if thumb is None else wandb.Image(str(thumb), caption=row["id"]))
                mirror_cells.append(None if thumb is None else
                                    {"_type": "image", "path": str(thumb),
                                     "source": str(folder / f"{name}.png")})
            values = [_number(row.get(m)) for m in metrics]
            table.add_data(*cells, *values)
            mirror_rows.append(mirror_cells + values)
            if per_image and row.get("status") == "ok":
                summary.update({f"final/{row['id']}/{m}": v for m, v in zip(metrics, values)
                                if v is not None})
                if (folder / "result.png").is_file():
                    summary_images[f"final/{row['id']}/result"] = folder / "result.png"
        with _staging_under(self.media_dir / "data"):
            self.run.log({**(logged or {}), "results": table})
        self.mirror["table"] = {"key": "results", "columns": columns, "rows": mirror_rows}

        for s in stats:
            summary.update({f"mean/{s.metric}": s.mean, f"std/{s.metric}": s.std,
                            f"ci95_low/{s.metric}": s.ci95_low,
                            f"ci95_high/{s.metric}": s.ci95_high, f"n/{s.metric}": s.n})
        summary = {k: v for k, v in summary.items()
                   if not (isinstance(v, float) and not math.isfinite(v))}
        images = {k: wandb.Image(str(p), caption=k.split("/")[1]) for k, p in summary_images.items()}
        self.run.summary.update({**summary, **images})
        self.mirror["summary"] = {**summary, **{k: {"_type": "image", "path": str(p)}
                                                for k, p in summary_images.items()}}
        self._write_mirror()

    def _thumbnail(self, path: Path, folder: str, name: str) -> Path | None:
        """A thumbnail of ``path``, written under ``media_dir`` (None: no such image)."""
        if not path.is_file():
            return None
        thumb = self.media_dir / folder / f"{name}.png"
        thumb.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((self.thumbnail, self.thumbnail))
            img.save(thumb)
        return thumb

    def _write_mirror(self) -> None:
        atomic_write_text(self.mirror_path,
                          json.dumps(to_jsonable(self.mirror), indent=1) + "\n")


@contextmanager
def _staging_under(data_dir: Path) -> Iterator[None]:
    """Stage the artifacts logged inside (a table's ``run_table`` artifact, with its images)
    under ``data_dir`` rather than the user's W&B data folder (~/.local/share/wandb), so that the
    output folder holds everything its offline run refers to. wandb reads only the environment
    for this (``WANDB_DATA_DIR``, when the artifact is staged); a user's own setting is kept."""
    if os.environ.get("WANDB_DATA_DIR"):
        yield
        return
    os.environ["WANDB_DATA_DIR"] = str(data_dir)
    try:
        yield
    finally:
        os.environ.pop("WANDB_DATA_DIR", None)


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None
