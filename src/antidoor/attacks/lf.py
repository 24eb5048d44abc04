"""LF: a low-frequency universal adversarial perturbation as the trigger.

Zeng, Park, Mao & Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective",
ICCV 2021. The trigger is a smooth (low-pass) perturbation that already pushes a clean model
towards the target class, added to the image and clipped: x' = clip(x + delta). Dirty-label.
BackdoorBench ships one such perturbation for CIFAR-10 (values 0..51 on the 0-255 scale), made by
targeted universal DeepFool on 100 training images of a clean PreAct-ResNet-18, each update
Gaussian low-pass filtered.

Ours is fitted by :meth:`LF.fit`: delta = eps * tanh(blur_sigma(u)), with ``blur_sigma`` a Gaussian
low-pass filter, so delta is smooth and bounded by construction; ``u`` is fitted with Adam
(``lr``, ``steps``) to send ``n_images`` non-target attacker images to the target class on our own
clean surrogate (``surrogate_*``). ``build`` draws the initial ``u`` (seeded noise), so an unfitted
LF attack is a random smooth pattern.

Deviations: gradient descent on a targeted cross-entropy instead of universal DeepFool (simpler,
batched, same aim: a universal low-frequency perturbation towards the target), and a signed
perturbation with eps = 25.5 (the same peak-to-peak range, 51, as BackdoorBench's non-negative
0..51 trigger, without brightening every image). The surrogate is ours: BackdoorBench's clean
model is not available.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from antidoor.attacks.base import ATTACKS, Attack, AttackerData
from antidoor.attacks.surrogate import SurrogateParams, train_surrogate


class LFParams(SurrogateParams):
    eps: float = Field(25.5, gt=0, le=255, description="L-inf bound of the perturbation, 0-255 scale")
    sigma: float = Field(2.0, gt=0, description="width (pixels) of the Gaussian low-pass filter")
    steps: int = Field(200, ge=0, description="optimisation steps of the universal perturbation")
    lr: float = Field(0.05, gt=0, description="Adam learning rate of the perturbation")
    n_images: int = Field(200, ge=1, description="non-target attacker images the perturbation is fitted on")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian low-pass of a (B, C, H, W) batch, reflect padding."""
    h, w = x.shape[-2:]
    r = max(1, min(math.ceil(3 * sigma), (min(h, w) - 1) // 2))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@ATTACKS.register("lf")
class LF(Attack):
    name = "lf"
    needs_prepare = True
    Params = LFParams
    params: LFParams

    def _delta(self, u: torch.Tensor) -> torch.Tensor:
        return self.params.eps / 255 * torch.tanh(gaussian_blur(u[None], self.params.sigma)[0])

    def _initial_u(self, generator: torch.Generator) -> torch.Tensor:
        u = torch.randn(self.image_shape, generator=generator)
        return u / gaussian_blur(u[None], self.params.sigma).std()  # smooth part of unit size

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"perturbation": self._delta(self._initial_u(generator))}

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.tensors["perturbation"]).clamp(0, 1)

    def fit(self, data: AttackerData) -> dict[str, torch.Tensor]:
        p = self.params
        model = train_surrogate(p, data, self.seed)
        others = (data.y != self.target).nonzero().flatten()
        g = torch.Generator().manual_seed(self.seed)
        pick = others[torch.randperm(len(others), generator=g)[:p.n_images].to(others.device)]
        x = data.x[pick].float().div(255)
        target = torch.full((len(x),), self.target, device=x.device)
        u = self._initial_u(torch.Generator().manual_seed(self.seed)).to(x.device).requires_grad_(True)
        opt = torch.optim.Adam([u], lr=p.lr)
        for _ in range(p.steps):
            loss = F.cross_entropy(model((x + self._delta(u)).clamp(0, 1)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        delta = self._delta(u.detach())
        with torch.no_grad():
            fooled = (model((x + delta).clamp(0, 1)).argmax(1) == self.target).float().mean().item()
        self.fit_report = {"surrogate_fooling_rate": fooled}
        return {"perturbation": delta}
