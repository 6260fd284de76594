"""What the engine needs from a paper's method, written down: ``Method`` and ``Progress``.

A method fits one batch of B images at a time, each image with its own tensors (stacked with
the image as dimension 0). The engine (genprior.engine) drives it:

1. ``start(batch)``: the images' set-up (observations, per-image tensors, latents);
2. ``make_optimizer(fused)``: one per-image optimizer over those tensors (genprior.optim);
3. per step (engine.step): ``step_lrs()`` and ``step_masks()`` for the optimizer, then
   ``optimizer_step(optimizer, evaluate)`` (by default: ``evaluate`` = zero_grad, ``loss()``,
   backward, ``before_optimizer_step()``; then the update), ``end_step(record)`` (stage control);
4. when ``progress.all_done()``: the results (``final_output``, ``metrics``, the ``display``
   images, ``extra_images``, ``observation_metrics``, ``image_info``).

``Progress`` is where every image is in its schedule; a method's ``end_step`` is the one place
that moves it (stage ends, early stops).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from genprior.items import ImageBatch, StepRecord
from genprior.optim import StackedOptimizer

__all__ = ["Method", "Progress"]


class Progress:
    """Where every image of a batch is in a schedule of stages (host-side, no device syncs).

    ``lengths`` are the stages' iteration counts. Each image walks through them on its own: an
    image whose stage ends early (``advance(stop=...)``, DGP's stop_mse, the reference's
    ``break``) starts its next stage while the others carry on.
    """

    def __init__(self, lengths: list[int], batch_size: int) -> None:
        self.lengths = [int(n) for n in lengths]
        self.stage = [0] * batch_size
        self.iteration = [0] * batch_size  # iteration inside the current stage
        self.t = [0] * batch_size  # steps taken; the reference's global step is t + 1 during a step
        self.done = [False] * batch_size
        self.stopped_early: list[list[int]] = [[] for _ in range(batch_size)]  # stages ended by a stop
        for b in range(batch_size):
            self._skip_empty_stages(b)

    @property
    def batch_size(self) -> int:
        return len(self.stage)

    @property
    def num_stages(self) -> int:
        return len(self.lengths)

    def _skip_empty_stages(self, b: int) -> None:
        while self.stage[b] < self.num_stages and self.lengths[self.stage[b]] <= 0:
            self.stage[b] += 1
        if self.stage[b] >= self.num_stages:
            self.done[b] = True

    def active(self) -> Tensor:
        return torch.tensor([not d for d in self.done], dtype=torch.bool)

    def all_done(self) -> bool:
        return all(self.done)

    def current(self, b: int) -> int:
        """Image b's stage index (the last one once it is done)."""
        return min(self.stage[b], self.num_stages - 1)

    def advance(self, stop: list[bool]) -> list[bool]:
        """After one step: count it, and end image b's stage when its iterations are used up or
        ``stop[b]``. Returns, per image, whether a stage ended at this step."""
        ended = [False] * self.batch_size
        for b in range(self.batch_size):
            if self.done[b]:
                continue
            self.iteration[b] += 1
            self.t[b] += 1
            length = self.lengths[self.stage[b]]
            if stop[b] or self.iteration[b] >= length:
                if stop[b] and self.iteration[b] < length:
                    self.stopped_early[b].append(self.stage[b])
                ended[b] = True
                self.stage[b] += 1
                self.iteration[b] = 0
                self._skip_empty_stages(b)
        return ended

    def total_steps(self) -> int:
        """The steps a batch takes at most (no early stop)."""
        return sum(max(n, 0) for n in self.lengths)


class Method(nn.Module):
    """Base of DGP, DIP and mGANprior: the members the engine and the callbacks use.

    Subclasses set ``progress`` and ``ids`` in ``start`` and implement the abstract members;
    the others have the defaults below. Per-method behaviour the tasks need is here too, as
    class attributes, instead of branches on the prior's kind.
    """

    #: how genprior's loaders prepare this method's images (image_io.preprocess): "dgp" (the
    #: DGP recipe), "pggan" (PGGAN's LSUN recipe) or "none" (the image at its own size, DIP)
    preprocessing: ClassVar[str] = "dgp"
    #: whether reconstruction.pt can be written for its images (genprior.saved: DGP only)
    saves_reconstructions: ClassVar[bool] = False
    #: the reference's main.py bug (DGP SPEC §6.1 quirk 3): the next batch's optimizer starts
    #: from this batch's Adam state (DGP's ``dgp.carry_optimizer_state``; False elsewhere)
    carry_optimizer_state: bool = False
    #: per stage, write the frame every save_interval[s] iterations (DGP's ``dgp.save_interval``)
    save_interval: list[int] | None = None
    #: the run's seed: with an image's id it picks that image's random stream (items.image_generator)
    seed: int = 0

    progress: Progress
    ids: list[str]

    def __init__(self) -> None:
        super().__init__()
        # Follows the module through Lightning's moves: where new per-image tensors are made.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: Any) -> Method:
        """The method for a composed config: its prior, degradation and settings."""
        raise NotImplementedError

    @classmethod
    def image_size(cls, cfg: Any) -> int:
        """The size genprior's loaders give this method's images (the prior's resolution)."""
        return int(cfg.prior.resolution)

    # ------------------------------------------------------------------ fitting
    def start(self, batch: ImageBatch) -> None:
        raise NotImplementedError

    def make_optimizer(self, fused: bool = True) -> StackedOptimizer:
        raise NotImplementedError

    def step_lrs(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def step_masks(self) -> dict[str, Tensor]:
        """Per mask key, the images whose masked tensors get a gradient this step (DGP)."""
        return {}

    def loss(self) -> tuple[Tensor, StepRecord, Tensor | None]:
        """The step's forward pass: the summed loss (each image's gradient is its own), the
        per-image record, and the images to show for this step (None: nothing to show)."""
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """After backward, before the update (DIP's backtracking restores weights here)."""

    def optimizer_step(self, optimizer: StackedOptimizer, evaluate: Callable[[], Tensor]) -> None:
        """The update of one step. ``evaluate`` is the step's closure (zero_grad, ``loss``,
        backward, ``before_optimizer_step``; returns the loss); the default evaluates once and
        steps ``optimizer``. A method whose optimizer evaluates the closure itself (DIP's
        L-BFGS) overrides this; every ``evaluate`` call is one record for the loggers."""
        evaluate()
        optimizer.step()

    def max_batch_size(self) -> int | None:
        """The most images this method's settings can fit at once (engine.choose_batch_size
        caps ``trainer.batch_size`` with it); None: no limit."""
        return None

    def end_step(self, record: StepRecord) -> list[bool]:
        """Stage control after a step: returns, per image, whether a stage ended."""
        return self.progress.advance([False] * self.batch_size)

    @property
    def batch_size(self) -> int:
        return len(self.ids)

    def stage_lengths(self) -> list[int]:
        """The schedule's iterations per stage (known from the settings, before any batch)."""
        raise NotImplementedError

    def total_steps(self) -> int:
        """The steps a batch takes at most (no early stop)."""
        return sum(max(int(n), 0) for n in self.stage_lengths())

    @property
    def print_interval(self) -> int:
        return 100

    # ------------------------------------------------------------------ results
    def final_output(self) -> Tensor:
        raise NotImplementedError

    def display(self, x: Tensor) -> Tensor:
        """Images of the method's value range as [0, 1] images to write or show."""
        raise NotImplementedError

    def observation_for_display(self) -> Tensor:
        raise NotImplementedError

    def clean_for_display(self) -> Tensor | None:
        raise NotImplementedError

    def metrics(self, x: Tensor) -> dict[str, Tensor]:
        """Per-image [B] metrics of the images x against the clean images."""
        return {}

    def extra_images(self, x: Tensor, b: int) -> dict[str, Tensor]:
        """More images of image b to write next to result.png (name -> [C, H, W] in [0, 1])."""
        return {}

    def observation_metrics(self, b: int) -> dict[str, float]:
        return {}

    def image_info(self, b: int) -> dict[str, Any]:
        return {}
