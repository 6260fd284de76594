"""``SaveReconstructions``: every fitted image's ``reconstruction.pt`` when its batch ends.

Used by ``output.save_G=true`` and by the manipulation tasks, which edit these files (the file
format is described in ``genprior.saved``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from genprior.image_io import safe_name
from genprior.saved import FILE_NAME, SavedReconstruction, weights_identity


class SaveReconstructions(L.Callback):
    def __init__(self, out_dir: Path, cfg: DictConfig) -> None:
        self.out_dir = Path(out_dir)
        self.task = str(cfg.task.name)
        self.prior: dict[str, Any] = OmegaConf.to_container(cfg.prior, resolve=True)  # type: ignore[assignment]
        self.info = {"seed": int(cfg.seed), "dgp": OmegaConf.to_container(cfg.dgp, resolve=True)}
        self.weights: dict[str, Any] | None = None  # computed once, at the first save
        self.written: list[Path] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.aborted is not None or not pl_module.items:
            return
        method = pl_module.method
        if self.weights is None:
            self.weights = weights_identity(self.prior, method.G_weight)
        for b, image_id in enumerate(method.ids):
            if b in pl_module.failed:
                continue
            rec = SavedReconstruction.from_method(method, b, self.prior, self.weights,
                                                  task=self.task, info=self.info)
            self.written.append(rec.save(self.out_dir / safe_name(image_id) / FILE_NAME))
