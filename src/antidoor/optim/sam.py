"""SAM: sharpness-aware minimisation as a wrapper around any base optimiser.

Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021; the adaptive variant (ASAM) from Kwon, Kim, Park & Choi, "ASAM:
Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.

Each step, with g = grad L(w)::

    e     = rho * T^2 g / ||T g||_2        (T = |w| when adaptive, else the identity; one global norm)
    g_sam = grad L(w + e)                  (the ascent: gradient at the worst nearby point)
    w     = base_step(w, g_sam)            (weights restored to w exactly first, then the base optimiser steps)

``step(closure)`` runs both evaluations: ``closure`` must zero the gradients, compute the loss,
call ``backward()`` and return the loss; it is called twice. ``first_step``/``second_step`` are
public for loops that compute the two gradients themselves. The base optimiser keeps its own state
(momentum, Adam moments); SAM shares its parameter groups, so a learning-rate scheduler built on
either one drives both. ``rho`` and ``adaptive`` live in each parameter group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from antidoor.errors import AntidoorError


class SAM(torch.optim.Optimizer):
    """>>> opt = SAM(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), rho=0.05)
    >>> opt.step(closure)   # closure: zero_grad, loss, backward, return loss
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise AntidoorError(f"SAM wraps a torch.optim.Optimizer, got {type(base).__name__}")
        if not rho >= 0:
            raise AntidoorError(f"SAM rho = {rho!r}: must be >= 0")
        self.base = base
        self.eps = eps
        super().__init__(base.param_groups, {"rho": rho, "adaptive": adaptive})
        # one set of groups for both, so schedulers and zero_grad reach the base optimiser too
        self.param_groups = base.param_groups
        for group in self.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = [((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(2)
                 for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not norms:
            return torch.zeros(())
        return torch.stack([n.to(norms[0].device) for n in norms]).norm(2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e (the ascent), remembering w exactly."""
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + self.eps)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["w"] = p.detach().clone()
                e = (p * p if group["adaptive"] else 1.0) * p.grad * scale.to(p.device)
                p.add_(e)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly, then take the base optimiser's step with the gradient found at w + e."""
        for group in self.param_groups:
            for p in group["params"]:
                w = self.state[p].pop("w", None)
                if w is not None:
                    p.copy_(w)
        self.base.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise AntidoorError("SAM.step needs a closure that zeroes the gradients, computes the loss and calls backward()")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss
