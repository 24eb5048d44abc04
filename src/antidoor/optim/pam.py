"""PAM: Path-Aware Minimization, as a wrapper around any base optimiser.

Min, Qin, Zhang, Shen & Cheng, "Uncovering, Explaining, and Mitigating the Superficial Safety of
Backdoor Defense", NeurIPS 2024 (arXiv 2410.09838), Section 5.

A SAM-like update whose ascent direction is not the gradient but the path back to the backdoored
weights theta_0 (the "anchor"). With theta_t the current weights, each step::

    d       = theta_0 - theta_t                       (one global L2 norm over every parameter)
    theta~  = theta_t + rho * d / ||d||_2             (mode "length", the official code's reading)
            = theta_t + rho * d                       (mode "fraction": a point a share rho along the path)
    g       = grad L(theta~)                          (the only forward/backward of the step)
    theta_t = base_step(theta_t, g)                   (theta_t restored bit for bit first)

When ||d|| = 0 (the first step of a defense that starts at the backdoored weights) there is no
direction, and the step takes no perturbation: it is the base optimiser's step. Minimising the loss
at points toward the backdoored model pushes the solution off the backdoor-connected path (the
paper's explanation of superficial safety), at the cost of one forward/backward per step (SAM
needs two).

``rho`` defaults to 0.5, the value of the official scripts. The official code reads it as a step
length in weight space (mode ``"length"``); ``"fraction"`` is the other natural reading, offered
for ablations (rho in {0.3, 0.5, 0.7, 0.9} in the paper's ablation).

BatchNorm: only parameters move to theta~; running statistics are buffers, not perturbed, and a
forward in train mode at theta~ updates them with the statistics of the perturbed network (the
one forward of the step runs there). With rho small against ||theta|| the difference is small; a
defense that trains in eval mode (frozen statistics) is unaffected.

Deviations from the official code: the base optimiser is any ``torch.optim.Optimizer`` with its own
settings (the official PAM recipe uses SGD with momentum 0.1, likely a typo for 0.9: the ``pam``
defense states its choice); the model is never deep-copied per batch, only each parameter's
current value is saved and copied back.

    >>> opt = PAM(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), anchor=backdoored.parameters())
    >>> opt.step(closure)   # closure: zero_grad, loss at the perturbed point, backward, return loss
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch

from antidoor.errors import AntidoorError

PAM_MODES = ("length", "fraction")


class PAM(torch.optim.Optimizer):
    """Path-aware wrapper: ``step(closure)`` evaluates the gradient at theta~ and steps the base optimiser at theta_t.

    ``anchor``: the backdoored weights, one tensor per parameter of ``base`` in the order of its
    parameter groups (``model.parameters()`` of a model with the same architecture).
    Loops that compute the gradient themselves call :meth:`perturb`, then ``loss.backward()``,
    then :meth:`step` without a closure (it restores theta_t before stepping).
    """

    def __init__(self, base: torch.optim.Optimizer, anchor: Iterable[torch.Tensor], rho: float = 0.5,
                 mode: Literal["length", "fraction"] = "length") -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise AntidoorError(f"PAM wraps a torch.optim.Optimizer, got {type(base).__name__}")
        if not rho >= 0:
            raise AntidoorError(f"PAM rho = {rho!r}: must be >= 0")
        if mode not in PAM_MODES:
            raise AntidoorError(f"PAM mode = {mode!r}; allowed: {', '.join(PAM_MODES)}")
        self.base = base
        self.rho, self.mode = rho, mode
        super().__init__(base.param_groups, {})
        self.param_groups = base.param_groups  # one set of groups: schedulers and zero_grad reach the base too
        params = [p for group in self.param_groups for p in group["params"]]
        anchors = [a.detach() for a in anchor]
        if len(anchors) != len(params):
            raise AntidoorError(f"PAM anchor has {len(anchors)} tensors for {len(params)} parameters; "
                                "pass the backdoored model's parameters() (same architecture)")
        for i, (p, a) in enumerate(zip(params, anchors, strict=True)):
            if a.shape != p.shape:
                raise AntidoorError(f"PAM anchor tensor {i} has shape {tuple(a.shape)}, parameter has {tuple(p.shape)}")
            self.state[p]["anchor"] = a.to(device=p.device, dtype=p.dtype).clone()
        self._perturbed = False

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def distance(self) -> torch.Tensor:
        """||theta_0 - theta_t||_2 over every parameter (one global norm)."""
        params = self._params()
        device = params[0].device
        return torch.stack([(self.state[p]["anchor"] - p).norm(2).float().to(device) for p in params]).norm(2)

    @torch.no_grad()
    def perturb(self) -> None:
        """Move to theta~ (saving theta_t exactly); no move when the weights sit on the anchor or rho is 0."""
        if self._perturbed:
            raise RuntimeError("PAM.perturb() called twice without step()")
        params = self._params()
        for p in params:
            self.state[p]["theta"] = p.detach().clone()
        self._perturbed = True
        norm = self.distance().item()
        if norm == 0.0 or self.rho == 0.0:
            return
        scale = self.rho / norm if self.mode == "length" else self.rho
        for p in params:
            p.add_(self.state[p]["anchor"] - p, alpha=scale)

    @torch.no_grad()
    def restore(self) -> None:
        """Back to theta_t, bit for bit (a copy, not a subtraction, so no rounding is left behind)."""
        if not self._perturbed:
            return
        for p in self._params():
            p.copy_(self.state[p].pop("theta"))
        self._perturbed = False

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """With ``closure``: perturb, evaluate it (zero_grad, loss, backward), restore, base step.

        Without: the gradient must already have been computed after :meth:`perturb`.
        """
        loss = None
        if closure is not None:
            self.perturb()
            with torch.enable_grad():
                loss = closure()
        elif not self._perturbed:
            raise RuntimeError("PAM.step() without a closure needs perturb() and backward() first")
        self.restore()
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)
