"""ImageNet classifiers as feature maps Φ_L for network inversion (DIP paper §4.5-4.6).

AlexNet, VGG-16 and VGG-19 are torchvision's architectures (built with ``weights=None``) with
torchvision's published ImageNet weights read from a local file through
``genprior.weights.read_state_dict`` (``weights_only=True``; the files are untrusted):

==========  ==========================  ==============================================
net         file                        URL
==========  ==========================  ==============================================
alexnet     alexnet-owt-7be5be79.pth    https://download.pytorch.org/models/<file>
vgg16       vgg16-397923af.pth          https://download.pytorch.org/models/<file>
vgg19       vgg19-dcbb9e9d.pth          https://download.pytorch.org/models/<file>
==========  ==========================  ==============================================

``weights`` None looks in torch's hub cache (``<torch.hub.get_dir()>/checkpoints/<file>``),
where torchvision itself would download it; "random" is a seeded random init (tests, the
``*_quick`` presets); anything else is a path.

``FeatureExtractor(net, layer)`` maps [0, 1] RGB images to the activations of one named layer
(ImageNet mean/std normalisation first). Layer names follow the Caffe models the paper inverts:
``convK`` is a convolution's output before its ReLU, ``reluK`` after it, ``poolK`` after the
max-pool, ``fc6``..``fc8`` the linear layers' outputs before their ReLU (``fc8``: the class
logits, before the soft-max). VGG names are ``convB_I`` / ``reluB_I`` / ``poolB``. The networks
run in eval mode (dropout off). torchvision's AlexNet is the "one weird trick" variant without
local response normalisation, so its conv layers differ from the Caffe AlexNet of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from genprior.errors import InvalidSettingError, MissingFileError
from genprior.weights import WeightsFileError, read_state_dict

__all__ = ["NETWORKS", "FeatureExtractor", "build_classifier", "check_weights_file", "layer_names",
           "select_unit", "weights_path"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
URL = "https://download.pytorch.org/models/{file}"


@dataclass(frozen=True)
class NetworkSpec:
    file: str
    # convolutions per block (VGG) or None (AlexNet's own names)
    vgg_blocks: tuple[int, ...] | None


NETWORKS: dict[str, NetworkSpec] = {
    "alexnet": NetworkSpec("alexnet-owt-7be5be79.pth", None),
    "vgg16": NetworkSpec("vgg16-397923af.pth", (2, 2, 3, 3, 3)),
    "vgg19": NetworkSpec("vgg19-dcbb9e9d.pth", (2, 2, 4, 4, 4)),
}

# torchvision's AlexNet: features[i] and classifier[i] under Caffe's names.
_ALEXNET_FEATURES = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3", "relu3",
                     "conv4", "relu4", "conv5", "relu5", "pool5"]
_ALEXNET_CLASSIFIER = ["drop6", "fc6", "relu6", "drop7", "fc7", "relu7", "fc8"]
_VGG_CLASSIFIER = ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]


def _feature_names(net: str) -> list[str]:
    blocks = NETWORKS[net].vgg_blocks
    if blocks is None:
        return list(_ALEXNET_FEATURES)
    names: list[str] = []
    for b, convs in enumerate(blocks, start=1):
        for i in range(1, convs + 1):
            names += [f"conv{b}_{i}", f"relu{b}_{i}"]
        names.append(f"pool{b}")
    return names


def layer_names(net: str) -> list[str]:
    """Every layer ``FeatureExtractor`` can stop at, in forward order (dropouts excluded)."""
    _check_net(net)
    classifier = _ALEXNET_CLASSIFIER if NETWORKS[net].vgg_blocks is None else _VGG_CLASSIFIER
    return _feature_names(net) + [n for n in classifier if not n.startswith("drop")]


def _check_net(net: str) -> None:
    if net not in NETWORKS:
        raise InvalidSettingError(f"inversion.classifier must be one of {', '.join(NETWORKS)}, got {net!r}")


def weights_path(net: str, weights: str | None) -> Path:
    """Where the published weights of ``net`` are read from (None: the torch hub cache)."""
    _check_net(net)
    if weights:
        return Path(weights).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / NETWORKS[net].file


def check_weights_file(net: str, weights: str | None = None) -> Path:
    """The file ``build_classifier`` would read for ``net``; a missing one is a MissingFileError
    that says where to get it and where to put it (checked before a run writes anything)."""
    path = weights_path(net, weights)
    if not path.is_file():  # read_state_dict would shorten this hint
        where = "the torch hub cache" if not weights else "inversion.classifier_weights"
        raise MissingFileError(
            f"{net} ImageNet weights (network inversion) not found: {path} ({where}). Download "
            f"{URL.format(file=NETWORKS[net].file)} and put it at {path}, or pass another copy's "
            "path as inversion.classifier_weights=<file>")
    return path


def build_classifier(net: str, weights: str | None = None, seed: int = 0) -> nn.Module:
    """torchvision's ``net`` in eval mode, frozen, with the published ImageNet weights (a local
    file, ``weights_path``) or, for ``weights="random"``, torchvision's init under ``seed``."""
    _check_net(net)
    import torchvision  # heavy import, needed only to build a classifier

    builder = getattr(torchvision.models, net)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = builder(weights=None)
    else:
        path = check_weights_file(net, weights)
        state = read_state_dict(path, f"{net} ImageNet weights (network inversion)")
        model = builder(weights=None)  # after the read: a missing file fails fast
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = " ".join(str(err).split())[:200]
            raise WeightsFileError(f"{net} ImageNet weights {path} do not fit torchvision's {net}: {first}") from err
    return model.eval().requires_grad_(False)


class FeatureExtractor(nn.Module):
    """Φ_L: [B, 3, H, W] images in [0, 1] -> the activations of ``layer`` of ``model``.

    The classifier is shared by all images and frozen; images are independent (no batch
    statistics), so a batch computes what B single images compute.
    """

    def __init__(self, net: str, model: nn.Module, layer: str) -> None:
        super().__init__()
        names = layer_names(net)
        if layer not in names:
            raise InvalidSettingError(f"unknown {net} layer {layer!r}; valid: {', '.join(names)}")
        self.net, self.layer = net, layer
        features = _feature_names(net)
        classifier = _ALEXNET_CLASSIFIER if NETWORKS[net].vgg_blocks is None else _VGG_CLASSIFIER
        if layer in features:
            modules = list(model.features.children())[: features.index(layer) + 1]
            self.features = nn.Sequential(*modules)
            self.head: nn.Sequential | None = None
        else:
            self.features = model.features
            self.pool = model.avgpool
            self.head = nn.Sequential(*list(model.classifier.children())[: classifier.index(layer) + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # always eval: dropout off (Lightning calls train())

    @property
    def spatial(self) -> bool:
        """Whether Φ_L has spatial dimensions (conv layers) or not (fc layers)."""
        return self.head is None

    def forward(self, x: Tensor) -> Tensor:
        h = self.features((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        if self.head is not None:
            h = self.head(torch.flatten(self.pool(h), 1))
        return h


def select_unit(features: Tensor, index: Tensor) -> Tensor:
    """Φ(x)_m per image ([B]): the m-th output of an fc layer, or the central pixel of the m-th
    feature map of a conv layer (DIP paper, "Activation maximization"). ``index`` is [B]."""
    rows = torch.arange(features.shape[0], device=features.device)
    index = index.to(features.device)
    if features.ndim == 2:
        return features[rows, index]
    h, w = features.shape[-2:]
    return features[rows, index, h // 2, w // 2]
