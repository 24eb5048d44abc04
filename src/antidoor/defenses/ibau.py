"""i-BAU: implicit backdoor adversarial unlearning.

Zeng, Chen, Park, Xia, Jin & Jia, "Adversarial Unlearning of Backdoors via Implicit
Hypergradient", ICLR 2022.

The minimax problem ``min_theta max_delta CE(f_theta(x + delta), y)`` over one *universal*
perturbation delta, solved round by round. Each of ``rounds`` rounds:

1. Universal perturbation (one pass over the clean training images): delta = 0, then per batch one
   SGD step (lr ``pert_lr``) on ``-CE(f(x + delta), argmax f(x)) + 0.001 ||delta||^2``.
2. Unlearning (one pass): per batch, the hypergradient of the outer loss
   ``L_out = CE(f(x'), y)`` (x' = x with delta added to ``portion`` of the batch) with respect to
   theta through the inner fixed point ``delta = phi(delta, theta) = delta - inner_lr * grad_delta L_in``,
   ``L_in = -CE(f(x + delta), y) + 0.001 ||delta||^2``::

       v <- 0;  repeat K times: v <- (d phi / d delta)^T v + grad_delta L_out
       grad_theta = d L_out / d theta + (d phi / d theta)^T v

   then one Adam (amsgrad) step on theta.

The model stays in eval mode (BatchNorm statistics frozen) throughout. The model after the last
round is returned.

delta lives in *normalised* units, as in the authors' code: the model sees (x - mean)/std + delta,
i.e. the pixel-space perturbation is delta * std, so the official step size and penalty mean the
same here. delta is not clipped (the authors' code does not clip either).

Defaults from the authors' code: 5 rounds, K 5, inner step 0.1, perturbation lr 10, penalty 0.001,
portion 0.01, Adam lr 1e-3 (BackdoorBench: 1e-4) with amsgrad and no weight decay, batch 100 (we
keep 128 like the other defenses). Deviation: the outer loss perturbs at least one image per batch
(``int(0.01 B)`` is 0 for batches under 100, which would silently drop the hypergradient's direct term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from antidoor.defenses.base import BATCH_SIZE_HELP, DEFENSES, DefenderData, Defense, DefenseParams
from antidoor.models.registry import Classifier
from antidoor.precision import autocast
from antidoor.train import batches, prepare_model, steps_per_epoch
from antidoor.utils import generator_for, progress_bar


class IBAUParams(DefenseParams):
    rounds: int = Field(5, ge=1, description="rounds of (universal perturbation, unlearning pass)")
    batch_size: int = Field(128, ge=1, description=BATCH_SIZE_HELP)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the model (outer problem)")
    amsgrad: bool = True
    weight_decay: float = Field(0.0, ge=0)
    pert_lr: float = Field(10.0, gt=0, description="SGD learning rate of the universal perturbation")
    penalty: float = Field(0.001, ge=0, description="weight of ||delta||^2 in the inner problem")
    k: int = Field(5, ge=1, description="fixed-point iterations of the implicit hypergradient")
    inner_lr: float = Field(0.1, gt=0, description="step of the inner fixed-point map")
    portion: float = Field(0.01, gt=0, le=1, description="share of each batch perturbed in the outer loss")
    amp: bool = Field(True, description="bfloat16 autocast where the device runs it fast (antidoor.precision)")


def _perturbed(model: Classifier, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Logits of x + delta with delta in normalised units (pixel offset delta * std)."""
    return model(x + delta * model.std).float()


def universal_perturbation(model: Classifier, data: DefenderData, p: IBAUParams, g: torch.Generator) -> torch.Tensor:
    """Step 1: one pass of SGD on delta (1, C, H, W) against the model's own predictions."""
    delta = torch.zeros((1, *data.x.shape[1:]), device=data.device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=p.pert_lr)
    amp = autocast(data.device, p.amp)
    for x, _, _ in batches(data.x, data.y, p.batch_size, g, drop_last=False):
        with torch.no_grad(), amp:
            y0 = model(x).argmax(1)
        with amp:
            loss = -F.cross_entropy(_perturbed(model, x, delta), y0) + p.penalty * delta.pow(2).sum()
        (delta.grad,) = torch.autograd.grad(loss, [delta])  # no parameter gradients: only delta moves here
        opt.step()
    return delta.detach()


def implicit_hypergradient(model: Classifier, params: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                           delta: torch.Tensor, p: IBAUParams, g: torch.Generator) -> list[torch.Tensor]:
    """Step 2's gradient of the outer loss with respect to ``params`` (see the module docstring)."""
    amp = autocast(x.device, p.amp)
    delta = delta.detach().requires_grad_(True)
    n = len(x)
    chosen = torch.randperm(n, device=x.device, generator=g)[:max(1, int(p.portion * n))]
    patch = torch.zeros((n, 1, 1, 1), device=x.device)
    patch[chosen] = 1
    with amp:
        outer = F.cross_entropy(_perturbed(model, x, patch * delta), y)
    g_delta, *g_params = torch.autograd.grad(outer, [delta, *params], allow_unused=True)
    with amp:
        inner = -F.cross_entropy(_perturbed(model, x, delta), y) + p.penalty * delta.pow(2).sum()
    (grad_inner,) = torch.autograd.grad(inner, delta, create_graph=True)
    mapped = delta - p.inner_lr * grad_inner
    v = torch.zeros_like(delta)
    for _ in range(p.k):
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jv + g_delta
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [_sum(direct, indirect, w) for direct, indirect, w in zip(g_params, implicit, params, strict=True)]


def _sum(a: torch.Tensor | None, b: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """a + b where autograd returned None for a parameter the loss does not reach."""
    if a is None:
        return b if b is not None else torch.zeros_like(like)
    return a if b is None else a + b


@DEFENSES.register("i-bau", aliases=("ibau",))
class IBAU(Defense):
    name = "i-bau"
    Params = IBAUParams
    params: IBAUParams

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        p = self.params
        self.note_full_batch(p.batch_size, len(data.x))
        prepare_model(model, data.device)
        model.eval()  # BatchNorm statistics frozen; its affine parameters still train
        params = [w for w in model.parameters() if w.requires_grad]
        optimizer = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay, amsgrad=p.amsgrad)
        g = generator_for(data.device, self.seed)
        n_batches = steps_per_epoch(len(data.x), p.batch_size, drop_last=False)
        with progress_bar(p.rounds * n_batches, "i-BAU") as advance:
            for r in range(p.rounds):
                delta = universal_perturbation(model, data, p, g)
                for x, y, _ in batches(data.x, data.y, p.batch_size, g, drop_last=False):
                    grads = implicit_hypergradient(model, params, x, y, delta, p, g)
                    for w, gr in zip(params, grads, strict=True):
                        w.grad = gr.detach()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    advance(1, round=r + 1)
                self.report(r + 1, model)
        return model

