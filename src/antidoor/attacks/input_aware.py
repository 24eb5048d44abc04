"""Input-aware: a dynamic, per-image trigger from a generator trained with a classifier.

Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020. A generator G draws a pattern
for each image and a mask net M says where it goes: x' = x + (G(x) - x) * M(x). Training mixes
backdoor samples (own pattern, relabelled to the target), cross samples (another image's pattern
and mask, label kept: a trigger only works on the image it was made for) and clean samples; a
diversity loss ||x1 - x2|| / ||G(x1) - G(x2)|| stops G from collapsing to one pattern.

Defaults follow BackdoorBench: G and M are encoder-decoders of ``generator_width`` = 32, 64, 128
channels (see ``surrogate.EncoderDecoder``), M's output is sharpened by tanh(20 m - 10) / 2 + 0.5;
stage 1 trains M alone for ``mask_epochs`` = 25 with lambda_norm = 100 * relu(mean mask -
``mask_density`` 0.032) plus its diversity loss, Adam lr 0.01, betas (0.5, 0.9); stage 2 trains G
(Adam 0.01, betas (0.5, 0.9)) jointly with a classifier (SGD, momentum 0.9, weight decay 5e-4)
on CE + ``lambda_div`` = 1 times G's diversity loss, with ``joint_ratio`` = 0.1 of each batch
backdoor samples and as many cross samples (``cross_ratio`` = 1), after crop and flip.

Deviations: the diversity loss takes the root of the pattern distance plus 1e-12 (BackdoorBench's
has a NaN gradient wherever two patterns are identical, which a long fit reaches: it then silently
turns G, the classifier and the victim into NaN); and every epoch of the fit checks that its loss is
finite, stopping with an error otherwise. BackdoorBench trains G with the final classifier in one run. Here G and M are fitted
once, in :meth:`InputAware.fit`, jointly with the attacker's own surrogate classifier
(``surrogate_*``; 10 epochs by default instead of 100, cosine schedules instead of step ones) and
then frozen: the victim is trained like every other victim, on batches where the ``pratio``
poisoned indices carry their own G/M trigger (relabelled) and ``cross_ratio`` times as many other
samples carry another image's trigger (labels kept). G and M weights (and BatchNorm statistics)
are the trigger tensors, so a checkpoint holds the whole trigger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from antidoor.attacks.base import ATTACKS, Attack, AttackerData, quantize
from antidoor.attacks.surrogate import (
    EncoderDecoder,
    SurrogateParams,
    accuracy,
    call_with,
    init_module,
    new_surrogate,
    surrogate_config,
    tensors_of,
)
from antidoor.data.augment import Augment
from antidoor.train import batches, ensure_finite, make_optimizer, make_scheduler, steps_per_epoch
from antidoor.utils import generator_for, progress_bar


class InputAwareParams(SurrogateParams):
    generator_width: int = Field(32, ge=1, description="channels of the first stage of G and M")
    mask_density: float = Field(0.032, gt=0, le=1, description="mean mask value M is pushed below")
    lambda_div: float = Field(1.0, ge=0, description="weight of the diversity loss")
    lambda_norm: float = Field(100.0, ge=0, description="weight of the mask-density loss (stage 1)")
    mask_epochs: int = Field(25, ge=1, description="epochs of stage 1 (M alone)")
    generator_lr: float = Field(0.01, gt=0, description="Adam learning rate of G and M")
    joint_ratio: float = Field(0.1, gt=0, lt=0.5, description="share of each stage-2 batch that gets the trigger")
    cross_ratio: float = Field(1.0, ge=0, description="cross samples per backdoor sample")


def _sharpen(m: torch.Tensor) -> torch.Tensor:
    return torch.tanh(20 * m - 10) / 2 + 0.5


def _diversity(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    d_in = (x1 - x2).pow(2).flatten(1).mean(1).sqrt()
    # + 1e-12 inside the root: where two outputs are identical (a saturated sigmoid or tanh does that
    # exactly in float32) the gradient of sqrt at 0 is 0/0 = NaN, which poisons G and then the classifier
    d_out = (out1 - out2).pow(2).flatten(1).mean(1).add(1e-12).sqrt()
    return (d_in / (d_out + 1e-6)).mean()


@ATTACKS.register("input_aware")
class InputAware(Attack):
    name = "input_aware"
    needs_prepare = True
    Params = InputAwareParams
    params: InputAwareParams

    def _nets(self) -> tuple[EncoderDecoder, EncoderDecoder]:
        if not hasattr(self, "_g"):  # skeletons: their weights always come from self.tensors
            c = self.image_shape[0]
            g0 = torch.Generator().manual_seed(self.seed)
            self._g = init_module(EncoderDecoder, g0, c, c, self.params.generator_width)
            self._m = init_module(EncoderDecoder, g0, c, 1, self.params.generator_width)
        return self._g, self._m

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        g, m = self._nets()
        return {**tensors_of(g, "generator"), **tensors_of(m, "mask")}

    def pattern_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, m = self._nets()
        with torch.no_grad():
            return call_with(g, self.tensors, "generator", x), _sharpen(call_with(m, self.tensors, "mask", x))

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.pattern_and_mask(x)
        return x + (pattern - x) * mask

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, poison: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        clean = x
        x, y = super().poison_batch(x, y, poison, generator)
        n_cross = min(round(self.params.cross_ratio * int(poison.sum())), int((~poison).sum()))
        if n_cross > 0 and len(x) > 1:
            others = (~poison).nonzero().flatten()
            pick = others[torch.randperm(len(others), device=x.device, generator=generator)[:n_cross]]
            # each picked sample gets the trigger made for the next (clean) image of the batch
            pattern, mask = self.pattern_and_mask(clean[(pick + 1) % len(x)])
            x[pick] = quantize(x[pick] + (pattern - x[pick]) * mask)
        return x, y

    def fit(self, data: AttackerData) -> dict[str, torch.Tensor]:
        p = self.params
        device = data.device
        c = self.image_shape[0]
        gen = torch.Generator().manual_seed(self.seed)
        G = init_module(EncoderDecoder, gen, c, c, p.generator_width).to(device).train()
        M = init_module(EncoderDecoder, gen, c, 1, p.generator_width).to(device).train()
        G.load_state_dict({k[len("generator."):]: v for k, v in self.tensors.items() if k.startswith("generator.")})
        M.load_state_dict({k[len("mask."):]: v for k, v in self.tensors.items() if k.startswith("mask.")})
        cfg = surrogate_config(p, len(data.x))
        per_epoch = steps_per_epoch(len(data.x), cfg.batch_size, cfg.drop_last)
        augment = Augment(cfg.crop_padding, data.hflip)
        rng = generator_for(device, self.seed)

        def adam(params: object, epochs: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
            opt = torch.optim.Adam(params, lr=p.generator_lr, betas=(0.5, 0.9))  # type: ignore[arg-type]
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * per_epoch))

        # stage 1: the mask net alone
        opt_m, sched_m = adam(M.parameters(), p.mask_epochs)
        hint = f"lower attack.generator_lr (now {p.generator_lr}) or attack.surrogate_lr (now {p.surrogate_lr})"
        with progress_bar(p.mask_epochs * per_epoch, "attack: input-aware mask net") as advance:
            for epoch in range(p.mask_epochs):
                total = torch.zeros((), device=device)
                for x, _, _ in batches(data.x, data.y, cfg.batch_size, rng, augment=augment, channels_last=False):
                    x2 = x.roll(1, 0)
                    m1, m2 = _sharpen(M(x)), _sharpen(M(x2))
                    loss = p.lambda_norm * F.relu(m1.mean() - p.mask_density) + p.lambda_div * _diversity(x, x2, m1, m2)
                    opt_m.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_m.step()
                    sched_m.step()
                    total += loss.detach()
                    advance(1)
                ensure_finite(total.item(), f"input_aware mask net, epoch {epoch + 1} of {p.mask_epochs}", hint)
        M.eval().requires_grad_(False)

        # stage 2: the generator jointly with a classifier
        C = new_surrogate(p, data).train()
        opt_c = make_optimizer(C.parameters(), cfg)
        sched_c = make_scheduler(opt_c, cfg, cfg.epochs * per_epoch)
        opt_g, sched_g = adam(G.parameters(), cfg.epochs)
        with progress_bar(cfg.epochs * per_epoch, "attack: input-aware generator") as advance:
            for epoch in range(cfg.epochs):
                total = torch.zeros((), device=device)
                for x, y, _ in batches(data.x, data.y, cfg.batch_size, rng, augment=augment, channels_last=False):
                    n_bd = max(1, round(p.joint_ratio * len(x)))
                    n_cross = min(round(p.cross_ratio * n_bd), len(x) - n_bd)
                    x2 = x.roll(1, 0)  # another image for every sample
                    xb, xc, x2c = x[:n_bd], x[n_bd:n_bd + n_cross], x2[n_bd:n_bd + n_cross]
                    pb, pc = G(xb), G(x2c)
                    with torch.no_grad():
                        mb, mc = _sharpen(M(xb)), _sharpen(M(x2c))
                    inputs = torch.cat([xb + (pb - xb) * mb, xc + (pc - xc) * mc, x[n_bd + n_cross:]])
                    labels = torch.cat([torch.full_like(y[:n_bd], self.target), y[n_bd:]])
                    loss = F.cross_entropy(C(inputs), labels)
                    k = min(n_bd, n_cross)
                    if k > 0 and p.lambda_div > 0:
                        loss = loss + p.lambda_div * _diversity(xb[:k], x2c[:k], pb[:k], pc[:k])
                    opt_c.zero_grad(set_to_none=True)
                    opt_g.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_c.step()
                    opt_g.step()
                    sched_c.step()
                    sched_g.step()
                    total += loss.detach()
                    advance(1)
                ensure_finite(total.item(), f"input_aware generator, epoch {epoch + 1} of {cfg.epochs}", hint)
        G.eval()
        C.eval()
        fitted = {**tensors_of(G, "generator"), **tensors_of(M, "mask")}
        self.tensors = {**self.tensors, **fitted}  # so stamp() below uses the fitted nets
        others = data.x[data.y != self.target][:500]
        with torch.no_grad():
            triggered = self.apply_uint8(others)
            pattern, mask = self.pattern_and_mask(others.float().div(255))
        # pattern_spread: how much G's pattern varies between images (std across images, mean over pixels)
        self.fit_report = {"surrogate_acc": accuracy(C, data.x, data.y),
                           "surrogate_asr": accuracy(C, triggered, torch.full_like(data.y[:len(others)], self.target)),
                           "mask_mean": mask.mean().item(), "pattern_spread": pattern.std(0).mean().item()}
        return fitted
