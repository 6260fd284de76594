"""The reconstruction LightningModule: one ``training_step`` is one optimisation step.

It combines a *method* (DGP or DIP: which tensors each image trains, the schedule, the loss)
with Lightning's loop, loggers and callbacks. A method exposes:

- ``param_groups()``: optimizer groups of stacked per-image tensors (one per generator block,
  then the latent, then the class embedding when update_embed is set);
- ``step_lrs()``: each group's per-image learning rate for the next step (the schedule);
- ``loss()``: the forward pass, returning the summed loss, a per-image record and the output;
- ``end_step(record)``: early stopping and stage bookkeeping; ``progress`` tells who is done.

Images on one module never share gradients: the loss is a sum of per-image losses of disjoint
parameters, so every image's gradient is its own.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from genprior.optim import PerImageAdam


class Reconstruction(L.LightningModule):
    def __init__(
        self,
        method: Any,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        previous_optimizer: PerImageAdam | None = None,
        nan_check_every: int = 10,
        fused_optimizer: bool = False,
    ) -> None:
        super().__init__()
        self.method = method
        self.betas = betas
        self.eps = eps
        self.automatic_optimization = False
        self.previous_optimizer = previous_optimizer
        self.nan_check_every = nan_check_every
        self.fused_optimizer = fused_optimizer  # perf.fused_optimizer (genprior.perf)
        # Filled in by every step for the callbacks (no host sync here).
        self.last_x: Tensor | None = None
        self.last_record: Any = None
        self.last_stage_ended: list[bool] = []
        self.records: list[Any] = []
        self.failed: dict[int, str] = {}
        self.optimizer: PerImageAdam | None = None

    # The method's tensors are plain tensors, not registered parameters, so Lightning sees an
    # empty module; the optimizer gets them directly.
    def configure_optimizers(self) -> PerImageAdam:
        # A method may bring its own per-image optimizer (mGANprior: plain SGD, PerImageSGD).
        make = getattr(self.method, "make_optimizer", None)
        opt = make() if make is not None else PerImageAdam(
            self.method.param_groups(), batch_size=self.method.batch_size, betas=self.betas, eps=self.eps,
            fused=self.fused_optimizer)
        if self.previous_optimizer is not None:
            carry_state(self.previous_optimizer, opt)
        self.optimizer = opt
        return opt

    def training_step(self, batch: Any, batch_idx: int) -> None:
        method = self.method
        opt = self.optimizers()
        raw: PerImageAdam = opt.optimizer if hasattr(opt, "optimizer") else opt  # type: ignore[assignment]
        active = method.progress.active()
        for b in self.failed:
            active[b] = False
        raw.active = active
        raw.set_lrs(method.step_lrs())
        if hasattr(method, "step_masks"):
            raw.masks = method.step_masks()
        opt.zero_grad(set_to_none=True)
        loss, record, x = method.loss()
        self.manual_backward(loss)
        if hasattr(method, "before_optimizer_step"):
            method.before_optimizer_step()  # DIP's backtracking restores weights here
        opt.step()
        self.last_stage_ended = method.end_step(record)
        self.last_x, self.last_record = x, record
        self.records.append(record)
        step = self.global_step
        if self.nan_check_every and (step % self.nan_check_every == 0 or method.progress.all_done()):
            self.check_finite()
        if method.progress.all_done() or len(self.failed) == method.batch_size:
            self.trainer.should_stop = True

    def check_finite(self) -> None:
        """A NaN/inf loss stops that image (recorded as failed); the others carry on."""
        if not self.records:
            return
        totals = torch.stack([r.total for r in self.records[-self.nan_check_every:]]).cpu()
        bad = ~torch.isfinite(totals).all(0)
        for b in torch.nonzero(bad).flatten().tolist():
            if b not in self.failed:
                self.failed[b] = f"non-finite loss (NaN or inf) at or before step {self.global_step + 1}"
                self.method.progress.done[b] = True

    def on_train_end(self) -> None:
        self.check_finite()


def carry_state(previous: PerImageAdam, new: PerImageAdam) -> None:
    """Copy Adam moments and step counts position by position (the reference's main.py bug).

    main.py keeps one optimizer for every image, so image k starts with image k-1's moments
    and bias-correction step count (SPEC §6.1, quirk 3). Reproduced only when asked for
    (``dgp.carry_optimizer_state=true``).
    """
    if previous.batch_size != new.batch_size:
        raise ValueError("carry_optimizer_state needs the same batch size for every batch")
    new.image_steps = previous.image_steps.clone()
    new.masked_steps = {k: v.clone() for k, v in previous.masked_steps.items()}
    for old_group, new_group in zip(previous.param_groups, new.param_groups):
        for old_p, new_p in zip(old_group["params"], new_group["params"]):
            old = previous.state.get(old_p)
            if not old or old["exp_avg"].shape != new_p.shape:
                continue
            key = new._mask_key.get(id(new_p))
            new.state[new_p] = {
                "step": new.image_steps if key is None else new.masked_steps[key],
                "exp_avg": old["exp_avg"].clone(),
                "exp_avg_sq": old["exp_avg_sq"].clone(),
            }


class StepLoader:
    """A loader of step indices: Lightning runs one training_step per item."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.steps))

    def __len__(self) -> int:
        return self.steps
