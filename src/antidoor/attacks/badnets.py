"""BadNets: a small patch in a corner.

Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain", 2017. Defaults follow BackdoorBench: a 3x3 white square flush with the
bottom-right corner, all-to-one to class 0, 10% of the training set.

Deviation: BackdoorBench stamps the patch before crop-and-flip augmentation; our default
``stage="after_augment"`` stamps it after, so the trigger the model learns sits exactly where
test images carry it (``stage="before_augment"`` restores BackdoorBench's behaviour). On the
bundled 5,000 images (small_cnn width 16, 20 epochs, lr 0.05, seed 0) asr is 42.2% with the patch
stamped before augmentation and 95.1% after it: crops and flips scatter a 3x3 patch over the
image, and 500 poisoned images are too few to learn every position.
"""

from __future__ import annotations

import torch
from pydantic import Field

from antidoor.attacks.base import ATTACKS, Attack, AttackParams, Corner, corner_mask


class BadNetsParams(AttackParams):
    patch_size: int = Field(3, ge=1, description="side of the square patch in pixels")
    position: Corner = "bottom_right"
    value: float = Field(1.0, ge=0, le=1, description="patch intensity in [0, 1] (1 = white)")


@ATTACKS.register("badnets")
class BadNets(Attack):
    name = "badnets"
    Params = BadNetsParams
    params: BadNetsParams

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        mask = corner_mask(self.params.patch_size, self.image_shape, self.params.position)
        return {"mask": mask, "pattern": torch.full(self.image_shape, self.params.value) * mask}

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        mask, pattern = self.tensors["mask"], self.tensors["pattern"]
        return x * (1 - mask) + pattern
