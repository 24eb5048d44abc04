"""ANP: Adversarial Neuron Pruning.

Wu & Wang, "Adversarial Neuron Perturbations Purify Backdoored Deep Neural Networks", NeurIPS 2021.

Backdoor neurons are the ones whose small perturbation makes the model collapse. Every channel of
every BatchNorm layer gets a mask m in [0, 1] (init 1) and multiplicative noises (d_w, d_b) in
[-eps, eps]; the layer computes ``BN(x) with weight * (m + d_w) and bias * (1 + d_b)``. The model's
own weights stay fixed. For ``iterations`` clean batches (x, y):

1. Neuron perturbation (maximisation): d ~ U(-eps, eps), then ``steps`` signed ascent steps of
   size eps/steps on CE(f_{m+d}(x), y), clipped to [-eps, eps].
2. Mask update (minimisation), one SGD step on
   ``alpha * CE(f_m(x), y) + (1 - alpha) * CE(f_{m+d}(x), y)``, then m clipped to [0, 1].
3. Prune: channels with m < threshold get BN weight 0 (no fine-tuning).

The threshold is ``threshold`` when given; otherwise it is chosen on the defender's *validation*
images: the largest threshold of the grid ``prune_step, 2 prune_step, ..., prune_max`` whose pruned
model keeps at least ``(1 - acc_ratio)`` of the unpruned model's validation accuracy (more pruning
removes more of the backdoor; the accuracy budget is the only signal a defender has).

Defaults: eps 0.4, 1 step, alpha 0.2, mask SGD lr 0.2 with momentum 0.9, 2,000 iterations (the
paper and its authors' code; BackdoorBench's config has lr 0.01), batch 128, threshold grid 0.05 to
0.9 in steps of 0.05 and acc_ratio 0.1 (BackdoorBench). BatchNorm runs in training mode during mask
learning, as in the authors' code, on a copy: the returned model keeps its original statistics.

Deviations from BackdoorBench's code, and why: it picks the threshold with the lowest *test* asr;
a defender has no test set and no trigger, so we choose on validation accuracy only, as above.
The layers are perturbed through ``torch.func.functional_call`` with the masked BN parameters, so
no module is replaced and every registered architecture works unchanged.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from antidoor.defenses.base import BATCH_SIZE_HELP, DEFENSES, DefenderData, Defense, DefenseParams
from antidoor.errors import AntidoorError
from antidoor.models.registry import Classifier
from antidoor.precision import autocast
from antidoor.train import batches, prepare_model
from antidoor.utils import generator_for, info, progress_bar


class ANPParams(DefenseParams):
    iterations: int = Field(2000, ge=1, description="mask-learning steps (one clean batch each)")
    batch_size: int = Field(128, ge=1, description=BATCH_SIZE_HELP)
    lr: float = Field(0.2, gt=0, description="SGD learning rate of the masks")
    momentum: float = Field(0.9, ge=0, lt=1)
    eps: float = Field(0.4, ge=0, description="bound of the multiplicative neuron noise")
    steps: int = Field(1, ge=1, description="ascent steps of the noise per batch")
    alpha: float = Field(0.2, ge=0, le=1, description="weight of the natural loss (1 - alpha: perturbed loss)")
    threshold: float | None = Field(None, ge=0, le=1, description="prune masks below this; None: choose on validation data")
    prune_step: float = Field(0.05, gt=0, le=1, description="spacing of the threshold grid")
    prune_max: float = Field(0.9, gt=0, le=1, description="largest threshold tried")
    acc_ratio: float = Field(0.1, ge=0, lt=1, description="largest relative drop of validation accuracy allowed")
    amp: bool = Field(True, description="bfloat16 autocast where the device runs it fast (antidoor.precision)")

    @model_validator(mode="after")
    def _grid(self) -> ANPParams:
        if self.prune_step > self.prune_max:
            raise AntidoorError(f"defense.prune_step {self.prune_step} is larger than defense.prune_max {self.prune_max}, "
                                "so no threshold would be tried; allowed: prune_step <= prune_max")
        return self


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every affine BatchNorm layer, by its name in ``model``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}


def _forward(model: nn.Module, bns: dict[str, nn.Module], x: torch.Tensor, mask: dict[str, torch.Tensor],
             noise: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
    params = {}
    for name, bn in bns.items():
        if noise is None:
            params[f"{name}.weight"] = bn.weight * mask[name]
        else:
            d_w, d_b = noise[name]
            params[f"{name}.weight"] = bn.weight * (mask[name] + d_w)
            params[f"{name}.bias"] = bn.bias * (1 + d_b)
    return torch.func.functional_call(model, params, (x,))


def learn_masks(model: Classifier, data: DefenderData, p: ANPParams, seed: int) -> dict[str, torch.Tensor]:
    """Steps 1-2 on a copy of ``model``: one mask value in [0, 1] per BN channel."""
    work = copy.deepcopy(model).requires_grad_(False).train()
    bns = batchnorm_layers(work)
    mask = {n: torch.ones_like(bn.weight, requires_grad=True) for n, bn in bns.items()}
    optimizer = torch.optim.SGD(mask.values(), lr=p.lr, momentum=p.momentum)
    g = generator_for(data.device, seed)
    amp = autocast(data.device, p.amp)
    done = 0
    with progress_bar(p.iterations, "ANP") as advance:
        while done < p.iterations:
            for x, y, _ in batches(data.x, data.y, p.batch_size, g, drop_last=False):
                noise = None
                if p.eps > 0:
                    noise = {n: tuple((torch.rand(m.shape, device=m.device, generator=g) * 2 - 1).mul_(p.eps).requires_grad_(True)
                                      for _ in range(2)) for n, m in mask.items()}
                    for _ in range(p.steps):
                        with amp:
                            loss = F.cross_entropy(_forward(work, bns, x, mask, noise).float(), y)
                        leaves = [t for pair in noise.values() for t in pair]
                        grads = torch.autograd.grad(loss, leaves)
                        with torch.no_grad():
                            for t, gr in zip(leaves, grads, strict=True):
                                t.add_(gr.sign(), alpha=p.eps / p.steps).clamp_(-p.eps, p.eps)
                    noise = {n: (d_w.detach(), d_b.detach()) for n, (d_w, d_b) in noise.items()}
                with amp:
                    loss = p.alpha * F.cross_entropy(_forward(work, bns, x, mask, None).float(), y)
                    if noise is not None:
                        loss = loss + (1 - p.alpha) * F.cross_entropy(_forward(work, bns, x, mask, noise).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for m in mask.values():
                        m.clamp_(0, 1)
                done += 1
                advance(1, loss=loss.item())
                if done == p.iterations:
                    break
    return {n: m.detach() for n, m in mask.items()}


@torch.no_grad()
def prune(model: Classifier, mask: dict[str, torch.Tensor], threshold: float, original: dict[str, torch.Tensor]) -> int:
    """Set the BN weight of every channel with mask < threshold to 0 (from ``original`` weights); return the count."""
    bns = batchnorm_layers(model)
    pruned = 0
    for name, m in mask.items():
        weight = bns[name].weight
        cut = m < threshold
        weight.copy_(torch.where(cut, torch.zeros_like(weight), original[name]))
        pruned += int(cut.sum())
    return pruned


@DEFENSES.register("anp")
class ANP(Defense):
    name = "anp"
    Params = ANPParams
    params: ANPParams

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        p = self.params
        self.note_full_batch(p.batch_size, len(data.x))
        prepare_model(model, data.device)
        if not batchnorm_layers(model):
            raise AntidoorError("defense 'anp' prunes BatchNorm channels, and this model has no BatchNorm layer")
        mask = learn_masks(model, data, p, self.seed)
        original = {n: bn.weight.detach().clone() for n, bn in batchnorm_layers(model).items()}
        threshold = p.threshold if p.threshold is not None else self.choose_threshold(model, data, mask, original)
        pruned = prune(model, mask, threshold, original)
        info(f"ANP: threshold {threshold:g} prunes {pruned} of {sum(len(m) for m in mask.values())} BatchNorm channels")
        self.report(1, model)
        return model

    def choose_threshold(self, model: Classifier, data: DefenderData, mask: dict[str, torch.Tensor],
                         original: dict[str, torch.Tensor]) -> float:
        """The largest grid threshold whose pruned model keeps (1 - acc_ratio) of the validation accuracy."""
        p = self.params

        floor = (1 - p.acc_ratio) * data.val_accuracy(model)
        n = math.floor(p.prune_max / p.prune_step + 1e-9)
        best = 0.0
        for i in range(1, n + 1):
            t = round(i * p.prune_step, 10)
            prune(model, mask, t, original)
            if data.val_accuracy(model) >= floor:
                best = t
        prune(model, mask, 0.0, original)  # back to the unpruned weights
        return best
