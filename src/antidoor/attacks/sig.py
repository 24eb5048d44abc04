"""SIG: a sinusoidal signal on target-class images only (clean-label).

Barni, Kallas & Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning", ICIP 2019. Defaults follow BackdoorBench: x' = clip(x + delta * sin(2 pi f j / W)),
delta = 40 (on the 0-255 scale), f = 6, the same over rows and channels. Only target-class
training images are poisoned and keep their labels; ``pratio`` counts against the whole training
set, so 0.1 of CIFAR-10 is every target-class image. Test images of all other classes get the
signal.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from antidoor.attacks.base import ATTACKS, Attack, AttackParams


class SIGParams(AttackParams):
    delta: float = Field(40.0, gt=0, le=255, description="signal amplitude on the 0-255 scale")
    frequency: float = Field(6.0, gt=0, description="periods across the image width")


@ATTACKS.register("sig")
class SIG(Attack):
    name = "sig"
    clean_label = True
    Params = SIGParams
    params: SIGParams

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        c, h, w = self.image_shape
        j = torch.arange(w, dtype=torch.float32)
        signal = self.params.delta / 255 * torch.sin(2 * math.pi * self.params.frequency * j / w)
        return {"signal": signal.view(1, 1, w).expand(c, h, w).contiguous()}

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.tensors["signal"]).clamp(0, 1)
