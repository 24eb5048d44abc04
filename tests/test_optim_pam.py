"""PAM: the path-aware perturbation, exact restoration, and equivalence to the base optimiser at rho = 0."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from antidoor.errors import AntidoorError
from antidoor.models import build_model
from antidoor.optim import PAM


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def batch(bundled):
    return bundled.x_train[:32].float().div(255), bundled.y_train[:32]


@pytest.fixture()
def models():
    torch.manual_seed(0)
    backdoored = build_model("small_cnn", num_classes=10, width=8)
    model = copy.deepcopy(backdoored)
    with torch.no_grad():  # a purified model some way from the backdoored one
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, backdoored


def _closure(model, opt, batch, seen=None):
    x, y = batch

    def closure():
        opt.zero_grad()
        if seen is not None:
            seen.append(_flat(model).clone())
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_rho_zero_matches_the_base_optimiser_step_for_step(models, batch, base):
    model, backdoored = models
    twin = copy.deepcopy(model)

    def make(m):
        if base == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return torch.optim.Adam(m.parameters(), lr=1e-3)

    pam, plain = PAM(make(model), backdoored.parameters(), rho=0.0), make(twin)
    for _ in range(4):
        pam.step(_closure(model, pam, batch))
        plain.step(_closure(twin, plain, batch))
        assert torch.equal(_flat(model), _flat(twin))


@pytest.mark.parametrize(("mode", "rho"), [("length", 0.5), ("length", 0.05), ("fraction", 0.3)])
def test_perturbation_points_to_the_backdoored_weights_with_length_rho(models, batch, mode, rho):
    model, backdoored = models
    theta, anchor = _flat(model), _flat(backdoored)
    d = anchor - theta
    seen: list[torch.Tensor] = []
    opt = PAM(torch.optim.SGD(model.parameters(), lr=0.0), backdoored.parameters(), rho=rho, mode=mode)
    opt.step(_closure(model, opt, batch, seen))
    e = seen[0] - theta
    expected = rho if mode == "length" else rho * d.norm()
    assert e.norm().item() == pytest.approx(float(expected), rel=1e-4)
    assert F.cosine_similarity(e, d, dim=0).item() > 0.9999


def test_weights_are_restored_exactly_after_the_gradient_evaluation(models, batch):
    model, backdoored = models
    before = _flat(model).clone()
    seen: list[torch.Tensor] = []
    opt = PAM(torch.optim.SGD(model.parameters(), lr=0.0), backdoored.parameters(), rho=0.7)
    opt.step(_closure(model, opt, batch, seen))
    assert not torch.equal(seen[0], before)  # the gradient was taken elsewhere
    assert torch.equal(_flat(model), before)  # and the weights came back bit for bit


def test_gradient_is_the_one_at_the_perturbed_point(models, batch):
    model, backdoored = models
    opt = PAM(torch.optim.SGD(model.parameters(), lr=0.1), backdoored.parameters(), rho=0.5)
    probe = copy.deepcopy(model)
    PAM(torch.optim.SGD(probe.parameters(), lr=0.0), backdoored.parameters(), rho=0.5).perturb()
    x, y = batch
    F.cross_entropy(probe(x), y).backward()
    expected = [p.grad.clone() for p in probe.parameters()]
    theta = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(model, opt, batch))
    for p, t, g in zip(model.parameters(), theta, expected, strict=True):
        torch.testing.assert_close(p.detach(), t - 0.1 * g)


def test_zero_distance_takes_no_perturbation(batch):
    torch.manual_seed(0)
    backdoored = build_model("small_cnn", num_classes=10, width=8)
    model = copy.deepcopy(backdoored)
    twin = copy.deepcopy(backdoored)
    seen: list[torch.Tensor] = []
    opt = PAM(torch.optim.SGD(model.parameters(), lr=0.05), backdoored.parameters(), rho=0.5)
    plain = torch.optim.SGD(twin.parameters(), lr=0.05)
    opt.step(_closure(model, opt, batch, seen))
    plain.step(_closure(twin, plain, batch))
    assert torch.equal(seen[0], _flat(backdoored))
    assert torch.equal(_flat(model), _flat(twin))


def test_explicit_perturb_backward_step_loop(models, batch):
    model, backdoored = models
    twin = copy.deepcopy(model)
    a = PAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), backdoored.parameters(), rho=0.5)
    b = PAM(torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9), backdoored.parameters(), rho=0.5)
    x, y = batch
    for _ in range(2):
        a.zero_grad()
        a.perturb()
        F.cross_entropy(model(x), y).backward()
        a.step()
        b.step(_closure(twin, b, batch))
    assert torch.equal(_flat(model), _flat(twin))


def test_bad_arguments_are_refused(models):
    model, backdoored = models
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(AntidoorError, match="rho"):
        PAM(sgd, backdoored.parameters(), rho=-0.1)
    with pytest.raises(AntidoorError, match="mode"):
        PAM(sgd, backdoored.parameters(), mode="angle")  # type: ignore[arg-type]
    with pytest.raises(AntidoorError, match="anchor has"):
        PAM(sgd, list(backdoored.parameters())[:-1])
    other = build_model("small_cnn", num_classes=5, width=8)
    with pytest.raises(AntidoorError, match="shape"):
        PAM(sgd, other.parameters())
    with pytest.raises(AntidoorError, match="Optimizer"):
        PAM(model, backdoored.parameters())  # type: ignore[arg-type]
