"""``ExtraMetrics``: the papers' other metrics (``metrics.extra``: LPIPS, NIQE, classifier
top-1/top-5, colorization AuC) of every finished image, into its result row.

Scored on the displayed result in [0, 1] against the displayed clean image and the images'
classes. A metric that cannot score a task gives NaN for those images (logged once), never a
failed image; a metric whose weights file is missing reports itself unavailable (NaN, with
instructions) when it is built.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch

from genprior.metrics import score_batch

log = logging.getLogger("genprior")


class ExtraMetrics(L.Callback):
    def __init__(self, metrics: dict[str, Any]) -> None:
        self.metrics = metrics

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.aborted is not None or not pl_module.items:
            return
        out = pl_module.outputs()
        n = out.result.shape[0]
        labels = torch.tensor([item.class_id for item in pl_module.items])
        with torch.no_grad():
            for name, metric in self.metrics.items():
                try:
                    metric.to(out.result.device)
                    out.extra.update(score_batch({name: metric}, out.result.float(),
                                                 None if out.target is None else out.target.float(), labels))
                except Exception as err:  # a metric that cannot score this task costs no image
                    keys = getattr(metric, "keys", (name,))
                    log.warning("metric %r cannot score these images (%s: %s); reported as NaN",
                                name, type(err).__name__, err)
                    out.extra.update({k: torch.full((n,), math.nan) for k in keys})
