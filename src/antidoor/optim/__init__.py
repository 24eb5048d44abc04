"""Optimiser wrappers (each a ``torch.optim.Optimizer`` around any base optimiser)."""

from antidoor.optim.pam import PAM
from antidoor.optim.sam import SAM

__all__ = ["PAM", "SAM"]
