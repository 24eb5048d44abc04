"""The stress suite on real bundled images: retuning attack, QRA, the backdoor-connected path,
the report files and the ``antidoor stress`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from antidoor.defenses import purify
from antidoor.errors import AntidoorError
from antidoor.models import build_model
from antidoor.stress import (
    PathResult,
    PerturbationGenerator,
    QRAConfig,
    RAConfig,
    StressConfig,
    backdoor_path,
    make_qra_data,
    perturb,
    qra,
    qra_data_for,
    ra_data_for,
    retuning_attack,
    run_stress,
    write_report,
)
from antidoor.stress.path import PathConfig
from antidoor.stress.verdict import VERDICTS
from conftest import invoke_main

SMALL = StressConfig(ra=RAConfig(seeds=[0], epochs=1), qra=QRAConfig(n_clean=64, n_poison=64, epochs=1, hidden=32),
                     path=PathConfig(points=3), ep_params={"epochs": 2, "batch_size": 50})


@pytest.fixture(scope="module")
def ft_model(badnets_run):
    """The session's BadNets model fine-tuned on the defender's clean images (2 epochs): a purified model."""
    scenario = badnets_run.result.scenario
    return purify(badnets_run.result.model, scenario.defender_data(), "ft", epochs=2, batch_size=50)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ra_set_mixes_defender_images_with_relabelled_poisoned_samples(badnets_run):
    scenario = badnets_run.result.scenario
    data = ra_data_for(scenario, RAConfig())
    defender = scenario.defender_data()
    n_defender = len(defender.x) + len(defender.x_val)
    assert len(data.x) == n_defender + 5 and data.n_poison == 5  # capped by the defender's data, 5 poisoned
    assert (data.y[-5:] == scenario.attack.target).all()
    # the poisoned ones carry the BadNets patch (bottom-right); the clean ones are the defender's own images
    stamped = scenario.attack.apply(data.x[-5:].float() / 255).mul(255).round().to(torch.uint8)
    assert torch.equal(stamped, data.x[-5:])
    assert torch.equal(data.x[:-5].sort(0).values, torch.cat([defender.x, defender.x_val]).sort(0).values)
    with pytest.raises(AntidoorError, match=r"ra.n_poison"):
        ra_data_for(scenario, RAConfig(n_poison=10_000, n_total=20_000))


def test_ra_keeps_clean_model_low_and_backdoored_model_high(badnets_run, clean_run):
    """The two references on real images: RA does not implant the backdoor into a clean model, and
    the backdoored model keeps it. Same set, same seeds for both."""
    scenario = badnets_run.result.scenario
    data = ra_data_for(scenario, RAConfig())
    clean_before = _state(clean_run.result.model)
    clean = retuning_attack(clean_run.result.model, data, scenario.evaluator, seeds=[0, 1])
    backdoored = retuning_attack(badnets_run.result.model, data, scenario.evaluator, seeds=[0, 1])
    assert _same(clean_before, clean_run.result.model.state_dict())  # RA works on copies
    cs, bs = clean.summary(), backdoored.summary()
    # measured: clean 11% -> 15%, backdoored 97% -> 72% (this fixture model is weak: 4 epochs, clean_acc 31%)
    assert cs["p_asr_mean"] < 0.35, cs
    assert bs["p_asr_mean"] > 0.55 and bs["p_asr_mean"] - cs["p_asr_mean"] > 0.35, bs
    assert len(cs["asr_curve_mean"]) == 6 and cs["asr_curve_mean"][0] == cs["o_asr"]  # before + 5 epochs
    assert [r.seed for r in clean.runs] == [0, 1] and clean.runs[0].asr_curve[-1] == clean.runs[0].p_asr
    # same seed, same numbers (CPU)
    again = retuning_attack(clean_run.result.model, data, scenario.evaluator, seeds=[0])
    assert again.runs[0].asr_curve == clean.runs[0].asr_curve


def test_evaluator_subset_is_a_fixed_stratified_draw_of_the_test_split(badnets_run):
    ev = badnets_run.result.scenario.evaluator
    assert ev.subset(None) is ev and ev.subset(len(ev.y)) is ev
    sub = ev.subset(200, seed=3)
    assert len(sub.y) == 200 and sub.attack is ev.attack
    counts, full = sub.y.bincount(minlength=10), ev.y.bincount(minlength=10)
    assert (counts - 200 * full / len(ev.y)).abs().max() < 1  # each class its share
    rows = {tuple(r) for r in ev.x.flatten(1).tolist()}
    assert all(tuple(r) in rows for r in sub.x.flatten(1).tolist())  # the split's own images
    assert torch.equal(ev.subset(200, seed=3).x, sub.x) and (sub.y_bd != ev.attack.target).all()


def test_ra_curves_on_a_subset_keep_the_whole_split_numbers(badnets_run):
    """curve_images and curves change what is measured per epoch, never o_asr, p_asr or the retuned model."""
    scenario = badnets_run.result.scenario
    data = ra_data_for(scenario, RAConfig())
    model = badnets_run.result.model
    full = retuning_attack(model, data, scenario.evaluator, seeds=[0], epochs=2, keep_models=True)
    part = retuning_attack(model, data, scenario.evaluator, seeds=[0], epochs=2, curve_images=300, keep_models=True)
    assert part.before == full.before and part.runs[0].p_asr == full.runs[0].p_asr
    assert part.runs[0].clean_acc == full.runs[0].clean_acc and part.runs[0].hits == full.runs[0].hits
    assert _same(_state(part.retuned[0]), _state(full.retuned[0]))
    sub = scenario.evaluator.subset(300)
    assert len(part.runs[0].asr_curve) == 3 and part.runs[0].asr_curve[0] == sub(model)["asr"]
    assert part.runs[0].asr_curve[-1] == sub(part.retuned[0])["asr"]
    # without curves: the same retuned model and p_asr, and only the point before RA in the curve
    bare = retuning_attack(model, data, scenario.evaluator, seeds=[0], epochs=2, curves=False, keep_models=True)
    assert bare.runs[0].p_asr == full.runs[0].p_asr and bare.runs[0].hits == full.runs[0].hits
    assert _same(_state(bare.retuned[0]), _state(full.retuned[0]))
    assert bare.runs[0].asr_curve == [full.before["asr"]] and len(full.runs[0].asr_curve) == 3


def test_ra_refuses_bad_parameters(badnets_run):
    scenario = badnets_run.result.scenario
    data = ra_data_for(scenario, RAConfig())
    with pytest.raises(AntidoorError, match=r"ra.epochs"):
        retuning_attack(badnets_run.result.model, data, scenario.evaluator, epochs=0)
    with pytest.raises(AntidoorError, match=r"ra.seeds"):
        retuning_attack(badnets_run.result.model, data, scenario.evaluator, seeds=[])


def test_path_endpoints_equal_the_two_models(badnets_run, ft_model):
    scenario = badnets_run.result.scenario
    ev = scenario.evaluator
    bd = badnets_run.result.model
    before = (_state(ft_model), _state(bd))
    defender = scenario.defender_data()
    path = backdoor_path(ft_model, bd, defender.x, ev, points=5, bn="interpolate")
    own_ft, own_bd = ev(ft_model), ev(bd)
    assert path.t == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (path.clean_acc[0], path.asr[0]) == (own_ft["clean_acc"], own_ft["asr"])
    assert (path.clean_acc[-1], path.asr[-1]) == (own_bd["clean_acc"], own_bd["asr"])
    assert path.endpoints == {"purified": own_ft, "backdoored": own_bd}
    assert _same(before[0], ft_model.state_dict()) and _same(before[1], bd.state_dict())
    # re-estimated BatchNorm statistics (default): same weights at the ends, so close to the models' own numbers
    re = backdoor_path(ft_model, bd, torch.cat([defender.x, defender.x_val]), ev, points=3)
    assert re.bn == "reestimate" and isinstance(re, PathResult)
    assert abs(re.asr[-1] - own_bd["asr"]) < 0.15 and abs(re.clean_acc[0] - own_ft["clean_acc"]) < 0.1
    assert re.backdoor_error == [1 - a for a in re.asr]
    # measured on a subset: the same points, the ends' own numbers on the whole split
    part = backdoor_path(ft_model, bd, defender.x, ev, points=3, bn="interpolate", test_images=300)
    sub = ev.subset(300)
    assert part.t == [0.0, 0.5, 1.0] and part.endpoints == path.endpoints
    assert (part.clean_acc[0], part.asr[-1]) == (sub(ft_model)["clean_acc"], sub(bd)["asr"])


def test_path_refuses_models_that_cannot_be_interpolated(badnets_run):
    ev = badnets_run.result.scenario.evaluator
    images = badnets_run.data.x_train[:64]
    bd = badnets_run.result.model
    narrow = build_model("small_cnn", 10, width=8)
    with pytest.raises(AntidoorError, match=r"cannot interpolate.*small_cnn.*width 8.*width 16"):
        backdoor_path(narrow, bd, images, ev)
    with pytest.raises(AntidoorError, match=r"cannot interpolate.*5 classes.*10 classes"):
        backdoor_path(build_model("small_cnn", 5, width=16), bd, images, ev)
    with pytest.raises(AntidoorError, match=r"cannot interpolate"):
        backdoor_path(build_model("preact_resnet18", 10, width=16), bd, images, ev)
    with pytest.raises(AntidoorError, match=r"path.bn"):
        backdoor_path(bd, bd, images, ev, bn="average")  # type: ignore[arg-type]


def test_qra_perturbation_stays_within_eps(badnets_run, clean_run, ft_model):
    scenario = badnets_run.result.scenario
    eps = 8 / 255
    x = badnets_run.data.x_test[:200].float() / 255
    torch.manual_seed(0)
    gen = PerturbationGenerator((3, 32, 32), hidden=16)
    with torch.no_grad():
        gen.net[-2].weight.mul_(100)  # saturate tanh: the clip must still hold
        xp = perturb(gen, x, eps)
    assert (xp - x).abs().max() <= eps + 1e-6 and xp.min() >= 0 and xp.max() <= 1
    assert (xp - x).abs().max() > eps * 0.9
    data = qra_data_for(scenario, QRAConfig(n_clean=64, n_poison=64))
    target = scenario.attack.target
    assert (data.y_true[data.poisoned] != target).all()  # target-class images excluded from the poisoned part
    res = qra(ft_model, data, scenario.evaluator, retuned=badnets_run.result.model, clean_surrogate=clean_run.result.model,
              eps=eps, epochs=2, hidden=32, keep_generator=True)
    assert 0 < res.max_abs_delta <= eps + 1e-6
    assert 0 <= res.qra_asr_purified <= 1 and res.qra_asr_clean is not None
    assert res.attacker_models["clean_surrogate"] == "given clean model" and "white-box" in res.attacker_models["access"]
    with torch.no_grad():
        out = perturb(res.generator, scenario.evaluator.x_bd[:100].float() / 255, eps)
    assert (out - scenario.evaluator.x_bd[:100].float() / 255).abs().max() <= eps + 1e-6
    # without a clean surrogate the CE term is dropped and no clean asr is measured
    res2 = qra(ft_model, data, scenario.evaluator, retuned=badnets_run.result.model, clean_surrogate=None, epochs=1, hidden=32)
    assert res2.qra_asr_clean is None and "dropped" in res2.attacker_models["clean_surrogate"]


def test_qra_uses_the_attacks_target(badnets_run):
    """Another target: the poisoned part holds no image of that class, and it is the one excluded."""
    from antidoor.attacks import create_attack

    d = badnets_run.data
    attack = create_attack({"name": "badnets", "target": 3}, d.image_shape, d.num_classes)
    data = make_qra_data(d.x_train, d.y_train, attack, exclude=torch.arange(100), n_clean=50, n_poison=300)
    assert (data.y_true[data.poisoned] != 3).all() and (data.y_true[data.poisoned] == 0).any()
    with pytest.raises(AntidoorError, match=r"qra.n_poison"):
        make_qra_data(d.x_train, d.y_train, attack, exclude=torch.arange(100), n_poison=100_000)


@pytest.fixture(scope="module")
def small_stress(badnets_run, clean_run, ft_model):
    scenario = badnets_run.result.scenario
    return run_stress({"ft": ft_model}, badnets_run.result.model, clean_run.result.model, scenario, SMALL)


def test_run_stress_covers_models_and_references(small_stress, tmp_path):
    res = small_stress
    assert list(res.models) == ["ft", "ep", "backdoored", "clean"]
    assert res.models["ft"].qra is not None and res.models["ft"].path is not None
    assert res.models["ep"].path is not None and res.models["clean"].path is None and res.models["clean"].qra is None
    written = write_report(res, tmp_path)
    assert [p.name for p in written] == ["stress.json", "stress.md", "ra_curve.png", "path.png"]
    doc = json.loads((tmp_path / "stress.json").read_text())
    assert [r["model"] for r in doc["table"]] == ["ft", "ep", "backdoored", "clean"]
    assert doc["models"]["ft"]["qra"]["attacker_models"]["retuned"] == "ft after RA (seed 0)"
    md = (tmp_path / "stress.md").read_text()
    assert "| ft | purified |" in md and "Backdoor-connected path" in md and "BatchNorm: reestimate" in md
    for png in ("ra_curve.png", "path.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_stress_measures_each_reference_once_before_ra(badnets_run, clean_run, ft_model, monkeypatch):
    """The backdoored and the clean reference are measured on the whole test split once before RA: that
    measurement feeds both the scenario checks and their RA's o_asr (it was taken twice)."""
    from antidoor.metrics import Evaluator

    scenario = badnets_run.result.scenario
    bd, clean = badnets_run.result.model, clean_run.result.model
    calls: list[int] = []
    real_measure = Evaluator.measure

    def counting(self, model):
        if self is scenario.evaluator:
            calls.append(id(model))
        return real_measure(self, model)

    monkeypatch.setattr(Evaluator, "measure", counting)
    cfg = StressConfig(ra=RAConfig(seeds=[0], epochs=1, curves=False), qra=None, path=None, ep=False)
    res = run_stress({"ft": ft_model}, bd, clean, scenario, cfg)
    assert calls.count(id(bd)) == 1 and calls.count(id(clean)) == 1 and calls.count(id(ft_model)) == 1
    expected = real_measure(scenario.evaluator, bd)[0]
    assert res.models["backdoored"].ra.o_asr == pytest.approx(expected["asr"])


def _complete(path: Path) -> bool:
    data = path.read_bytes()
    if path.suffix == ".json":
        json.loads(data)
        return True
    if path.suffix == ".png":
        return data.startswith(b"\x89PNG") and data.rstrip().endswith(b"IEND\xaeB`\x82")
    return data.endswith(b"\n")


def test_report_files_are_written_atomically(small_stress, tmp_path, monkeypatch):
    """Interrupt the report after each file in turn: every file on disk is a whole old or new file,
    never half of one, and no temporary file is left behind."""
    write_report(small_stress, tmp_path)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    small_stress.seconds += 1000  # a different report
    real_replace = os.replace
    for k in range(4):
        calls = []

        def interrupted(src, dst, calls=calls, k=k):
            if len(calls) == k:
                raise KeyboardInterrupt
            calls.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_report(small_stress, tmp_path)
        monkeypatch.setattr(os, "replace", real_replace)
        files = sorted(tmp_path.iterdir())
        assert [p.name for p in files] == sorted(old), files  # no .tmp residue
        for p in files:
            assert _complete(p), p
        assert (tmp_path / "stress.json").read_bytes() != old["stress.json"] or k == 0
    small_stress.seconds -= 1000


@pytest.fixture(scope="module")
def stress_ckpts(badnets_run, clean_run, ft_model, saved_run, tmp_path_factory):
    from antidoor.checkpoint import load_checkpoint, save_checkpoint
    from antidoor.pipeline import run_meta

    d = tmp_path_factory.mktemp("stress")
    bd = load_checkpoint(saved_run)
    ft = save_checkpoint(d / "ft.safetensors", ft_model, {**bd.meta, "defense": {"name": "ft"}}, bd.attack, bd.splits)
    c = clean_run.result
    clean = save_checkpoint(d / "clean.safetensors", c.model, run_meta(clean_run.cfg, c), c.scenario.attack, c.scenario.splits)
    other = save_checkpoint(d / "narrow.safetensors", build_model("small_cnn", 10, width=8), {}, bd.attack)
    return {"ft": ft, "clean": clean, "narrow": other, "dir": d}


def test_cli_stress_writes_report(run_cli, saved_run, stress_ckpts, tmp_path):
    res = run_cli("stress", stress_ckpts["ft"], "--backdoored", saved_run, "--clean-ref", stress_ckpts["clean"],
                  "--set", "ra.seeds=[0]", "--set", "ra.epochs=1", "--set", "qra.epochs=1", "--set", "qra.n_clean=64",
                  "--set", "qra.n_poison=64", "--set", "qra.hidden=32", "--set", "path.points=3", "--set", "ep=false",
                  "--device", "cpu", "--out", tmp_path, "--quiet")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["path.png", "ra_curve.png", "stress.json", "stress.md"]
    doc = json.loads((tmp_path / "stress.json").read_text())
    assert [r["model"] for r in doc["table"]] == ["ft", "backdoored", "clean"]
    assert doc["config"]["path"]["points"] == 3 and doc["seconds"] > 0
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["table"][0]["model"] == "ft" and last["verdicts"]["ft"] in VERDICTS
    said = "\n" + res.stderr
    assert said.index(f"\nft: {last['verdicts']['ft']}") < said.index("┏")  # its own line, after any warnings, before the tables
    assert (tmp_path / "stress.md").read_text().splitlines()[2] == "## Verdict"


@pytest.mark.parametrize("case", ["missing", "architecture", "param", "no_backdoored", "bn"])
def test_cli_stress_bad_input_is_one_line(run_cli, saved_run, stress_ckpts, tmp_path, case):
    args = {
        "missing": [tmp_path / "nope.safetensors", "--backdoored", saved_run],
        "architecture": [stress_ckpts["narrow"], "--backdoored", saved_run],
        "param": [stress_ckpts["ft"], "--backdoored", saved_run, "--set", "path.points=1"],
        "no_backdoored": [stress_ckpts["ft"]],
        "bn": [stress_ckpts["ft"], "--backdoored", saved_run, "--set", "path.bn=mean"],
    }[case]
    run = run_cli if case == "missing" else invoke_main  # the first through a real subprocess, the rest in-process
    line = run("stress", *args, "--device", "cpu", "--out", tmp_path / "out").error_line()
    expected = {"missing": "does not exist", "architecture": "cannot interpolate", "param": "path.points",
                "no_backdoored": "--backdoored", "bn": "path.bn"}[case]
    assert expected in line
    assert not (tmp_path / "out").exists()
