"""DGP's progressive schedule: stages, the per-step learning rates, and per-image progress.

A stage (SPEC §6.2, §10) has a number of iterations, G and z learning rates, how many generator
groups are unfrozen (ft_num), a per-group decay (lr_ratio), the D-feature depth (ftr_num), the
loss weights and whether instance norm replaces the conditional BN (use_in).

Each image walks through the stages on its own: an image that meets stop_mse / stop_ftr ends
its current stage early (the reference's ``break``, quirk 4) and starts the next one while the
other images of the batch carry on. ``Progress`` keeps that per-image position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Stage:
    iterations: int
    G_lr: float
    z_lr: float
    ftr_num: int
    ft_num: int
    lr_ratio: float
    w_D_loss: float
    w_mse: float
    w_percep: float
    use_in: bool


def stages_from_config(dgp: object) -> list[Stage]:
    """Zip the reference's per-stage lists (``dgp.iterations``, ``dgp.G_lrs`` ...) into stages."""
    get = dgp.__getitem__ if hasattr(dgp, "__getitem__") else lambda k: getattr(dgp, k)
    n = len(get("iterations"))
    return [
        Stage(
            iterations=int(get("iterations")[s]),
            G_lr=float(get("G_lrs")[s]),
            z_lr=float(get("z_lrs")[s]),
            ftr_num=int(get("ftr_num")[s]),
            ft_num=int(get("ft_num")[s]),
            lr_ratio=float(get("lr_ratio")[s]),
            w_D_loss=float(get("w_D_loss")[s]),
            w_mse=float(get("w_mse")[s]),
            w_percep=float(get("w_percep")[s]),
            use_in=bool(get("use_in")[s]),
        )
        for s in range(n)
    ]


def warm_factor(t: int, warm_up: int) -> float:
    """SPEC §6.2.1: for t < warm_up the base rate is scaled by t / warm_up (t counts from 1)."""
    return t / warm_up if t < warm_up else 1.0


def group_lrs(stage: Stage, t: int, warm_up: int, n_groups: int) -> tuple[list[float], float]:
    """Learning rates of the generator groups (shallow to deep) and of z at global step t.

    Group i gets ``G_lr * warm * lr_ratio**i`` while ``i < ft_num`` and 0 otherwise: the frozen
    groups stay in the optimizer (their Adam moments keep accumulating, SPEC quirk 2).
    """
    warm = warm_factor(t, warm_up)
    g = [stage.G_lr * warm * stage.lr_ratio**i if i < stage.ft_num else 0.0 for i in range(n_groups)]
    return g, stage.z_lr * warm


class Progress:
    """Where every image of a batch is in the schedule (host-side; no device syncs)."""

    def __init__(self, stages: list[Stage], batch_size: int) -> None:
        self.stages = stages
        self.stage = [0] * batch_size
        self.iteration = [0] * batch_size  # iteration inside the current stage
        self.t = [0] * batch_size  # steps taken; the reference's global step is t + 1 during a step
        self.done = [False] * batch_size
        self.stopped_early = [[] for _ in range(batch_size)]  # stage indices ended by stop_*
        for b in range(batch_size):
            self._skip_empty_stages(b)

    @property
    def batch_size(self) -> int:
        return len(self.stage)

    def _skip_empty_stages(self, b: int) -> None:
        while self.stage[b] < len(self.stages) and self.stages[self.stage[b]].iterations <= 0:
            self.stage[b] += 1
        if self.stage[b] >= len(self.stages):
            self.done[b] = True

    def active(self) -> Tensor:
        return torch.tensor([not d for d in self.done], dtype=torch.bool)

    def all_done(self) -> bool:
        return all(self.done)

    def current(self, b: int) -> Stage:
        return self.stages[min(self.stage[b], len(self.stages) - 1)]

    def end_step(self, stop: list[bool]) -> list[bool]:
        """Advance after one optimisation step; ``stop[b]`` ends image b's stage early.

        Returns, per image, whether a stage ended at this step (for stage snapshots).
        """
        ended = [False] * self.batch_size
        for b in range(self.batch_size):
            if self.done[b]:
                continue
            self.iteration[b] += 1
            self.t[b] += 1
            if stop[b] or self.iteration[b] >= self.stages[self.stage[b]].iterations:
                if stop[b] and self.iteration[b] < self.stages[self.stage[b]].iterations:
                    self.stopped_early[b].append(self.stage[b])
                ended[b] = True
                self.stage[b] += 1
                self.iteration[b] = 0
                self._skip_empty_stages(b)
        return ended

    def total_steps(self) -> int:
        """Upper bound of the steps a batch needs (no early stop)."""
        return sum(max(s.iterations, 0) for s in self.stages)
