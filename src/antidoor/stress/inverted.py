"""Stress when the trigger is unknown: a trigger recovered from the backdoored model itself (BTI-DBF inversion).

A user auditing a model may hold neither the attacker's trigger nor its poisoned samples. BTI-DBF's
inversion (Xu et al., ICLR 2024; :mod:`antidoor.defenses.btidbf`) recovers, from the backdoored model and
the defender's clean images only, a generator G whose outputs G(x) carry the backdoor's features, and
detects the target class. :func:`inverted_attack` runs that inversion (its pretraining, a feature-mask and a
generator phase, the target detection, and a second generator phase pushed toward the target as in BTI-DBF's
second round; no unlearning) and returns it as an :class:`Attack`
whose trigger is G: RA's poisoned samples are G(x), relabelled to the detected target, of training images
outside the defender's data (or of the recorded poisoned images' clean originals, when recorded), and
o_asr/p_asr are measured under G.

``antidoor stress ... --set inversion={}`` (or ``inversion: {generator_epochs: 30, ...}`` in a config) turns it
on; it replaces the backdoored checkpoint's trigger (if any), and EP is not purified (its poisoned samples are
unknown too; ``--ep FILE`` still gives one). The guardrail on the backdoored reference's asr then
checks the inversion itself: a G that does not reactivate the backdoor is refused.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from antidoor.attacks.base import Attack, AttackParams
from antidoor.defenses.btidbf import BTIDBFParams, UNetGenerator, first_round_inversion, train_generator
from antidoor.models.registry import Classifier
from antidoor.utils import generator_for, info

if TYPE_CHECKING:
    from antidoor.pipeline import Scenario


class InversionConfig(BaseModel):
    """BTI-DBF's inversion settings (its defaults; every one a BTI-DBF parameter of the same name)."""

    model_config = ConfigDict(extra="forbid")
    generator_width: int = Field(32, ge=1)
    pretrain_epochs: int = Field(50, ge=0)
    mask_epochs: int = Field(20, ge=1)
    generator_epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    norm_bound: float = Field(0.3, gt=0, description="bound on the pixel MSE between x and G(x), in bound_units")
    bound_units: Literal["normalised", "pixels"] = "normalised"
    seed: int = Field(0, ge=0)


class InvertedParams(AttackParams):
    generator_width: int = Field(32, ge=1)


class InvertedTrigger(Attack):
    """The trigger is a generator: ``stamp(x) = G(x)``; its weights are the attack's tensors (``gen.*``)."""

    name = "inverted"
    Params = InvertedParams
    params: InvertedParams

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        gen = UNetGenerator(self.image_shape[0], self.params.generator_width)
        return {f"gen.{k}": v for k, v in gen.state_dict().items()}

    def _generator(self) -> UNetGenerator:
        dev = next(iter(self.tensors.values())).device
        gen = getattr(self, "_gen", None)
        if gen is None or next(gen.parameters()).device != dev:
            gen = UNetGenerator(self.image_shape[0], self.params.generator_width).to(dev)
            gen.load_state_dict({k.removeprefix("gen."): v for k, v in self.tensors.items()})
            self._gen = gen.eval().requires_grad_(False)
        return gen

    @torch.no_grad()
    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self._generator()(x)


def inverted_attack(backdoored: Classifier, scenario: Scenario, config: InversionConfig | None = None) -> InvertedTrigger:
    """Recover a trigger generator and the target from ``backdoored`` with the defender's clean images only."""
    cfg = config or InversionConfig()
    data = scenario.defender_data()
    p = BTIDBFParams(rounds=1, batch_size=min(cfg.batch_size, len(data.x)), generator_width=cfg.generator_width,
                     pretrain_epochs=cfg.pretrain_epochs, mask_epochs=cfg.mask_epochs, generator_epochs=cfg.generator_epochs,
                     norm_bound=cfg.norm_bound, bound_units=cfg.bound_units)
    model = copy.deepcopy(backdoored).to(data.device).eval().requires_grad_(False)
    g = generator_for(data.device, cfg.seed)
    torch.manual_seed(cfg.seed)  # the generator's initial weights: the same recovered trigger in every process
    gen = UNetGenerator(data.x.shape[1], p.generator_width).to(data.device)
    mask, target = first_round_inversion(gen, torch.optim.Adam(gen.parameters(), lr=p.generator_lr), model, data, p, g)
    train_generator(gen, torch.optim.Adam(gen.parameters(), lr=p.generator_lr), model, mask, data, p, g, target)
    info(f"trigger inversion (BTI-DBF): detected target class {target}")
    tensors = {f"gen.{k}": v.detach() for k, v in gen.state_dict().items()}
    d = scenario.data
    return InvertedTrigger(InvertedParams(target=target, pratio=0.0, generator_width=cfg.generator_width), d.image_shape,
                           d.num_classes, cfg.seed, tensors)


__all__ = ["InversionConfig", "InvertedTrigger", "inverted_attack"]
