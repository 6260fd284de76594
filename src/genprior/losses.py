"""Loss terms, per image: MSE, L1, DGP's D-feature loss and the perceptual (VGG-16) loss.

Every function returns one value per image (``[B]``): the images of a batch are fitted
independently, so each image's gradient must come from its own term only. A batch of one uses
the very functions the references call (``F.mse_loss``, ``F.l1_loss``, summed one feature at
a time), so that B = 1 computes what they compute, op for op (docs/faithfulness.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genprior.errors import MissingFileError
from genprior.weights import WeightsFileError, read_state_dict

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


def mse_per_image(x: Tensor, target: Tensor) -> Tensor:
    """mean((x - target)^2) of every image, [B]; B = 1 is the reference's nn.MSELoss."""
    if x.shape[0] == 1 and x.shape == target.shape:
        return F.mse_loss(x, target).reshape(1)
    return (x - target).square().flatten(1).mean(1)


def l1_per_image(x: Tensor, target: Tensor) -> Tensor:
    """mean|x - target| of every image, [B]; B = 1 is the reference's F.l1_loss."""
    if x.shape[0] == 1 and x.shape == target.shape:
        return F.l1_loss(x, target).reshape(1)
    return (x - target).abs().flatten(1).mean(1)


def feature_l1_terms(fake_feats: Sequence[Tensor], real_feats: Sequence[Tensor]) -> Tensor:
    """Per-image mean |fake - real| of every D feature, ordered from the end: [B, n_feat].

    Column 0 is the pooled vector, column 1 relu(last block output), ... (DGP SPEC §4), the
    order in which the reference's DiscriminatorLoss takes them. Each mean runs over one
    image's elements only, so a batch gives B independent values. A real feature list with
    batch 1 broadcasts against a fake batch.
    """
    if len(fake_feats) != len(real_feats):
        raise ValueError(f"{len(fake_feats)} fake features vs {len(real_feats)} real features")
    terms = [l1_per_image(fake, real) for fake, real in zip(reversed(fake_feats), reversed(real_feats))]
    return torch.stack(terms, 1)


def d_feature_loss(fake_feats: Sequence[Tensor], real_feats: Sequence[Tensor], ftr_num: int) -> Tensor:
    """DGP's DiscriminatorLoss: per image, the sum of the last ``ftr_num`` L1 terms -> [B]."""
    if not 1 <= ftr_num <= len(fake_feats):
        raise ValueError(f"ftr_num must be in 1..{len(fake_feats)}, got {ftr_num}")
    terms = feature_l1_terms(fake_feats[-ftr_num:], real_feats[-ftr_num:])
    loss = terms[:, 0]
    for j in range(1, ftr_num):  # summed one by one, in the reference's order
        loss = loss + terms[:, j]
    return loss


def load_vgg16_features(weights: str | Path | None, upto: int) -> nn.Sequential:
    """timm's VGG-16 ``features`` up to layer ``upto`` (inclusive), weights from a local file."""
    import timm  # heavy import, needed only when a VGG-16 loss is built

    if weights is None:
        raise MissingFileError("no VGG-16 weights given. " + VGG_WEIGHTS_HELP)
    path = Path(weights)
    if not path.is_file():
        raise MissingFileError(f"VGG-16 weights file {path} does not exist. " + VGG_WEIGHTS_HELP)
    model = timm.create_model("vgg16", pretrained=False)
    state = read_state_dict(path, "VGG-16 weights (perceptual loss)")
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    own = model.features.state_dict()
    wanted = {f"features.{k}" for k in own}
    missing = sorted(wanted - set(feats))
    if missing:
        raise WeightsFileError(f"VGG-16 weights (perceptual loss) {path} is not a VGG-16 checkpoint: "
                               f"missing {missing[:4]} ...")
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
