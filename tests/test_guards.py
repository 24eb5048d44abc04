"""Guardrails before a stress test, each triggered by the mistake it exists for, and the split round-trip."""

from __future__ import annotations

import copy

import pytest
import torch

from antidoor.attacks import create_attack
from antidoor.checkpoint import load_checkpoint, save_checkpoint
from antidoor.errors import AntidoorError
from antidoor.models import Classifier, wrap
from antidoor.pipeline import Scenario
from antidoor.stress import RAConfig, StressConfig, run_stress
from antidoor.stress.guards import GuardConfig, check_scenario

QUICK = StressConfig(ra=RAConfig(seeds=[0], epochs=1), qra=None, path=None, ep=False)


def _with_attack(scenario: Scenario, spec: dict) -> Scenario:
    d = scenario.data
    other = copy.copy(scenario)
    other.attack = create_attack({**spec, "seed": 0}, d.image_shape, d.num_classes)
    other._evaluator = None
    return other


def test_save_load_round_trips_every_split_even_without_metadata(badnets_run, tmp_path):
    """The README's ``save_checkpoint(path, model, {}, attack, splits)``: every split comes back, in
    load_checkpoint and in the scenario rebuilt from it (it used to reload 0 poisoned indices)."""
    res = badnets_run.result
    s = res.scenario.splits
    path = save_checkpoint(tmp_path / "m.safetensors", res.model, {}, res.scenario.attack, s)
    ckpt = load_checkpoint(path)
    for name in ("defender_train", "defender_val", "poison"):
        assert torch.equal(getattr(ckpt.splits, name), getattr(s, name)), name
    assert len(s.poison) == 400
    sc = Scenario.from_checkpoint(ckpt, device="cpu")
    assert torch.equal(sc.splits.poison, s.poison) and torch.equal(sc.splits.defender_val, s.defender_val)


def test_plain_module_is_refused(badnets_run, clean_run):
    sc = badnets_run.result.scenario
    with pytest.raises(AntidoorError, match=r"model 'ft' is a plain SmallCNN.*antidoor.models.wrap"):
        run_stress({"ft": badnets_run.result.model.backbone}, badnets_run.result.model, clean_run.result.model, sc, QUICK)


def test_wrong_trigger_is_refused(badnets_run, clean_run):
    """A trigger the backdoored model does not know (BadNets at the other corner... here: Blended) is refused."""
    sc = _with_attack(badnets_run.result.scenario, {"name": "blended", "target": 0, "pratio": 0.1})
    with pytest.raises(AntidoorError, match=r"backdoored reference has asr .* below guards.min_backdoored_asr 50%.*"
                                            r"--set guards.enforce=false"):
        run_stress({"ft": clean_run.result.model}, badnets_run.result.model, clean_run.result.model, sc, QUICK)


def test_a_trigger_the_clean_reference_follows_too_is_refused(badnets_run, clean_run):
    """A trigger that sends the clean reference to the target as often as the backdoored model (an inverted
    trigger that is a universal adversarial perturbation; here, a 'clean' reference that is the backdoored
    model) cannot tell a backdoor from its absence: refused, or warned and recorded with enforce=false."""
    model, sc = badnets_run.result.model, badnets_run.result.scenario
    with pytest.raises(AntidoorError, match=r"clean reference has asr .* less than guards.min_asr_gap \(25 points\) apart.*"
                                            r"not specific to the backdoor.*--set guards.enforce=false"):
        run_stress({"ft": clean_run.result.model}, model, model, sc, QUICK)
    checks = check_scenario({}, 0.97, sc, GuardConfig(enforce=False), clean_asr=0.90)
    gap = next(c for c in checks if c.name == "trigger_specific")
    assert not gap.ok and gap.value == pytest.approx(0.07) and gap.threshold == 0.25
    # the real clean reference passes: its asr under BadNets' trigger is far below the backdoored model's
    clean_asr = sc.evaluator(clean_run.result.model)["asr"]
    assert next(c for c in check_scenario({}, sc.evaluator(model)["asr"], sc, GuardConfig(), clean_asr=clean_asr)
                if c.name == "trigger_specific").ok


def test_wrong_class_order_and_normalisation_are_caught(badnets_run):
    """A model whose class order is shifted by one is near chance on the defender's images: refused,
    or with enforce=false warned and recorded."""
    sc = badnets_run.result.scenario
    model = badnets_run.result.model
    head = copy.deepcopy(model)
    perm = torch.roll(torch.arange(10), 1)
    with torch.no_grad():
        head.backbone.head.weight.copy_(model.backbone.head.weight[perm])
        head.backbone.head.bias.copy_(model.backbone.head.bias[perm])
    with pytest.raises(AntidoorError, match=r"model 'shifted' classifies the defender's 100 clean images at .*class order"):
        check_scenario({"backdoored": model, "shifted": head}, 0.97, sc, GuardConfig())
    checks = check_scenario({"backdoored": model, "shifted": head}, 0.97, sc, GuardConfig(enforce=False))
    by_name = {c.name: c for c in checks}
    assert by_name["clean_acc:backdoored"].ok and not by_name["clean_acc:shifted"].ok
    assert by_name["clean_acc:shifted"].value < 0.25 <= by_name["clean_acc:backdoored"].value
    # the normalisation of a model trained on normalised images, left out (mean 0, std 1)
    raw = wrap(copy.deepcopy(model.backbone), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert isinstance(raw, Classifier)
    acc = {c.name: c.value for c in check_scenario({"raw": raw}, 0.97, sc, GuardConfig(enforce=False))}["clean_acc:raw"]
    assert acc < by_name["clean_acc:backdoored"].value


def test_missing_poisoned_samples_are_said_and_recorded(badnets_run):
    sc = copy.copy(badnets_run.result.scenario)
    sc.splits = copy.copy(sc.splits)
    sc.splits.poison = torch.empty(0, dtype=torch.int64)
    checks = check_scenario({}, 0.97, sc, GuardConfig())
    assert checks[0].name == "poisoned_samples" and not checks[0].ok and "no EP reference" in checks[0].message
    sc.splits.poison = torch.tensor([10**6])
    with pytest.raises(AntidoorError, match=r"recorded poisoned indices reach 1000000"):
        check_scenario({}, 0.97, sc, GuardConfig())
