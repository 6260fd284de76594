"""Image-quality metrics: one module per family, and the registry of the papers' extra metrics.

* ``restoration``: the full-reference metrics of a restoration run, per image (``psnr``,
  ``ssim``, ``mse``, ``l1``, ``colorization_auc``), DGP's ``restoration_metrics`` (SPEC §8)
  with its Lab recombination (``lab_recombine``), hole crop and SSIM data_range of 2;
* ``lpips``: LPIPS v0.1 (``lpips``, ``LPIPS``, ``load_lpips_network``);
* ``niqe``: NIQE as the MATLAB release computes it (``niqe``, ``NIQE``, ``NIQEModel``,
  ``fit_niqe_model``);
* ``classifier``: top-1/top-5 accuracy of a timm classifier (``topk_correct``,
  ``ClassifierAccuracy``, ``ImageClassifier``, ``build_classifier``);
* ``base``: what they share (``ScoredMetric``, ``WeightsUnavailable``, image checks);
* ``ranges``: every metric's value range (``METRIC_RANGES``, ``metric_range``), which the
  evaluation summary clips its confidence intervals to.

Every per-image function returns ``Tensor[B]`` in float64. The papers' metrics beyond PSNR
and SSIM (LPIPS, NIQE, classifier accuracy, colorization AuC) are also torchmetrics
``Metric`` classes (``LPIPS``, ``NIQE``, ``ClassifierAccuracy``, ``ColorizationAuC``) that keep
sums of those values and image counts in ``dist_reduce_fx="sum"`` states, so a multi-GPU
evaluation reports the mean over all images of all ranks. Each also has
``score(preds, target=None, labels=None)``: it updates the state *and* returns the per-image
values (``dict[key, Tensor[B]]``) for the results rows, so nothing is computed twice.
``score_batch`` does that for a dict of metrics.

Three of them need published data that cannot be downloaded here; all of it comes from local
files named in ``MetricsConfig`` (``docs/degradations_and_metrics.md`` lists where to get each):

* LPIPS: an ImageNet AlexNet/VGG-16 backbone (torchvision's file) and the LPIPS v0.1 linear
  layers (shipped inside torchmetrics' wheel, used from there by default);
* NIQE: the pristine-image MVG model of Mittal et al. 2013 (MATLAB ``modelparameters.mat`` or
  the same numbers as ``niqe_pris_params.npz``), or one fitted with ``fit_niqe_model``;
* accuracy: the classifier's weights (timm model name, local file).

``build_metrics`` turns a ``MetricsConfig`` into metrics; one whose file is missing becomes an
``UnavailableMetric`` (NaN, with a status saying what to download and which key to set), logged
once, so a long run never dies at its last step for want of a weights file.

The package sits below the methods and the engine: it imports only ``genprior.color``,
``genprior.degradations`` and third-party libraries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torchmetrics import Metric

from genprior.metrics.base import WeightsUnavailable, torch_hub_checkpoint
from genprior.metrics.classifier import (
    ClassifierAccuracy,
    ImageClassifier,
    build_classifier,
    topk_correct,
)
from genprior.metrics.lpips import (
    LPIPS,
    LPIPSNetwork,
    default_lpips_weights,
    load_lpips_network,
    lpips,
)
from genprior.metrics.niqe import (
    NIQE,
    NIQE_HELP,
    NIQEModel,
    aggd_fit,
    fit_niqe_model,
    matlab_imresize_half,
    niqe,
    niqe_features,
    niqe_gray,
)
from genprior.metrics.ranges import METRIC_RANGES, metric_range
from genprior.metrics.restoration import (
    IMAGE_KEYS,
    METRIC_TASKS,
    REFERENCE_SSIM_DATA_RANGE,
    SSIM_WINDOWS,
    ColorizationAuC,
    colorization_auc,
    l1,
    lab_recombine,
    mse,
    psnr,
    restoration_metrics,
    ssim,
)

__all__ = [
    "EXTRA_METRICS",
    "IMAGE_KEYS",
    "LPIPS",
    "METRIC_RANGES",
    "METRIC_TASKS",
    "NIQE",
    "REFERENCE_SSIM_DATA_RANGE",
    "SSIM_WINDOWS",
    "ClassifierAccuracy",
    "ColorizationAuC",
    "ImageClassifier",
    "LPIPSNetwork",
    "NIQEModel",
    "UnavailableMetric",
    "WeightsUnavailable",
    "aggd_fit",
    "build_classifier",
    "build_metrics",
    "colorization_auc",
    "default_lpips_weights",
    "fit_niqe_model",
    "l1",
    "lab_recombine",
    "load_lpips_network",
    "lpips",
    "matlab_imresize_half",
    "metric_range",
    "metric_status",
    "mse",
    "niqe",
    "niqe_features",
    "niqe_gray",
    "psnr",
    "restoration_metrics",
    "score_batch",
    "ssim",
    "topk_correct",
    "torch_hub_checkpoint",
]

log = logging.getLogger(__name__)


class UnavailableMetric(Metric):
    """Stands in for a metric whose weights are missing: it scores NaN and says why.

    ``status`` holds the reason with instructions (what to download, which config key to
    set). ``update`` accepts anything and does nothing, so the run goes on.
    """

    is_differentiable = False
    full_state_update = False
    higher_is_better = None

    def __init__(self, name: str, status: str, keys: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name
        self.status = status
        self.keys = tuple(keys or (name,))

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def score(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        self.update()
        nan = torch.full((preds.shape[0],), torch.nan, dtype=torch.float64, device=preds.device)
        return {k: nan.clone() for k in self.keys}

    def compute(self) -> Tensor | dict[str, Tensor]:
        nan = torch.tensor(torch.nan, dtype=torch.float64)
        return nan if len(self.keys) == 1 else {k: nan.clone() for k in self.keys}


def _build_lpips(cfg: Any, value_range: Sequence[float]) -> Metric:
    network = load_lpips_network(cfg.lpips_net, cfg.lpips_weights, cfg.lpips_backbone_weights)
    return LPIPS(network, value_range)


def _build_niqe(cfg: Any, value_range: Sequence[float]) -> Metric:
    if not cfg.niqe_model:
        raise WeightsUnavailable("metrics.niqe_model is not set. " + NIQE_HELP)
    return NIQE(NIQEModel.load(cfg.niqe_model), value_range, int(cfg.niqe_block_size))


def _build_accuracy(cfg: Any, value_range: Sequence[float]) -> Metric:
    classifier = build_classifier(cfg.classifier, cfg.classifier_weights, cfg.classifier_input_size, value_range)
    return ClassifierAccuracy(classifier)


def _build_auc(cfg: Any, value_range: Sequence[float]) -> Metric:
    return ColorizationAuC(value_range, float(cfg.auc_max_threshold))


_BUILDERS = {
    "lpips": (_build_lpips, ("lpips",)),
    "niqe": (_build_niqe, ("niqe",)),
    "accuracy": (_build_accuracy, ("top1", "top5")),
    "colorization_auc": (_build_auc, ("colorization_auc",)),
}
EXTRA_METRICS: tuple[str, ...] = tuple(_BUILDERS)


@rank_zero_only
def _log_unavailable(name: str, status: str) -> None:
    log.warning("metric %r is unavailable and will be reported as NaN: %s", name, status)


def build_metrics(
    cfg: Any, names: Sequence[str] | None = None, value_range: Sequence[float] = (-1.0, 1.0)
) -> dict[str, Metric]:
    """The metrics ``names`` (default ``cfg.extra``) built from a ``MetricsConfig``.

    ``value_range`` is the images' range: (-1, 1) for DGP and mGANprior, (0, 1) for DIP. A
    metric whose weights or model file is missing becomes an ``UnavailableMetric`` (logged
    once, on rank zero); an unknown name or a file of the wrong kind raises ``ValueError``
    right away, before any work is done.
    """
    names = list(cfg.extra if names is None else names)
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid: {list(EXTRA_METRICS)}")
    metrics: dict[str, Metric] = {}
    for name in names:
        build, keys = _BUILDERS[name]
        try:
            metrics[name] = build(cfg, value_range)
        except WeightsUnavailable as missing:
            metrics[name] = UnavailableMetric(name, str(missing), keys)
            _log_unavailable(name, str(missing))
    return metrics


def metric_status(metrics: Mapping[str, Metric]) -> dict[str, str]:
    """``"ok"`` or the reason a metric is unavailable, by name."""
    return {name: str(getattr(m, "status", "ok")) for name, m in metrics.items()}


def score_batch(
    metrics: Mapping[str, Metric],
    preds: Tensor,
    target: Tensor | None = None,
    labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """Update every metric with a batch; return all per-image values (float64 Tensor[B]).

    Keys are the metrics' value names (``lpips``, ``niqe``, ``top1``, ``top5``,
    ``colorization_auc``); an unavailable metric gives NaN.
    """
    out: dict[str, Tensor] = {}
    for metric in metrics.values():
        out.update(metric.score(preds, target, labels))  # type: ignore[operator]
    return out
