"""QRA (query-based reactivation attack): a small input perturbation that wakes a dormant backdoor.

Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense",
NeurIPS 2024, Section 3.2. A generator G (an MLP autoencoder on the flattened image,
3HW -> 1024 -> 1024 -> 1024 -> 3HW, ReLU between layers, tanh output) gives a sample-specific
perturbation delta = clip(eps * G(x), -eps, eps), eps = 16/255, and x' = clip(x + delta, 0, 1).
It is trained on 500 clean images (true labels) and 500 poisoned non-target-class images with

    alpha * KL(softmax f_RA(x) || softmax f_pur(x')) + CE(f_clean(x'), y_true),   alpha = 0.2,

so that on x' the purified model behaves like its retuned version on x (reactivation), while a clean
model still sees the true class (the perturbation must not be a generic adversarial example).
SGD lr 0.1, momentum 0.9, 50 epochs, batch 128. Reported: the asr of the poisoned test images plus
their perturbation on the purified model (``qra_asr_purified``) and on the clean reference
(``qra_asr_clean``); a large gap means the perturbation reactivates the backdoor.

The attacker is white-box: the loss needs gradients through f_pur and f_clean and outputs of f_RA,
although the paper calls the attack query-based. Which models play which role is an explicit
argument (``retuned``, ``purified``, ``clean_surrogate``; ``clean_surrogate=None`` drops the CE term)
and is written into the result. Deviations from the official code: the target is the attack's
(the official code hard-codes class 0); the poisoned training part holds only non-target-class
images, and the extra metric ``qra_clean_to_target`` (clean test images plus their perturbation sent
to the target) counts only non-target-class images (the official one counts target-class images as
successes). The teacher's outputs f_RA(x) do not depend on G, so they are computed once. The
training images come from the training set outside the defender's share: the clean part from images
the attacker did not poison, the poisoned part from non-target images with the trigger stamped on.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from antidoor.attacks.base import Attack
from antidoor.errors import AntidoorError, validate_params
from antidoor.metrics import Evaluator
from antidoor.precision import autocast
from antidoor.train import steps_per_epoch
from antidoor.utils import generator_for, progress_bar


class QRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_clean: int = Field(500, ge=0, description="clean training images for the generator")
    n_poison: int = Field(500, ge=1, description="poisoned non-target-class training images for the generator")
    eps: float = Field(16 / 255, gt=0, le=1, description="L-inf bound of the perturbation in [0, 1] pixel space")
    alpha: float = Field(0.2, ge=0, description="weight of the reactivation (KL) term")
    epochs: int = Field(50, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(128, ge=1)
    hidden: int = Field(1024, ge=1, description="width of the generator's hidden layers")
    seed: int = Field(0, ge=0)


class PerturbationGenerator(nn.Module):
    """G: flattened image -> tanh output of the same size (the paper's MLP autoencoder)."""

    def __init__(self, image_shape: tuple[int, int, int], hidden: int = 1024) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        d = image_shape[0] * image_shape[1] * image_shape[2]
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).view(-1, *self.image_shape)


def perturb(generator: PerturbationGenerator, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x' = clip(x + clip(eps * G(x), -eps, eps), 0, 1) for x in [0, 1]."""
    delta = (eps * generator(x)).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


@dataclass
class QRAData:
    """The generator's training images (uint8, on the device): clean ones with their labels, then poisoned ones."""

    x: torch.Tensor
    y_true: torch.Tensor
    poisoned: torch.Tensor  # bool per image

    def describe(self) -> dict[str, int]:
        return {"n_clean": int((~self.poisoned).sum()), "n_poison": int(self.poisoned.sum())}


def make_qra_data(x_train: torch.Tensor, y_train: torch.Tensor, attack: Attack, exclude: torch.Tensor,
                  avoid_for_clean: torch.Tensor | None = None, n_clean: int = 500, n_poison: int = 500,
                  seed: int = 0) -> QRAData:
    """Draw the generator's training set from ``x_train`` outside ``exclude`` (the defender's indices).

    Clean part: images not in ``avoid_for_clean`` (the attacker's poisoned indices). Poisoned part:
    other non-target-class images with the trigger stamped on. Fewer images than asked is an error.
    """
    dev = x_train.device
    n = len(x_train)
    free = torch.ones(n, dtype=torch.bool)
    free[exclude.cpu()] = False
    g = torch.Generator().manual_seed(seed)
    non_target = (y_train.cpu() != attack.target) & free
    pool = non_target.nonzero().flatten()
    if n_poison > len(pool):
        raise AntidoorError(f"qra.n_poison {n_poison}: only {len(pool)} non-target training images lie outside the "
                            f"defender's data; allowed: 1..{len(pool)}")
    poison_idx = pool[torch.randperm(len(pool), generator=g)[:n_poison]]
    free[poison_idx] = False
    if avoid_for_clean is not None:
        free[avoid_for_clean.cpu()] = False
    clean_pool = free.nonzero().flatten()
    if n_clean > len(clean_pool):
        raise AntidoorError(f"qra.n_clean {n_clean}: only {len(clean_pool)} unused clean training images remain; "
                            f"allowed: 0..{len(clean_pool)}")
    clean_idx = clean_pool[torch.randperm(len(clean_pool), generator=g)[:n_clean]]
    px = attack.apply_uint8(x_train[poison_idx.to(dev)])
    x = torch.cat([x_train[clean_idx.to(dev)], px])
    y = torch.cat([y_train[clean_idx.to(dev)], y_train[poison_idx.to(dev)]])
    poisoned = torch.cat([torch.zeros(n_clean, dtype=torch.bool), torch.ones(n_poison, dtype=torch.bool)]).to(dev)
    return QRAData(x, y, poisoned)


@dataclass
class QRAResult:
    qra_asr_purified: float
    qra_asr_clean: float | None
    asr_purified: float  # the poisoned test images without the perturbation
    asr_clean: float | None
    qra_clean_to_target: float  # non-target clean test images plus perturbation -> target, on the purified model
    max_abs_delta: float
    attacker_models: dict[str, str]
    config: dict[str, Any]
    data: dict[str, int]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    generator: PerturbationGenerator | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "generator"}


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """An eval-mode copy with no parameter gradients: the attacker's models are never changed."""
    m = copy.deepcopy(model).to(device).eval()
    m.requires_grad_(False)
    return m


@torch.no_grad()
def _target_rate(model: nn.Module, generator: PerturbationGenerator | None, images: torch.Tensor, target: int, eps: float,
                 batch_size: int = 512) -> tuple[float, float]:
    """Share of ``images`` (uint8) classified as ``target``, with (if ``generator``) the perturbation; and max |delta|."""
    hits, max_delta = 0, 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float().div_(255)
        xp = perturb(generator, x, eps) if generator is not None else x
        max_delta = max(max_delta, (xp - x).abs().max().item())
        with autocast(x.device):
            hits += int((model(xp.contiguous(memory_format=torch.channels_last)).argmax(1) == target).sum())
    return hits / max(len(images), 1), max_delta


def qra(purified: nn.Module, data: QRAData, evaluator: Evaluator, *, retuned: nn.Module, clean_surrogate: nn.Module | None,
        clean_ref: nn.Module | None = None, config: QRAConfig | None = None, roles: dict[str, str] | None = None,
        keep_generator: bool = False, **overrides: Any) -> QRAResult:
    """Train the perturbation generator against ``purified`` and measure the reactivated asr.

    The attacker uses ``retuned`` (f_RA, teacher on unperturbed inputs), ``purified`` (f_pur, on
    perturbed inputs) and ``clean_surrogate`` (f_clean; ``None`` drops the CE term). ``clean_ref``
    (default: ``clean_surrogate``) is the clean model on which ``qra_asr_clean`` is measured.
    ``roles`` names the three models in the result (e.g. {"retuned": "FT after RA, seed 0"}).
    The test split (``evaluator``) is only measured on, after training.

    >>> res = qra(purified, qra_data, scenario.evaluator, retuned=ra.retuned[0], clean_surrogate=clean_model)
    """
    cfg = validate_params(QRAConfig, {**(config or QRAConfig()).model_dump(), **overrides}, "qra", "QRA")
    attack = evaluator.attack
    if attack is None:
        raise AntidoorError("QRA needs an evaluator with an attack (the target and the triggered test images)")
    device = data.x.device
    t0 = time.perf_counter()
    f_pur, f_ra = _frozen(purified, device), _frozen(retuned, device)
    f_clean = _frozen(clean_surrogate, device) if clean_surrogate is not None else None
    clean_ref = clean_ref if clean_ref is not None else clean_surrogate
    torch.manual_seed(cfg.seed)
    gen = PerturbationGenerator(tuple(data.x.shape[1:]), cfg.hidden).to(device)
    opt = torch.optim.SGD(gen.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    x_all = data.x.float().div_(255)
    with torch.no_grad(), autocast(device):
        # f_RA sees the unperturbed images, which never change: its soft labels are computed once
        teacher = torch.cat([F.softmax(f_ra(x_all[i:i + 512].contiguous(memory_format=torch.channels_last)).float(), 1)
                             for i in range(0, len(x_all), 512)])
    g = generator_for(device, cfg.seed)
    history = []
    steps = steps_per_epoch(len(x_all), cfg.batch_size, drop_last=False)
    gen.train()
    with progress_bar(cfg.epochs * steps, "QRA") as advance:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(x_all), device=device, generator=g)
            total, seen = torch.zeros((), device=device), 0
            for start in range(0, len(x_all), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                x = x_all[idx]
                xp = perturb(gen, x, cfg.eps).contiguous(memory_format=torch.channels_last)
                with autocast(device):
                    log_q = F.log_softmax(f_pur(xp).float(), 1)
                    # KL(p || q) with p the teacher's distribution, batch mean (as nn.KLDivLoss(reduction="batchmean"))
                    loss = cfg.alpha * F.kl_div(log_q, teacher[idx], reduction="batchmean")
                    if f_clean is not None:
                        loss = loss + F.cross_entropy(f_clean(xp).float(), data.y_true[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
                seen += len(idx)
                advance(1, epoch=epoch + 1)
            history.append({"epoch": epoch + 1, "loss": total.item() / seen})
    gen.eval()
    target = attack.target
    x_bd = evaluator.x_bd.to(device)
    clean_nt = evaluator.x[evaluator.y != target].to(device)
    qra_pur, max_delta = _target_rate(f_pur, gen, x_bd, target, cfg.eps)
    asr_pur, _ = _target_rate(f_pur, None, x_bd, target, cfg.eps)
    clean_to_target, d2 = _target_rate(f_pur, gen, clean_nt, target, cfg.eps)
    qra_clean = asr_clean = None
    if clean_ref is not None:
        ref = _frozen(clean_ref, device)
        qra_clean, _ = _target_rate(ref, gen, x_bd, target, cfg.eps)
        asr_clean, _ = _target_rate(ref, None, x_bd, target, cfg.eps)
    names = {"retuned": "given retuned model", "purified": "the purified model",
             "clean_surrogate": "given clean model" if clean_surrogate is not None else "none (CE term dropped)",
             "clean_ref": "given clean model" if clean_ref is not None else "none", **(roles or {})}
    names["access"] = "white-box: gradients through purified and clean_surrogate, outputs of retuned"
    return QRAResult(qra_pur, qra_clean, asr_pur, asr_clean, clean_to_target, max(max_delta, d2), names, cfg.model_dump(),
                     data.describe(), history, round(time.perf_counter() - t0, 2), gen if keep_generator else None)


__all__ = ["PerturbationGenerator", "QRAConfig", "QRAData", "QRAResult", "make_qra_data", "perturb", "qra"]
