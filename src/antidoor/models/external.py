"""Architectures from torchvision and timm, and any user ``nn.Module``, behind antidoor's normalising wrapper.

Names are namespaced so they never collide with antidoor's own CIFAR variants: ``torchvision:resnet18``
is torchvision's ImageNet ResNet-18 (7x7 stride-2 stem and max-pool), ``timm:resnet18`` is timm's, and
``resnet18`` stays antidoor's CIFAR ResNet-18 (3x3 stem). Networks are built with random initial
weights only (torchvision ``weights=None``, timm ``pretrained=False``): antidoor never downloads
weights; a user's trained weights come in through ``antidoor import`` (:mod:`antidoor.importer`).
``timm`` is optional (``pip install antidoor[timm]``).

Inside a :class:`~antidoor.models.registry.Classifier` the network sits in :class:`ExternalNet`
(``backbone.net.<its own keys>``), which gives it the ``head`` and ``forward_features`` that
antidoor's defenses use (the last linear layer producing the class scores, and its input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from antidoor.errors import AntidoorError

NAMESPACES = ("torchvision", "timm")


class ExternalNet(nn.Module):
    """Any classifier network, with ``head`` (its last ``nn.Linear``) and ``forward_features`` (the head's input)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise AntidoorError(f"{type(net).__name__} has no nn.Linear layer giving the class scores; antidoor needs one")
        self._head_name = next(n for n, m in net.named_modules() if m is linears[-1])

    @property
    def head(self) -> nn.Linear:  # a property, not a submodule: the state dict keeps the network's own keys only
        return self.net.get_submodule(self._head_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            self.net(x)
        finally:
            handle.remove()
        return seen[-1]


def _torchvision(arch: str) -> Callable[..., nn.Module]:
    import torchvision

    if arch not in torchvision.models.list_models():
        raise AntidoorError(f"unknown model 'torchvision:{arch}'; torchvision has e.g. resnet18, resnet50, vgg11_bn, "
                            "mobilenet_v3_small, efficientnet_b0, vit_b_16 (torchvision.models.list_models())")

    def build(num_classes: int, **kwargs: Any) -> nn.Module:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)

    return build


def _timm(arch: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise AntidoorError(f"model 'timm:{arch}' needs timm, which is not installed; pip install 'antidoor[timm]'") from None
    if not timm.is_model(arch):
        raise AntidoorError(f"unknown model 'timm:{arch}'; see timm.list_models()")

    def build(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)

    return build


def external_factory(name: str) -> Callable[..., nn.Module]:
    """The factory for ``namespace:arch`` (``num_classes``, ``in_channels``, the library's own keyword arguments)."""
    namespace, _, arch = name.partition(":")
    if namespace not in NAMESPACES or not arch:
        raise AntidoorError(f"unknown model {name!r}; namespaced names are torchvision:<arch> or timm:<arch>")
    make = _torchvision(arch) if namespace == "torchvision" else _timm(arch)

    def factory(num_classes: int, in_channels: int = 3, **kwargs: Any) -> ExternalNet:
        if namespace == "torchvision":
            if in_channels != 3:
                raise AntidoorError(f"model {name!r} takes 3-channel images; got in_channels {in_channels}")
            return ExternalNet(make(num_classes, **kwargs))
        return ExternalNet(make(num_classes, in_channels, **kwargs))

    return factory


def wrap(module: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], arch: str | None = None,
         **arch_kwargs: Any) -> Any:
    """Wrap a user's trained ``nn.Module`` (taking normalised images) into a Classifier (taking [0, 1] pixels).

    ``mean``/``std`` are the normalisation it was trained with. ``arch`` (e.g. ``torchvision:resnet18``) records
    how to rebuild it, so a checkpoint saved from it loads again; without it the checkpoint cannot be rebuilt.

    >>> model = wrap(torchvision.models.resnet18(num_classes=10), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261),
    ...              arch="torchvision:resnet18")
    """
    from antidoor.models.registry import Classifier

    net = ExternalNet(module)
    in_channels = len(mean)
    if len(std) != in_channels or in_channels not in (1, 3):
        raise AntidoorError(f"normalisation has {len(mean)} means and {len(std)} stds; give one of each per channel (1 or 3)")
    spec = {"name": arch or f"python:{type(module).__qualname__}", "num_classes": net.head.out_features,
            "in_channels": in_channels, "kwargs": arch_kwargs}
    return Classifier(net, tuple(mean), tuple(std), spec)


__all__ = ["NAMESPACES", "ExternalNet", "external_factory", "wrap"]
