"""BTI-DBF(U): backdoor trigger inversion by decoupling benign features, then unlearning.

Xu, Huang, Li, Qin & Ren, "Towards Reliable and Efficient Backdoor Trigger Inversion via
Decoupling Benign Features", ICLR 2024.

A generator G (a U-Net, images in [0, 1] to images in [0, 1]) is first trained to reproduce its
input, so that G(x) starts as x. Then, each round:

(a) Decouple benign features. A soft mask m = tanh(v) / 2 + 1/2 over the model's last feature map f(x)
    is trained so that the masked part alone still classifies clean images and the rest does not::

        L_mask = CE(h(m * f(x)), y) - CE(h((1 - m) * f(x)), y)          (h: the classifier's head)

(b) Invert the trigger. G learns to keep the benign features (m * f) of an image and move its
    other ("backdoor") features, within a pixel budget::

        L_G = D(x, G(x))                                    if D(x, G(x)) > norm_bound or L_benign > feat_bound
            = -MSE((1-m) f(x), (1-m) f(G(x))) + benign_weight * L_benign     otherwise,
        L_benign = MSE(m f(x), m f(G(x))),   D(a, b) = MSE((a - b) / std)

    D is the pixel MSE in the classifier's input units (after its normalisation by the dataset's std),
    the units in which the official code, which feeds normalised images to G, measures it.

    After the first round the target class t is detected (the class the model most often gives to
    G(x + 0.03 noise) on the clean set) and from the second round on L_G adds CE(f(G(x)), t). t is
    recorded with the result (``chosen.detected_target``): an inversion that missed the trigger shows
    there as a class other than the backdoor's. ``chosen.target_share`` records the share of the other classes'
    validation images that G(x) sends to t (:func:`target_share`); below 50% the defense warns that the inversion
    likely found no trigger (t is then an argmax over images that did not move).
(c) Unlearn. The model is fine-tuned on clean batches in which a share ``generated_ratio`` of the
    images is replaced by G(x) with their *true* labels::

        L = CE(model(x_mixed), y) + feature_weight * MSE(features(x), features(x_mixed))

The model after the last round is the result (no model selection on any data).

Defaults are the official ones (the authors' code and the superficial-safety paper's
``defense.sh``), counted in epochs over the official 2,500 clean CIFAR-10 images: generator width
32 (encoder 32-64-128-256, bottleneck 512), pretraining 50 epochs with Adam 1e-3, mask 20 epochs
with Adam 0.01, generator 30 epochs with Adam 1e-3, norm_bound 0.3 (a bound on D, the pixel MSE in normalised
units: on CIFAR-10, std ~0.25, a [0, 1]-pixel MSE of ~0.019),
feat_bound 3, benign weight 0.01, unlearning 30 epochs per round with Adam 1e-4, 20% of each batch
generated, 5 rounds (the paper's nround; ``defense.sh`` uses 3), batch 128. Every number is a
parameter, so tests and the demo can run it tiny.

Deviations from the official code, and why:
- Features: the official code splits its ResNet by hand into "input -> layer4 maps" and "maps ->
  logits". We cut every registered backbone at the same place generically (:class:`FeatureSplit`): the
  last feature map is the input of the backbone's global average pooling (``backbone.avgpool``, read
  with a forward hook), and the logits are ``backbone.head`` of its pooled map. The mask has one value
  per channel and position, as the official one. A backbone without ``avgpool`` is cut at its
  penultimate features (``Classifier.features``, one mask value per feature).
- The generator is trained again in every round, continuing from the previous round's weights
  (as in the authors' ``btidbfu.py``, where one Adam optimiser trains it across rounds); the
  superficial-safety code trains it in round 1 only and then freezes it.
- The mask and generator phases use a copy of the current model in eval mode (BatchNorm running
  statistics, no gradients to its weights); the official code puts the classifier in train mode
  for the mask phase, so batch statistics of clean images shaped the mask.
- G ends in a sigmoid so its outputs are images in [0, 1]. G's input is padded (replicate) to a
  multiple of 16 and its output cropped back, so any image size works.
- G works on [0, 1] pixels, the official G on normalised images; every pixel-space number of the official
  code (norm_bound, the pretraining switch at 0.1, the detection noise's std 0.03) is therefore read in
  normalised units: MSEs are divided by std^2 and the noise is scaled by std, per channel, with the
  classifier's own ``std``. Until 2026-12-05 antidoor read them on [0, 1] pixels, a pixel budget 16 times
  looser on CIFAR-10, within which G found universal adversarial perturbations instead of the trigger
  (``benchmarks/regime.md``, "Did the inversion find the BadNets seed-2 trigger?"); ``bound_units: pixels``
  reproduces that, e.g. the regime study's stored BTI-DBF and PAM rows.
- Pretraining: the official loss is a cross-entropy between two softmax outputs, plus feature and
  pixel MSE with the pixel weight switching from 100 to 0.01 once the pixel MSE is below 0.1; we keep
  the switch and the MSE terms and use the soft-label cross-entropy CE(f(G(x)), softmax f(x)) for the
  prediction term (the official one feeds probabilities where logits are expected).
- Unlearning: the replaced images are the first ones of each shuffled batch (a random subset); one
  forward runs on the mixed batch and the clean versions of the replaced images together, and the
  feature term compares only the replaced images (the others are the same images; in the official
  code, two separate train-mode forwards make them differ only through BatchNorm batch statistics);
  the term is averaged over the whole batch as in the official MSE.
- The clean-image augmentation (crop and flip) applies to every phase, as the official clean
  loader does; ``augment: false`` turns it off.
- The official scripts' crashes have no counterpart: the non-PAM path calls ``unlearn`` with an extra
  argument, and the scripts read an ``attack_target`` option that is never defined; here the target is
  always the detected one, never read from the attack.
- ``restarts`` (not in the paper; default 1, the official single run): round 1's inversion from several starts
  of G, keeping the one whose G scores highest on the generator phase's own objective, measured on the defender's
  validation images (:func:`inversion_score`; ``chosen.inversion_start`` records which). On the regime study's
  BadNets model, at the study's cut inversion (5 epochs a phase), a single start landed on the trigger in 2 runs of 6
  and on a universal adversarial perturbation in the others, and those 2 scored highest (``benchmarks/regime.md``).
- Subclasses (``pam``) change the unlearning optimiser through :meth:`BTIDBF.make_optimizer`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from antidoor.data.augment import Augment
from antidoor.defenses.base import BATCH_SIZE_HELP, DEFENSES, DefenderData, Defense, DefenseParams
from antidoor.defenses.tuning import LossFn, tune
from antidoor.models.registry import Classifier
from antidoor.precision import autocast
from antidoor.train import Schedule, TrainConfig, batches, make_optimizer, prepare_model, steps_per_epoch
from antidoor.utils import generator_for, info, progress_bar, warn


class BTIDBFParams(DefenseParams):
    # added after studies were stored: at one start, the behaviour before it, it stays out of stage keys
    # (experiment.stages.defense_key_spec), so their stages resume
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"restarts": 1}
    rounds: int = Field(5, ge=1, description="inversion + unlearning rounds (paper 5; the superficial-safety script 3)")
    batch_size: int = Field(128, ge=1, description=BATCH_SIZE_HELP)
    generator_width: int = Field(32, ge=1, description="channels of the U-Net's first block (then x2 per block; bottleneck x16)")
    pretrain_epochs: int = Field(50, ge=0, description="epochs training G to reproduce its input")
    pretrain_lr: float = Field(1e-3, gt=0)
    mask_epochs: int = Field(20, ge=1, description="epochs of the feature-mask phase, per round")
    mask_lr: float = Field(0.01, gt=0)
    generator_epochs: int = Field(30, ge=1, description="epochs of the generator phase, per round")
    generator_lr: float = Field(1e-3, gt=0)
    norm_bound: float = Field(0.3, gt=0, description="bound on the pixel MSE between x and G(x), in the classifier's "
                                                     "normalised units (official; CIFAR-10: ~0.019 on [0, 1] pixels)")
    feat_bound: float = Field(3.0, gt=0, description="bound on the benign-feature MSE")
    benign_weight: float = Field(0.01, ge=0, description="weight of the benign-feature MSE in the generator loss")
    target_noise: float = Field(0.03, ge=0, description="std of the Gaussian noise added before G when detecting the "
                                                         "target, in normalised units")
    bound_units: Literal["normalised", "pixels"] = Field(
        "normalised", description="units of norm_bound, the pretraining switch (0.1) and target_noise: the classifier's "
                                  "normalised units (official) or [0, 1] pixels (antidoor before 2026-12-05)")
    restarts: int = Field(1, ge=1, description="round-1 inversions from different starts of G; the one scoring "
                                               "highest on the generator objective over the defender's validation "
                                               "images is kept (1: the official single run)")
    epochs: int = Field(30, ge=1, description="unlearning epochs per round")
    optimizer: Literal["sgd", "adam"] = Field("adam", description="unlearning optimiser")
    lr: float = Field(1e-4, gt=0, description="unlearning learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Adam: beta1)")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = Field("constant", description="unlearning learning-rate schedule, restarted every round "
                                                        "(official: constant)")
    generated_ratio: float = Field(0.2, gt=0, le=1, description="share of each unlearning batch replaced by G(x) (true labels)")
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature MSE between x and the mixed batch")
    augment: bool = Field(True, description="crop/flip the clean images in every phase")
    amp: bool = Field(True, description="bfloat16 autocast where the device runs it fast (antidoor.precision)")


class FeatureSplit:
    """The model cut where the official code cuts ResNet: x -> the last feature map (the input of the
    backbone's global average pooling, C x H x W) and that map -> logits (pooling, then the head).

    Every registered backbone ends in a global pooling (``avgpool``, or ``pool``) then ``head``; a backbone
    without one is cut at its penultimate features (``Classifier.features``) instead.
    """

    def __init__(self, model: Classifier) -> None:
        self.model = model
        self.head = model.backbone.head
        self.pool: nn.Module | None = getattr(model.backbone, "avgpool", getattr(model.backbone, "pool", None))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return self.model.features(x)
        captured: list[torch.Tensor] = []
        hook = self.pool.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            self.model.features(x)
        finally:
            hook.remove()
        return captured[0]

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        return self.head(feat if self.pool is None else self.pool(feat).flatten(1))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out, affine=True), nn.LeakyReLU(0.2))


class UNetGenerator(nn.Module):
    """BTI-DBF's generator: 4 encoder blocks (width x 1, 2, 4, 8), a bottleneck (x 16), a
    transposed-convolution decoder with skip connections, a 1x1 convolution and a sigmoid."""

    depth = 4

    def __init__(self, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(self.depth)]
        ins = [channels, *widths[:-1]]
        self.encoder = nn.ModuleList(_conv_block(c_in, c_out) for c_in, c_out in zip(ins, widths, strict=True))
        self.bottleneck = _conv_block(widths[-1], 2 * widths[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(2 * c, c, 2, stride=2) for c in reversed(widths))
        self.decoder = nn.ModuleList(_conv_block(2 * c, c) for c in reversed(widths))
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        z = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate") if (h % m or w % m) else x
        skips = []
        for block in self.encoder:
            z = block(z)
            skips.append(z)
            z = F.max_pool2d(z, 2)
        z = self.bottleneck(z)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            z = block(torch.cat([up(z), skip], 1))
        return torch.sigmoid(self.out(z))[..., :h, :w]


def _epochs(data: DefenderData, p: BTIDBFParams, epochs: int, g: torch.Generator,
            description: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``epochs`` passes over the defender's clean images (crop/flip with ``p.augment``), with a progress bar."""
    augment = Augment(hflip=data.hflip) if p.augment else None
    with progress_bar(epochs * steps_per_epoch(len(data.x), p.batch_size, drop_last=False), description) as advance:
        for _ in range(epochs):
            for x, y, _ in batches(data.x, data.y, p.batch_size, g, drop_last=False, augment=augment, channels_last=False):
                yield x, y
                advance(1)


def input_mse(model: Classifier, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The MSE between two batches of [0, 1] images in the classifier's input units (after its normalisation),
    where the official code, whose G maps normalised images to normalised images, measures its pixel bounds."""
    return ((a - b) / model.std).pow(2).mean()


def _budget_mse(model: Classifier, p: BTIDBFParams, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The pixel MSE the official bounds apply to, in ``p.bound_units``."""
    return input_mse(model, a, b) if p.bound_units == "normalised" else F.mse_loss(a, b)


def _descend(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def pretrain_generator(gen: UNetGenerator, model: Classifier, data: DefenderData, p: BTIDBFParams, g: torch.Generator) -> None:
    """G(x) ~ x: pixel MSE in ``bound_units`` (weight 100 until it is below 0.1, then 0.01) + feature MSE + soft-label CE."""
    if p.pretrain_epochs == 0:
        return
    opt = torch.optim.Adam(gen.parameters(), lr=p.pretrain_lr)
    gen.train()
    split = FeatureSplit(model)
    amp = autocast(data.device, p.amp)
    for x, _ in _epochs(data, p, p.pretrain_epochs, g, "BTI-DBF: pretrain G"):
        with amp:
            with torch.no_grad():
                feat = split.features(x).float()
                probs = split.logits(feat).float().softmax(1)
            gx = gen(x).float()
            feat_g = split.features(gx).float()
            pixel = _budget_mse(model, p, gx, x)
            loss = (F.cross_entropy(split.logits(feat_g).float(), probs) + F.mse_loss(feat_g, feat)
                    + torch.where(pixel > 0.1, 100.0, 0.01) * pixel)
        _descend(opt, loss)


def train_feature_mask(model: Classifier, data: DefenderData, p: BTIDBFParams, g: torch.Generator) -> torch.Tensor:
    """(a) The soft mask m in (0, 1)^(C x H x W) over the last feature map that keeps the benign features."""
    split = FeatureSplit(model)
    with torch.no_grad():
        shape = split.features(data.x[:1].float().div(255)).shape[1:]
    logit = torch.randn(shape, device=data.device, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([logit], lr=p.mask_lr)
    amp = autocast(data.device, p.amp)
    for x, y in _epochs(data, p, p.mask_epochs, g, "BTI-DBF: feature mask"):
        with torch.no_grad(), amp:
            feat = split.features(x).float()  # the model is fixed here: only the mask learns
        m = torch.tanh(logit) / 2 + 0.5
        _descend(opt, F.cross_entropy(split.logits(m * feat), y) - F.cross_entropy(split.logits((1 - m) * feat), y))
    return (torch.tanh(logit) / 2 + 0.5).detach()


def feature_terms(mask: torch.Tensor, feat: torch.Tensor, feat_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator phase's feature terms: the MSE of the benign (masked) features and of the others ("backdoor")
    between clean images' features ``feat`` and their inverted versions' ``feat_inv``."""
    return F.mse_loss(mask * feat_inv, mask * feat), F.mse_loss((1 - mask) * feat_inv, (1 - mask) * feat)


def train_generator(gen: UNetGenerator, opt: torch.optim.Optimizer, model: Classifier, mask: torch.Tensor,
                    data: DefenderData, p: BTIDBFParams, g: torch.Generator, target: int | None) -> None:
    """(b) G keeps the benign (masked) features and moves the others, within the pixel budget;
    with a detected ``target``, also pushes G(x) toward it."""
    gen.train()
    split = FeatureSplit(model)
    amp = autocast(data.device, p.amp)
    for x, y in _epochs(data, p, p.generator_epochs, g, "BTI-DBF: generator"):
        with amp:
            with torch.no_grad():
                feat = split.features(x).float()
            gx = gen(x).float()
            feat_g = split.features(gx).float()
            benign, backdoor = feature_terms(mask, feat, feat_g)
            pixel = _budget_mse(model, p, gx, x)
            # the switch without a host round trip: the gradient flows through the chosen branch only
            loss = torch.where((pixel > p.norm_bound) | (benign > p.feat_bound), pixel, -backdoor + p.benign_weight * benign)
            if target is not None:
                loss = loss + F.cross_entropy(split.logits(feat_g).float(), torch.full_like(y, target))
        _descend(opt, loss)


@torch.no_grad()
def detect_target(gen: UNetGenerator, model: Classifier, data: DefenderData, p: BTIDBFParams, g: torch.Generator) -> int:
    """The class the model gives most often to G(x + noise) over the clean set (the official rule)."""
    gen.eval()
    counts = torch.zeros(data.num_classes, device=data.device, dtype=torch.long)
    std = p.target_noise * (model.std if p.bound_units == "normalised" else 1.0)  # per channel, once
    with autocast(data.device, p.amp):
        for x, _, _ in batches(data.x, data.y, p.batch_size, g, shuffle=False, drop_last=False, channels_last=False):
            noise = torch.randn(x.shape, device=x.device, generator=g) * std
            counts += torch.bincount(model(gen(x + noise)).argmax(1), minlength=data.num_classes)
    return int(counts.argmax())


def first_round_inversion(gen: UNetGenerator, gen_opt: torch.optim.Optimizer, model: Classifier, data: DefenderData,
                          p: BTIDBFParams, g: torch.Generator, scores: list[float] | None = None) -> tuple[torch.Tensor, int]:
    """Round 1 of the inversion: pretrain G, train the benign-feature mask, train G (no target yet), then
    detect the target. Returns the mask and the detected class; ``model`` is the fixed inversion copy.

    With ``p.restarts`` > 1 it runs again from further starts of G (drawn from torch's global generator, the
    stream ``g`` continuing) and keeps the run whose G scores highest (:func:`inversion_score`), loaded into
    ``gen`` and ``gen_opt``; ``scores``, if given, receives every run's score.
    """
    best: tuple | None = None
    for start in range(p.restarts):
        gen_i, opt_i = (gen, gen_opt) if start == 0 else _generator_and_adam(data, p)
        pretrain_generator(gen_i, model, data, p, g)
        mask = train_feature_mask(model, data, p, g)
        train_generator(gen_i, opt_i, model, mask, data, p, g, None)
        if p.restarts == 1:
            return mask, detect_target(gen_i, model, data, p, g)
        score = inversion_score(gen_i, model, mask, data, p)
        info(f"BTI-DBF: inversion start {start + 1}/{p.restarts}: score {score:.4g}")
        if scores is not None:
            scores.append(score)
        if best is None or score > best[0]:
            best = (score, copy.deepcopy(gen_i.state_dict()), copy.deepcopy(opt_i.state_dict()), mask)
    assert best is not None
    gen.load_state_dict(best[1])
    gen_opt.load_state_dict(best[2])
    return best[3], detect_target(gen, model, data, p, g)


@torch.no_grad()
def inversion_score(gen: UNetGenerator, model: Classifier, mask: torch.Tensor, data: DefenderData, p: BTIDBFParams,
                    batch: int = 500) -> float:
    """What the generator phase maximises, on the defender's validation images (all its images if it has none):
    the backdoor-feature MSE of G(x) minus ``benign_weight`` times its benign-feature MSE. Of six starts on the regime
    study's BadNets model (the study's cut inversion), the two that found the trigger scored highest
    (``benchmarks/regime.md``, "Why the inversion misses")."""
    gen.eval()
    split = FeatureSplit(model)
    x_all = data.x_val if len(data.x_val) else data.x
    total = 0.0
    with autocast(data.device, p.amp):
        for i in range(0, len(x_all), batch):
            x = x_all[i:i + batch].float().div(255)
            benign, backdoor = feature_terms(mask, split.features(x).float(), split.features(gen(x).float()).float())
            total += float(backdoor - p.benign_weight * benign) * len(x)
    return total / len(x_all)


@torch.no_grad()
def target_share(gen: UNetGenerator, model: Classifier, data: DefenderData, target: int, amp: bool = True,
                 batch: int = 500) -> float:
    """How much of a trigger G found: the share of the defender's validation images (all its images if it has none)
    of classes other than ``target`` that ``model`` gives to ``target`` once G has inverted them (no noise).

    A trigger sends nearly all of them (the demo's CIFAR-10 BadNets model: 100%), but so can a universal adversarial
    perturbation (the six starts on the MNIST model of ``benchmarks/README.md``, "heldout_defaults.sh": 74-100% of the
    probe's validation images to the class each detected), so a high share is no proof. A G that
    stayed near x sends almost none, and then the detected class is only the argmax of a count in which no image
    moved: with balanced classes, the lowest class index (at ``norm_bound`` 0.12 on that MNIST model: class 0, the
    attack's target, with 0% moved). 0.0 when every image is of class ``target``."""
    gen.eval()
    was_training = model.training
    model.eval()  # running statistics: a train-mode forward would also move them
    x_all, y_all = (data.x_val, data.y_val) if len(data.x_val) else (data.x, data.y)
    moved, others = 0, 0
    for i in range(0, len(x_all), batch):
        x, y = x_all[i:i + batch].float().div(255), y_all[i:i + batch]
        with autocast(data.device, amp):
            pred = model(gen(x).float().contiguous(memory_format=torch.channels_last)).argmax(1)  # as evaluated
        moved += int(((pred == target) & (y != target)).sum())
        others += int((y != target).sum())
    model.train(was_training)
    return moved / others if others else 0.0


LOW_TARGET_SHARE = 0.5  # below it, the inversion is reported as having found no trigger


def new_inversion(data: DefenderData, p: BTIDBFParams, seed: int) -> tuple[UNetGenerator, torch.optim.Optimizer, torch.Generator]:
    """G, its Adam (one optimiser across rounds, as in the authors' code) and the inversion's random stream.
    G's initial weights come from torch's global generator, which :func:`~antidoor.defenses.base.purify` seeds with
    the defense's seed just before (a caller outside it, e.g. a benchmark, seeds it the same way)."""
    return *_generator_and_adam(data, p), generator_for(data.device, seed)


def _generator_and_adam(data: DefenderData, p: BTIDBFParams) -> tuple[UNetGenerator, torch.optim.Optimizer]:
    gen = UNetGenerator(data.x.shape[1], p.generator_width).to(data.device)
    return gen, torch.optim.Adam(gen.parameters(), lr=p.generator_lr)


@torch.no_grad()
def objective_terms(model: Classifier, mask: torch.Tensor, x: torch.Tensor, x_inv: torch.Tensor) -> dict[str, float]:
    """The generator phase's terms for an inverted batch ``x_inv`` of the clean images ``x``: the benign-feature MSE,
    the backdoor-feature MSE (what G maximises) and the pixel MSE the budget bounds (normalised units). Measuring
    them for G(x) and for the real trigger tells whether an inversion that missed the trigger was the objective's
    choice or the optimiser's."""
    split = FeatureSplit(model)
    benign, backdoor = feature_terms(mask, split.features(x).float(), split.features(x_inv).float())
    return {"benign": float(benign), "backdoor": float(backdoor), "input_mse": float(input_mse(model, x_inv, x))}


def n_generated(batch: int, ratio: float) -> int:
    return max(1, min(batch, round(ratio * batch)))


@DEFENSES.register("bti-dbf")
class BTIDBF(Defense):
    name = "bti-dbf"
    Params = BTIDBFParams
    params: BTIDBFParams
    # Round 1's inversion (pretraining, mask, generator, target) depends only on the starting weights:
    # a caller that runs the defense again from the same start (``rho: auto``) keeps it and reuses it.
    keep_first_inversion: bool = False
    first_inversion: tuple | None = None

    def make_optimizer(self, model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The unlearning optimiser, built once for every round (the hook ``pam`` overrides)."""
        return make_optimizer(model.parameters(), cfg)

    def unlearning_config(self) -> TrainConfig:
        p = self.params
        return TrainConfig(epochs=p.epochs, batch_size=p.batch_size, optimizer=p.optimizer, lr=p.lr, momentum=p.momentum,
                           weight_decay=p.weight_decay, schedule=p.schedule, augment=p.augment, drop_last=False, amp=p.amp)

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        p = self.params
        self.note_full_batch(p.batch_size, len(data.x))
        device = data.device
        prepare_model(model, device)
        gen, gen_opt, g = new_inversion(data, p, self.seed)
        cfg = self.unlearning_config()
        optimizer = self.make_optimizer(model, cfg)
        target = None
        for r in range(p.rounds):
            if r == 0 and self.first_inversion is not None:  # the same start: round 1's inversion, as computed before
                gen_state, opt_state, mask, target, rng = copy.deepcopy(self.first_inversion)
                gen.load_state_dict(gen_state)
                gen_opt.load_state_dict(opt_state)
                g.set_state(rng)
            else:
                inv = self._inversion_copy(model)
                if target is None:  # round 1 (later rounds have its target, computed here or reused)
                    scores: list[float] = []
                    mask, target = first_round_inversion(gen, gen_opt, inv, data, p, g, scores)
                    if scores:  # recorded with the result: which start was kept
                        self.chosen["inversion_start"] = float(1 + max(range(len(scores)), key=scores.__getitem__))
                    info(f"{self.name}: detected target class {target} (round 1)")
                else:
                    mask = train_feature_mask(inv, data, p, g)
                    train_generator(gen, gen_opt, inv, mask, data, p, g, target)
                del inv
                if r == 0 and self.keep_first_inversion:
                    self.first_inversion = copy.deepcopy((gen.state_dict(), gen_opt.state_dict(), mask, target, g.get_state()))
            # recorded with the result (chosen.detected_target): the one thing a user can compare with a known or
            # suspected target to tell whether the inversion found the backdoor or something else
            self.chosen["detected_target"] = float(target)
            # before any unlearning: what round 1's G does to the model it was inverted on; once per defense, as
            # pam's rho: auto runs this again from the same inversion for every candidate
            if r == 0 and "target_share" not in self.chosen:
                share = target_share(gen, model, data, target, p.amp)
                self.chosen["target_share"] = round(share, 4)
                if share < LOW_TARGET_SHARE:
                    warn(f"{self.name}: the inverted trigger sends only {share:.0%} of the other classes' validation images "
                         f"to the detected class {target}: the inversion likely found no trigger, so that class is not evidence "
                         "of a backdoor and the unlearning has little to unlearn")
            gen.eval()
            tune(model, data, cfg, seed=self.seed + 1 + r, loss_fn=self._unlearning_loss(gen), optimizer=optimizer,
                 description=f"{self.name}: unlearn round {r + 1}")
            self.report(r + 1, model)
        return model

    @staticmethod
    def _inversion_copy(model: Classifier) -> Classifier:
        return copy.deepcopy(model).eval().requires_grad_(False)

    def _unlearning_loss(self, gen: UNetGenerator) -> LossFn:
        p = self.params

        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            k = n_generated(len(x), p.generated_ratio)
            with torch.no_grad():
                gx = gen(x[:k]).to(x.dtype)
            mixed = torch.cat([gx, x[k:]]).contiguous(memory_format=torch.channels_last)
            if p.feature_weight == 0:
                return F.cross_entropy(model(mixed), y)
            split = FeatureSplit(model)
            feats = split.features(torch.cat([mixed, x[:k]]))
            loss = F.cross_entropy(split.logits(feats[:len(x)]), y)
            feature_mse = (feats[:k] - feats[len(x):]).pow(2).sum() / feats[:len(x)].numel()
            return loss + p.feature_weight * feature_mse

        return loss_fn
