"""WRN-d-k for CIFAR and SVHN, as in the paper and its official code.

A 16-channel 3x3 stem, three groups of (d - 4) / 6 pre-activation basic blocks of widths
16k, 32k and 64k at strides 1, 2, 2, and a BN-ReLU-pool-fc head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, with a 1x1 projection where the shape changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the official code.
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + identity


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: float, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        blocks = (depth - 4) // 6
        widths = [int(round(16 * width)), int(round(32 * width)), int(round(64 * width))]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        in_planes = 16
        for group, (planes, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
            group_blocks = []
            for i in range(blocks):
                group_blocks.append(
                    WideBasicBlock(in_planes, planes, stride if i == 0 else 1, dropout)
                )
                in_planes = planes
            layers.append(nn.Sequential(*group_blocks))
            setattr(self, f"group{group + 1}", layers[-1])
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.group3(self.group2(self.group1(x)))
        return F.relu(self.bn(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)
        return self.fc(x)
