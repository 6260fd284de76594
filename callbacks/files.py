"""Per-image files of a fit, written when its batch ends (README "Outputs").

- ``ImageFiles``: result / observation / target PNGs, the method's extra images
  (colorization2.png, ...), and the stage and progress sheets of ``StageSnapshots``
  (``stages.png`` is labelled: "observation", "stage s (it i)", ..., "target").
- ``LossFiles``: every step's losses as ``losses.csv`` and ``loss_curve.png`` (losses on a log
  axis, PSNR in dB on a linear one, a dashed line where each stage starts).
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from genprior.image_io import image_grid, labelled_sheet, safe_name, save_image

__all__ = ["ImageFiles", "LossFiles", "loss_rows", "stage_boundaries"]


class ImageFiles(L.Callback):
    def __init__(self, out_dir: Path, snapshots: Any = None) -> None:
        self.out_dir = Path(out_dir)
        self.snapshots = snapshots

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.aborted is not None or not pl_module.items:
            return
        method, out = pl_module.method, pl_module.outputs()
        for b, image_id in enumerate(method.ids):
            folder = self.out_dir / safe_name(image_id)
            folder.mkdir(parents=True, exist_ok=True)
            save_image(out.result[b], folder / "result.png", value_range=(0.0, 1.0))
            save_image(out.observation[b], folder / "observation.png", value_range=(0.0, 1.0))
            if out.target is not None:
                save_image(out.target[b], folder / "target.png", value_range=(0.0, 1.0))
            for name, image in method.extra_images(out.final, b).items():
                save_image(image, folder / f"{name}.png", value_range=(0.0, 1.0))
            if self.snapshots is not None:
                frames = list(self.snapshots.stage_frames.get(b, []))
                if frames:
                    labels = list(self.snapshots.stage_labels.get(b, []))
                    if out.target is not None:
                        frames.append(out.target[b])
                        labels.append("target")
                    labelled_sheet(frames, len(frames), labels=labels, title=str(image_id)).save(
                        folder / "stages.png")
                frames = self.snapshots.progress_frames.get(b, [])
                if frames:
                    save_image(image_grid(frames), folder / "progress.png", value_range=(0.0, 1.0))


class LossFiles(L.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.stages: dict[int, list[int]] = {}  # per image, the stage (0-based) of each step it took
        self._stage_now: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.aborted is not None or not pl_module.items:
            self._stage_now = []
            return
        progress = pl_module.method.progress
        if batch_idx == 0:
            self.stages = {b: [] for b in range(progress.batch_size)}
        self._stage_now = list(progress.stage)  # of the step about to run

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        record = pl_module.last_record
        if record is None or not self._stage_now:
            return
        for b, was_active in enumerate(record.active.tolist()):
            if was_active:
                self.stages[b].append(self._stage_now[b])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.aborted is not None or not pl_module.items:
            return
        for b, image_id in enumerate(pl_module.method.ids):
            folder = self.out_dir / safe_name(image_id)
            folder.mkdir(parents=True, exist_ok=True)
            rows = loss_rows(pl_module.records, b)
            _write_csv(folder / "losses.csv", rows)
            stages = self.stages.get(b, [])
            if len(stages) == len(rows):
                plotted = [{**r, "stage": s + 1} for r, s in zip(rows, stages)]
            else:  # a batch fitted without this callback's hooks (no stage lines then)
                plotted = rows
            _plot_losses(plotted, folder / "loss_curve.png", title=str(image_id))


def loss_rows(records: list[Any], b: int) -> list[dict[str, float]]:
    """Image b's reported losses at each step it took (step counts from 1)."""
    rows: list[dict[str, float]] = []
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


def stage_boundaries(rows: list[dict[str, float]]) -> list[tuple[float, int]]:
    """Where a new stage starts in loss rows that carry a 1-based ``stage``: (x, stage) pairs,
    x half-way between the last step of one stage and the first of the next. An image whose
    stage stopped early (DGP's stop_mse) starts its next stage sooner, so the lines come from
    the rows, not from the schedule."""
    out: list[tuple[float, int]] = []
    for prev, row in itertools.pairwise(rows):
        if "stage" in row and row["stage"] != prev.get("stage"):
            out.append(((prev["step"] + row["step"]) / 2, int(row["stage"])))
    return out


def _is_db(key: str) -> bool:
    return "psnr" in key  # PSNR columns (DIP's psnr_gt, psnr_noisy, ...) are in dB, the rest are losses


def _plot_losses(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib  # optional heavy dependency, needed only to draw the curve

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if rows:
        steps = [r["step"] for r in rows]
        keys = [k for k in rows[0] if k not in ("step", "stage")]
        db_axis, loss_values = None, []
        lines = []
        for k, key in enumerate(keys):
            values = [r[key] for r in rows]
            if all(v == 0 for v in values):
                continue
            color = f"C{k % 10}"  # one colour cycle over both axes
            if _is_db(key):
                db_axis = db_axis or ax.twinx()
                lines += db_axis.plot(steps, values, label=f"{key} (dB)", linewidth=1, linestyle=":", color=color)
            else:
                lines += ax.plot(steps, values, label=key, linewidth=1, color=color)
                loss_values += [v for v in values if math.isfinite(v)]
        # A log axis only when every finite loss is positive: a NaN step (the fit stopped
        # there) or an objective of either sign (activation maximisation) gets a linear one.
        if loss_values and min(loss_values) > 0:
            ax.set_yscale("log")
            ax.set_ylabel("loss (log scale)", fontsize=8)
        elif loss_values:
            ax.set_ylabel("loss", fontsize=8)
        if db_axis is not None:
            db_axis.set_ylabel("PSNR (dB)", fontsize=8)
        for x, stage in stage_boundaries(rows):
            ax.axvline(x, color="0.5", linewidth=0.8, linestyle="--")
            ax.text(x, 0.99, f" stage {stage}", transform=ax.get_xaxis_transform(), fontsize=6,
                    color="0.3", va="top", ha="left")
        if lines:  # on the top axis, so that no curve is drawn over it
            (db_axis or ax).legend(lines, [line.get_label() for line in lines], fontsize=7)
    ax.set_xlabel("iteration")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
