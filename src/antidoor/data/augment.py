"""Batched augmentation on tensors already on the device (no per-sample PIL work)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop each image back to its size at a random offset.

    One gather for the whole batch: offsets are drawn per sample and turned into row/column indices.
    """
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w)
    cols = (dx + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    # gather whole padded rows first, then the columns inside them
    by_rows = padded.gather(2, rows[..., :1].expand(b, c, h, w + 2 * padding))
    return by_rows.gather(3, cols)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


class Augment:
    """Random crop with padding, then a horizontal flip where the dataset allows it."""

    def __init__(self, padding: int = 4, hflip: bool = True) -> None:
        self.padding = padding
        self.hflip = hflip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop(x, self.padding, generator)
        return random_hflip(x, generator) if self.hflip else x
