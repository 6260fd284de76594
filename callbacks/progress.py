"""``StageProgressBar``: Lightning's bar plus where the batch is in the method's stages."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """``stage s/S it i/N`` of the slowest image still running and ``done d/B``."""

    def get_metrics(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
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
