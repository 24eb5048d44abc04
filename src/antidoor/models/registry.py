"""The model registry and the normalising wrapper every model is saved in."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from antidoor.errors import AntidoorError
from antidoor.registry import Registry

MODELS: Registry[Any] = Registry("model")


class Classifier(nn.Module):
    """Takes [0, 1] pixels, normalises with the dataset's statistics, runs the backbone.

    Attacks and perturbations all live in pixel space; normalisation is part of the model and is
    saved with it (``mean``/``std`` buffers). ``arch`` records how to rebuild the backbone.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], arch: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (input of the final linear layer ``backbone.head``)."""
        return self.backbone.forward_features((x - self.mean) / self.std)

    @torch.no_grad()
    def fit_to_data(self, images: torch.Tensor) -> bool:
        """Data-dependent initialisation, for backbones that have one (``whitened_cnn``'s whitening).

        ``images`` are uint8 (N, C, H, W) training images; returns whether anything was fitted.
        """
        fit = getattr(self.backbone, "fit_whitening", None)
        if fit is None:
            return False
        fit((images.float().div(255) - self.mean) / self.std)
        return True


def model_factory(name: str) -> Any:
    """The factory of a registered model, or of a namespaced one (``torchvision:resnet18``, ``timm:vit_tiny_patch16_224``)."""
    if ":" in name:
        from antidoor.models.external import external_factory

        return external_factory(name)
    return MODELS.get(name)


def build_model(name: str, num_classes: int, in_channels: int = 3, mean: tuple[float, ...] | None = None,
                std: tuple[float, ...] | None = None, **kwargs: Any) -> Classifier:
    """Create a registered architecture wrapped with its input normalisation.

    >>> model = build_model("preact_resnet18", num_classes=10, width=16)
    """
    factory = model_factory(name)
    if ":" in name:  # torchvision:/timm: networks have their own widths; antidoor's model.width does not apply
        kwargs.pop("width", None)
    if num_classes < 2:
        raise AntidoorError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels not in (1, 3):
        raise AntidoorError(f"in_channels must be 1 or 3, got {in_channels}")
    width = kwargs.get("width")
    if width is not None and (not isinstance(width, int) or width < 1):
        raise AntidoorError(f"model.width must be a positive integer, got {width!r}")
    try:
        backbone = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as e:
        raise AntidoorError(f"model {name!r}: bad arguments {kwargs} ({e})") from None
    mean = tuple(mean) if mean else (0.5,) * in_channels
    std = tuple(std) if std else (0.5,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise AntidoorError(f"normalisation has {len(mean)} means and {len(std)} stds for {in_channels} channels")
    arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "kwargs": kwargs}
    return Classifier(backbone, mean, std, arch)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An inference-only copy for a model that never trains again (SAU's ``f_ref``, a teacher, ...).

    The copy is in eval mode with ``requires_grad`` off, and every conv -> BatchNorm pair is folded
    into one convolution with a bias (``torch.fx``): in eval mode a BatchNorm is an affine map, so
    the copy computes the same function up to float rounding, with no BatchNorm left to run forward
    or backward. Gradients with respect to the *input* still flow. A model that ``torch.fx`` cannot
    trace (data-dependent control flow) is copied unfolded.
    """
    import copy

    from torch.fx.experimental.optimization import fuse

    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    try:
        folded = fuse(frozen, inplace=True)
    except Exception:  # tracing is best-effort: an untraceable model is still correct unfolded
        return frozen
    folded = folded.eval().requires_grad_(False)
    if hasattr(model, "arch"):  # keep the description for code that inspects the copy
        folded.arch = model.arch
    return folded
