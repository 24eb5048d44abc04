"""The verdict: its rule on hand-made per-image outcomes, and on real models through run_stress and the CLI."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from antidoor.stress import RAConfig, StressConfig, run_stress, write_report
from antidoor.stress.verdict import VerdictConfig, judge, pack_hits, unpack_hits


def _model(role: str, o_rate: float, p_rates: list[float], n: int = 400) -> dict:
    """Per-image outcomes with exactly the given rates (the first k images hit): not data, a rule's input."""
    def hits(rate: float) -> str:
        return pack_hits(np.arange(n) < round(rate * n))

    return {"role": role, "ra": {"before_hits": hits(o_rate), "runs": [{"hits": hits(p)} for p in p_rates]}}


def test_pack_round_trip():
    v = np.array([True, False, True] * 301)
    assert (unpack_hits(pack_hits(v)) == v).all()
    assert pack_hits(None) == ""


def test_rule_names_each_verdict():
    models = {"ft": _model("purified", 0.09, [0.62, 0.60, 0.63]),      # the FT: 9.3% -> 61.7%
              "deep": _model("purified", 0.05, [0.12, 0.10, 0.14]),
              "none": _model("purified", 0.90, [0.95, 0.96, 0.97]),
              "ep": _model("oracle reference (EP)", 0.04, [0.10, 0.12, 0.08]),
              "backdoored": _model("backdoored reference", 0.95, [0.97, 0.97, 0.97]),
              "clean": _model("clean reference", 0.03, [0.06, 0.05, 0.07])}
    v = judge(models)
    assert set(v) == {"ft", "deep", "none"}  # references are not judged
    assert (v["ft"].verdict, v["deep"].verdict, v["none"].verdict) == ("superficial", "deep", "not purified")
    assert all(x.confident for x in v.values())
    assert v["ft"].p_ref_from == "EP" and v["ft"].p_ref == pytest.approx(0.10)
    lo, hi = v["ft"].p_asr_ci
    assert lo < v["ft"].p_asr < hi and hi - lo < 0.15
    assert "ft: superficial." in v["ft"].sentence() and "95% bootstrap" in v["ft"].sentence()


def test_the_bootstrap_draw_is_made_once_per_split_and_changes_no_number():
    """A study's findings and report judge every seed on the same test split: the image weights are drawn once,
    and each verdict is the one a fresh generator gives (the cached draw hands on the generator's state too)."""
    from antidoor.stress import verdict

    models = {"sau": _model("purified", 0.05, [0.30, 0.26]), "ep": _model("oracle reference (EP)", 0.03, [0.06, 0.05]),
              "clean": _model("clean reference", 0.02, [0.03, 0.04])}
    verdict._image_weights_and_state.cache_clear()
    first = judge(models)["sau"].to_dict()
    again = judge(models)["sau"].to_dict()
    assert verdict._image_weights_and_state.cache_info().hits == 1
    verdict._image_weights_and_state.cache_clear()
    assert first == again == judge(models)["sau"].to_dict()
    # the cached weights are the draw of a fresh default_rng(seed), and the replicates go on from where it stopped
    w, rng = verdict._image_weights(0, 400, 2000)
    fresh = np.random.default_rng(0)
    assert np.array_equal(w, fresh.multinomial(400, np.full(400, 1 / 400), size=2000).astype(np.float32) / 400)
    assert rng.integers(1 << 30) == fresh.integers(1 << 30)
    assert not w.flags.writeable
    other = judge(models, VerdictConfig(seed=1))["sau"]
    assert other.p_asr == first["p_asr"] and other.p_asr_ci != first["p_asr_ci"]  # another seed, another draw


def test_ra_that_implants_the_trigger_in_the_clean_model_gives_inconclusive():
    """Blended in the regime study: RA takes the clean reference to 99.7%, so a purified model at p_asr 100%
    is neither shown superficial nor deep; a model whose backdoor was never removed is still not purified."""
    models = {"sau": _model("purified", 0.0, [1.0, 1.0, 1.0]),
              "ft": _model("purified", 1.0, [1.0, 1.0, 1.0]),
              "clean": _model("clean reference", 0.0, [0.997, 0.997, 0.997]),
              "ep": _model("oracle reference (EP)", 0.02, [0.86, 0.89, 0.91])}
    v = judge(models)
    assert (v["sau"].verdict, v["ft"].verdict) == ("inconclusive", "not purified")
    assert v["sau"].confident and v["sau"].p_ref_from == "clean reference"
    assert re.search(r"RA implants the trigger in the clean reference too \(p_asr 99\.\d%\)", v["sau"].sentence())
    assert v["sau"].details().startswith("RA implants")  # what the CLI and stress.md print after the verdict word
    # with a margin the references stay below (1 - margin), the same numbers are judged as before
    assert judge(models, VerdictConfig(margin=0.001))["sau"].verdict == "superficial"


def test_close_call_is_uncertain_and_margin_is_configurable():
    models = {"m": _model("purified", 0.05, [0.17, 0.12, 0.20], n=100), "clean": _model("clean reference", 0.03, [0.04], n=100)}
    v = judge(models)["m"]
    assert v.verdict == "superficial" and not v.confident  # 16.3 - 4 = 12.3 points over, on 100 images and 3 seeds
    assert judge(models, VerdictConfig(margin=0.2))["m"].verdict == "deep"


def test_no_per_image_outcomes_no_verdict():
    assert judge({"m": {"role": "purified", "ra": {"runs": [{"p_asr": 0.5}]}}}) == {}


QUICK = StressConfig(ra=RAConfig(seeds=[0, 1], epochs=1), qra=None, path=None, ep=False)


@pytest.fixture(scope="module")
def real_stress(badnets_run, clean_run):
    """The backdoored model passed as 'purified' (not purified) and the clean model passed as one (deep)."""
    sc = badnets_run.result.scenario
    bd, clean = badnets_run.result.model, clean_run.result.model
    return run_stress({"untouched": bd, "fresh": clean}, bd, clean, sc, QUICK)


def test_verdict_on_real_models_comes_first_in_stress_md(real_stress, tmp_path):
    res = real_stress
    v = res.verdicts()
    assert v["untouched"].verdict == "not purified" and v["untouched"].confident
    assert v["fresh"].verdict == "deep"
    write_report(res, tmp_path)
    md = (tmp_path / "stress.md").read_text().splitlines()
    assert md[2] == "## Verdict" and md[4].startswith("- **untouched: not purified**")
    doc = json.loads((tmp_path / "stress.json").read_text())
    assert next(iter(doc)) == "verdicts" and doc["verdicts"]["fresh"]["verdict"] == "deep"
    assert len(doc["models"]["fresh"]["ra"]["runs"][0]["hits"]) > 100


def test_results_load_gives_a_dataframe_with_the_verdict(real_stress, tmp_path):
    pytest.importorskip("pandas")
    from antidoor.results import load

    write_report(real_stress, tmp_path)
    df = load(tmp_path).set_index("model")
    assert list(df.index) == ["untouched", "fresh", "backdoored", "clean"]
    assert df.loc["untouched", "verdict"] == "not purified" and df.loc["fresh", "verdict"] == "deep"
    assert df.loc["fresh", "p_asr_ci_low"] <= df.loc["fresh", "p_asr_mean"] <= df.loc["fresh", "p_asr_ci_high"]


def test_unknown_trigger_stress_under_an_inverted_one(badnets_run, clean_run):
    """Tiny-scale code path of issue 18's item 5: the trigger recovered from the backdoored model (BTI-DBF
    inversion) is the one RA stamps and asr is measured under; the verdict comes out of it the same way.

    Which class the inversion finds is not asserted: on this 4-epoch model a 2-epoch inversion of the
    bf16-trained fixture finds class 5 on one CPU and class 8 on another, a universal perturbation that moves
    the clean model too (BTI-DBF picks the wrong class on weak models; the inverted-trigger benchmark is where
    that is measured)."""
    from antidoor.stress.guards import GuardConfig
    from antidoor.stress.inverted import InversionConfig

    sc = badnets_run.result.scenario
    bd, clean = badnets_run.result.model, clean_run.result.model
    cfg = QUICK.model_copy(update={"inversion": InversionConfig(generator_width=4, pretrain_epochs=1, mask_epochs=1,
                                                                generator_epochs=2, batch_size=50),
                                   "guards": GuardConfig(enforce=False)})  # a 2-epoch inversion may not reach 50% asr
    res = run_stress({"fresh": clean}, bd, clean, sc, cfg)
    assert res.data["attack"]["name"] == "inverted" and sc.attack.name == "badnets"  # the caller's scenario is untouched
    target = res.data["attack"]["target"]
    assert 0 <= target < 10 and res.models["backdoored"].ra.o_asr > 0.5  # asr is measured under the recovered trigger
    # "fresh" is the clean model itself, so its gaps are nil: deep, unless the trigger the inversion found moves
    # the clean model so far (a universal perturbation; found on some CPUs' bf16 numerics) that no verdict is possible
    v = res.verdicts()["fresh"]
    assert v.verdict == ("inconclusive" if v.p_ref > 1 - v.margin else "deep"), v.sentence()
    assert "ep" not in res.models


def test_the_recovered_trigger_does_not_depend_on_the_global_random_state(badnets_run):
    """The same inversion seed gives the same trigger whatever ran before it (it used to draw the generator's
    initial weights from the process's global RNG, so two identical stress commands recovered different triggers)."""
    from antidoor.stress.inverted import InversionConfig, inverted_attack

    sc, bd = badnets_run.result.scenario, badnets_run.result.model
    cfg = InversionConfig(generator_width=4, pretrain_epochs=1, mask_epochs=1, generator_epochs=1, batch_size=50)
    triggers = []
    for state in (1, 2):
        torch.manual_seed(state)
        triggers.append(inverted_attack(bd, sc, cfg))
    assert triggers[0].params.target == triggers[1].params.target
    assert all(torch.equal(v, triggers[1].tensors[k]) for k, v in triggers[0].tensors.items())


def test_a_recovered_trigger_uses_outside_images_when_the_recorded_ones_are_its_target_class(badnets_run):
    """A clean-label attack (SIG) records only target-class images; a recovered trigger relabels to its target,
    so none of them can serve RA: it stamps training images outside the defender's data instead."""
    from antidoor.stress.inverted import InvertedParams, InvertedTrigger
    from antidoor.stress.suite import ra_data_for

    sc = copy.copy(badnets_run.result.scenario)
    d = sc.data
    params = InvertedParams(target=0, pratio=0.0, generator_width=2)
    sc.attack, sc._evaluator = InvertedTrigger(params, d.image_shape, d.num_classes, 0), None
    sc.splits = copy.copy(sc.splits)
    sc.splits.poison = (d.y_train == 0).nonzero().flatten()[:40].cpu()  # what SIG records: target-class images
    ra = ra_data_for(sc, RAConfig())
    assert "outside the defender's data" in ra.describe()["poisoned_from"]
    sc.splits.poison = (d.y_train != 0).nonzero().flatten()[:40].cpu()  # a dirty-label attack's: usable as they are
    assert "originals of other classes" in ra_data_for(sc, RAConfig()).describe()["poisoned_from"]
