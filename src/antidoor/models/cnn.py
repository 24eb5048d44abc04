"""A small CNN: three conv-BN-ReLU stages with max-pooling, then global pooling and a linear head.

Fast on a CPU; the model of choice for quick experiments and tests. ``width`` is the channel
count of the first stage (default 32).
"""

from __future__ import annotations

import torch
from torch import nn

from antidoor.models.registry import MODELS


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(in_channels, w), *_block(w, w), nn.MaxPool2d(2, ceil_mode=True),
            *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2, ceil_mode=True),
            *_block(2 * w, 4 * w), *_block(4 * w, 4 * w), nn.MaxPool2d(2, ceil_mode=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.avgpool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@MODELS.register("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 3, width: int = 32) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width)
