"""``LossLogger``: batch-mean losses (and restoration metrics) through Lightning's loggers.

Every ``log_every_n_steps`` steps and at each batch's last step: the mean over the running
images of every reported loss, the method's metrics of this step's images (the reference
computes them on the CPU every step, which costs more than the optimisation on a GPU), and
the stage of the slowest image. The values go straight to the run's loggers, at the run's step
count (it goes on counting across batches; ``epoch`` is the batch), because a batch's last step
is not a step Lightning would flush its own logs at; loss, psnr and stage also go to the bar.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class LossLogger(L.Callback):
    def __init__(self, log_every_n_steps: int = 10, with_metrics: bool = True) -> None:
        self.every = max(1, log_every_n_steps)
        self.with_metrics = with_metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        record, method = pl_module.last_record, pl_module.method
        if record is None:
            return
        done = method.progress.all_done()
        steps = pl_module.steps_run  # this step included
        if steps % self.every and not done:
            return
        active = record.active.to(record.total.device)
        if not bool(active.any()):
            return
        values = {k: float(v[active].mean()) for k, v in record.reported().items()}
        if self.with_metrics and pl_module.last_x is not None:
            metrics = method.metrics(pl_module.last_x)
            values.update({k: float(v[active.to(v.device)].mean()) for k, v in metrics.items()})
        values["stage"] = float(min(max(method.progress.stage) + 1, method.progress.num_stages))
        for k in ("loss", "psnr", "stage"):
            if k in values:
                pl_module.log(f"train/{k}", values[k], prog_bar=True, logger=False, on_step=True,
                              on_epoch=False, batch_size=method.batch_size)
        # float32, as Lightning's own logging stores them (the CSV columns stay what they were)
        logged = {"epoch": trainer.current_epoch,
                  **{f"train/{k}": float(torch.tensor(v, dtype=torch.float32)) for k, v in values.items()}}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=steps - 1)
