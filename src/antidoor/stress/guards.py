"""Guardrails before a stress test: refuse (or warn) when the numbers it would print are wrong by construction.

Three mistakes give plausible but wrong numbers without a word, so each is checked before anything runs:

- **a model without its input normalisation** (a raw ``nn.Module`` instead of a :class:`Classifier`):
  refused always; ``antidoor.models.wrap(module, mean, std)`` adds it;
- **a trigger that does not match the backdoored model**: its asr under the given trigger is below
  ``guards.min_backdoored_asr`` (default 50%), so every asr of the suite measures the wrong trigger;
- **a trigger that is not specific to the backdoor**: with a clean reference, its asr under the trigger
  must stay ``guards.min_asr_gap`` (default 25 points) below the backdoored reference's. A trigger that
  the clean model follows too (an inverted trigger that became a universal adversarial perturbation, say)
  sends every model to the target, references included, and the verdicts would call anything deep;
- **a model near chance on the defender's clean images** (training and validation parts; the test split
  is not used to decide anything): accuracy below chance + ``guards.chance_margin`` (default 15 points),
  or below halfway between chance and the backdoored reference's accuracy when that is lower
  means a wrong normalisation, class order or class count;
- **poisoned samples missing**: with no recorded poisoned training samples RA stamps the trigger on
  training images outside the defender's data and no EP can be built; said as a warning, since RA on
  stamped images is a valid RA, and recorded in the result. Recorded indices outside the training set
  are refused.

With ``guards.enforce: false`` (``--set guards.enforce=false``) a failed check is a warning instead of
an error, and still recorded in ``stress.json`` and at the top of ``stress.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from antidoor.errors import AntidoorError
from antidoor.metrics import predict
from antidoor.utils import warn

if TYPE_CHECKING:
    from antidoor.pipeline import Scenario

OVERRIDE = "--set guards.enforce=false to go on anyway"


class GuardConfig(BaseModel):
    """Thresholds of the checks run before a stress test (see :mod:`antidoor.stress.guards`)."""

    model_config = ConfigDict(extra="forbid")
    enforce: bool = Field(True, description="refuse on a failed check; false: warn and go on")
    min_backdoored_asr: float = Field(0.5, ge=0, le=1, description="least asr of the backdoored reference")
    chance_margin: float = Field(0.15, ge=0, le=1, description="least clean_acc above chance")
    min_asr_gap: float = Field(0.25, ge=0, le=1, description="least gap between the backdoored and the clean reference's "
                                                             "asr under the trigger")


@dataclass
class Check:
    """One guardrail's outcome; ``value``/``threshold`` are rates in [0, 1] (None where not a rate)."""

    name: str
    ok: bool
    message: str
    value: float | None = None
    threshold: float | None = None
    severity: str = "error"  # "error": refused unless guards.enforce is false; "warning": said, never refused

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_classifier(name: str, model: torch.nn.Module) -> None:
    """Refuse a model that does not normalise its [0, 1] inputs itself (every measurement would be wrong)."""
    if not (hasattr(model, "mean") and hasattr(model, "std") and hasattr(model, "arch")):
        raise AntidoorError(f"model {name!r} is a plain {type(model).__name__}, not an antidoor Classifier: antidoor feeds "
                            "[0, 1] pixels and the model must normalise them itself; wrap it with "
                            "antidoor.models.wrap(module, mean, std) using the normalisation it was trained with")


def check_scenario(models: dict[str, torch.nn.Module], backdoored_asr: float, scenario: Scenario,
                   config: GuardConfig, clean_asr: float | None = None) -> list[Check]:
    """Run every check; raise on the first failed error-level check when ``config.enforce``, else warn.

    ``clean_asr``: the clean reference's asr under the same trigger, where there is one.
    """
    checks = [_poisoned_samples(scenario), _trigger_matches(backdoored_asr, config)]
    if clean_asr is not None and backdoored_asr >= config.min_backdoored_asr:
        checks.append(_trigger_specific(backdoored_asr, clean_asr, config))
    accuracy = {n: _defender_accuracy(m, scenario) for n, m in models.items()}  # each model measured once
    n_images = len(scenario.splits.defender_train) + len(scenario.splits.defender_val)
    checks += [_above_chance(n, acc, accuracy.get("backdoored"), n_images, scenario.data.num_classes, config)
               for n, acc in accuracy.items()]
    for c in checks:
        if c.ok:
            continue
        if c.severity == "error" and config.enforce:
            raise AntidoorError(f"{c.message}; {OVERRIDE}")
        warn(c.message)
    return checks


def _trigger_matches(asr: float, config: GuardConfig) -> Check:
    t = config.min_backdoored_asr
    ok = asr >= t
    msg = (f"the backdoored reference has asr {100 * asr:.1f}% under the given trigger" +
           ("" if ok else f", below guards.min_backdoored_asr {100 * t:.0f}%: the trigger (its image, position, "
                          "target or blend) does not match the model, so every asr measured would be about another trigger"))
    return Check("backdoored_asr", ok, msg, asr, t)


def _trigger_specific(backdoored_asr: float, clean_asr: float, config: GuardConfig) -> Check:
    gap, t = backdoored_asr - clean_asr, config.min_asr_gap
    ok = gap >= t
    msg = (f"the clean reference has asr {100 * clean_asr:.1f}% under the trigger, the backdoored one "
           f"{100 * backdoored_asr:.1f}%" +
           ("" if ok else f": less than guards.min_asr_gap ({100 * t:.0f} points) apart, so the trigger is not specific to the "
                          "backdoor (a model without it follows it too: an inverted trigger that became a universal "
                          "adversarial perturbation, say) and o_asr/p_asr cannot tell a backdoor from its absence"))
    return Check("trigger_specific", ok, msg, gap, t)


def _defender_accuracy(model: torch.nn.Module, scenario: Scenario) -> float:
    d, s = scenario.data, scenario.splits
    idx = torch.cat([s.defender_train, s.defender_val]).to(d.x_train.device)
    return (predict(model, d.x_train[idx]) == d.y_train[idx].to(_device(model))).float().mean().item()


def _above_chance(name: str, acc: float, reference_acc: float | None, n_images: int, num_classes: int,
                  config: GuardConfig) -> Check:
    """Near chance: below chance + chance_margin, or, for a weak backdoored reference, below halfway
    between chance and its accuracy (a purified model of a 35% model may honestly sit at 24%)."""
    chance = 1 / num_classes
    t = chance + config.chance_margin
    if reference_acc is not None and reference_acc > chance:
        t = min(t, (chance + reference_acc) / 2)
    ok = acc >= t
    msg = (f"model {name!r} classifies the defender's {n_images} clean images at {100 * acc:.1f}%" +
           ("" if ok else f", within guards.chance_margin of chance ({100 * chance:.1f}%): its input normalisation "
                          "(mean/std), class order or class count is probably not the one it was trained with"))
    return Check(f"clean_acc:{name}", ok, msg, acc, t)


def _poisoned_samples(scenario: Scenario) -> Check:
    n, poison = len(scenario.data.y_train), scenario.splits.poison
    if len(poison) and (int(poison.max()) >= n or int(poison.min()) < 0):
        raise AntidoorError(f"the recorded poisoned indices reach {int(poison.max())}, but the training set of "
                            f"{scenario.data.name!r} has {n} images: the checkpoint was trained on other data")
    given = scenario.poisoned_samples
    if given is not None:
        return Check("poisoned_samples", given.y is not None, f"{given.source}" + (
            "" if given.y is not None else ": without their true labels ('y'), so no EP reference can be purified"),
            severity="warning")
    if len(poison):
        return Check("poisoned_samples", True, f"{len(poison)} recorded poisoned training samples", severity="warning")
    return Check("poisoned_samples", False, "no recorded poisoned training samples: RA stamps the trigger on training images "
                 "outside the defender's data instead, and no EP reference can be purified (give the attacker's samples "
                 "with --poisoned FILE or --poisoned-indices FILE, or an EP model with --ep)", severity="warning")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = ["Check", "GuardConfig", "check_scenario", "require_classifier"]
