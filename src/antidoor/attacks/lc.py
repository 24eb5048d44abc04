"""LC: label-consistent backdoor, adversarially perturbed target-class images plus a corner trigger.

Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks", arXiv 1912.02771, 2019. Clean-label:
only target-class training images are poisoned and keep their labels. Each is first made hard to
classify by an untargeted L-inf PGD perturbation against a classifier, so the model leans on the
trigger to get them right; then the trigger is stamped. Defaults follow BackdoorBench: PGD with
eps = 8, step 1.5 (0-255 scale), 100 steps, no random start, in [0, 1] pixel space; the trigger is a
3 x 3 black-and-white checkerboard in all four corners at amplitude 1 (each pixel + or - 255, so it
saturates to black or white; ``amplitude`` < 1 is the paper's reduced-amplitude trigger). Test
images get the trigger only. ``pratio`` counts against the whole training set, as for SIG.

Deviations: the official attack perturbs with an adversarially trained ResNet-18 that is not
available; we attack our own clean surrogate (``surrogate_*``), trained on the attacker's data.
The perturbed images are kept as trigger tensors (``source_index``, ``source_images``) and swapped
in for the poisoned indices before augmentation, so the checkpoint holds them (oracle references
see the very images that were trained on). The trigger is stamped at ``stage`` (default: after
augmentation, like every attack here; BackdoorBench stamps it before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from antidoor.attacks.base import ATTACKS, Attack, AttackerData
from antidoor.attacks.surrogate import SurrogateParams, accuracy, train_surrogate
from antidoor.errors import AntidoorError

CHECKER = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


class LCParams(SurrogateParams):
    eps: float = Field(8.0, gt=0, le=255, description="L-inf bound of the PGD perturbation, 0-255 scale")
    step: float = Field(1.5, gt=0, le=255, description="PGD step size, 0-255 scale")
    steps: int = Field(100, ge=0, description="PGD steps (0: no adversarial perturbation)")
    amplitude: float = Field(1.0, gt=0, le=1, description="trigger amplitude: each trigger pixel +/- amplitude, clipped")


@ATTACKS.register("lc")
class LC(Attack):
    name = "lc"
    clean_label = True
    needs_prepare = True
    Params = LCParams
    params: LCParams

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        c, h, w = self.image_shape
        if min(h, w) < 6:
            raise AntidoorError(f"attack 'lc' needs images of at least 6x6 for its corner triggers, got {h}x{w}")
        sign = torch.zeros(1, h, w)  # +1 white, -1 black, 0 untouched
        for rows in (slice(0, 3), slice(h - 3, h)):
            for cols in (slice(0, 3), slice(w - 3, w)):
                sign[0, rows, cols] = 2 * CHECKER - 1
        return {"pattern": (self.params.amplitude * sign).expand(c, h, w).contiguous()}

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.tensors["pattern"]).clamp(0, 1)

    def fit(self, data: AttackerData) -> dict[str, torch.Tensor]:
        p = self.params
        idx = data.poison
        if len(idx) == 0 or p.steps == 0:
            return {"source_index": idx.clone(), "source_images": data.x[idx].clone()}
        model = train_surrogate(p, data, self.seed)
        eps, step = p.eps / 255, p.step / 255
        out = []
        for start in range(0, len(idx), 256):
            chunk = idx[start:start + 256]
            x0, y = data.x[chunk].float().div(255), data.y[chunk]
            x = x0.clone()
            for _ in range(p.steps):
                x.requires_grad_(True)
                grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
                x = (x.detach() + step * grad.sign()).clamp(x0 - eps, x0 + eps).clamp(0, 1)
            out.append(x.mul(255).round().to(torch.uint8))
        adv = torch.cat(out)
        self.fit_report = {"surrogate_acc": accuracy(model, data.x, data.y),
                           "surrogate_acc_on_perturbed": accuracy(model, adv, data.y[idx])}
        return {"source_index": idx.clone(), "source_images": adv}

    def replace_sources(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        src = self.tensors.get("source_index")
        if src is None or len(src) == 0:
            return x
        pos = torch.searchsorted(src, idx).clamp_max(len(src) - 1)
        hit = src[pos] == idx
        if not hit.any():
            return x
        x = x.clone()
        x[hit] = self.tensors["source_images"][pos[hit]].to(x.dtype).div(255)
        return x
