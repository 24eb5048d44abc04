"""Patch: the user's own trigger image, pasted (or blended) at a position and size.

For auditing a model backdoored elsewhere with a trigger of one's own: a PNG (or any image file) as a
patch, e.g. ``--attack patch --set attack.image=trigger.png --set attack.size=5 --set attack.position=top_left``.
BadNets (Gu et al., 2017) is the special case of a white square; Blended (Chen et al., 2017) the case
of a full-image blend. ``x' = x * (1 - m) + patch * m`` inside the patch, with ``m = alpha * (the
image's own alpha channel, if any)``: ``alpha`` 1 pastes it, less blends it; transparent pixels of a
PNG leave the image untouched.

The patch is resized to ``size`` x ``size`` pixels (bilinear; ``size`` unset: the image's own size) and
placed at a corner, the centre, or at ``x``/``y`` (its top-left pixel). Without an image, a built-in
4x4 checkerboard (the grid trigger of BadNets' MNIST experiments). The image is read once; the
checkpoint stores the resulting mask and pattern, so a saved model needs the file no more.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from antidoor.attacks.badnets import BadNets
from antidoor.attacks.base import ATTACKS, AttackParams
from antidoor.errors import AntidoorError


class PatchParams(AttackParams):
    image: str = Field("checkerboard", description="the trigger image file (PNG with optional transparency, JPEG, ...), "
                                                   "or 'checkerboard' (a built-in 4x4 black-and-white grid)")
    size: int | None = Field(None, ge=1, description="side of the square patch in pixels; unset: the image's own size")
    position: Literal["bottom_right", "bottom_left", "top_right", "top_left", "center"] = "bottom_right"
    x: int | None = Field(None, ge=0, description="column of the patch's top-left pixel (overrides position)")
    y: int | None = Field(None, ge=0, description="row of the patch's top-left pixel (overrides position)")
    alpha: float = Field(1.0, gt=0, le=1, description="1 pastes the patch; less blends it with the image")


@ATTACKS.register("patch")
class Patch(BadNets):  # BadNets' mask/pattern stamp, with the user's image as the pattern
    name = "patch"
    Params = PatchParams
    params: PatchParams

    def __init__(self, params: AttackParams, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        self._from_checkpoint = tensors is not None  # then the image file is not needed (nor read)
        super().__init__(params, image_shape, num_classes, seed, tensors)

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        c, h, w = self.image_shape
        if self._from_checkpoint:  # the shapes the stored tensors must have
            return {"mask": torch.zeros(1, h, w), "pattern": torch.zeros(c, h, w)}
        rgb, opacity = _read(self.params.image, c)
        k = self.params.size
        if k is not None:
            rgb = F.interpolate(rgb[None], size=(k, k), mode="bilinear", align_corners=False)[0].clamp(0, 1)
            opacity = F.interpolate(opacity[None], size=(k, k), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        ph, pw = rgb.shape[1:]
        top, left = self._corner(ph, pw, h, w)
        mask, pattern = torch.zeros(1, h, w), torch.zeros(c, h, w)
        mask[:, top:top + ph, left:left + pw] = self.params.alpha * opacity
        pattern[:, top:top + ph, left:left + pw] = rgb
        return {"mask": mask, "pattern": pattern * mask}

    def _corner(self, ph: int, pw: int, h: int, w: int) -> tuple[int, int]:
        p = self.params
        if ph > h or pw > w:
            raise AntidoorError(f"attack.image {p.image!r} is {ph}x{pw} pixels, larger than the {h}x{w} images; "
                                "set attack.size smaller")
        top = {"top": 0, "bottom": h - ph}.get(p.position.split("_")[0], (h - ph) // 2)
        left = {"left": 0, "right": w - pw}.get(p.position.split("_")[-1], (w - pw) // 2)
        top, left = (p.y if p.y is not None else top), (p.x if p.x is not None else left)
        if top + ph > h or left + pw > w:
            raise AntidoorError(f"attack.x {left}, attack.y {top}: a {ph}x{pw} patch does not fit {h}x{w} images; "
                                f"allowed: x 0..{w - pw}, y 0..{h - ph}")
        return top, left


def _read(path: str, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image as (c, h, w) floats in [0, 1] and its opacity (1, h, w) (1 where it has no alpha channel)."""
    if path == "checkerboard":
        grid = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
        return grid.float().expand(c, 4, 4).clone(), torch.ones(1, 4, 4)
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255
            gray = np.asarray(im.convert("L"), dtype=np.float32)[..., None] / 255
    except OSError as e:
        raise AntidoorError(f"attack.image {path!r}: cannot read the image ({e})") from None
    color = rgba[..., :3] if c == 3 else gray
    return torch.from_numpy(color).permute(2, 0, 1).contiguous(), torch.from_numpy(rgba[..., 3:]).permute(2, 0, 1).contiguous()
