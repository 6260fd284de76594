"""Restoration: fit the configured method to every image and score the result.

The task of every ``task.name`` that is not a manipulation or the adversarial defense: DGP's
restorations, DIP's, mGANprior's. It reads the images for the method (genprior.datamodules),
builds the method and ``metrics.extra`` once, and runs them through the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L

from genprior import engine
from genprior.datamodules import load_items
from genprior.items import ImageItem
from genprior.methods import Method, build, method_class
from genprior.metrics import build_metrics

__all__ = ["extra_metrics", "run"]


def extra_metrics(cfg: Any) -> dict[str, Any]:
    """``metrics.extra`` (LPIPS, NIQE, accuracy, AuC), built once per run. Their networks come
    from local files; a missing file gives a metric that reports NaN and says where to get it.
    They score the displayed images, which are in [0, 1] for every prior."""
    return build_metrics(cfg.metrics, value_range=(0.0, 1.0)) if cfg.metrics.extra else {}


def run(cfg: Any, out: Path, *, items: Sequence[ImageItem] | None = None, method: Method | None = None,
        loggers: Sequence[Any] | None = None, callbacks: Sequence[L.Callback] = (),
        on_row: Callable[[dict[str, Any]], None] | None = None,
        read: Callable[[ImageItem], ImageItem] | None = None) -> list[dict[str, Any]]:
    """One result row per image (``items``, else the images ``data.*`` names)."""
    if items is None:
        items = load_items(cfg, method if method is not None else method_class(str(cfg.prior.kind)))
    if method is None:
        method = build(cfg)
    return engine.run(cfg, method, items, out, read=read, loggers=loggers, callbacks=callbacks,
                      extra_metrics=extra_metrics(cfg), on_row=on_row)
