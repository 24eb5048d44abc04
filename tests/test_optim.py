"""SAM: the optimiser wrapper FT-SAM uses (shape-level maths on tiny synthetic problems)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from antidoor.errors import AntidoorError
from antidoor.optim import SAM


def _problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_with_rho_zero_is_the_base_step(adaptive):
    a, x, y = _problem()
    b = copy.deepcopy(a)
    base = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sam = SAM(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), rho=0.0, adaptive=adaptive)
    for _ in range(3):
        base.step(_closure(a, base, x, y))
        sam.step(_closure(b, sam, x, y))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_sam_restores_the_weights_after_the_ascent_and_steps_with_the_perturbed_gradient():
    model, x, y = _problem()
    w0 = [p.detach().clone() for p in model.parameters()]
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.05), rho=0.5)
    closure = _closure(model, sam, x, y)
    closure()
    g0 = [p.grad.clone() for p in model.parameters()]
    sam.first_step(zero_grad=True)
    norm = torch.stack([g.norm() for g in g0]).norm()
    moved = [p.detach().clone() for p in model.parameters()]
    for w, m, g in zip(w0, moved, g0, strict=True):  # the ascent: w + rho g / ||g||
        assert torch.allclose(m, w + 0.5 * g / norm, atol=1e-6)
    closure()
    g_adv = [p.grad.clone() for p in model.parameters()]
    sam.second_step()
    for p, w, g in zip(model.parameters(), w0, g_adv, strict=True):  # exact restore, then SGD with the adversarial gradient
        assert torch.allclose(p.detach(), w - 0.05 * g, atol=1e-6)
    assert not any("w" in s for s in sam.state.values())
    assert not all(torch.allclose(a, b) for a, b in zip(g0, g_adv, strict=True))


def test_sam_restores_the_weights_bit_for_bit():
    model, x, y = _problem(2)
    w0 = [p.detach().clone() for p in model.parameters()]
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.0), rho=3.0, adaptive=True)
    sam.step(_closure(model, sam, x, y))
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p.detach(), w)


def test_sam_lowers_the_loss_and_shares_groups_with_schedulers():
    model, x, y = _problem(1)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    before = F.cross_entropy(model(x), y).item()
    for _ in range(20):
        sam.step(_closure(model, sam, x, y))
        sched.step()
    assert F.cross_entropy(model(x), y).item() < before
    assert sam.base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**20)


def test_sam_bad_arguments_are_named():
    model, _, _ = _problem()
    with pytest.raises(AntidoorError, match="rho"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=-1)
    with pytest.raises(AntidoorError, match="closure"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1)).step()
