"""``StageProgressBar``: which images are being fitted and where they are in the method's stages.

Lightning's bar counts epochs ("Epoch 0"); a genprior epoch is one batch of images
(docs/architecture.md), so the bar says "batch k/K (images a-b of N)" instead, and its
postfix keeps ``stage s/S it i/N`` of the slowest image still running and ``done d/B``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

__all__ = ["StageProgressBar", "batch_description"]


def batch_description(batch: int, batches: int, first: int, last: int, total: int) -> str:
    """``batch 2/5 (images 5-8 of 20)``: the bar's text for the batch of images a..b (1-based)."""
    images = f"image {first}" if first == last else f"images {first}-{last}"
    return f"batch {batch}/{max(batches, batch)} ({images} of {max(total, last)})"


class StageProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, described by the batch of images it fits, with the stages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._images_before = 0  # images of the batches already fitted
        self._batch_images = 0

    @property
    def train_description(self) -> str:
        return "genprior"

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # TQDMProgressBar's reset of the bar, with this description instead of "Epoch e"
        self._images_before += self._batch_images
        data = trainer.datamodule
        current = list(getattr(data, "current", []))
        queued = list(getattr(data, "queue", []))
        self._batch_images = len(current)
        # The images still queued are not read yet: N counts them all (an unreadable one is
        # dropped when its batch comes up, so N can shrink).
        total = self._images_before + len(current) + sum(len(batch) for batch in queued)
        description = batch_description(
            trainer.current_epoch + 1, trainer.current_epoch + 1 + len(queued),
            self._images_before + 1, self._images_before + len(current), total) if current else "no image left"
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description(description, refresh=False)
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = 0

    def get_metrics(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.pop("train/stage", None)  # the stage is shown below, as s/S
        progress = getattr(pl_module.method, "progress", None)
        if progress is None:  # before the first batch starts
            return items
        running = [b for b in range(progress.batch_size) if not progress.done[b]]
        if running:
            b = min(running, key=lambda k: (progress.stage[k], progress.iteration[k]))
            stage = progress.stage[b]
            items["stage"] = f"{stage + 1}/{progress.num_stages}"
            items["it"] = f"{progress.iteration[b]}/{progress.lengths[stage]}"
        items["done"] = f"{sum(progress.done)}/{progress.batch_size}"
        return items
