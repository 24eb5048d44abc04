"""Optimiser wrappers (each a ``torch.optim.Optimizer`` around any base optimiser)."""

from antidoor.optim.pam import PAM

__all__ = ["PAM"]
