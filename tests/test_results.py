"""Study results: each stage's latest attempt only, rates (der included) in percent, results.load as a DataFrame."""

from __future__ import annotations

import pytest

from antidoor.experiment import STORE_NAME, Store
from antidoor.experiment.store import Metric
from antidoor.report import build_report, result_rows
from antidoor.report.tables import fmt_value

LABELS = {"dataset": "cifar10-mini", "model": "small_cnn", "attack": "badnets", "defense": "ft", "seed": 0}


@pytest.fixture()
def resumed_store(tmp_path):
    """A purification that failed, then succeeded when the study was resumed with a smaller batch (another key)."""
    path = tmp_path / STORE_NAME
    with Store(path) as store:
        first = store.start("key-batch-256", "purify", {"batch_size": 256}, LABELS)
        store.fail(first, "RuntimeError: batch larger than the defender's data")
        second = store.start("key-batch-32", "purify", {"batch_size": 32}, LABELS)
        store.finish(second, [Metric("purify", "clean_acc", 0.62), Metric("purify", "asr", 0.05), Metric("purify", "der", 0.93)])
    return path


def test_resumed_study_shows_each_stages_latest_attempt(resumed_store):
    with Store(resumed_store) as store:
        rows = result_rows(store)
        report = build_report(store)
    assert [(r["defense"], r["status"], r["clean_acc"]) for r in rows] == [("ft", "done", 0.62)]
    assert report.summary[0] == "1 stage runs: 1 done, 0 failed, 0 running"
    assert not any("did not finish" in n for n in report.notes)


def test_a_purification_rerun_under_new_settings_does_not_borrow_the_old_ones_stress(tmp_path):
    """A resumed study reran PAM under new defaults and stopped before stressing it: its row must not show the p_asr
    of the model it replaced."""
    from antidoor.experiment.stages import config_key

    attack = {"stage": "attack", "attack": {"name": "badnets"}}
    old, new = ({"stage": "purify", "defense": {"name": "pam", "epochs": e}, "upstream": attack} for e in (30, 10))

    def stress_of(purify: dict) -> dict:
        return {"stage": "stress", "role": "purified", "stress": {}, "upstream": purify}

    with Store(tmp_path / STORE_NAME) as store:
        def record(config: dict, stage: str, labels: dict, metrics: list[Metric]) -> None:
            store.finish(store.start(config_key(config), stage, config, labels), metrics)

        record(attack, "attack", {**LABELS, "defense": None}, [Metric("attack", "asr", 0.97)])
        pam = {**LABELS, "defense": "pam"}
        record(old, "purify", pam, [Metric("purify", "asr", 0.40)])
        record(stress_of(old), "stress", pam, [Metric("stress", "p_asr", 0.41)])
        record(new, "purify", pam, [Metric("purify", "asr", 0.02)])
        row = next(r for r in result_rows(store) if r["defense"] == "pam")
        assert row["asr"] == 0.02 and "p_asr" not in row
        record(stress_of(new), "stress", pam, [Metric("stress", "p_asr", 0.03)])
        row = next(r for r in result_rows(store) if r["defense"] == "pam")
        assert (row["asr"], row["p_asr"]) == (0.02, 0.03)


def test_report_names_the_seeds_the_store_holds_not_only_the_last_runs_plan(tmp_path):
    """A study resumed for one seed (``--set seeds=[2]``) records that subset as its config; the report still says
    which seeds its tables hold."""
    with Store(tmp_path / STORE_NAME) as store:
        for seed in (0, 2):
            run = store.start(f"key-{seed}", "purify", {}, {**LABELS, "seed": seed})
            store.finish(run, [Metric("purify", "clean_acc", 0.8)])
        store.set_meta("study", {"name": "s", "seeds": [2], "device": "cpu"})
        assert build_report(store).summary[1] == "seeds: 0, 2 (the last grid run planned 2); device: cpu"
        store.set_meta("study", {"name": "s", "seeds": [2, 0], "device": "cpu"})
        assert build_report(store).summary[1] == "seeds: 0, 2; device: cpu"


def test_rates_and_der_in_percent():
    assert fmt_value(0.93, "der") == "93.0%" and fmt_value(0.5, "asr") == "50.0%" and fmt_value(12.3, "seconds") == "12.3"
    # a defense's chosen setting is a number, not a rate; its accuracies stay rates
    assert fmt_value(0.3, "chosen.rho") == "0.3" and fmt_value(5.0, "chosen.rho_candidates_tried") == "5"
    assert fmt_value(0.912, "chosen.rho_val_clean_acc") == "91.2%"
    # a cost is a difference of rates, in points, whatever its sign
    assert fmt_value(0.03, "clean_acc_drop") == "3.0%" and fmt_value(-0.004, "clean_acc_drop") == "-0.4%"


def test_results_load_a_study(resumed_store):
    pytest.importorskip("pandas")
    from antidoor.results import load

    df = load(resumed_store.parent)
    assert list(df["defense"]) == ["ft"] and df.loc[0, "der"] == pytest.approx(0.93)


def test_results_load_refuses_other_paths(tmp_path):
    from antidoor.errors import AntidoorError
    from antidoor.results import load

    pytest.importorskip("pandas")
    with pytest.raises(AntidoorError, match="neither a study"):
        load(tmp_path)
