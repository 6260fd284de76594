"""LPIPS (Zhang et al. 2018), v0.1, "lin" variant, as the lpips package computes it.

The distance needs two published files, read from local paths (never downloaded): an
ImageNet AlexNet/VGG-16 backbone (torchvision's file) and the LPIPS v0.1 linear layers
(shipped inside torchmetrics' wheel, used from there by default).
``docs/degradations_and_metrics.md`` lists where to get each.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genprior.metrics.base import (
    ScoredMetric,
    WeightsUnavailable,
    check_rgb_pair,
    to_unit,
    torch_hub_checkpoint,
)
from genprior.weights import read_state_dict

__all__ = [
    "LPIPS",
    "LPIPS_SCALE",
    "LPIPS_SHIFT",
    "LPIPSNetwork",
    "default_lpips_weights",
    "load_lpips_network",
    "lpips",
]


# The lpips package's ScalingLayer: maps [-1, 1] inputs to roughly ImageNet-normalised ones.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Slices of torchvision's ``features`` whose last output is tapped (relu1..relu5 for AlexNet,
# relu1_2 .. relu5_3 for VGG-16), and the tapped channel counts.
_LPIPS_SLICES = {
    "alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
    "vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)),
}
_LPIPS_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
_LPIPS_LIN_KEY = re.compile(r"^lin(\d)\.model\.\d\.weight$")


def _torchvision_weights(net: str) -> Any:
    import torchvision  # heavy import, needed only when an LPIPS network is built

    return {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}[
        net
    ].IMAGENET1K_V1


def _lpips_help(net: str) -> str:
    url = _torchvision_weights(net).url
    backbone = "AlexNet" if net == "alex" else "VGG-16"
    return (
        f"LPIPS ({net}) needs torchvision's ImageNet {backbone} weights as a local file: "
        f"download {url} on a machine with internet access and put it in the torch hub cache "
        f"({torch_hub_checkpoint(url).parent}) or pass its path as "
        "metrics.lpips_backbone_weights=<file>. The LPIPS linear layers are the lpips "
        f"package's weights/v0.1/{net}.pth; torchmetrics ships a copy that is used by default "
        "(another file: metrics.lpips_weights=<file>)."
    )


def default_lpips_weights(net: str) -> Path:
    """The LPIPS v0.1 linear-layer file that torchmetrics ships (the lpips package's file)."""
    return Path(str(importlib.resources.files("torchmetrics.functional.image"))) / "lpips_models" / f"{net}.pth"


class LPIPSNetwork(nn.Module):
    """LPIPS v0.1 as in the lpips package: ``forward(x0, x1)`` gives the distance per image.

    Inputs are [B, 3, H, W] in [-1, 1]. Both go through the ScalingLayer and the backbone; each
    tapped feature map is normalised to unit length over channels, the squared difference is
    weighted per channel by a learned 1x1 convolution (no bias), averaged over space, and the
    layers are summed. The backbone keeps torchvision's ``features`` indices so its state dict
    keys are the checkpoint's.
    """

    shift: Tensor
    scale: Tensor

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        import torchvision  # heavy import, needed only when an LPIPS network is built

        if net not in _LPIPS_SLICES:
            raise ValueError(f"LPIPS net must be one of {sorted(_LPIPS_SLICES)}; got {net!r}")
        self.net = net
        build = torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16
        # Built on the meta device and materialised without the classifier: its 58M (AlexNet)
        # or 124M (VGG-16) parameters would be initialised only to be thrown away.
        with torch.device("meta"):
            features = build(weights=None).features[: _LPIPS_SLICES[net][-1][1]]
        self.features = features.to_empty(device="cpu")
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                layer.reset_parameters()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS[net])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSNetwork:
        # Always in eval mode: a Lightning module's train() must not flip it.
        return super().train(False)

    @staticmethod
    def _unit(feature: Tensor, eps: float = 1e-10) -> Tensor:
        # The lpips package's normalize_tensor: eps added to the norm, not inside the sqrt.
        return feature / (feature.square().sum(dim=1, keepdim=True).sqrt() + eps)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        h = (torch.cat((x0, x1)) - self.shift) / self.scale
        total = torch.zeros(x0.shape[0], device=x0.device, dtype=h.dtype)
        for (start, stop), lin in zip(_LPIPS_SLICES[self.net], self.lins):
            h = self.features[start:stop](h)
            f0, f1 = h.chunk(2)
            diff = (self._unit(f0) - self._unit(f1)).square()
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


def load_lpips_network(
    net: str = "alex",
    lin_weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
) -> LPIPSNetwork:
    """An ``LPIPSNetwork`` with weights from local files.

    ``backbone_weights``: torchvision's ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``
    (any file whose ``features.<i>.*`` keys are torchvision's; .pth or .safetensors); None
    looks in the torch hub cache. ``lin_weights``: the lpips package's ``weights/v0.1/<net>.pth``
    (keys ``lin<k>.model.1.weight``, shape [1, C, 1, 1]); None uses torchmetrics' copy.
    Raises ``WeightsUnavailable`` when a file is missing, ``ValueError`` when a file is not
    what it should be.
    """
    network = LPIPSNetwork(net)
    backbone = Path(backbone_weights) if backbone_weights else torch_hub_checkpoint(_torchvision_weights(net).url)
    lin = Path(lin_weights) if lin_weights else default_lpips_weights(net)
    for path in (backbone, lin):
        if not path.is_file():
            raise WeightsUnavailable(f"{path} does not exist. " + _lpips_help(net))

    state = read_state_dict(backbone, f"LPIPS ({net}) backbone weights")
    wanted = {f"features.{k}" for k in network.features.state_dict()}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"{backbone} is not a torchvision {net} checkpoint: missing {missing[:3]} ...")
    network.load_state_dict({k: state[k] for k in wanted}, strict=False)

    lin_state = read_state_dict(lin, f"LPIPS ({net}) linear-layer weights")
    found = {int(m.group(1)): v for k, v in lin_state.items() if (m := _LPIPS_LIN_KEY.match(k))}
    shapes = [(1, c, 1, 1) for c in _LPIPS_CHANNELS[net]]
    got = [tuple(found[i].shape) if i in found else None for i in range(len(shapes))]
    if got != shapes:
        raise ValueError(
            f"{lin} is not an LPIPS v0.1 {net} linear-layer file: expected lin0..lin4 "
            f"(lin<k>.model.1.weight) of shapes {shapes}, got {got}"
        )
    for i, layer in enumerate(network.lins):
        layer.weight.copy_(found[i])
    return network


def lpips(
    preds: Tensor, target: Tensor, network: LPIPSNetwork, value_range: Sequence[float] = (-1.0, 1.0)
) -> Tensor:
    """LPIPS distance per image (lower is more similar), float64 Tensor[B].

    Images in ``value_range`` are mapped to [-1, 1], the range LPIPS was trained on; the
    network runs in its own dtype on its own device, at the images' full resolution.
    """
    check_rgb_pair(preds, target)
    p = to_unit(preds, value_range) * 2 - 1
    t = to_unit(target, value_range) * 2 - 1
    param = next(network.parameters())
    with torch.no_grad():
        out = network(p.to(param), t.to(param))
    return out.double().to(preds.device)


class LPIPS(ScoredMetric):
    """Mean LPIPS over images; ``update(preds, target)``."""

    higher_is_better = False
    keys = ("lpips",)

    def __init__(self, network: LPIPSNetwork, value_range: Sequence[float] = (-1.0, 1.0), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network = network
        self.value_range = (float(value_range[0]), float(value_range[1]))

    def per_image(
        self, preds: Tensor, target: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        return {"lpips": lpips(preds, check_rgb_pair(preds, target), self.network, self.value_range)}

    def update(self, preds: Tensor, target: Tensor) -> None:
        self._accumulate(self.per_image(preds, target))

    def _update_from(self, preds: Tensor, target: Tensor | None, labels: Tensor | None) -> None:
        self.update(preds, check_rgb_pair(preds, target))

