"""In-memory image datasets: uint8 NCHW tensors, moved to the device once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from antidoor.errors import AntidoorError


@dataclass
class ImageData:
    """A classification dataset held as uint8 tensors (N, C, H, W) and int64 labels.

    ``hflip`` says whether horizontal flips are a valid augmentation (not for digits or signs).
    ``mean``/``std`` are per-channel statistics of the training images in [0, 1]; the model
    wrapper normalises with them.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    hflip: bool = True
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise AntidoorError(f"dataset {self.name!r}: {split} images must be uint8 (N, C, H, W), "
                                    f"got {x.dtype} {tuple(x.shape)}")
            if y.ndim != 1 or len(y) != len(x):
                raise AntidoorError(f"dataset {self.name!r}: {len(x)} {split} images but labels of shape {tuple(y.shape)}")
            if len(x) == 0:
                raise AntidoorError(f"dataset {self.name!r}: the {split} split is empty")
            if y.min() < 0 or y.max() >= len(self.classes):
                raise AntidoorError(f"dataset {self.name!r}: {split} labels must lie in [0, {len(self.classes) - 1}], "
                                    f"got {int(y.min())}..{int(y.max())}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise AntidoorError(f"dataset {self.name!r}: train images {tuple(self.x_train.shape[1:])} and "
                                f"test images {tuple(self.x_test.shape[1:])} differ in shape")
        if self.x_train.shape[1] not in (1, 3):
            raise AntidoorError(f"dataset {self.name!r}: images need 1 or 3 channels, got {self.x_train.shape[1]}")
        if not self.mean:
            x = self.x_train.float().div_(255)
            self.mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
            self.std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device) -> ImageData:
        """The same dataset with its tensors on ``device`` (a no-op when already there)."""
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return ImageData(self.name, **moved, classes=self.classes, hflip=self.hflip, mean=self.mean, std=self.std,
                         source=self.source)

    def describe(self) -> dict[str, Any]:
        """What the checkpoint sidecar records about the data."""
        return {
            "name": self.name, "classes": self.classes, "image_shape": list(self.image_shape),
            "n_train": len(self.x_train), "n_test": len(self.x_test), "hflip": self.hflip,
            "source": self.source,
        }
