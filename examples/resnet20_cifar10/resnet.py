"""ResNet-20/56 for CIFAR-10 (He et al. 2016, option-A shortcuts), matching the shared weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad channels (planes // 4 per side)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes = stride != 1 or in_planes != planes
        self.shortcut = ShortcutA(planes) if changes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, in_planes = (16, 32, 64), 16
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet20() -> ResNetCifar:
    return ResNetCifar(3)


def resnet56() -> ResNetCifar:
    return ResNetCifar(9)
