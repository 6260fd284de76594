"""Loss terms that need a network of their own.

The D-feature loss lives beside the discriminator (``genprior.priors.biggan``); MSE, L1 and the
latent prior are one-liners inside the methods. This module holds the perceptual loss of DGP's
Table 4 ablation (and mGANprior's VGG variant): distances between VGG-16 features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

# Indices of the ReLU outputs in VGG-16's ``features`` (torchvision and timm share the layout):
# relu1_2, relu2_2, relu3_3, relu4_3. conv4_3 (index 21) is mGANprior's layer.
VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "conv4_3": 21}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VGG_WEIGHTS_HELP = (
    "The perceptual loss needs VGG-16 ImageNet weights as a local file: for example timm's "
    "'vgg16.tv_in1k' (huggingface.co/timm/vgg16.tv_in1k, model.safetensors or "
    "pytorch_model.bin) or torchvision's vgg16-397923af.pth. Download it on a machine with "
    "internet access and pass its path as dgp.perceptual_weights=<file>."
)


def load_vgg16_features(weights: str | Path | None, upto: int) -> nn.Sequential:
    """timm's VGG-16 ``features`` up to layer ``upto`` (inclusive), weights from a local file."""
    import timm

    if weights is None:
        raise FileNotFoundError("no VGG-16 weights given. " + VGG_WEIGHTS_HELP)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"VGG-16 weights file {path} does not exist. " + VGG_WEIGHTS_HELP)
    model = timm.create_model("vgg16", pretrained=False)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # untrusted file
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    own = model.features.state_dict()
    wanted = {f"features.{k}" for k in own}
    missing = sorted(wanted - set(feats))
    if missing:
        raise ValueError(f"{path} is not a VGG-16 checkpoint: missing {missing[:4]} ...")
    model.features.load_state_dict({k[len("features."):]: v for k, v in feats.items()})
    layers = nn.Sequential(*list(model.features.children())[: upto + 1]).eval()
    for p in layers.parameters():
        p.requires_grad_(False)
    return layers


class PerceptualLoss(nn.Module):
    """Per-image sum over layers of mean squared VGG-16 feature differences, images in [-1, 1]."""

    def __init__(self, weights: str | Path | None, layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
                 features: nn.Sequential | None = None) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if unknown:
            raise ValueError(f"unknown VGG-16 layer(s) {unknown}; valid: {sorted(VGG16_LAYERS)}")
        self.taps = sorted(VGG16_LAYERS[name] for name in layers)
        self.features = features if features is not None else load_vgg16_features(weights, self.taps[-1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _taps(self, x: Tensor) -> list[Tensor]:
        h = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
            if i >= self.taps[-1]:
                break
        return out

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            ref = self._taps(target)
        loss = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for a, b in zip(self._taps(x), ref):
            loss = loss + (a - b).pow(2).flatten(1).mean(1)
        return loss
