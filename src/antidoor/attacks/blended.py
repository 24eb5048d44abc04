"""Blended: alpha-blend a fixed pattern over the whole image.

Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017. x' = (1 - alpha) * x + alpha * pattern, alpha = 0.2 for training and test
(BackdoorBench's default).

Deviation: BackdoorBench blends a 'hello kitty' photo that we do not ship. Our default pattern
is uniform noise drawn once from the attack seed, the other blend key of Chen et al.; any image
file can be given as ``pattern`` instead (resized to the data's size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from antidoor.attacks.base import ATTACKS, Attack, AttackParams
from antidoor.errors import AntidoorError


class BlendedParams(AttackParams):
    alpha: float = Field(0.2, gt=0, le=1, description="blend weight of the pattern")
    pattern: str = Field("noise", description="'noise' (seeded uniform noise) or the path of an image file")


@ATTACKS.register("blended")
class Blended(Attack):
    name = "blended"
    Params = BlendedParams
    params: BlendedParams

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        c, h, w = self.image_shape
        if self.params.pattern == "noise":
            return {"pattern": torch.rand(c, h, w, generator=generator)}
        return {"pattern": _read_pattern(self.params.pattern, c, h, w)}

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        a = self.params.alpha
        return (1 - a) * x + a * self.tensors["pattern"]


def _read_pattern(path: str, c: int, h: int, w: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB" if c == 3 else "L"), dtype=np.float32) / 255
    except OSError as e:
        raise AntidoorError(f"attack.pattern {path!r}: cannot read the image ({e}); use 'noise' or an image file") from None
    t = torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)
    return F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)
