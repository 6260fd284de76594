"""Callbacks that turn a fit into files and logged numbers.

- ``StageSnapshots``: the reference's progress sheet (the observation, then x at i = 0 and every
  print_interval iterations) plus x at the end of every stage; written per image at fit end.
- ``LossLogger``: batch-mean losses through Lightning's loggers every ``log_every_n_steps``,
  and restoration metrics (PSNR, SSIM...) only on those steps: the reference computes them on
  the CPU at every step, which costs more than the optimisation on a GPU.
- ``ImageOutputs``: per image, result / observation / target PNGs, ``losses.csv`` (one row per
  step), ``loss_curve.png`` and ``metrics.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from genprior.image_io import save_image

log = logging.getLogger("genprior")


def image_grid(frames: list[Tensor], ncol: int | None = None, normalize: bool = True) -> Tensor:
    """Tile [3,H,W] frames (any range) into one image; min-max normalised like the reference."""
    n = len(frames)
    ncol = ncol or max(1, math.isqrt(n))
    nrow = math.ceil(n / ncol)
    _, h, w = frames[0].shape
    pad = 2
    grid = torch.zeros(3, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for k, f in enumerate(frames):
        r, c = divmod(k, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = f.float().cpu()
    if normalize:
        lo, hi = grid.min(), grid.max()
        grid = (grid - lo) / (hi - lo).clamp(min=1e-8)
    return grid


class StageSnapshots(L.Callback):
    """Frames of every image: progress sheet, stage ends, and (optionally) every save_interval.

    ``save_interval`` is the reference's per-stage list: x is saved at i = 0 and every
    save_interval[s] iterations of stage s, as ``<out>/<id>/steps/s<stage>_i<iteration>.png``.
    """

    def __init__(self, print_interval: int = 100, save_interval: list[int] | None = None,
                 out_dir: Path | None = None) -> None:
        self.print_interval = print_interval
        self.save_interval = list(save_interval) if save_interval else None
        self.out_dir = out_dir
        self.progress_frames: dict[int, list[Tensor]] = {}
        self.stage_frames: dict[int, list[Tensor]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        method = pl_module.method
        obs = method.observation_for_display()
        self.progress_frames = {b: [obs[b].cpu()] for b in range(method.batch_size)}
        self.stage_frames = {b: [obs[b].cpu()] for b in range(method.batch_size)}
        self._position: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        progress = getattr(pl_module.method, "progress", None)
        if progress is not None:
            # (stage, iteration) of every image for the step about to run
            self._position = list(zip(progress.stage, progress.iteration))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        x, record = pl_module.last_x, pl_module.last_record
        if x is None or not self._position:
            return
        x = pl_module.method.display(x)
        for b, was_active in enumerate(record.active.tolist()):
            if not was_active:
                continue
            stage, i = self._position[b]
            if i == 0 or (i + 1) % self.print_interval == 0:
                self.progress_frames[b].append(x[b].cpu())
            if pl_module.last_stage_ended[b]:
                self.stage_frames[b].append(x[b].cpu())
            if self.save_interval and self.out_dir is not None and stage < len(self.save_interval):
                every = self.save_interval[stage]
                if i == 0 or (every > 0 and i % every == 0):
                    image_id = pl_module.method.ids[b]
                    save_image(x[b], self.out_dir / _safe(image_id) / "steps" / f"s{stage + 1}_i{i:05d}.png",
                               value_range=(0.0, 1.0))


class LossLogger(L.Callback):
    def __init__(self, log_every_n_steps: int = 10, with_metrics: bool = True) -> None:
        self.every = max(1, log_every_n_steps)
        self.with_metrics = with_metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        done = pl_module.method.progress.all_done()
        if step % self.every and not done:
            return
        record = pl_module.last_record
        active = record.active.to(record.total.device)
        if not bool(active.any()):
            return
        values = {k: float(v[active].mean()) for k, v in record.reported().items()}
        if self.with_metrics:
            metrics = pl_module.method.metrics(pl_module.last_x)
            values.update({k: float(v[active.to(v.device)].mean()) for k, v in metrics.items()})
        stage = max(pl_module.method.progress.stage) + 1
        values["stage"] = float(min(stage, len(pl_module.method.progress.stages)))
        for k, v in values.items():
            pl_module.log(f"train/{k}", v, prog_bar=k in ("loss", "psnr", "stage"),
                          on_step=True, on_epoch=False, batch_size=pl_module.method.batch_size)


class ImageOutputs(L.Callback):
    """Writes every image's files into ``<out>/<image id>/`` when its fit ends."""

    def __init__(self, out_dir: Path, snapshots: StageSnapshots | None = None,
                 extra_metrics: dict[str, Any] | None = None, labels: list[int] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.snapshots = snapshots
        self.extra_metrics = extra_metrics or {}
        self.labels = labels
        self.results: list[dict[str, Any]] = []

    def _extra_scores(self, result: Tensor, target: Tensor | None) -> dict[str, Tensor]:
        """Per-image ``metrics.extra`` values (LPIPS, NIQE, top1/top5, colorization AuC) of the
        displayed result in [0, 1] against the displayed target and the images' classes."""
        if not self.extra_metrics:
            return {}
        from genprior.metrics_extra import score_batch

        n = result.shape[0]
        labels = torch.tensor(self.labels if self.labels and len(self.labels) == n else [-1] * n)
        scores: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, metric in self.extra_metrics.items():
                try:
                    metric.to(result.device)
                    scores.update(score_batch({name: metric}, result.float(),
                                              None if target is None else target.float(), labels))
                except Exception as err:  # a metric that cannot score this task costs no image
                    keys = getattr(metric, "keys", (name,))
                    log.warning("metric %r cannot score these images (%s: %s); reported as NaN",
                                name, type(err).__name__, err)
                    scores.update({k: torch.full((n,), math.nan) for k in keys})
        return scores

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        method = pl_module.method
        final = method.final_output()
        metrics = method.metrics(final)
        obs_disp = method.observation_for_display()
        target_disp = method.clean_for_display()
        result_disp = method.display(final)
        extra_scores = self._extra_scores(result_disp, target_disp)
        records = pl_module.records
        for b, image_id in enumerate(method.ids):
            folder = self.out_dir / _safe(image_id)
            folder.mkdir(parents=True, exist_ok=True)
            save_image(result_disp[b], folder / "result.png", value_range=(0.0, 1.0))
            save_image(obs_disp[b], folder / "observation.png", value_range=(0.0, 1.0))
            if target_disp is not None:
                save_image(target_disp[b], folder / "target.png", value_range=(0.0, 1.0))
            extra = method.extra_images(final, b)
            for name, img in extra.items():
                save_image(img, folder / f"{name}.png", value_range=(0.0, 1.0))
            if self.snapshots is not None:
                frames = self.snapshots.stage_frames.get(b, [])
                if frames:
                    save_image(image_grid(frames, ncol=len(frames), normalize=False), folder / "stages.png", value_range=(0.0, 1.0))
                frames = self.snapshots.progress_frames.get(b, [])
                if frames:
                    save_image(image_grid(frames), folder / "progress.png", value_range=(0.0, 1.0))
            rows = _loss_rows(records, b)
            _write_csv(folder / "losses.csv", rows)
            _plot_losses(rows, folder / "loss_curve.png", title=str(image_id))
            failed = pl_module.failed.get(b)
            row = {
                "id": image_id,
                "status": "failed" if failed else "ok",
                "error": failed,
                "steps": len(rows),
                **{k: float(v[b]) for k, v in metrics.items()},
                **{k: float(v[b]) for k, v in extra_scores.items()},
                **method.observation_metrics(b),
                **{f"final_{k}": r[k] for r in rows[-1:] for k in r if k != "step"},
                **method.image_info(b),
            }
            (folder / "metrics.json").write_text(json.dumps(row, indent=2, default=str))
            self.results.append(row)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "image"


def _loss_rows(records: list[Any], b: int) -> list[dict[str, float]]:
    rows = []
    if not records:
        return rows
    keys = list(records[0].reported().keys())
    stacked = {k: torch.stack([r.reported()[k] for r in records]).cpu() for k in keys}
    active = torch.stack([r.active for r in records]).cpu()
    step = 0
    for t in range(active.shape[0]):
        if not bool(active[t, b]):
            continue
        step += 1
        rows.append({"step": step, **{k: float(stacked[k][t, b]) for k in keys}})
    return rows


def _write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as fh:
        if not rows:
            fh.write("step\n")
            return
        writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def _plot_losses(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if rows:
        steps = [r["step"] for r in rows]
        for key in rows[0]:
            if key == "step":
                continue
            values = [r[key] for r in rows]
            if all(v == 0 for v in values):
                continue
            ax.plot(steps, values, label=key, linewidth=1)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("iteration")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
