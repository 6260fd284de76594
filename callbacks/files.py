"""Per-image files of a fit, written when its batch ends (README "Outputs").

- ``ImageFiles``: result / observation / target PNGs, the method's extra images
  (colorization2.png, ...), and the stage and progress sheets of ``StageSnapshots``.
- ``LossFiles``: every step's losses as ``losses.csv`` and ``loss_curve.png``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch

from genprior.image_io import image_grid, safe_name, save_image

__all__ = ["ImageFiles", "LossFiles", "loss_rows"]


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
                frames = self.snapshots.stage_frames.get(b, [])
                if frames:
                    save_image(image_grid(frames, ncol=len(frames), normalize=False),
                               folder / "stages.png", value_range=(0.0, 1.0))
                frames = self.snapshots.progress_frames.get(b, [])
                if frames:
                    save_image(image_grid(frames), folder / "progress.png", value_range=(0.0, 1.0))


class LossFiles(L.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.aborted is not None or not pl_module.items:
            return
        for b, image_id in enumerate(pl_module.method.ids):
            folder = self.out_dir / safe_name(image_id)
            folder.mkdir(parents=True, exist_ok=True)
            rows = loss_rows(pl_module.records, b)
            _write_csv(folder / "losses.csv", rows)
            _plot_losses(rows, folder / "loss_curve.png", title=str(image_id))


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


def _plot_losses(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib  # optional heavy dependency, needed only to draw the curve

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
