"""A progress bar that shows where the batch is in DGP's stages."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """Lightning's bar plus ``stage s/S it i/N`` of the slowest image still running."""

    def get_metrics(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        progress = getattr(pl_module.method, "progress", None)
        if progress is not None:
            running = [b for b in range(progress.batch_size) if not progress.done[b]]
            if running:
                b = min(running, key=lambda k: (progress.stage[k], progress.iteration[k]))
                stage = progress.stage[b]
                items["stage"] = f"{stage + 1}/{len(progress.stages)}"
                items["it"] = f"{progress.iteration[b]}/{progress.stages[stage].iterations}"
            items["done"] = f"{sum(progress.done)}/{progress.batch_size}"
        return items
