"""Network architectures trainable by ``fer-batch train`` (all take (N, C, S, S) float input)."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGNet(nn.Module):
    """VGG-style: blocks of ``depth`` 3x3 conv+BN+ReLU then 2x2 max-pool; global average pool; dropout; linear."""

    def __init__(self, num_classes: int = 7, in_ch: int = 1, widths=(32, 64, 128, 256), depth: int = 2, dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for w in widths:
            for _ in range(depth):
                layers += _conv_bn(c, w)
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """ResNet-style for small faces: stem conv, stages of BasicBlocks (stride 2 between), GAP, linear."""

    def __init__(self, num_classes: int = 7, in_ch: int = 1, widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), dropout: float = 0.3):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_ch, widths[0]))
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stages.append(BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.stages(self.stem(x))))
