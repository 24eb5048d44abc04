"""Defenses: the registry contract, purify on real images, and the answers to bad parameters."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import torch

from antidoor.defenses import DEFENSES, DefenderData, Defense, purify
from antidoor.defenses.base import validate_defense_spec
from antidoor.defenses.sau import SAUParams, js_divergence, shared_adversarial_examples
from antidoor.errors import AntidoorError

# SAU's official lr 1e-4 needs about a thousand steps; the session model's defender set has 80
# images, so the tests use lr 1e-3 (measured: 5 rounds of batch 40 take asr 0.97 -> 0.08).
FAST_SAU = {"rounds": 5, "batch_size": 40, "lr": 1e-3}


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
    params = FAST_SAU if name == "sau" else {"epochs": 1, "batch_size": 40}
    purified = purify(model, data, name, seed=0, **params)
    assert purified is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "purify changed its input model"
    assert not _same_weights(purified, model)
    assert not purified.training


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


def test_sau_perturbation_stays_within_bound(badnets_run, defender):
    model = badnets_run.result.model.eval()
    ref = __import__("copy").deepcopy(model).requires_grad_(False)
    x = defender.x[:16].float().div(255)
    p = SAUParams(bound=0.05, step_size=0.03, init="random")
    delta, y0_ref = shared_adversarial_examples(model, ref, x, defender.y[:16], p, torch.Generator().manual_seed(0))
    assert delta.abs().max() <= 0.05 + 1e-6
    assert torch.equal(y0_ref, ref(x).argmax(1))
    assert all(p.grad is None for p in ref.parameters())


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


def test_batch_larger_than_the_defender_data_is_refused(badnets_run, defender):
    with pytest.raises(AntidoorError, match=rf"batch_size 999 .* {len(defender.x)} clean"):
        purify(badnets_run.result.model, defender, "sau", batch_size=999)


def test_unknown_defense_lists_the_available_ones(badnets_run, defender):
    with pytest.raises(AntidoorError, match="unknown defense 'nope'; available: ep, ft, sau"):
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

    for args, needle in [
        (["--defense", "nope"], "unknown defense 'nope'"),
        (["--defense", "sau", "--set", "defense.bound=-1"], "defense.bound"),
        (["--defense", "sau", "--set", "defense.rounds=0"], "defense.rounds"),
        (["--defense", "sau", "--set", "defense.batch_size=100000"], "batch_size 100000"),
    ]:
        bad = run_cli("purify", saved_run, *args, "--out", tmp_path / "bad", "--quiet")
        assert needle in bad.error_line(), args


def test_demo_runs_end_to_end_with_small_settings(run_cli, tmp_path):
    """The demo's whole pipeline (train clean + BadNets, purify with FT and SAU, write results) on bundled data."""
    import json

    res = run_cli("demo", "--set", "train.epochs=1", "--set", "model.width=8",
                  "--set", "defenses=[{name: ft, epochs: 1}, {name: sau, rounds: 1, batch_size: 100}, {name: ep, epochs: 1}]",
                  "--set", "ra.seeds=[0]", "--set", "ra.epochs=1", "--out", tmp_path, "--quiet")
    assert res.returncode == 0, res.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in results["training"]] == ["clean", "badnets"]
    assert [r["model"] for r in results["purification"]] == ["badnets (no defense)", "ft", "sau", "ep"]
    # the superficial-safety table: asr before (o_asr) and after (p_asr) the retuning attack, references included
    ra = results["superficial_safety"]
    assert [r["model"] for r in ra] == ["ft", "sau", "ep", "clean", "badnets"]
    by_model = {r["model"]: r for r in results["purification"]}
    assert all(r["o_asr"] == pytest.approx(by_model[r["model"]]["asr"]) for r in ra[:3])
    assert all(0 <= r["p_asr"] <= 1 and r["p_asr_std"] == 0 for r in ra)
    assert all(0 <= r["der"] <= 1 for r in results["purification"][1:])
    for name in ("clean", "badnets", "badnets-ft", "badnets-sau", "badnets-ep"):
        assert (tmp_path / f"{name}.safetensors").is_file() and (tmp_path / f"{name}.json").is_file()
    assert "Superficial safety" in (tmp_path / "results.md").read_text()
    assert "| clean_acc |" in (tmp_path / "results.md").read_text().replace("| model | clean_acc |", "| clean_acc |")
