"""SAU: Shared Adversarial Unlearning.

Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared
Adversarial Examples", NeurIPS 2023.

Two models: ``f`` (being purified, initialised from the backdoored model) and ``f_ref`` (the
frozen backdoored model), both in eval mode (BatchNorm statistics frozen unless ``bn_train``; BN affine parameters
still train). Each round visits every clean batch (x, y) once:

1. Shared adversarial examples (maximisation). With y0 = argmax f(x), y0_ref = argmax f_ref(x)
   (once per batch) and delta initialised at +bound, repeat ``pgd_steps`` times::

       succ     = argmax f(x+d) != y0          succ_ref = argmax f_ref(x+d) != y0_ref
       shared   = succ & succ_ref & (argmax f(x+d) == argmax f_ref(x+d))
       L_adv    = -[sum_{~succ} CE(f(x+d), y) + sum_{~succ_ref} CE(f_ref(x+d), y)] / 2B
       L_js     = sum_{~shared} JS(softmax f(x+d) || softmax f_ref(x+d)) / B   (probs clamped at 1e-8)
       d       <- clip(d - step_size * sign(grad_d(beta_1 L_adv + beta_2 L_js)), -bound, bound)

   stopping early once every sample is shared.
2. Unlearning (minimisation), one Adam step::

       y_adv_ref = argmax f_ref(x+d);  P = (y_adv_ref != y) & (y_adv_ref != y0_ref)
       s         = softmax(f(x+d))[y_adv_ref]
       L         = lambda_1 CE(f(x), y) + lambda_2 CE(f(x+d), y) + lambda_3 sum_P -log(1 - s) / B

   with log(1 - s) computed exactly, as logsumexp over the other classes' logits minus logsumexp
   over all of them: no clamp, so the samples the backdoor is surest of (s near 1) keep the
   largest gradient instead of none.

3. The model after the last round is the result (no model selection on any test data).

Defaults (the paper and BackdoorBench's config): 5% clean data, batch 256 (at least 8 batches a round, below),
Adam (amsgrad) lr 1e-4, no weight decay, 100 rounds, L-inf bound 0.2 in [0, 1] pixel space, 5 PGD steps of size 0.2,
init +bound, beta_1 0.01, beta_2 1, lambda_1 1, lambda_2 0, lambda_3 1, no augmentation of the
clean set (the official code loads it with the test-time transform), BatchNorm frozen. ``bn_train`` is
the official ``--train_mode`` (off there too, with the remark that frozen BatchNorm keeps clean accuracy
higher and asr higher): the unlearning step's one forward of the clean and perturbed images runs
BatchNorm in training mode, so its statistics are that batch's and the running ones move towards them;
the maximisation stays in eval mode. ``benchmarks/regime.md`` shows why it matters: re-estimating
BatchNorm on clean images brings back part of what SAU with frozen statistics removed.

Deviations from the official code, and why:
- Every round is cut into at least ``min_batches`` (8) batches: rounds count passes over the clean set, Adam counts
  steps, and on a small set batch 256 makes one step per round. The papers' 2,500 images at batch 256 make 10 batches
  a round and the regime study's 2,000 make 8, so there nothing changes; on a 240-image defender set (MNIST,
  ``benchmarks/heldout_defaults.sh``) batch 256 (100 steps) left 36.9% asr at 0.28 points of clean accuracy and
  batch 32 (8 a round, 800 steps) 4.3% at 0.43. ``min_batches: 1`` takes ``batch_size`` as given.
- Every setting reaches the algorithm: there is no learning-rate schedule (the official one is
  built and never stepped) and ``amp`` really switches bfloat16 autocast on CUDA.
- Speed without changing the maths (``benchmarks/sau_speed.py``): ``f_ref`` is an inference-only
  copy (``frozen_copy``: ``requires_grad_(False)``, eval mode, each conv -> BatchNorm pair folded into
  one convolution, the same function up to float rounding), so no parameter gradients are ever
  computed or accumulated in it, and it runs under ``no_grad`` where no gradient must flow to delta;
  y0_ref = argmax f_ref(x) is computed once per image for the whole run (without augmentation the
  images are the same in every round), not at every PGD step; f(x) runs once per batch, with
  autograd: it gives y0 and its graph serves the unlearning step's clean loss (f has not changed
  in between), so the clean batch is never forwarded twice; gradients are taken with respect to
  delta only (``torch.autograd.grad``).
- log(1 - s) is exact (see step 2). The official code clamps 1 - s from below (the other classes'
  probability mass plus 1e-6), which keeps a gradient at s near 1 but bends the loss there; a clamp
  of s to [1e-3, 0.999], as an earlier antidoor had, cuts that gradient off altogether and slows
  the first rounds (``benchmarks/sau_unlearning_term.py``).
- Like the official code, x + d is not clipped to [0, 1]: d is a probe of the models, not an image.

Hooks for variants: :meth:`SAU.make_optimizer` builds the unlearning optimiser and :meth:`SAU.unlearn`
takes step 2; ``sau-pam`` (:mod:`antidoor.defenses.saupam`) overrides both and sets
``reuse_clean_logits = False``, since its loss is evaluated at other weights than the maximisation's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from antidoor.data.augment import Augment
from antidoor.defenses.base import BATCH_SIZE_HELP, DEFENSES, DefenderData, Defense, DefenseParams
from antidoor.metrics import predict
from antidoor.models.registry import Classifier, frozen_copy
from antidoor.precision import autocast
from antidoor.train import batches, prepare_model, steps_per_epoch
from antidoor.utils import generator_for, progress_bar


class SAUParams(DefenseParams):
    rounds: int = Field(100, ge=1, description="passes over the clean set")
    batch_size: int = Field(256, ge=1, description=BATCH_SIZE_HELP)
    min_batches: int = Field(8, ge=1, description="batches per round at least: on a clean set smaller than this many "
                             "batches the batch shrinks to n // min_batches (1: batch_size as given)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0)
    amsgrad: bool = True
    bound: float = Field(0.2, gt=0, description="L-inf bound of the perturbation in [0, 1] pixel space")
    pgd_steps: int = Field(5, ge=1)
    step_size: float = Field(0.2, gt=0)
    init: Literal["max", "min", "zero", "random"] = Field("max", description="initial perturbation: +bound, -bound, 0 or uniform")
    beta_1: float = Field(0.01, ge=0, description="weight of the adversarial loss in the maximisation")
    beta_2: float = Field(1.0, ge=0, description="weight of the JS agreement loss in the maximisation")
    lambda_1: float = Field(1.0, ge=0, description="clean cross-entropy")
    lambda_2: float = Field(0.0, ge=0, description="adversarial cross-entropy (adversarial training)")
    lambda_3: float = Field(1.0, ge=0, description="shared adversarial unlearning")
    augment: bool = Field(False, description="crop/flip the clean batches (the official code does not)")
    bn_train: bool = Field(False, description="BatchNorm in training mode for the unlearning step's forward (the official "
                           "--train_mode): batch statistics of the clean and perturbed images, running statistics updated")
    amp: bool = Field(True, description="bfloat16 autocast where the device runs it fast (antidoor.precision)")

    # bn_train came after studies were stored; off, SAU runs exactly as before it, so it stays out of stage keys
    # (experiment.stages.defense_key_spec) and stored SAU and sau-pam stages resume
    # min_batches likewise: at 1 the batch is batch_size as given, as it was before the parameter
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"bn_train": False, "min_batches": 1}


def _init_delta(x: torch.Tensor, p: SAUParams, g: torch.Generator) -> torch.Tensor:
    if p.init == "max":
        return torch.full_like(x, p.bound)
    if p.init == "min":
        return torch.full_like(x, -p.bound)
    if p.init == "zero":
        return torch.zeros_like(x)
    return (torch.rand(x.shape, device=x.device, generator=g) * 2 - 1) * p.bound


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence of two probability rows (already clamped away from 0)."""
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log())).sum(1) + 0.5 * (q * (q.log() - m.log())).sum(1)


def shared_adversarial_examples(f: Classifier, f_ref: nn.Module, x: torch.Tensor, y: torch.Tensor, y0: torch.Tensor,
                                y0_ref: torch.Tensor, p: SAUParams, g: torch.Generator) -> torch.Tensor:
    """Step 1: the shared adversarial perturbation d of the batch, given y0 = argmax f(x) and y0_ref = argmax f_ref(x)."""
    amp = autocast(x.device, p.amp)
    n = len(x)
    delta = _init_delta(x, p, g).clamp_(-p.bound, p.bound)
    for _ in range(p.pgd_steps):
        delta.requires_grad_(True)
        x_adv = x + delta
        with amp:
            logits, logits_ref = f(x_adv).float(), f_ref(x_adv).float()
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        succ, succ_ref = pred != y0, pred_ref != y0_ref
        shared = succ & succ_ref & (pred == pred_ref)
        ce = F.cross_entropy(logits, y, reduction="none")
        ce_ref = F.cross_entropy(logits_ref, y, reduction="none")
        loss_adv = -((ce * ~succ).sum() + (ce_ref * ~succ_ref).sum()) / (2 * n)
        probs, probs_ref = logits.softmax(1).clamp_min(1e-8), logits_ref.softmax(1).clamp_min(1e-8)
        loss_js = (js_divergence(probs, probs_ref) * ~shared).sum() / n
        (grad,) = torch.autograd.grad(p.beta_1 * loss_adv + p.beta_2 * loss_js, delta)
        delta = (delta.detach() - p.step_size * grad.sign()).clamp_(-p.bound, p.bound)
        if bool(shared.all()):
            break
    return delta.detach()


def log_one_minus_softmax(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log(1 - softmax(logits)[k]) per row, exactly: logsumexp of the other classes' logits minus
    logsumexp of all. Stable and with a gradient however close softmax[k] is to 1, where
    ``log1p(-s)`` would round to log(0)."""
    others = logits.scatter(1, k[:, None], float("-inf"))
    return others.logsumexp(1) - logits.logsumexp(1)


def unlearning_loss(f: Classifier, f_ref: nn.Module, logits: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor,
                    delta: torch.Tensor, y0_ref: torch.Tensor, p: SAUParams) -> torch.Tensor:
    """Step 2: lambda_1 CE(clean) + lambda_2 CE(adversarial) + lambda_3 shared unlearning.

    ``logits`` = f(x), computed with autograd before step 1 (f has not changed since) and reused here;
    ``None`` computes it now, in one forward with x + delta (for steps that evaluate the loss at other
    weights than the maximisation's, as ``sau-pam`` does, or with BatchNorm in training mode, ``bn_train``).
    """
    n = len(x)
    x_adv = x + delta
    amp = autocast(x.device, p.amp)
    with torch.no_grad(), amp:
        y_adv_ref = f_ref(x_adv).argmax(1)
    with amp:
        if logits is None:
            f.train(p.bn_train)  # BatchNorm's batch statistics over the clean and perturbed images together
            logits, adv_logits = f(torch.cat([x, x_adv])).float().split(n)
            f.eval()
        else:
            adv_logits = f(x_adv).float()
    potential = (y_adv_ref != y) & (y_adv_ref != y0_ref)
    loss_shared = (-log_one_minus_softmax(adv_logits, y_adv_ref) * potential).sum() / n
    return p.lambda_1 * F.cross_entropy(logits, y) + p.lambda_2 * F.cross_entropy(adv_logits, y) + p.lambda_3 * loss_shared


def is_shared(pred: torch.Tensor, pred_ref: torch.Tensor, y0: torch.Tensor, y0_ref: torch.Tensor) -> torch.Tensor:
    """Shared adversarial: both models leave their clean predictions ``y0``/``y0_ref`` and agree on the new class."""
    return (pred != y0) & (pred_ref != y0_ref) & (pred == pred_ref)


def shared_adversarial_predictions(f: nn.Module, f_ref: nn.Module, images: torch.Tensor, labels: torch.Tensor, p: SAUParams,
                                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (clean, uint8) image: whether SAU's maximisation finds a shared adversarial example for it, and the
    class ``f`` gives the perturbed image (the shared class where it is shared). Both on ``images``' device."""
    f_eval, f_ref_eval = f.training, f_ref.training
    f.eval(), f_ref.eval()
    g = generator_for(images.device, seed)
    shared, classes = [], []
    amp = autocast(images.device, p.amp)
    for x, y, _ in batches(images, labels, p.batch_size, g, shuffle=False, drop_last=False):
        with torch.no_grad(), amp:
            y0, y0_ref = f(x).argmax(1), f_ref(x).argmax(1)
        delta = shared_adversarial_examples(f, f_ref, x, y, y0, y0_ref, p, g)
        with torch.no_grad(), amp:
            pred, pred_ref = f(x + delta).argmax(1), f_ref(x + delta).argmax(1)
        shared.append(is_shared(pred, pred_ref, y0, y0_ref))
        classes.append(pred)
    f.train(f_eval), f_ref.train(f_ref_eval)
    empty = torch.empty(0, dtype=torch.long, device=images.device)
    return (torch.cat(shared) if shared else empty.bool()), (torch.cat(classes) if classes else empty)


def shared_adversarial_rate(f: nn.Module, f_ref: nn.Module, images: torch.Tensor, labels: torch.Tensor, p: SAUParams,
                            seed: int = 0) -> float:
    """Share of (clean, uint8) images for which SAU's maximisation finds a shared adversarial example.

    Shared means both models leave their clean prediction and agree on the new one. SAU's paper
    bounds the backdoor risk by this shared adversarial risk, so the defender can compare settings
    on their own validation images with it, without knowing the trigger (``benchmarks/sau_quality.py``).
    """
    shared, _ = shared_adversarial_predictions(f, f_ref, images, labels, p, seed)
    return int(shared.sum()) / max(1, len(images))


@DEFENSES.register("sau")
class SAU(Defense):
    name = "sau"
    Params = SAUParams
    params: SAUParams
    # the unlearning step reuses f(x) from before the maximisation (f has not changed in between);
    # a subclass that evaluates the loss at other weights sets this to False
    reuse_clean_logits: ClassVar[bool] = True

    def make_optimizer(self, f: Classifier) -> torch.optim.Optimizer:
        """The unlearning optimiser (built before any update, so f's weights are the backdoored ones)."""
        p = self.params
        return torch.optim.Adam(f.parameters(), lr=p.lr, weight_decay=p.weight_decay, amsgrad=p.amsgrad)

    def unlearn(self, optimizer: torch.optim.Optimizer, f: Classifier, f_ref: nn.Module, logits: torch.Tensor | None,
                x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, y0_ref: torch.Tensor) -> None:
        """Step 2: one optimiser step on the unlearning loss."""
        loss = unlearning_loss(f, f_ref, logits, x, y, delta, y0_ref, self.params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        p = self.params
        batch = self.batch_for(p.batch_size, len(data.x), p.min_batches)
        f = prepare_model(model, data.device)
        f_ref = prepare_model(frozen_copy(f), data.device)
        f.eval()  # BN statistics frozen in both models; f's BN affine parameters still train
        optimizer = self.make_optimizer(f)
        g = generator_for(data.device, self.seed)
        augment = Augment(hflip=data.hflip) if p.augment else None
        # f_ref is frozen and, without augmentation, every image is the same in every round:
        # its clean predictions are computed once for the whole set
        y0_ref_all = None if augment else predict(f_ref, data.x, batch, p.amp)
        amp = autocast(data.device, p.amp)
        steps = p.rounds * steps_per_epoch(len(data.x), batch, drop_last=False)
        with progress_bar(steps, self.name.upper(), "fewer defense.rounds shorten it") as advance:
            for r in range(p.rounds):
                for x, y, idx in batches(data.x, data.y, batch, g, drop_last=False, augment=augment):
                    if self.reuse_clean_logits and not p.bn_train:  # bn_train: the clean loss needs batch statistics
                        with amp:
                            logits = f(x).float()  # kept with its graph for the unlearning step's clean loss
                        y0 = logits.detach().argmax(1)
                    else:
                        with torch.no_grad(), amp:
                            logits, y0 = None, f(x).argmax(1)
                    if y0_ref_all is not None:
                        y0_ref = y0_ref_all[idx]
                    else:
                        with torch.no_grad(), amp:
                            y0_ref = f_ref(x).argmax(1)
                    delta = shared_adversarial_examples(f, f_ref, x, y, y0, y0_ref, p, g)
                    self.unlearn(optimizer, f, f_ref, logits, x, y, delta, y0_ref)
                    advance(1, round=r + 1)
                self.report(r + 1, f)
        return f
