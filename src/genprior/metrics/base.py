"""What the metric families of ``genprior.metrics`` share.

* ``ScoredMetric``: the torchmetrics base of the papers' extra metrics (per-key sums of
  per-image values and image counts, summed across ranks) and their ``score`` method;
* ``WeightsUnavailable`` and ``torch_hub_checkpoint``: how a metric says that a local weights
  file is missing, and where torch.hub / torchvision / timm would have cached it;
* the checks and the range map of RGB image batches (``check_rgb``, ``check_rgb_pair``,
  ``to_unit``).

Nothing here knows a particular metric; the registry (``genprior.metrics``) and the families
(``restoration``, ``lpips``, ``niqe``, ``classifier``) build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from genprior.errors import UserError

__all__ = [
    "ScoredMetric",
    "WeightsUnavailable",
    "check_rgb",
    "check_rgb_pair",
    "to_unit",
    "torch_hub_checkpoint",
]


class WeightsUnavailable(FileNotFoundError, UserError):
    """A metric's weights or model file is missing; the message says where to get it."""


def torch_hub_checkpoint(url: str) -> Path:
    """Where torch.hub / torchvision / timm cache the file of ``url`` (read, never downloaded)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def to_unit(images: Tensor, value_range: Sequence[float]) -> Tensor:
    """Images in ``value_range`` mapped to [0, 1] (not clipped)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low; got {value_range!r}")
    return (images - lo) / (hi - lo)


def check_rgb(images: Tensor, what: str = "images") -> None:
    """Raise ValueError unless ``images`` is an RGB batch [B, 3, H, W]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must be a batch [B, 3, H, W]; got {tuple(images.shape)}")


def check_rgb_pair(preds: Tensor, target: Tensor | None) -> Tensor:
    """``target``, after checking that it is given and is an RGB batch of ``preds``' shape.

    Returning it lets a caller whose ``target`` is Optional pass it on as a Tensor.
    """
    if target is None:
        raise ValueError("this metric compares two images: pass target")
    check_rgb(preds, "preds")
    if preds.shape != target.shape:
        raise ValueError(f"preds and target differ in shape: {tuple(preds.shape)} vs {tuple(target.shape)}")
    return target


class ScoredMetric(Metric):
    """Per-key sums of per-image values and per-key image counts; compute() is their ratio.

    Subclasses implement ``per_image``, an ``update`` with their own natural signature that
    passes ``per_image``'s values to ``_accumulate``, and ``_update_from`` that calls that
    ``update`` from ``score``'s uniform arguments. ``score`` goes through ``update`` so that
    torchmetrics' bookkeeping (update count, cached result) stays right.

    The states are ``add_state(..., dist_reduce_fx="sum")``, so a multi-GPU evaluation reports
    the mean over all images of all ranks with no hand-written all-reduce: each image counts
    once whatever the batch split and the number of ranks. With ``skip_nan`` (classifier
    accuracy, where a NaN marks an image without a label) NaN values are left out of both
    sums; otherwise a NaN makes the mean NaN, as it should.
    """

    is_differentiable = False
    full_state_update = False
    keys: tuple[str, ...] = ()
    skip_nan = False
    status = "ok"

    value_sum: Tensor
    num_images: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n = len(self.keys)
        self.add_state("value_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self._last_values: dict[str, Tensor] = {}

    def per_image(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def _update_from(self, preds: Tensor, target: Tensor | None, labels: Tensor | None) -> None:
        raise NotImplementedError

    def _accumulate(self, values: dict[str, Tensor]) -> None:
        stacked = torch.stack([values[k].to(self.value_sum) for k in self.keys])
        counted = ~stacked.isnan() if self.skip_nan else torch.ones_like(stacked, dtype=torch.bool)
        self.value_sum += torch.where(counted, stacked, 0.0).sum(dim=1)
        self.num_images += counted.sum(dim=1)
        self._last_values = values

    def score(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Update the state with a batch and return its per-image values (float64 Tensor[B])."""
        self._update_from(preds, target, labels)
        values, self._last_values = self._last_values, {}
        return values

    def compute(self) -> Tensor | dict[str, Tensor]:
        means = self.value_sum / self.num_images
        if len(self.keys) == 1:
            return means[0]
        return dict(zip(self.keys, means.unbind()))
