"""WaNet: an imperceptible warp of the image, with noise-mode samples that keep their labels.

Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021. Defaults follow
BackdoorBench: a uniform[-1, 1] control grid of k x k = 4 x 4 points, divided by its mean
absolute value and upsampled bicubically; the sampling grid is identity + s * field / H with
s = 0.5, times ``grid_rescale`` = 1, clamped to [-1, 1]. In each training batch the poisoned
samples are warped and relabelled, and ``cross_ratio`` = 2 times as many other samples are warped
with the grid plus per-pixel uniform[-1, 1] / H noise and keep their labels (noise mode), which
stops the model from learning any warp as the trigger.

Deviations: BackdoorBench warps normalised tensors and then uses its own crop/rotation/flip;
we warp [0, 1] pixels (the same images, since warping commutes with per-channel normalisation up
to the zero padding, which the clamped grid never reaches) and use the shared augmentation.
Poisoned indices are fixed for the run (as for every attack) instead of the first samples of
each batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from antidoor.attacks.base import ATTACKS, Attack, AttackParams, quantize


class WaNetParams(AttackParams):
    k: int = Field(4, ge=2, description="control grid size")
    s: float = Field(0.5, gt=0, description="warp strength")
    grid_rescale: float = Field(1.0, gt=0)
    cross_ratio: float = Field(2.0, ge=0, description="noise-mode samples per poisoned sample in a batch")


@ATTACKS.register("wanet")
class WaNet(Attack):
    name = "wanet"
    Params = WaNetParams
    params: WaNetParams

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        _, h, w = self.image_shape
        k = self.params.k
        field = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
        field = field / field.abs().mean()
        field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=2)[None]
        grid = (identity + self.params.s * field / h) * self.params.grid_rescale
        return {"grid": grid.clamp(-1, 1)}

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.expand(len(x), -1, -1, -1).to(x.dtype), align_corners=True)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self.tensors["grid"])

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, poison: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().poison_batch(x, y, poison, generator)
        n_cross = min(round(self.params.cross_ratio * int(poison.sum())), int((~poison).sum()))
        if n_cross > 0:
            others = (~poison).nonzero().flatten()
            pick = others[torch.randperm(len(others), device=x.device, generator=generator)[:n_cross]]
            _, h, w = self.image_shape
            noise = torch.rand(n_cross, h, w, 2, device=x.device, generator=generator) * 2 - 1
            grid = (self.tensors["grid"] + noise / h).clamp(-1, 1)
            x[pick] = quantize(self._warp(x[pick], grid))
        return x, y
