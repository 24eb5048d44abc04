"""PAM: Path-Aware Minimization, the superficial-safety paper's defense (its official recipe).

Min, Qin, Zhang, Shen & Cheng, "Uncovering, Explaining, and Mitigating the Superficial Safety of
Backdoor Defense", NeurIPS 2024 (arXiv 2410.09838), Section 5.

The recipe: BTI-DBF(U)'s inversion (:mod:`antidoor.defenses.btidbf`: feature mask, generator) makes
samples G(x) that carry the model's backdoor features; the model is then fine-tuned with
cross-entropy on clean batches in which 20% of the images are replaced by G(x) with their true
labels, and every step is a PAM step (:class:`antidoor.optim.PAM`): the gradient is taken at
theta~ = theta_t + rho * (theta_0 - theta_t) / ||theta_0 - theta_t||, a point toward the backdoored
weights theta_0 (the model given to the defense), and applied at theta_t.

Defaults (the official ``defense.sh``): rho 0.5, SGD lr 0.01, batch 128, 5% clean data, 30 epochs per
round, 3 rounds, cross-entropy only (no feature term), no weight decay, constant learning rate.
The inversion phases keep BTI-DBF's defaults.

Deviations from the official code, and why:
- SGD momentum is a parameter with default 0.9: the official script's 0.1 is most likely a typo for
  the 0.9 used everywhere else in the paper's recipes (``momentum: 0.1`` reproduces it).
- The generator is trained again in every round (BTI-DBF(U)'s own schedule); the official PAM code
  trains it in round 1 only.
- The model is never deep-copied per batch (the official code copies it at every step); PAM saves
  and restores the parameters' values only.
- ``rho_mode: fraction`` reads rho as a share of the way back to theta_0 instead of a step length.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import BaseModel, Field

from antidoor.defenses.base import DEFENSES
from antidoor.defenses.btidbf import BTIDBF, BTIDBFParams
from antidoor.models.registry import Classifier
from antidoor.optim import PAM
from antidoor.train import TrainConfig, make_optimizer


class PAMSettings(BaseModel):
    """The path-aware step's settings, shared by every ``*-pam`` defense."""

    rho: float = Field(0.5, ge=0, description="PAM radius toward the backdoored weights (0: the base optimiser)")
    rho_mode: Literal["length", "fraction"] = Field("length", description="rho as a step length (official) or a path share")

    def wrap(self, base: torch.optim.Optimizer, backdoored: Iterable[torch.Tensor]) -> PAM:
        return PAM(base, anchor=backdoored, rho=self.rho, mode=self.rho_mode)


class PAMParams(BTIDBFParams, PAMSettings):
    rounds: int = Field(3, ge=1, description="inversion + unlearning rounds")
    epochs: int = Field(30, ge=1, description="PAM fine-tuning epochs per round")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (official script: 0.1, likely a typo for 0.9)")
    feature_weight: float = Field(0.0, ge=0, description="weight of BTI-DBF's feature MSE (the PAM recipe: 0, CE only)")


@DEFENSES.register("pam")
class PAMDefense(BTIDBF):
    name = "pam"
    Params = PAMParams
    params: PAMParams

    def make_optimizer(self, model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
        # built before any update: the model's weights are the backdoored ones, the anchor theta_0
        return self.params.wrap(make_optimizer(model.parameters(), cfg), model.parameters())
