"""``ResultRows``: one result row per image, as soon as its batch ends.

A row holds the image's id, path and class, ``status`` (``ok`` / ``failed``) and ``error``,
its metrics (the method's, then ``metrics.extra``'s), the observation's metrics, the last
step's losses (``final_*``), what the method reports about the image (class chosen, stages
ended early, ...), the steps taken and the seconds per image. With ``out_dir`` the row (before
its path and seconds) is also written as ``<out_dir>/<id>/metrics.json``. Unusable images (never read)
and images of a batch that raised get a failed row; a batch of several images that raised is
first fitted again image by image (``requeue``), so the error lands on the image that caused it.
A run ended by SIGTERM / SIGINT gives the images in flight a row with status ``interrupted``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from genprior.errors import Interrupted, output_error
from genprior.image_io import safe_name
from genprior.items import ImageItem

from .files import loss_rows

log = logging.getLogger("genprior")


def failed_row(item: ImageItem, error: str) -> dict[str, Any]:
    return {"id": item.id, "path": item.path, "class": item.class_id, "status": "failed", "error": error}


class ResultRows(L.Callback):
    def __init__(self, on_row: Callable[[dict[str, Any]], None] | None = None,
                 out_dir: Path | None = None) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.rows: list[dict[str, Any]] = []
        self.on_row = on_row
        self.requeue: Callable[[list[ImageItem]], None] | None = None

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        """A run ended by SIGTERM / SIGINT (genprior.errors.Interrupted, raised by train.py's
        signal handler): every image of the batch in flight gets a row with status
        "interrupted", so the results say what became of it."""
        if not isinstance(exception, Interrupted):
            return
        done = {row["id"] for row in self.rows}
        for item in getattr(pl_module, "items", []):
            if item.id not in done:
                self.add({**failed_row(item, str(exception)), "status": "interrupted"})

    def unusable(self, item: ImageItem) -> None:
        print(f"genprior: skipping {item.path}: {item.error}")
        self.add(failed_row(item, str(item.error)))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        items = pl_module.items
        if not items:
            return
        if pl_module.aborted is not None:
            if len(items) > 1 and self.requeue is not None:
                self.requeue(items)  # again one by one: find the image that fails
                return
            print(f"genprior: image {items[0].path} failed: {pl_module.aborted}")
            self.add(failed_row(items[0], pl_module.aborted))
            return
        method, out = pl_module.method, pl_module.outputs()
        seconds = pl_module.seconds_per_image
        for b, item in enumerate(items):
            losses = loss_rows(pl_module.records, b)
            failed = pl_module.failed.get(b)
            row: dict[str, Any] = {
                "id": item.id,
                "status": "failed" if failed else "ok",
                "error": failed,
                "steps": len(losses),
                **{k: float(v[b]) for k, v in out.metrics.items()},
                **{k: float(v[b]) for k, v in out.extra.items()},
                **method.observation_metrics(b),
                **{f"final_{k}": v for r in losses[-1:] for k, v in r.items() if k != "step"},
                **method.image_info(b),
            }
            if self.out_dir is not None:
                folder = self.out_dir / safe_name(item.id)
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    (folder / "metrics.json").write_text(json.dumps(row, indent=2, default=str))
                except OSError as err:  # a full disk, a read-only folder: one line (train.py)
                    raise output_error(err, folder / "metrics.json") or err from None
            row.update({"path": item.path, "seconds": seconds})
            self.add(row)
