"""SAU-PAM: Shared Adversarial Unlearning with every unlearning step a PAM step.

Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning", NeurIPS 2023 (:mod:`antidoor.defenses.sau`),
with the optimiser of Min, Qin, Zhang, Shen & Cheng, "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense", NeurIPS 2024 (:class:`antidoor.optim.PAM`), which composes
with any fine-tuning based defense.

Per batch: the shared adversarial perturbation d is found at the current weights theta_t (SAU's
step 1, unchanged); then PAM moves to theta~ = theta_t + rho * (theta_0 - theta_t) / ||theta_0 - theta_t||
(theta_0: the backdoored weights given to the defense), SAU's unlearning loss is evaluated there
(x and x + d in one forward), its gradient is taken, theta_t is restored and the Adam step applied.
SAU reuses f(x) from before step 1 in its loss; here it cannot (the loss lives at theta~), so each
batch costs one extra forward of x. Defaults: SAU's, plus ``rho: auto`` (chosen on the defender's
validation data, :class:`antidoor.defenses.pam.PathAware`; PAM's official value is 0.5).
"""

from __future__ import annotations

import torch
from torch import nn

from antidoor.defenses.base import DEFENSES
from antidoor.defenses.pam import PAMSettings, PathAware
from antidoor.defenses.sau import SAU, SAUParams
from antidoor.models.registry import Classifier
from antidoor.optim import PAM


class SAUPAMParams(SAUParams, PAMSettings):
    """SAU's parameters plus ``rho`` and ``rho_mode``."""


@DEFENSES.register("sau-pam")
class SAUPAM(PathAware, SAU):
    name = "sau-pam"
    Params = SAUPAMParams
    params: SAUPAMParams
    reuse_clean_logits = False

    def make_optimizer(self, f: Classifier) -> torch.optim.Optimizer:
        return self.path_aware(super().make_optimizer(f), f.parameters())  # anchor: the backdoored weights

    def unlearn(self, optimizer: torch.optim.Optimizer, f: Classifier, f_ref: nn.Module, logits: torch.Tensor | None,
                x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, y0_ref: torch.Tensor) -> None:
        assert isinstance(optimizer, PAM) and logits is None
        optimizer.perturb()  # to theta~; SAU's step then computes the loss there, and PAM.step restores theta_t first
        super().unlearn(optimizer, f, f_ref, None, x, y, delta, y0_ref)
