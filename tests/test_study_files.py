"""The study files shipped in benchmarks/ are valid as they stand (every key reaches a config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from antidoor.experiment.study import load_study

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


STUDIES = sorted(p.name for p in BENCHMARKS.glob("*.yaml") if "\nname:" in p.read_text())  # pam_rho.yaml is a script's config


@pytest.mark.parametrize("name", STUDIES)
def test_study_file_is_valid(name: str) -> None:
    study = load_study(BENCHMARKS / name)
    assert study.seeds and study.models


def test_backdoorbench_scale_is_the_papers_setting() -> None:
    study = load_study(BENCHMARKS / "backdoorbench_scale.yaml")
    assert [(m.name, m.width) for m in study.models] == [("preact_resnet18", 64)]
    assert (study.train.epochs, study.train.lr, study.train.schedule) == (100, 0.01, "cosine")
    assert [d.name for d in study.datasets] == ["cifar10"] and study.datasets[0].clean_count == 2500
    assert {d["name"] for d in study.defenses} == {"ft", "fst", "bti-dbf", "sau", "pam", "ep"}
    assert study.stress is not None and study.stress.qra is not None


def test_device_slice_runs_the_backdoorbench_study_at_tiny_scale(tmp_path: Path) -> None:
    """benchmarks/device_slice.sh runs backdoorbench_scale.yaml through the grid; SLICE=tiny shrinks only sizes."""
    import os
    import subprocess
    import sys
    import tarfile

    env = {**os.environ, "SLICE": "tiny", "OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(BENCHMARKS / "device_slice.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = (tmp_path / "out" / "results.md").read_text()
    for defense in ("| ft |", "| sau |", "| ep |", "| clean |", "| none |"):
        assert defense in results
    assert "failed" not in results
    with tarfile.open(tmp_path / "out" / "study.tar.gz") as tar:
        names = tar.getnames()
    assert "study.sqlite" in names and sum(n.startswith("artifacts/stress/") for n in names) == 5


def test_snapshot_tool_copies_the_store_and_only_vouched_stress_results(tmp_path: Path) -> None:
    """tools/snapshot_study.py: the store copied whole but for a first run in flight, a rerun in flight read as its
    earlier record; stress JSONs of done and superseded stages copied or kept, a stale stage's JSON removed,
    checkpoints never copied."""
    import subprocess
    import sys

    from antidoor.experiment.stages import artifact_path
    from antidoor.experiment.store import Metric, Store
    from antidoor.report.tables import result_rows

    src, dst = tmp_path / "runs", tmp_path / "committed"
    (src / "artifacts" / "stress").mkdir(parents=True)
    (src / "artifacts" / "attack").mkdir()
    (dst / "artifacts" / "stress").mkdir(parents=True)
    labels = {"dataset": "d", "model": "m", "attack": "badnets", "seed": 0}
    with Store(src / "study.sqlite") as store:
        for key, defense in [("done1", "sau"), ("stale1", "ft"), ("super1", "pam"), ("gone1", "ep")]:
            run_id = store.start(key, "stress", {"k": key}, {**labels, "defense": defense})
            store.finish(run_id, [])
        store.invalidate(["stale1"], "stale: built on an older checkpoint")
        store.invalidate(["super1"], "superseded by a rerun")
        run_id = store.start("attack1", "attack", {}, labels)
        store.finish(run_id, [])
        store.start("flight1", "purify", {"k": "flight1"}, {**labels, "defense": "sau"})  # the grid's stage in flight
        for key, defense in [("again1", "fst"), ("again2", "bti-dbf")]:
            run_id = store.start(key, "purify", {"k": key}, {**labels, "defense": defense})
            store.finish(run_id, [Metric("purify", "asr", 0.5)], seconds=12.5)
    first = subprocess.run([sys.executable, "tools/snapshot_study.py", str(src), str(dst)], capture_output=True,
                           text=True, cwd=BENCHMARKS.parent)
    assert first.returncode == 0, first.stderr
    with Store(dst / "study.sqlite") as copy:  # again2 committed stale: no earlier done record to take its time from
        copy.invalidate(["again2"], "stale: built on an older checkpoint")
    with Store(src / "study.sqlite") as store:  # reruns in flight: one committed before, one not
        store.start("again1", "purify", {"k": "again1"}, {**labels, "defense": "fst"})
        store.start("again2", "purify", {"k": "again2"}, {**labels, "defense": "bti-dbf"})
    name = {k: Path(artifact_path("stress", k)).name for k in ("done1", "stale1", "super1", "gone1")}
    for k in ("done1", "stale1", "super1"):
        (src / "artifacts" / "stress" / name[k]).write_text(f'{{"run": "{k}"}}')
    (src / "artifacts" / "attack" / "model.safetensors").write_bytes(b"x")
    (dst / "artifacts" / "stress" / name["stale1"]).write_text("old")  # committed before the stage went stale
    (dst / "artifacts" / "stress" / name["gone1"]).write_text('{"run": "gone1"}')  # committed, this checkout lacks it
    res = subprocess.run([sys.executable, "tools/snapshot_study.py", str(src), str(dst)], capture_output=True, text=True,
                         cwd=BENCHMARKS.parent)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (dst / "artifacts" / "stress").iterdir()) == sorted(
        [name["done1"], name["super1"], name["gone1"]])
    assert (dst / "artifacts" / "stress" / name["done1"]).read_text() == '{"run": "done1"}'
    assert not (dst / "artifacts" / "attack").exists()
    with Store(dst / "study.sqlite", readonly=True) as copy:
        assert {r["key"]: r["status"] for r in copy.runs()} == {
            "done1": "done", "stale1": "failed", "super1": "failed", "gone1": "done", "attack1": "done",
            "again1": "done", "again2": "done"}
        # a rerun in flight reads as its earlier record: the committed row's time, else done with no time
        assert {r["key"]: r["seconds"] for r in copy.runs() if r["key"].startswith("again")} == {
            "again1": 12.5, "again2": None}
        assert {r["defense"]: (r["status"], r["asr"]) for r in result_rows(copy) if r["defense"] in ("fst", "bti-dbf")} == {
            "fst": ("done", 0.5), "bti-dbf": ("done", 0.5)}
    assert "left out (in flight, nothing recorded yet): purify badnets sau 0" in res.stdout
    assert "rerun in flight, its earlier record kept: purify badnets fst 0" in res.stdout
    bad = subprocess.run([sys.executable, "tools/snapshot_study.py", str(tmp_path / "nowhere"), str(dst)],
                         capture_output=True, text=True, cwd=BENCHMARKS.parent)
    assert bad.returncode == 2 and "study.sqlite does not exist" in bad.stderr


def test_snapshot_tool_refuses_a_working_store_behind_the_committed_one(tmp_path: Path) -> None:
    """Another machine committed rows after this working store was copied: a snapshot would drop them, so it is
    refused (exit 2, naming the stages) unless --force; once the working store holds them, it goes through."""
    import shutil
    import subprocess
    import sys

    from antidoor.experiment.store import Metric, Store

    src, dst = tmp_path / "runs", tmp_path / "committed"
    src.mkdir()
    labels = {"dataset": "d", "model": "m", "attack": "badnets", "seed": 0}
    with Store(src / "study.sqlite") as store:
        store.finish(store.start("ft1", "purify", {"k": "ft1"}, {**labels, "defense": "ft"}), [Metric("purify", "asr", 0.9)])

    def snap(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "tools/snapshot_study.py", str(src), str(dst), *extra],
                              capture_output=True, text=True, cwd=BENCHMARKS.parent)

    assert snap().returncode == 0
    with Store(dst / "study.sqlite") as committed:  # another machine's session: a new stage, and FT run again
        committed.finish(committed.start("sau1", "purify", {"k": "sau1"}, {**labels, "defense": "sau"}),
                         [Metric("purify", "asr", 0.03)])
        committed.finish(committed.start("ft1", "purify", {"k": "ft1"}, {**labels, "defense": "ft"}),
                         [Metric("purify", "asr", 0.8)])
    saved = (dst / "study.sqlite").read_bytes()
    res = snap()
    err = " ".join(res.stderr.split())
    assert res.returncode == 2 and "records 2 stage run(s)" in err and "the working store is behind" in err
    assert "purify badnets sau 0 (missing in the working store)" in err
    assert "purify badnets ft 0 (an older run in the working store)" in err
    assert (dst / "study.sqlite").read_bytes() == saved  # refused untouched
    shutil.copy(dst / "study.sqlite", src / "study.sqlite")  # brought up to date: goes through
    assert snap().returncode == 0
    with Store(dst / "study.sqlite", readonly=True) as committed:
        assert {r["key"] for r in committed.runs()} == {"ft1", "sau1"}
    with Store(src / "study.sqlite") as store:  # the working store behind again; --force overwrites anyway
        store.conn.execute("DELETE FROM runs WHERE key = 'sau1'")
        store.conn.commit()
    assert snap().returncode == 2 and snap("--force").returncode == 0
    with Store(dst / "study.sqlite", readonly=True) as committed:
        assert {r["key"] for r in committed.runs()} == {"ft1"}


def test_findings_of_the_committed_regime_study() -> None:
    """benchmarks/regime_findings.py reads the committed store: seed 0's figures, criteria and chosen settings."""
    import subprocess
    import sys

    from antidoor.experiment.store import Store
    from antidoor.report.tables import result_rows

    with Store(BENCHMARKS / "regime" / "study.sqlite", readonly=True) as store:
        rows = {(r["attack"], r["seed"], r["defense"]): r for r in result_rows(store)}
    sau, backdoored = rows[("badnets", 0, "sau")], rows[("badnets", 0, "none")]
    assert sau["clean_acc_drop"] == backdoored["clean_acc"] - sau["clean_acc"] and 0.016 < sau["clean_acc_drop"] < 0.017
    assert "clean_acc_drop" not in backdoored and "clean_acc_drop" not in rows[("badnets", 0, "clean")]
    res = subprocess.run([sys.executable, str(BENCHMARKS / "regime_findings.py"), str(BENCHMARKS / "regime")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "## badnets on " in text and "## blended on " in text
    assert "| (1) | sau | asr ≤ 5.0 and cost ≤ 3.0 | s0: asr 2.9, cost 1.7 ✓; s1: asr 3.7, cost 1.6 ✓" in text  # defaults
    # SAU at its defaults on BadNets seed 1: the papers' superficial safety, by RA and by QRA
    assert "s1: superficial, p_asr 22.1 vs EP 2.9 ✓" in text and "s1: 29.6 vs clean 0.6 ✓" in text
    # seed 3 (built on the AMD EPYC, 2026-12-07) completes BadNets' fourth seed: SAU at its defaults superficial again
    assert "s3: superficial, p_asr 18.0 vs EP 3.7 ✓" in text and "s3: 13.0 vs clean 0.9 ✓" in text
    assert "- sau: seeds 0, 1, 3: batch_size: 256, lr: 0.0001, rounds: 100; seed 2: batch_size: 128" in text
    # each group of seeds under one setting gets its own mean: SAU's defaults on BadNets apart from seed 2's cut
    assert "  - seeds 0, 1, 3 (n = 3): asr 3.5 ± 0.5, cost 1.8 ± 0.2, p_asr 16.6 ± 6.3" in text
    assert "  - seed 2 (n = 1): asr 3.9, cost 3.0, p_asr 7.7, qra_asr 8.7" in text
    assert "s0: inconclusive, p_asr 100.0 vs clean reference 99.7 ✗" in text  # Blended's SAU under the verdict rule
    assert "| (5) | ep | qra_asr purified − clean ≤ 10.0 | s0: 77.0 vs clean 0.5 ✗" in text
    assert "- pam `chosen.rho`: seed 0: 0.3" in text
    assert ("| (3) | pam | p_asr ≤ EP's + 5.0 and cost ≤ 3.0 | s0: p_asr 1.2 vs EP 2.8, cost 2.2 ✓; "
            "s1: p_asr 1.5 vs EP 2.9, cost 2.8 ✓") in text  # 3 starts
    # BadNets's PAM rows all at today's defaults (no "made under different settings" line); Blended-digit's seed 2
    # still holds PAM from before the inversion's fix, and the findings say so; every BTI-DBF row ran after it
    badnets = text.split("## blended on ")[0]
    assert "- pam: " not in badnets and "- pam `chosen.rho`: seed 0: 0.3; seed 1: 0.5; seed 2: 0.7; seed 3: 0.3" in badnets
    assert "## badnets on runs/data/cifar10-20k.npz (whitened_cnn-w64); seeds 0, 1, 2, 3\n" in badnets
    assert "Seeds not complete yet" not in badnets
    assert "- pam: seeds 0, 1: bound_units: normalised, generator_epochs: 30" in text and "- bti-dbf: seeds" not in text
    assert "- bti-dbf `chosen.detected_target`: seed 0: 5; seed 1: 0; seed 2: 0; seed 3: 8" in text
    assert "| sau | 0.0 | 0.0 | 0.0 |" in text  # Blended's SAU along the path, BatchNorm re-estimated
    # Blended-digit counts all 3 seeds once seed 1's SAU and PAM landed (2026-12-07): SAU leaves half the blend
    digit = text.split("## blended-digit on ")[1]
    # seed 3's Blended-digit block is begun (2026-12-07), and seed 4's (2026-12-08, float32 on an AVX2-only host), but
    # neither is whole: listed, not counted
    assert "seeds 0, 1, 2\n\nSeeds not complete yet (not counted): 3, 4.\n" in digit
    assert "| (1) | sau | asr ≤ 5.0 and cost ≤ 3.0 | s0: asr 50.2, cost 1.7 ✗; s1: asr 52.6, cost 1.4 ✗" in digit


def test_the_regime_store_resumes_exactly_the_stages_whose_settings_changed() -> None:
    """benchmarks/regime/study.sqlite holds every stage of regime_study.yaml but those whose settings changed after they
    ran: BTI-DBF's and PAM's (the inversion's pixel bounds read in normalised units, ``bound_units``, 2026-12-05; PAM's
    new defaults, one round of 10 epochs, and since 2026-12-06 three starts of the inversion) and SAU's (run at its
    defaults instead of the cut since 2026-12-06). Those and their stress are exactly the stages ``antidoor grid
    benchmarks/regime_study.yaml --resume`` has left to run on the committed store (where a checkpoint they need is
    gone, the grid retrains it first; benchmarks/regime.md), but those rerun on 2026-12-06: BTI-DBF's of BadNets seeds
    0-2 and Blended-digit seeds 0-2, PAM's of BadNets seeds 0-2 and Blended-digit seed 0, SAU's of BadNets seeds 0
    and 1 and Blended-digit seed 0; and Blended-digit seed 1's block, rebuilt whole on the AMD EPYC on 2026-12-07."""
    from collections import Counter

    from antidoor.experiment.stages import plan
    from antidoor.experiment.store import Store

    stages = plan(load_study(BENCHMARKS / "regime_study.yaml"))
    # read through the Store, read-only: a plain connection left open made the committed store gain -wal/-shm files
    with Store(BENCHMARKS / "regime" / "study.sqlite", readonly=True) as store:
        done = {run["key"] for run in store.runs() if run["status"] == "done"}
    left = Counter((s.kind, s.labels["defense"]) for s in stages if s.key not in done and s.labels["seed"] != 3)
    # blocks left per defense, each a purification and its stress: PAM Blended-digit seed 2; SAU BadNets seed 2 and
    # Blended-digit seed 2 (the Intel Xeon's blocks; Blended-digit seed 1's, rebuilt on the AMD EPYC, completed 2026-12-07)
    blocks = {"pam": 1, "sau": 2}
    assert left == {(kind, d): n for kind in ("purify", "stress") for d, n in blocks.items()}
    # seed 3, built on the AMD EPYC since 2026-12-07: BadNets' block complete; Blended-digit's has its backdoored model,
    # the references' RA, FT, EP and FST, and three defenses left
    seed_3 = {(s.kind, s.labels.get("attack"), s.labels.get("defense")) for s in stages
              if s.key not in done and s.labels["seed"] == 3}
    assert seed_3 == {(kind, "blended-digit", d) for kind in ("purify", "stress") for d in ("sau", "bti-dbf", "pam")}


def test_no_stored_rho_auto_search_reached_the_fallback_rho_halvings_changes() -> None:
    """``rho_halvings`` (PAM's ``rho: auto``) came after the study's PAM stages and is left out of stage keys at its
    default, 3 (``PAMSettings.KEY_NEUTRAL``): sound only while it would have acted on no stage stored before it, i.e.
    every search stored before it kept a candidate within its budget, where halving is never reached. (Stages run
    since are run with it and may have halved.)"""
    import json

    from antidoor.experiment.store import Store

    added = 1796596250  # 2026-12-06 22:30:50 UTC, the commit that added rho_halvings
    with Store(BENCHMARKS / "regime" / "study.sqlite", readonly=True) as store:
        searches = 0
        for run in store.runs("purify"):
            spec = json.loads(run["config"])["defense"]
            if run["status"] != "done" or spec.get("rho") != "auto" or run["started"] >= added:
                continue
            chosen = {m["name"]: m["value"] for m in store.metrics(run["id"]) if m["name"].startswith("chosen.rho")}
            assert "rho_halvings" not in spec
            assert chosen["chosen.rho"] in spec["rho_candidates"], run["id"]
            assert chosen["chosen.rho_val_clean_acc"] >= chosen["chosen.rho_reference_val_clean_acc"] \
                - spec["rho_tolerance"] - 1e-6, run["id"]
            searches += 1
    assert searches >= 12  # every PAM stage stored, superseded ones included


def test_differing_settings_groups_seeds_by_the_parameters_they_differ_on() -> None:
    from antidoor.report.tables import differing_settings

    same = {"name": "sau", "lr": 1e-4, "rounds": 100}
    assert differing_settings({0: same, 1: dict(same)}) is None and differing_settings({}) is None
    text = differing_settings({2: {**same, "lr": 5e-4}, 0: same, 1: {**same, "restarts": 3}})
    assert text == ("seed 0: lr: 0.0001, restarts: (not a parameter then); seed 1: lr: 0.0001, restarts: 3; "
                    "seed 2: lr: 0.0005, restarts: (not a parameter then)")


def test_a_mean_over_seeds_purified_under_different_settings_says_so(run_cli) -> None:
    """The committed regime store's SAU on BadNets ran at its defaults on seeds 0, 1 and 3 and at the study's former cut
    on seed 2 (a resumed study whose defaults changed): ``results --mean`` notes that on stderr, keeping csv parseable,
    and the report lists it; defenses whose seeds agree (PAM on BadNets) and per-seed rows get no note."""
    import csv
    import io

    from antidoor.experiment.store import Store
    from antidoor.report.document import build_report

    mixed = "seeds 0, 1, 3: batch_size: 256, lr: 0.0001, rounds: 100; seed 2: batch_size: 128, lr: 0.0005, rounds: 10"
    res = run_cli("results", BENCHMARKS / "regime", "--mean", "--attack", "badnets", "--format", "csv")
    assert res.returncode == 0, res.stderr
    assert f"note: the mean of sau on badnets (whitened_cnn-w64, runs/data/cifar10-20k.npz) mixes settings: {mixed}" in res.stderr
    assert "pam on badnets" not in res.stderr and "blended" not in res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert {r["defense"] for r in rows} >= {"sau", "pam"} and all(r["attack"] == "badnets" for r in rows)
    per_seed = run_cli("results", BENCHMARKS / "regime", "--attack", "badnets", "--format", "csv")
    assert per_seed.returncode == 0 and "note:" not in per_seed.stderr
    with Store(BENCHMARKS / "regime" / "study.sqlite", readonly=True) as store:
        notes = build_report(store).notes
    assert any(n.startswith("The mean over seeds of sau on badnets") and mixed in n for n in notes)
    assert not any("pam on badnets" in n for n in notes)


def test_mixed_settings_reads_a_defense_this_install_does_not_register(tmp_path) -> None:
    """A store may hold a plugin's defense that is not loaded here: the note compares its stored spec, no error."""
    import contextlib
    import json
    import shutil
    import sqlite3

    from antidoor.experiment.store import Store
    from antidoor.report.tables import mixed_settings

    db = tmp_path / "study.sqlite"
    shutil.copy(BENCHMARKS / "regime" / "study.sqlite", db)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        rows = con.execute("SELECT id, config FROM runs WHERE stage = 'purify' AND attack = 'badnets' AND defense = 'ft'")
        for run_id, config in rows.fetchall():
            cfg = json.loads(config)
            cfg["defense"]["name"] = "plugin-ft"
            con.execute("UPDATE runs SET config = ? WHERE id = ?", (json.dumps(cfg), run_id))
    with Store(db, readonly=True) as store:
        mixed = mixed_settings(store)
    assert not any(key[2] == "badnets" and key[3] == "ft" for key in mixed)  # its seeds agree: no note, no error
    assert "seeds 0, 1, 3: batch_size: 256" in mixed[("runs/data/cifar10-20k.npz", "whitened_cnn-w64", "badnets", "sau")]
