"""Defenses: the registry contract, purify on real images, and the answers to bad parameters."""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import fields

import pytest
import torch

from antidoor.defenses import DEFENSES, DefenderData, Defense, purify
from antidoor.defenses.base import validate_defense_spec
from antidoor.defenses.sau import (
    SAUParams,
    js_divergence,
    shared_adversarial_examples,
    shared_adversarial_predictions,
    shared_adversarial_rate,
)
from antidoor.errors import AntidoorError
from antidoor.metrics import predict
from antidoor.models import MODELS, build_model, frozen_copy

# SAU's official lr 1e-4 needs about a thousand steps; the session model's defender set has 80
# images, so the tests use lr 1e-3 (measured: 5 rounds of batch 40 take asr 0.97 -> 0.08).
FAST_SAU = {"rounds": 5, "batch_size": 40, "lr": 1e-3}
# Small settings for the registry-parametrised tests: every defense gets one epoch/round (a few
# mask steps for ANP) and batch 40 from ``fast_params``; entries here add what a method also needs.
TINY_BTI = {"generator_width": 4, "pretrain_epochs": 1, "mask_epochs": 1, "generator_epochs": 1}
FAST_EXTRA = {"sau": FAST_SAU, "nad": {"teacher_epochs": 1}, "anp": {"iterations": 20}, "bti-dbf": TINY_BTI, "pam": TINY_BTI}


def fast_params(name: str) -> dict:
    """One epoch / round / few iterations and batch 40 for any registered defense, plus FAST_EXTRA."""
    fields = DEFENSES.get(name).Params.model_fields
    # the PAM defenses at a fixed rho: rho: auto runs the defense once per candidate (tests/test_pam_defenses.py)
    small = {k: v for k, v in {"epochs": 1, "rounds": 1, "iterations": 5, "batch_size": 40, "rho": 0.5}.items() if k in fields}
    return {**small, **FAST_EXTRA.get(name, {})}


@pytest.fixture(scope="module")
def defender(badnets_run) -> DefenderData:
    return badnets_run.result.scenario.defender_data()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_defender_data_has_no_test_split_and_defenses_cannot_receive_one():
    assert not any("test" in f.name for f in fields(DefenderData))
    assert list(inspect.signature(Defense.purify).parameters) == ["self", "model", "data"]
    for name in DEFENSES:
        assert list(inspect.signature(DEFENSES.get(name).purify).parameters) == ["self", "model", "data"]
    assert not any("test" in p for p in inspect.signature(purify).parameters)


def test_defender_split_is_disjoint_from_poison_and_test(badnets_run):
    s = badnets_run.result.scenario.splits
    assert not torch.isin(s.defender_train, s.poison).any()
    assert not torch.isin(s.defender_val, s.poison).any()
    assert not torch.isin(s.defender_train, s.defender_val).any()


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_purifies_a_copy_and_changes_weights(name, badnets_run, defender):
    model = badnets_run.result.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = badnets_run.result.scenario.defender_data(oracle=DEFENSES.get(name).needs_poisoned)
    purified = purify(model, data, name, seed=0, **fast_params(name))
    assert purified is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "purify changed its input model"
    assert not _same_weights(purified, model)
    assert not purified.training


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_is_deterministic_on_cpu_and_reports_progress(name, badnets_run):
    data = badnets_run.result.scenario.defender_data(oracle=DEFENSES.get(name).needs_poisoned)
    params = {**fast_params(name), **({"rounds": 1} if "rounds" in fast_params(name) else {})}  # SAU's 5 are for asr
    seen: list[int] = []
    a = purify(badnets_run.result.model, data, name, seed=5, monitor=lambda epoch, m: seen.append(epoch), **params)
    b = purify(badnets_run.result.model, data, name, seed=5, **params)
    assert _same_weights(a, b)
    assert seen and seen == sorted(seen) and seen[0] == 1


def test_sau_lowers_asr_on_real_images(badnets_run, defender):
    scenario = badnets_run.result.scenario
    before = badnets_run.result.metrics
    after = scenario.evaluator(purify(badnets_run.result.model, defender, "sau", seed=0, **FAST_SAU))
    assert before["asr"] > 0.85
    assert after["asr"] < 0.4, after
    assert after["asr"] < before["asr"] - 0.4


def test_sau_is_deterministic_on_cpu(badnets_run, defender):
    a = purify(badnets_run.result.model, defender, "sau", seed=3, rounds=1, batch_size=40)
    b = purify(badnets_run.result.model, defender, "sau", seed=3, rounds=1, batch_size=40)
    assert _same_weights(a, b)


def test_sau_keeps_batchnorm_statistics_frozen_unless_bn_train(badnets_run, defender):
    # the official --train_mode: the unlearning forward uses batch statistics and moves the running ones
    def stats(m):
        return {k: v.clone() for k, v in m.state_dict().items() if k.endswith(("running_mean", "running_var"))}

    before = stats(badnets_run.result.model)
    assert before
    frozen = purify(badnets_run.result.model, defender, "sau", seed=3, rounds=1, batch_size=40)
    trained = purify(badnets_run.result.model, defender, "sau", seed=3, rounds=1, batch_size=40, bn_train=True)
    assert all(torch.equal(before[k], v) for k, v in stats(frozen).items())
    assert all(not torch.equal(before[k], v) for k, v in stats(trained).items())
    assert not frozen.training and not trained.training  # handed back in eval mode either way
    again = purify(badnets_run.result.model, defender, "sau", seed=3, rounds=1, batch_size=40, bn_train=True)
    assert _same_weights(trained, again)


def test_sau_perturbation_stays_within_bound(badnets_run, defender):
    model = __import__("copy").deepcopy(badnets_run.result.model).eval()
    model.zero_grad(set_to_none=True)
    ref = frozen_copy(model)
    x = defender.x[:16].float().div(255)
    p = SAUParams(bound=0.05, step_size=0.03, init="random")
    with torch.no_grad():
        y0, y0_ref = model(x).argmax(1), ref(x).argmax(1)
    delta = shared_adversarial_examples(model, ref, x, defender.y[:16], y0, y0_ref, p, torch.Generator().manual_seed(0))
    assert delta.abs().max() <= 0.05 + 1e-6
    assert delta.abs().max() > 0
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is None for p in model.parameters())  # gradients flow to delta only


def test_js_divergence_is_zero_for_equal_and_positive_otherwise():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.2, 0.7]])
    assert js_divergence(p, p).abs().item() < 1e-7
    assert 0 < js_divergence(p, q).item() <= torch.log(torch.tensor(2.0)).item()


def test_monitor_sees_every_round_but_cannot_pick_the_model(badnets_run, defender):
    seen = []
    final = purify(badnets_run.result.model, defender, "sau", seed=0, monitor=lambda r, m: seen.append(r),
                   rounds=3, batch_size=40)
    again = purify(badnets_run.result.model, defender, "sau", seed=0, rounds=3, batch_size=40)
    assert seen == [1, 2, 3]
    assert _same_weights(final, again)


def test_sau_unlearning_term_is_exact_and_keeps_a_gradient_where_the_backdoor_is_sure():
    from antidoor.defenses.sau import log_one_minus_softmax

    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 0.0, 0.0], [40.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([1, 2, 0])
    s = logits.softmax(1).gather(1, k[:, None]).squeeze(1)
    exact = log_one_minus_softmax(logits, k)
    torch.testing.assert_close(exact[:2], torch.log1p(-s[:2]))
    # s = 1 - 2e-17: log1p(-s) rounds to log(0) or, clamped at 0.999, has no gradient; the exact form has both
    assert torch.isfinite(exact).all() and exact[2].item() == pytest.approx(math.log(1 + math.e) - 40, abs=1e-9)
    (grad,) = torch.autograd.grad(-exact[2], logits)
    assert grad[2, 0] > 0.99  # d(-log(1 - s))/d logit_k = s: the full push, not zero


def test_sau_after_r_rounds_of_a_longer_run_is_the_run_with_r_rounds(badnets_run, defender):
    # what lets benchmarks/sau_quality.py choose the number of rounds on validation data from one run
    snapshots = {}
    purify(badnets_run.result.model, defender, "sau", seed=0, rounds=3, batch_size=40,
           monitor=lambda r, m: snapshots.__setitem__(r, {k: v.clone() for k, v in m.state_dict().items()}))
    two = purify(badnets_run.result.model, defender, "sau", seed=0, rounds=2, batch_size=40)
    assert all(torch.equal(snapshots[2][k], v) for k, v in two.state_dict().items())
    assert not all(torch.equal(snapshots[3][k], v) for k, v in two.state_dict().items())


def test_shared_adversarial_rate_is_a_rate_and_drops_after_sau(badnets_run, defender):
    model = badnets_run.result.model
    p = SAUParams(batch_size=40)
    ref = frozen_copy(model)
    before = shared_adversarial_rate(model, ref, defender.x_val, defender.y_val, p)
    after = shared_adversarial_rate(purify(model, defender, "sau", seed=0, **FAST_SAU), ref, defender.x_val, defender.y_val, p)
    assert 0 <= after < before <= 1
    assert before == shared_adversarial_rate(model, ref, defender.x_val, defender.y_val, p)
    # per image: the shared mask the rate counts, and the class both models give the shared examples
    shared, classes = shared_adversarial_predictions(model, ref, defender.x_val, defender.y_val, p)
    assert shared.shape == classes.shape == defender.y_val.shape and shared.dtype == torch.bool
    assert int(shared.sum()) / len(shared) == before
    clean = predict(model, defender.x_val, p.batch_size)  # the batches and precision the search used
    assert not (classes[shared] == clean[shared]).any()  # a shared example leaves the clean prediction


def test_ep_without_poisoned_samples_fails_clearly(badnets_run, defender):
    with pytest.raises(AntidoorError, match=r"oracle.*poisoned"):
        purify(badnets_run.result.model, defender, "ep")


def test_ep_gets_poisoned_samples_with_true_labels(badnets_run):
    scenario = badnets_run.result.scenario
    data = scenario.defender_data(oracle=True)
    idx = scenario.splits.poison
    assert len(data.poisoned_x) == len(idx)
    assert torch.equal(data.poisoned_y, scenario.data.y_train[idx])
    assert not torch.equal(data.poisoned_x, scenario.data.x_train[idx])  # the trigger is on them


@pytest.mark.parametrize(("params", "key"), [
    ({"bound": -0.1}, "defense.bound"),
    ({"rounds": 0}, "defense.rounds"),
    ({"pgd_steps": 0}, "defense.pgd_steps"),
    ({"lr": 0}, "defense.lr"),
    ({"init": "sideways"}, "defense.init"),
    ({"bogus": 1}, "defense.bogus: unknown"),
])
def test_sau_bad_parameters_name_the_parameter(params, key):
    with pytest.raises(AntidoorError, match=key):
        validate_defense_spec({"name": "sau", **params})


def _bounded_fields() -> list[tuple[str, str, float]]:
    """(defense, parameter, a value just outside one of its bounds) for every bound of every numeric parameter."""
    cases = []
    for name in DEFENSES.names():
        for field, info in DEFENSES.get(name).Params.model_fields.items():
            for m in info.metadata:
                for bound, outside in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
                    if getattr(m, bound, None) is not None:
                        cases.append((name, field, getattr(m, bound) + outside))
    return cases


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_names_an_unknown_parameter(name):
    with pytest.raises(AntidoorError, match=rf"defense.bogus: unknown key .*\(defense '{name}' takes: "):
        validate_defense_spec({"name": name, "bogus": 1})


@pytest.mark.parametrize(("name", "field", "value"), _bounded_fields())
def test_every_defense_names_a_bad_parameter_value(name, field, value):
    with pytest.raises(AntidoorError, match=rf"defense\.{field} = {value!r}: "):
        validate_defense_spec({"name": name, field: value})


def test_a_batch_larger_than_the_defender_set_is_one_batch_of_all_of_it(badnets_run, defender, capsys):
    """SAU's default batch (256) on a small defender set runs, as a DataLoader would: one batch of every image
    per round, the very run a batch of exactly that size gives, and the user is told."""
    n = len(defender.x)
    settings = {"rounds": 2, "lr": 1e-3, "min_batches": 1}
    big = purify(badnets_run.result.model, defender, "sau", batch_size=999, **settings)
    assert f"defense.batch_size 999 is more than the {n} images sau trains on" in capsys.readouterr().err
    exact = purify(badnets_run.result.model, defender, "sau", batch_size=n, **settings)
    assert "is more than the" not in capsys.readouterr().err
    assert _same_weights(big, exact) and not _same_weights(big, badnets_run.result.model)


def test_sau_cuts_a_small_defender_set_into_min_batches_batches_a_round(badnets_run, defender, capsys):
    """SAU's default batch (256) on a small set would be one Adam step a round; ``min_batches`` (8) shrinks the batch
    to n // 8, the very run that batch given by hand makes, says so and records it; 1 restores the batch as given."""
    n = len(defender.x)
    settings = {"rounds": 1, "lr": 1e-3}
    chosen: dict[str, float] = {}
    auto = purify(badnets_run.result.model, defender, "sau", chosen=chosen, **settings)
    err = " ".join(capsys.readouterr().err.split())
    assert f"sau: {n} training images at defense.batch_size 256 would make 1 batch per pass; batches of {n // 8} make 8 " \
           "(defense.min_batches 8; 1 keeps 256)" in err
    assert chosen == {"batch_size": n // 8}
    by_hand = purify(badnets_run.result.model, defender, "sau", batch_size=n // 8, min_batches=1, **settings)
    assert _same_weights(auto, by_hand)
    chosen.clear()
    whole = purify(badnets_run.result.model, defender, "sau", min_batches=1, chosen=chosen, **settings)
    assert chosen == {} and not _same_weights(whole, auto)
    # a batch already small enough is kept: 8 batches of n // 8 or fewer images need no cut
    purify(badnets_run.result.model, defender, "sau", batch_size=n // 8, chosen=chosen, **settings)
    assert chosen == {} and "would make" not in capsys.readouterr().err


def test_min_batches_stays_out_of_stage_keys_at_1_and_enters_them_otherwise():
    from antidoor.experiment.stages import defense_key_spec, defense_run_spec

    old = validate_defense_spec({"name": "sau", "min_batches": 1})
    assert "min_batches" not in defense_key_spec(old) and defense_run_spec(defense_key_spec(old))["min_batches"] == 1
    assert defense_key_spec(validate_defense_spec({"name": "sau-pam"}))["min_batches"] == 8


@pytest.mark.parametrize("name", ["ft", "ft-sam", "ft-pam"])
def test_a_diverging_fine_tune_stops_with_a_clear_error(badnets_run, defender, name):
    with pytest.raises(AntidoorError, match=r"epoch 1 of 2: the loss became (nan|inf).*learning rate \(now 1e\+30\)"):
        purify(badnets_run.result.model, defender, name, epochs=2, lr=1e30, schedule="constant", batch_size=40)


def test_unknown_defense_lists_the_available_ones(badnets_run, defender):
    with pytest.raises(AntidoorError, match="unknown defense 'nope'; available: anp, bti-dbf, ep, fp, fst, ft, ft-pam, ft-sam, "
                                            "i-bau, nad, pam, sau, sau-pam"):
        purify(badnets_run.result.model, defender, "nope")


def test_cli_purify_round_trip_and_bad_input(saved_run, run_cli, tmp_path):
    out = tmp_path / "ft"
    ok = run_cli("purify", saved_run, "--defense", "ft", "--set", "defense.epochs=1", "--set", "defense.batch_size=40",
                 "--out", out, "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    from antidoor.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.meta["defense"]["name"] == "ft" and ckpt.meta["defense"]["epochs"] == 1
    assert "der" in ckpt.meta["metrics"] and ckpt.attack is not None and ckpt.splits is not None
    # the defender's validation accuracy is reported beside the test metrics, on the defender's own images
    from antidoor.pipeline import Scenario

    written = json.loads((out / "metrics.json").read_text())
    defender_data = Scenario.from_checkpoint(ckpt, device="cpu").defender_data()
    assert written["after"]["val_clean_acc"] == pytest.approx(defender_data.val_accuracy(ckpt.model.cpu()), abs=1e-6)
    assert 0 < written["before"]["val_clean_acc"] <= 1

    for args, needle in [
        (["--defense", "nope"], "unknown defense 'nope'"),
        (["--defense", "sau", "--set", "defense.bound=-1"], "defense.bound"),
        (["--defense", "sau", "--set", "defense.rounds=0"], "defense.rounds"),
        (["--defense", "sau", "--set", "defense.lr=1e39"], "defense.lr = 1e+39 is not a usable number"),
    ]:
        bad = run_cli("purify", saved_run, *args, "--out", tmp_path / "bad", "--quiet")
        assert needle in bad.error_line(), args


def test_demo_runs_end_to_end_with_small_settings(run_cli, tmp_path):
    """The demo's whole pipeline (train BadNets and the clean reference, purify with FT, SAU and EP, RA, write results)
    on bundled data. The README's example test runs it without the clean reference (its default)."""
    import json

    res = run_cli("demo", "--set", "train.epochs=1", "--set", "model.width=8",
                  "--set", "defenses=[{name: ft, epochs: 1}, {name: sau, rounds: 1, batch_size: 100}, {name: ep, epochs: 1}]",
                  "--set", "ra.seeds=[0]", "--set", "ra.epochs=1", "--set", "clean_reference=true", "--out", tmp_path, "--quiet")
    assert res.returncode == 0, res.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in results["training"]] == ["clean", "badnets"]
    assert [r["model"] for r in results["purification"]] == ["badnets (no defense)", "ft", "sau", "ep"]
    # the superficial-safety table: asr before (o_asr) and after (p_asr) the retuning attack, the clean reference included
    ra = results["superficial_safety"]
    assert [r["model"] for r in ra] == ["ft", "sau", "ep", "clean"]
    by_model = {r["model"]: r for r in results["purification"]}
    assert all(r["o_asr"] == pytest.approx(by_model[r["model"]]["asr"]) for r in ra[:3])
    assert all(0 <= r["p_asr"] <= 1 and r["p_asr_std"] == 0 and r["seconds"] > 0 for r in ra)
    assert all(0 <= r["der"] <= 1 for r in results["purification"][1:])
    for name in ("clean", "badnets", "badnets-ft", "badnets-sau", "badnets-ep"):
        assert (tmp_path / f"{name}.safetensors").is_file() and (tmp_path / f"{name}.json").is_file()
    assert "Superficial safety" in (tmp_path / "results.md").read_text()
    assert "| clean_acc |" in (tmp_path / "results.md").read_text().replace("| model | clean_acc |", "| clean_acc |")


@pytest.mark.parametrize("name", MODELS.names())
def test_frozen_copy_folds_batchnorm_and_computes_the_same_function(name, bundled):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, width=8)
    model.train()
    x = bundled.x_train[:32].float().div(255)
    model(x)  # non-trivial BatchNorm running statistics
    model.eval()
    frozen = frozen_copy(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    n_bn_frozen = sum(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    if name != "preact_resnet18":  # every BN there follows a residual add, not a conv, except the inner ones
        assert n_bn_frozen == 0 < n_bn
    else:
        assert n_bn_frozen < n_bn
    assert not any(p.requires_grad for p in frozen.parameters())
    xg = x.clone().requires_grad_(True)
    out = frozen(xg)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


# ---- method-specific checks of the baseline defenses (small settings, the session's real model) ----

def test_fp_prunes_within_the_validation_budget_and_keeps_channels_pruned(badnets_run, defender):
    from antidoor.defenses.fp import prune_dormant_channels

    model = __import__("copy").deepcopy(badnets_run.result.model)
    base = defender.val_accuracy(model)
    mask = prune_dormant_channels(model, defender, prune_step=0.05, acc_ratio=0.2)
    assert 0 < int((mask == 0).sum()) < len(mask)
    assert defender.val_accuracy(model) >= 0.8 * base
    purified = purify(badnets_run.result.model, defender, "fp", seed=0, epochs=2, batch_size=40, prune_step=0.05, acc_ratio=0.2)
    dead = purified.backbone.head.weight[:, mask == 0]
    assert torch.count_nonzero(dead) == 0, "pruned channels came back during fine-tuning"


def test_anp_masks_stay_in_range_and_a_fixed_threshold_prunes_exactly_those(badnets_run, defender):
    from antidoor.defenses.anp import ANPParams, batchnorm_layers, learn_masks

    model = badnets_run.result.model
    p = ANPParams(iterations=20, batch_size=40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = learn_masks(model, defender, p, seed=0)
    assert set(mask) == set(batchnorm_layers(model))
    values = torch.cat(list(mask.values()))
    assert values.min() >= 0 and values.max() <= 1 and values.min() < 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "mask learning touched the model"
    t = float(values.quantile(0.1)) + 1e-6
    purified = purify(model, defender, "anp", seed=0, iterations=20, batch_size=40, threshold=t)
    zeroed = sum(int((bn.weight == 0).sum()) for bn in batchnorm_layers(purified).values())
    assert zeroed == int((values < t).sum()) > 0
    for (name, bn), (_, bn0) in zip(batchnorm_layers(purified).items(), batchnorm_layers(model).items(), strict=True):
        assert torch.equal(bn.running_mean, bn0.running_mean), f"{name}: statistics changed"


def test_anp_threshold_grid_must_hold_a_threshold():
    with pytest.raises(AntidoorError, match=r"defense\.prune_step 0\.5 is larger than defense\.prune_max 0\.3"):
        validate_defense_spec({"name": "anp", "prune_step": 0.5, "prune_max": 0.3})


@pytest.mark.parametrize(("arch", "expected"), [
    ("small_cnn", ["backbone.features.19", "backbone.features"]),
    ("preact_resnet18", ["backbone.layer3", "backbone.layer4"]),
    ("resnet18", ["backbone.layer3", "backbone.layer4"]),
    ("vgg16_bn", ["backbone.features.32", "backbone.features.42"]),
    ("whitened_cnn", ["backbone.features.1", "backbone.features"]),
])
def test_nad_attends_to_the_last_two_stages_of_every_architecture(arch, expected):
    from antidoor.defenses.nad import attention_layers
    from antidoor.models import MODELS, build_model

    model = build_model(arch, 10, width=4)
    names = attention_layers(model, torch.zeros(2, 3, 32, 32))  # shapes only
    assert names == expected
    known = {"small_cnn", "preact_resnet18", "resnet18", "vgg16_bn", "whitened_cnn"}
    assert set(MODELS.names()) == known, "add the new model here"


def test_nad_attention_loss_is_zero_for_equal_maps_and_scale_free():
    from antidoor.defenses.nad import attention_loss, attention_map

    a = torch.rand(3, 5, 4, 4)
    assert attention_loss(a, a.clone(), 2.0).item() == 0
    assert torch.allclose(attention_map(a, 2.0), attention_map(3 * a, 2.0), atol=1e-6)
    assert torch.allclose(attention_map(a, 2.0).norm(dim=1), torch.ones(3))
    assert attention_loss(a, torch.rand(3, 5, 4, 4), 2.0).item() > 0


def test_ibau_hypergradient_adds_the_implicit_term(badnets_run, defender):
    from antidoor.defenses.ibau import IBAUParams, implicit_hypergradient

    model = __import__("copy").deepcopy(badnets_run.result.model).eval()
    params = list(model.parameters())
    x, y = defender.x[:20].float().div(255), defender.y[:20]
    delta = torch.full((1, *x.shape[1:]), 0.3)
    g = torch.Generator().manual_seed(0)
    full = implicit_hypergradient(model, params, x, y, delta, IBAUParams(k=5, portion=0.1), g)
    g = torch.Generator().manual_seed(0)
    direct_only = implicit_hypergradient(model, params, x, y, delta, IBAUParams(k=1, inner_lr=1e-12, portion=0.1), g)
    assert all(a.shape == w.shape and torch.isfinite(a).all() for a, w in zip(full, params, strict=True))
    assert any(not torch.allclose(a, b) for a, b in zip(full, direct_only, strict=True))


def test_fst_reinitialises_the_head_and_keeps_its_norm(badnets_run, defender):
    model = badnets_run.result.model
    purified = purify(model, defender, "fst", seed=0, epochs=2, batch_size=40)
    w0, w = model.backbone.head.weight, purified.backbone.head.weight
    assert torch.allclose(w.norm(), w0.norm(), rtol=1e-4)
    assert (w * w0).sum() < (w0 * w0).sum() / 2, "the new head should be far from the backdoored one"


def test_ftsam_uses_sam_and_is_deterministic(badnets_run, defender):
    a = purify(badnets_run.result.model, defender, "ft-sam", seed=1, epochs=1, batch_size=40)
    b = purify(badnets_run.result.model, defender, "ft-sam", seed=1, epochs=1, batch_size=40)
    c = purify(badnets_run.result.model, defender, "ft-sam", seed=1, epochs=1, batch_size=40, rho=0.0)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
