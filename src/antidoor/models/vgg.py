"""VGG-16 with batch normalisation, CIFAR variant (one linear classifier after global pooling).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015; BN as in Ioffe & Szegedy 2015. ``width`` is the channel count of the first stage
(64 in the paper). Max-pools round up, so inputs smaller than 32x32 (MNIST's 28x28) work too.
"""

from __future__ import annotations

import torch
from torch import nn

from antidoor.models.registry import MODELS

VGG16 = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


class VGG(nn.Module):
    def __init__(self, plan: tuple[int | str, ...], num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = width * int(item)
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.avgpool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@MODELS.register("vgg16_bn")
def vgg16_bn(num_classes: int, in_channels: int = 3, width: int = 64) -> VGG:
    return VGG(VGG16, num_classes, in_channels, width)
