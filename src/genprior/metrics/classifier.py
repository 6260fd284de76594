"""Classifier accuracy: top-1 / top-5 of a timm classifier on the restored images.

DGP's colorization score and adversarial-defence table. The classifier's weights (timm model
name, local file) are read from a local path, never downloaded; ``ImageClassifier`` puts the
preprocessing inside the module so that it takes genprior images directly (task=defense
attacks it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genprior.metrics.base import (
    ScoredMetric,
    WeightsUnavailable,
    check_rgb,
    to_unit,
    torch_hub_checkpoint,
)

__all__ = [
    "ClassifierAccuracy",
    "ImageClassifier",
    "build_classifier",
    "topk_correct",
]


def _classifier_help(name: str, path: Path | None) -> str:
    from timm.models import (
        get_pretrained_cfg,  # heavy import (timm), only to explain a missing file
    )

    cfg = get_pretrained_cfg(name)
    where = []
    if cfg is not None and cfg.url:
        where.append(cfg.url)
    if cfg is not None and cfg.hf_hub_id:
        where.append(f"huggingface.co/{cfg.hf_hub_id} (model.safetensors)")
    source = " or ".join(where) or "the model's published checkpoint"
    return (
        f"{'Weights file ' + str(path) + ' does not exist. ' if path else ''}Classifier accuracy "
        f"needs weights for timm model {name!r}: download {source} on a machine with internet "
        "access and pass its path as metrics.classifier_weights=<file> (or put the .pth file, "
        f"under its published name, in the torch hub cache {Path(torch.hub.get_dir()) / 'checkpoints'})."
    )


class ImageClassifier(nn.Module):
    """A timm classifier taking genprior images: the preprocessing is inside the module.

    ``forward(images)``: RGB [B, 3, H, W] in ``value_range`` -> clip to [0, 1] -> resize the
    whole image to ``input_size`` (the model's interpolation, antialiased; no centre crop,
    since restored images are already the object's crop) -> ImageNet mean/std -> logits.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        model: nn.Module,
        input_size: int | None = None,
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.model = model.eval().requires_grad_(False)
        self.input_size = int(input_size or cfg.get("input_size", (3, 224, 224))[-1])
        self.interpolation = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
        self.value_range = (float(value_range[0]), float(value_range[1]))
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ImageClassifier:
        return super().train(False)  # batch norm must stay in inference mode

    def forward(self, images: Tensor) -> Tensor:
        x = to_unit(images.to(self.mean), self.value_range).clamp(0.0, 1.0)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode=self.interpolation,
                align_corners=False, antialias=True,
            ).clamp(0.0, 1.0)
        return self.model((x - self.mean) / self.std)


def build_classifier(
    name: str = "resnet50.tv_in1k",
    weights: str | Path | None = None,
    input_size: int | None = None,
    value_range: Sequence[float] = (-1.0, 1.0),
) -> ImageClassifier:
    """A timm classifier with its weights from a local file (timm's ``pretrained_cfg_overlay``).

    ``name`` is any timm model name (with or without a pretrained tag); the default is the
    original torchvision ResNet-50, the one DGP's tables use. ``weights`` is a .pth or
    .safetensors state dict in timm's (= torchvision's, for ResNets) layout; None looks for
    the torchvision file of the model's pretrained config in the torch hub cache. A missing
    file raises ``WeightsUnavailable``; timm never downloads anything here.
    """
    import timm  # heavy import, needed only when the classifier is built
    from timm.models import get_pretrained_cfg

    if weights:
        path = Path(weights)
    else:
        cfg = get_pretrained_cfg(name)
        if cfg is None or not cfg.url:
            raise WeightsUnavailable("no classifier weights given. " + _classifier_help(name, None))
        path = torch_hub_checkpoint(cfg.url)
    if not path.is_file():
        raise WeightsUnavailable(_classifier_help(name, path))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    return ImageClassifier(model, input_size, value_range)


def topk_correct(logits: Tensor, labels: Tensor, top_k: Sequence[int] = (1, 5)) -> dict[str, Tensor]:
    """Per image, 100.0 if the label is among the k highest logits, else 0.0 (NaN if label < 0).

    Values are in percent so that their mean over images is the accuracy in percent; a
    negative label (class unknown) gives NaN, which ``ClassifierAccuracy`` leaves out.
    """
    labels = labels.to(logits.device).long()
    # Rank of the true class = number of classes scoring strictly higher.
    true_logit = logits.gather(1, labels.clamp_min(0)[:, None])
    rank = (logits > true_logit).sum(dim=1)
    unknown = labels < 0
    out = {}
    for k in top_k:
        hit = (rank < k).double() * 100.0
        out[f"top{k}"] = torch.where(unknown, torch.nan, hit)
    return out


class ClassifierAccuracy(ScoredMetric):
    """Top-k accuracy (%) of a classifier on the images; ``update(preds, labels)``.

    ``compute()`` returns ``{"top1": ..., "top5": ...}`` (one entry per k). Images whose label
    is negative (unknown) are not counted.
    """

    higher_is_better = True
    skip_nan = True

    def __init__(self, classifier: nn.Module, top_k: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        self.top_k = tuple(int(k) for k in top_k)
        self.keys = tuple(f"top{k}" for k in self.top_k)
        super().__init__(**kwargs)
        self.classifier = classifier

    def per_image(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        if labels is None:
            raise ValueError("classifier accuracy needs the images' class labels: pass labels")
        check_rgb(preds)
        with torch.no_grad():
            logits = self.classifier(preds)
        return topk_correct(logits, labels, self.top_k)

    def update(self, preds: Tensor, labels: Tensor) -> None:
        self._accumulate(self.per_image(preds, labels=labels))

    def _update_from(self, preds: Tensor, target: Tensor | None, labels: Tensor | None) -> None:
        if labels is None:
            raise ValueError("classifier accuracy needs the images' class labels: pass labels")
        self.update(preds, labels)

