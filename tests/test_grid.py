"""Studies at scale: planning and keys, the SQLite store under concurrent writers, the grid on the
local and Ray backends (same seeds, same metrics), failures, SIGKILL and resume, results and report.

Every grid here trains real models on a real 1,000-image subset of the bundled CIFAR-10 (small_cnn
width 8, 2 epochs), so a whole study runs in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from antidoor.errors import AntidoorError
from antidoor.experiment import STORE_NAME, Store, load_study, plan, run_grid
from antidoor.experiment.store import Metric
from antidoor.report import build_report, curve_rows, filter_rows, render, result_rows, write_report
from antidoor.report.html import to_html
from antidoor.report.markdown import to_markdown
from antidoor.stress.verdict import VERDICTS

TINY = {
    "name": "tiny",
    "datasets": [{"name": "cifar10-mini", "n_train": 1000, "n_test": 500}],
    "models": [{"name": "small_cnn", "width": 8}],
    "attacks": [{"name": "badnets", "pratio": 0.1}],
    # the second FT diverges (lr 1e30: NaN loss in its second epoch): it fails at run time
    "defenses": [{"name": "ft", "epochs": 1, "batch_size": 32}, {"name": "ft", "epochs": 2, "lr": 1e30}],
    "seeds": [0],
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "device": "cpu",
}


def write_yaml(path: Path, study: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(study))
    return path


def scalars(folder: Path) -> dict[tuple[str, str, str], float]:
    """(stage key, metric stage, name) -> value for every scalar metric in a study's store."""
    with Store(folder / STORE_NAME) as store:
        keys = {r["id"]: r["key"] for r in store.runs()}
        return {(keys[m["run_id"]], m["stage"], m["name"]): m["value"] for m in store.metrics() if m["step"] is None}


@pytest.fixture(scope="module")
def inline_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study, run in this process (local backend, one worker)."""
    out = tmp_path_factory.mktemp("grid") / "inline"
    summary = run_grid(load_study(base=TINY), out)
    assert (summary.stages, summary.done, summary.failed) == (4, 3, 1)
    return out


# -- planning ----------------------------------------------------------------------------------------------

def test_a_field_added_at_its_default_leaves_stage_keys_alone() -> None:
    """RA's ``curves`` came after studies were stored: at its default it is not in the keys, so they resume."""
    from antidoor.experiment.stages import key_dump
    from antidoor.stress.settings import ModelStressConfig

    study = {**TINY, "stress": {"ra": {"seeds": [0]}}}
    keys = [s.key for s in plan(load_study(base=study))]
    assert keys == [s.key for s in plan(load_study(base={**study, "stress": {"ra": {"seeds": [0], "curves": True}}}))]
    stages = plan(load_study(base={**study, "stress": {"ra": {"seeds": [0], "curves": False}}}))
    # set away from its default, it keys the stress stages (2 references, 2 purified models) and nothing else
    assert sorted(s.kind for s, key in zip(stages, keys, strict=True) if s.key != key) == ["stress"] * 4
    dumped = key_dump(ModelStressConfig(ra={"curves": True}))
    assert "curves" not in dumped["ra"] and ModelStressConfig(**dumped) == ModelStressConfig()


def test_a_defense_parameter_added_later_stays_out_of_keys_at_the_value_that_reproduces_the_old_stages() -> None:
    """``restarts`` came after studies were stored, which ran one start: at 1 it is not keyed, whatever the default.
    BTI-DBF's default is 1, so its default stages keep their keys; PAM's is 3, a different inversion, so PAM at its
    defaults is keyed, and ``{name: pam, restarts: 1}`` gets the stored single-start stages' key and runs 1 start."""
    from antidoor.experiment.stages import defense_key_spec, defense_run_spec

    study = {**TINY, "defenses": [{"name": "bti-dbf", "rounds": 1}, {"name": "pam"}]}
    stages = plan(load_study(base=study))
    defaults = plan(load_study(base={**study, "defenses": [{"name": "bti-dbf", "rounds": 1, "restarts": 1},
                                                           {"name": "pam", "restarts": 3}]}))
    assert [s.key for s in stages] == [s.key for s in defaults]
    purify = {s.labels["defense"]: s.config["defense"] for s in stages if s.kind == "purify"}
    assert "restarts" not in purify["bti-dbf"] and "rounds" in purify["bti-dbf"] and purify["pam"]["restarts"] == 3
    changed = plan(load_study(base={**study, "defenses": [{"name": "bti-dbf", "rounds": 1, "restarts": 2},
                                                          {"name": "pam", "restarts": 1}]}))
    assert sorted(s.labels["defense"] for s, old in zip(changed, stages, strict=True)
                  if s.key != old.key and s.kind == "purify") == ["bti-dbf", "pam"]
    single = next(s.config["defense"] for s in changed if s.kind == "purify" and s.labels["defense"] == "pam")
    assert "restarts" not in single  # the key the single-start PAM stages were stored under
    # the job runs what the key stands for: one start, not today's default of 3; other parameters as keyed
    assert defense_run_spec(single)["restarts"] == 1 and defense_run_spec(purify["pam"])["restarts"] == 3
    full = {**single, "restarts": 1, "rho_halvings": 3}  # every parameter, the neutral ones put back
    assert defense_run_spec(defense_key_spec(full)) == full


def test_pam_rho_halvings_at_its_default_keeps_the_stored_keys() -> None:
    from antidoor.experiment.stages import defense_run_spec

    keys = {}
    for halvings in (None, 3, 0):
        pam = {"name": "pam"} if halvings is None else {"name": "pam", "rho_halvings": halvings}
        keys[halvings] = next((s.key, s.config.get("defense")) for s in plan(load_study(base={**TINY, "defenses": [pam]}))
                              if s.kind == "purify")
    assert keys[None] == keys[3] and "rho_halvings" not in keys[3][1] and defense_run_spec(keys[3][1])["rho_halvings"] == 3
    assert keys[0][0] != keys[3][0] and keys[0][1]["rho_halvings"] == 0


def test_a_grid_stage_runs_what_its_key_stands_for(tmp_path: Path) -> None:
    """``{name: pam, restarts: 1}`` is keyed without ``restarts``; the stage must still run one start, not PAM's
    default of 3: its checkpoint records what ran."""
    from antidoor.checkpoint import load_checkpoint

    tiny_pam = {"name": "pam", "restarts": 1, "rho": 0.0, "rounds": 1, "batch_size": 40, "generator_width": 4,
                "pretrain_epochs": 1, "mask_epochs": 1, "generator_epochs": 1, "epochs": 1}
    study = load_study(base={**TINY, "defenses": [tiny_pam]})
    summary = run_grid(study, tmp_path / "pam")
    assert (summary.stages, summary.failed) == (3, 0)
    stage = next(s for s in plan(study) if s.kind == "purify")
    assert "restarts" not in stage.config["defense"]
    record = load_checkpoint(tmp_path / "pam" / stage.artifact).meta["defense"]
    assert record["restarts"] == 1 and record["rho"] == 0.0


def test_a_config_field_is_neutral_only_at_its_default() -> None:
    """A config is rebuilt from its key dump with defaults filled in, so a neutral value away from the default would
    run something other than what the key says: refused when the study is planned."""
    from typing import Any, ClassVar

    from pydantic import BaseModel

    from antidoor.experiment.stages import key_dump

    class Knob(BaseModel):
        KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"steps": 1}
        steps: int = 3

    with pytest.raises(TypeError, match=r"Knob.KEY_NEUTRAL\['steps'\] must be the field's default \(3\), not 1"):
        key_dump(Knob())


def test_plan_shares_stages_and_keys_follow_the_config() -> None:
    study = {**TINY, "attacks": [{"name": "badnets"}, {"name": "blended"}],
             "defenses": [{"name": "ft"}, {"name": "sau"}], "seeds": [0, 1]}
    stages = plan(load_study(base=study))
    kinds = [s.kind for s in stages]
    # one clean model per (dataset, model, seed), one backdoored per attack and seed, one purification per defense
    assert (kinds.count("clean"), kinds.count("attack"), kinds.count("purify")) == (2, 4, 8)
    assert len({s.key for s in stages}) == len(stages) == len({s.artifact for s in stages})
    position = {s.key: i for i, s in enumerate(stages)}
    assert all(position[k] < position[s.key] for s in stages for k in s.deps.values())  # upstream first
    again = {s.key for s in plan(load_study(base=study))}
    assert again == {s.key for s in stages}

    # a defense parameter changes only that defense's stages; the recipe changes every stage
    changed = plan(load_study(base=study, overrides=["defenses=[{name: ft}, {name: sau, rounds: 3}]"]))
    differ = {s.labels["defense"] for s in changed if s.key not in position}
    assert differ == {"sau"} and sum(s.key not in position for s in changed) == 4
    assert not {s.key for s in plan(load_study(base=study, overrides=["train.lr=0.02"]))} & set(position)


def test_entry_labels_name_rows_and_stay_out_of_stage_keys() -> None:
    """``label`` names an attack's or a defense's rows; the stages' keys are those of the unlabelled entries."""
    study = {**TINY, "attacks": [{"name": "blended"}], "defenses": [{"name": "ft"}, {"name": "ft", "epochs": 3}]}
    plain = plan(load_study(base=study))
    labelled = {**study, "attacks": [{"name": "blended", "label": "blended-noise"}],
                "defenses": [{"name": "ft"}, {"name": "ft", "epochs": 3, "label": "ft-long"}]}
    cfg = load_study(base=labelled)
    assert cfg.row_labels("attacks") == ["blended-noise"] and cfg.row_labels("defenses") == ["ft", "ft-long"]
    assert [s.key for s in plan(cfg)] == [s.key for s in plain]  # a stored study resumes under its new labels' keys
    rows = {(s.kind, s.labels["attack"], s.labels["defense"]) for s in plan(cfg)}
    assert ("purify", "blended-noise", "ft-long") in rows and ("purify", "blended-noise", "ft") in rows
    assert {(s.labels["attack"], s.labels["defense"]) for s in plain if s.kind == "purify"} == {("blended", "ft#1"),
                                                                                            ("blended", "ft#2")}
    # the store keeps the study with its labels: `grid --resume --out` without the YAML names rows alike
    again = load_study(base=cfg.dump())
    assert again.row_labels("defenses") == ["ft", "ft-long"] and again.attacks == cfg.attacks
    for entries, msg in (([{"name": "badnets", "label": "blended"}, {"name": "blended"}], "name two entries"),
                         ([{"name": "badnets", "label": "a#b"}], "short name"),
                         ([{"name": "badnets", "label": 3}], "short name")):
        with pytest.raises(AntidoorError, match=msg):
            load_study(base={**TINY, "attacks": entries})
    with pytest.raises(AntidoorError, match="not a study key"):
        load_study(base={**TINY, "attack_labels": ["x"]})


def test_study_config_errors_name_the_key(run_cli, tmp_path: Path) -> None:
    with pytest.raises(AntidoorError, match=r"defenses.*rnds|rnds"):
        load_study(base={**TINY, "defenses": [{"name": "sau", "rnds": 3}]})
    with pytest.raises(AntidoorError, match="poisons nothing"):
        load_study(base={**TINY, "attacks": [{"name": "badnets", "pratio": 0}]})
    with pytest.raises(AntidoorError, match="distinct"):
        load_study(base={**TINY, "seeds": [1, 1]})
    with pytest.raises(AntidoorError, match="n_train"):
        load_study(base={**TINY, "datasets": [{"name": "cifar10-mini", "n_train": 2}]})
    with pytest.raises(AntidoorError, match=r"absent\.yaml"):
        load_study(tmp_path / "absent.yaml")
    for kw, msg in (({"backend": "spark"}, "allowed: local, ray"), ({"workers": 0}, "at least 1"),
                    ({"address": "auto"}, "for --backend ray")):
        with pytest.raises(AntidoorError, match=msg):
            run_grid(load_study(base=TINY), tmp_path / "never", **kw)
    assert not (tmp_path / "never").exists()
    line = run_cli("results", tmp_path / "nowhere").error_line()
    assert "no study store" in line
    (tmp_path / "grid.log").write_text("a log, not a study")
    line = run_cli("report", tmp_path / "grid.log", "--out", tmp_path / "report").error_line()
    assert "grid.log' is a file; give a study folder" in line and not (tmp_path / "report").exists()


def test_results_filter_matches_a_label_or_its_registered_name(tmp_path: Path) -> None:
    """``results --attack blended`` finds an entry labelled ``blended-digit`` (its runs' configs say ``blended``)."""
    from antidoor.report.tables import registered_names

    with Store(tmp_path / STORE_NAME) as store:
        attack = {"attack": {"name": "blended", "alpha": 0.2}, "stage": "attack"}
        for stage, defense, cfg in (("attack", None, attack),
                                    ("purify", "ft-long", {"defense": {"name": "ft"}, "upstream": attack}),
                                    ("stress", "ft-long", {"upstream": {"defense": {"name": "ft"}, "upstream": attack}})):
            rid = store.start(f"k-{stage}", stage, cfg, {"dataset": "d", "model": "m", "attack": "blended-digit",
                                                         "defense": defense, "seed": 0})
            store.finish(rid, [Metric(stage, "asr", 0.5)])
        names = registered_names(store)
        rows = result_rows(store)
    assert names == {("attack", "blended-digit"): "blended", ("defense", "ft-long"): "ft"}
    assert {r["defense"] for r in rows} == {"none", "ft-long"}
    assert filter_rows(rows, attack=["blended"]) == []  # labels alone do not know the entry's name
    assert filter_rows(rows, attack=["blended"], names=names) == rows
    assert [r["defense"] for r in filter_rows(rows, defense=["ft"], names=names)] == ["ft-long"]
    assert filter_rows(rows, attack=["badnets"], names=names) == []
    from typer.testing import CliRunner

    from antidoor.cli import app

    out = CliRunner().invoke(app, ["results", str(tmp_path), "--attack", "blended", "--defense", "ft", "--format", "csv"])
    assert out.exit_code == 0 and out.stdout.count("blended-digit") == 1 and "ft-long" in out.stdout


# -- the store ---------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from antidoor.experiment.store import Metric, Store
    path, w, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with Store(path) as store:
        for i in range(n):
            rid = store.start(f"w{w}-r{i}", "purify", {"w": w, "i": i}, {"dataset": "d", "seed": i})
            store.finish(rid, [Metric("purify", f"m{j}", float(j), None) for j in range(4)]
                         + [Metric("purify", "curve.asr", 0.5, step=s) for s in (1, 2)], seconds=0.0)
""")


def test_store_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / STORE_NAME
    Store(path).close()
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), "40"], env=env) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    with Store(path) as store:
        runs = store.runs()
        assert len(runs) == 160 and all(r["status"] == "done" for r in runs)
        assert len(store.metrics()) == 160 * 6
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # a second finish replaces the run's metrics instead of adding to them
        store.finish(runs[0]["id"], [Metric("purify", "m0", 1.0)])
        assert len(store.metrics(runs[0]["id"])) == 1


# -- the grid ----------------------------------------------------------------------------------------------

def test_grid_records_every_stage_and_the_failure(inline_study: Path) -> None:
    with Store(inline_study / STORE_NAME) as store:
        runs = {(r["stage"], r["defense"]): r for r in store.runs()}
        assert {k: r["status"] for k, r in runs.items()} == {
            ("clean", None): "done", ("attack", None): "done", ("purify", "ft#1"): "done", ("purify", "ft#2"): "failed"}
        assert "FT, epoch 2 of 2: the loss became nan (training diverged)" in runs[("purify", "ft#2")]["error"]
        for r in runs.values():
            assert r["attempts"] == 1 and r["finished"] >= r["started"] and json.loads(r["versions"])["torch"]
            assert json.loads(r["config"])["stage"] == r["stage"]
        artifacts = store.artifacts()
        assert len(artifacts) == 3 and all((inline_study / a["path"]).is_file() for a in artifacts)
        rows = result_rows(store)
    by_defense = {r["defense"]: r for r in rows}
    assert list(by_defense) == ["clean", "none", "ft#1", "ft#2"]
    assert by_defense["ft#2"]["status"] == "failed" and "diverged" in by_defense["ft#2"]["error"]
    for d in ("clean", "none", "ft#1"):
        assert {"clean_acc", "asr", "robust_acc"} <= set(by_defense[d]) and by_defense[d]["status"] == "done"
    assert 0 <= by_defense["ft#1"]["der"] <= 1
    # the purified checkpoint loads and is the model the store measured
    from antidoor.checkpoint import load_checkpoint
    from antidoor.experiment.stages import scenario_of

    ckpt_path = next(inline_study.glob("artifacts/purify/*.safetensors"))
    ckpt = load_checkpoint(ckpt_path)
    scenario = scenario_of(ckpt, TINY["datasets"][0], 0, "cpu")
    assert scenario.evaluator(ckpt.model)["asr"] == pytest.approx(by_defense["ft#1"]["asr"], abs=0)
    # the defender's validation accuracy is recorded beside the test metrics (settings may be chosen with it)
    defender = scenario.defender_data()
    assert by_defense["ft#1"]["val_clean_acc"] == pytest.approx(defender.val_accuracy(ckpt.model), abs=0)
    n_correct = len(defender.x_val) * by_defense["ft#1"]["val_clean_acc"]
    assert n_correct == pytest.approx(round(n_correct), abs=1e-4)  # a share of the validation images, not the test's


def test_resume_reruns_nothing_finished_and_extends_a_study(inline_study: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(inline_study, folder)
    with pytest.raises(AntidoorError, match="--resume"):
        run_grid(load_study(base=TINY), folder)
    before = {r["key"]: r for r in Store(folder / STORE_NAME).runs()}
    with Store(folder / STORE_NAME) as store:  # a stage a killed grid left running, under settings no longer studied
        store.start("old-settings", "purify", {}, {"attack": "badnets", "defense": "ft", "seed": 0})
    # one more defense: only its stage runs; the failed one is tried again (and fails again)
    study = load_study(base={**TINY, "defenses": [*TINY["defenses"], {"name": "ft", "epochs": 1, "batch_size": 16}]})
    summary = run_grid(study, folder, resume=True)
    assert (summary.reused, summary.done, summary.failed) == (3, 1, 1)
    after = {r["key"]: r for r in Store(folder / STORE_NAME).runs()}
    assert after["old-settings"]["status"] == "failed" and after["old-settings"]["error"].startswith("interrupted")
    for key, r in before.items():
        if r["status"] == "done":
            assert (after[key]["finished"], after[key]["attempts"]) == (r["finished"], 1)
        else:
            assert after[key]["attempts"] == 2


def test_resume_refuses_a_trigger_file_changed_since_the_study_used_it(tmp_path: Path) -> None:
    """A stage's key holds a Blended pattern's path, not its content: an image edited in place is refused on resume."""
    from PIL import Image

    pattern = tmp_path / "pattern.png"
    Image.new("RGB", (8, 8), (250, 10, 10)).save(pattern)
    study = load_study(base={**TINY, "attacks": [{"name": "blended", "pattern": str(pattern)}], "defenses": []})
    folder = tmp_path / "study"
    assert run_grid(study, folder).failed == 0
    with Store(folder / STORE_NAME) as store:
        recorded = store.get_meta("trigger_files")
    assert list(recorded) == [str(pattern)]
    again = run_grid(study, folder, resume=True)  # unchanged: nothing to run
    assert (again.reused, again.done) == (2, 0)
    original = pattern.read_bytes()
    Image.new("RGB", (8, 8), (10, 250, 10)).save(pattern)
    with pytest.raises(AntidoorError, match=r"blended.pattern .*changed since this study first used it"):
        run_grid(study, folder, resume=True)
    with Store(folder / STORE_NAME) as store:
        assert store.get_meta("trigger_files") == recorded and {r["status"] for r in store.runs()} == {"done"}
    pattern.write_bytes(original)
    assert run_grid(study, folder, resume=True).reused == 2


def test_resume_without_checkpoints_reruns_only_what_a_stage_left_to_run_needs(inline_study: Path, tmp_path: Path) -> None:
    """A study committed without its checkpoints (store and stress results only) resumes where it stopped."""
    folder = tmp_path / "bare"
    shutil.copytree(inline_study, folder)
    for ckpt in (folder / "artifacts").rglob("*.safetensors"):
        ckpt.unlink()
    before = {r["key"]: r for r in Store(folder / STORE_NAME).runs()}
    done_only = {**TINY, "defenses": TINY["defenses"][:1]}  # without the stage that fails
    summary = run_grid(load_study(base=done_only), folder, resume=True)
    assert (summary.reused, summary.done, summary.failed) == (3, 0, 0)
    # a new defense needs the backdoored model, which needs the clean one (its reference metrics): both run again,
    # with the same seed and the same numbers; the purification that finished does not
    extended = {**done_only, "defenses": [*done_only["defenses"], {"name": "ft", "epochs": 1, "batch_size": 16}]}
    summary = run_grid(load_study(base=extended), folder, resume=True)
    assert (summary.reused, summary.done, summary.failed) == (1, 3, 0)
    after = {r["key"]: r for r in Store(folder / STORE_NAME).runs()}
    attempts = {after[k]["stage"]: after[k]["attempts"] for k in before if before[k]["status"] == "done"}
    assert attempts == {"clean": 2, "attack": 2, "purify": 1}
    attack_key = next(k for k, r in after.items() if r["stage"] == "attack")
    measured = [(attack_key, stage, m) for stage in ("attack", "reference") for m in ("clean_acc", "asr")]
    got, want = scalars(folder), scalars(inline_study)
    assert [got[k] for k in measured] == [want[k] for k in measured]


def test_resume_reruns_a_needed_checkpoint_that_is_not_the_one_the_store_recorded(inline_study: Path, tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture) -> None:
    """A store copied from another machine over an older folder: a checkpoint on disk with the right name but
    another run's bytes is not built on. Where a stage left to run reads it, it runs again (and, the same machine,
    reproduces); where nothing reads it, it stays as it is (only the checkpoints to be read are checked)."""
    folder = tmp_path / "swapped"
    shutil.copytree(inline_study, folder)
    done_only = {**TINY, "defenses": TINY["defenses"][:1]}
    with Store(folder / STORE_NAME) as store:
        keys = {r["stage"]: r["key"] for r in store.runs() if r["status"] == "done"}
        before = {r["key"]: r for r in store.runs()}
    from antidoor.experiment.stages import artifact_path

    for stage in ("attack", "purify"):  # same size, other bytes: what a retraining on another CPU leaves
        path = folder / artifact_path(stage, keys[stage])
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    capsys.readouterr()
    summary = run_grid(load_study(base=done_only), folder, resume=True)  # nothing left to run reads either checkpoint
    assert (summary.reused, summary.done) == (3, 0)
    assert "is not the checkpoint the store recorded" not in capsys.readouterr().err
    extended = {**done_only, "defenses": [*done_only["defenses"], {"name": "ft", "epochs": 1, "batch_size": 16}]}
    summary = run_grid(load_study(base=extended), folder, resume=True)  # the new FT reads the backdoored model
    err = " ".join(capsys.readouterr().err.split())
    assert "artifacts/attack/" in err and "is not the checkpoint the store recorded for it" in err
    assert (summary.reused, summary.done, summary.failed) == (2, 2, 0)
    with Store(folder / STORE_NAME) as store:
        after = {r["key"]: r for r in store.runs()}
        recorded = {a["path"]: a["sha256"] for a in store.artifacts()}
    assert {s: after[keys[s]]["attempts"] for s in ("clean", "attack", "purify")} == {"clean": 1, "attack": 2, "purify": 1}
    assert after[keys["purify"]]["finished"] == before[keys["purify"]]["finished"]  # reproduced: the old FT stands
    import hashlib

    attack_file = artifact_path("attack", keys["attack"])
    assert hashlib.sha256((folder / attack_file).read_bytes()).hexdigest() == recorded[attack_file]


def moved_study(study: Path, folder: Path, attack_status: str = "done") -> Path:
    """A copy of ``study`` as another CPU would resume it: no checkpoints, and a recorded attack clean_acc that
    retraining cannot reproduce (bf16 kernels differ between CPUs); the attack row left as ``attack_status``."""
    shutil.copytree(study, folder)
    for ckpt in (folder / "artifacts").rglob("*.safetensors"):
        ckpt.unlink()
    with Store(folder / STORE_NAME) as store:
        attack_id = next(r["id"] for r in store.runs() if r["stage"] == "attack")
    with sqlite3.connect(folder / STORE_NAME) as db:
        db.execute("UPDATE metrics SET value = value - 0.01 WHERE run_id = ? AND stage = 'attack' AND name = 'clean_acc' "
                   "AND step IS NULL", (attack_id,))
        db.execute("UPDATE runs SET status = ? WHERE id = ?", (attack_status, attack_id))
    return folder


@pytest.mark.parametrize("left_as", ["done", "running"])
def test_resume_reruns_what_was_built_on_a_checkpoint_that_did_not_come_back_the_same(inline_study: Path, tmp_path: Path,
                                                                                    left_as: str) -> None:
    """A stage run again on another CPU (bf16 kernels differ) may not reproduce its recorded results: then the
    finished stages built on the old checkpoint are stale and run again too. Simulated by a recorded value
    that the rerun cannot reproduce. ``running``: that rerun was itself killed once (its old results stay recorded)."""
    folder = moved_study(inline_study, tmp_path / "moved", left_as)
    extended = {**TINY, "defenses": [TINY["defenses"][0], {"name": "ft", "epochs": 1, "batch_size": 16}]}
    summary = run_grid(load_study(base=extended), folder, resume=True)
    # clean and attack run again for the new defense; the attack's numbers moved, so the finished FT reruns too
    assert (summary.reused, summary.done, summary.failed) == (0, 4, 0)
    with Store(folder / STORE_NAME) as store:
        attempts = sorted((r["stage"], r["attempts"]) for r in store.runs() if r["status"] == "done")
        purified = sorted((r for r in store.runs("purify") if r["status"] == "done"), key=lambda r: r["started"])
    assert attempts == [("attack", 2), ("clean", 2), ("purify", 1), ("purify", 2)]
    assert [r["attempts"] for r in purified] == [2, 1]  # the stale FT runs in plan order: before the new defense
    key = next(k for k in scalars(inline_study) if k[1:] == ("attack", "clean_acc"))
    assert scalars(folder)[key] == scalars(inline_study)[key]  # the rerun's own value replaced the one it did not match


@pytest.mark.parametrize(("badnets_block", "badnets_attempts"), [
    ("complete", [1, 1]),  # its attack and FT: not rerun (no stage left needs the attack's checkpoint)
    ("open, built on another clean model", [2, 2]),  # its attack's reference.* do not come back: the FT reruns
    ("open, built on the clean model that came back", [2, 1]),  # the attack reruns for the new FT; the old FT stands
    ("open, and its attack's rerun fails", None),  # nothing can tell whether the old FT stands: recorded as stale
])
def test_a_clean_model_that_changes_on_rerun_spares_the_blocks_not_built_on_it(tmp_path: Path, badnets_block: str,
                                                                               badnets_attempts: list[int] | None,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The clean model is shared by every attack of a seed, so the store's clean row holds the last one trained (on
    the CPU that last needed it); it need not be the one a block was built on. Retrained, it does not come back as
    that row. BadNets' complete block keeps its results. An open block (a new defense to run) reruns its attack stage,
    which measures the clean model again under its trigger (``reference.*``): the block reruns whole only if that
    does not come back as recorded, that is, if it was built on another clean model than the one trained now."""
    one_block = {**TINY, "defenses": TINY["defenses"][:1]}
    folder = tmp_path / "study"
    run_grid(load_study(base=one_block), folder)
    with Store(folder / STORE_NAME) as store:
        badnets = {r["key"] for r in store.runs() if r["attack"] == "badnets"}  # its attack, FT and nothing else
    for ckpt in (folder / "artifacts").rglob("*.safetensors"):
        ckpt.unlink()
    with sqlite3.connect(folder / STORE_NAME) as db:  # recorded values that retraining cannot reproduce
        db.execute("UPDATE metrics SET value = value - 0.01 WHERE stage = 'clean' AND name = 'clean_acc' "
                   "AND step IS NULL AND run_id = (SELECT id FROM runs WHERE stage = 'clean')")
        if badnets_block == "open, built on another clean model":
            db.execute("UPDATE metrics SET value = value - 0.01 WHERE stage = 'reference' AND name = 'clean_acc' "
                       "AND step IS NULL AND run_id = (SELECT id FROM runs WHERE stage = 'attack')")
    left_open = badnets_block != "complete"
    defenses = [*one_block["defenses"], {"name": "ft", "epochs": 1, "batch_size": 16}] if left_open else \
        one_block["defenses"]
    extended = {**one_block, "defenses": defenses,
                "attacks": [*one_block["attacks"], {"name": "blended", "pratio": 0.1}]}
    if badnets_attempts is None:
        from antidoor.experiment import stages

        def fail_badnets(stage, ctx):
            if stage.labels["attack"] == "badnets":
                raise RuntimeError("the machine ran out of memory")
            return real_attack(stage, ctx)

        real_attack = stages.RUNNERS["attack"]
        monkeypatch.setitem(stages.RUNNERS, "attack", fail_badnets)
        summary = run_grid(load_study(base=extended), folder, resume=True)
        assert summary.failed == 2  # the attack, and the new FT built on it
        with Store(folder / STORE_NAME) as store:
            old_ft = next(r for r in store.runs() if r["key"] in badnets and r["stage"] == "purify")
        assert old_ft["status"] == "failed" and old_ft["error"].startswith("stale: attack ")
        return
    summary = run_grid(load_study(base=extended), folder, resume=True)
    assert summary.failed == 0
    with Store(folder / STORE_NAME) as store:
        runs = [r for r in store.runs() if r["status"] == "done"]
    assert {r["stage"]: r["attempts"] for r in runs if r["attack"] != "badnets"} == {"clean": 2, "attack": 1, "purify": 1}
    assert [r["attempts"] for r in sorted((r for r in runs if r["key"] in badnets), key=lambda r: r["id"])] == \
        badnets_attempts


def test_a_resume_says_when_the_stages_to_rerun_were_recorded_on_another_cpu(inline_study: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Every stage records the CPU it ran on. A resume that must retrain a checkpoint recorded on another CPU says so
    before it starts (the model will likely not come back, and its open block would rerun whole); one on the same CPU
    says nothing."""
    from antidoor.checkpoint import cpu_name
    from antidoor.experiment import backends
    from antidoor.experiment.runner import STOP_NAME
    from antidoor.precision import cpu_bf16_kernels

    folder = moved_study(inline_study, tmp_path / "cpu")
    with Store(folder / STORE_NAME) as store:
        recorded = [json.loads(r["versions"]) for r in store.runs()]
        assert {(v["cpu"], v["cpu_bf16"]) for v in recorded} == {(cpu_name(), cpu_bf16_kernels())}
    real = backends.execute

    def stop_after_first(job):
        (folder / STOP_NAME).touch()
        return real(job)

    monkeypatch.setattr(backends, "execute", stop_after_first)
    extended = load_study(base={**TINY, "defenses": [TINY["defenses"][0], {"name": "ft", "epochs": 1, "batch_size": 16}]})
    run_grid(extended, folder, resume=True)
    assert "another CPU" not in capsys.readouterr().err
    with sqlite3.connect(folder / STORE_NAME) as db:
        db.execute("UPDATE runs SET versions = json_set(versions, '$.cpu', 'Another CPU 9000') WHERE stage = 'attack'")
    run_grid(extended, folder, resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "1 stage(s) to run again (attack " in err and "(Another CPU 9000, bf16 kernels: " in err
    # the same model name is not the same kind of CPU: one AMD EPYC has AVX512-BF16, another trains in float32
    other = "none" if cpu_bf16_kernels() != "none" else "avx512_bf16"
    folder = moved_study(inline_study, tmp_path / "bf16")
    with sqlite3.connect(folder / STORE_NAME) as db:
        db.execute(f"UPDATE runs SET versions = json_set(versions, '$.cpu_bf16', '{other}') WHERE stage = 'attack'")
    run_grid(extended, folder, resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert f"({cpu_name()}, bf16 kernels: {other}; this one: {cpu_name()}, bf16 kernels: {cpu_bf16_kernels()})" in err
    # a record from before the kernels were recorded compares by name; where this CPU trains in float32 it cannot
    # tell whether that run was bf16, and says so (the committed regime store's AMD EPYC rows are such records)
    import antidoor.checkpoint

    real_versions = antidoor.checkpoint.versions
    for kernels in ("avx512_bf16", "none"):
        monkeypatch.setattr(antidoor.checkpoint, "versions", lambda k=kernels: {**real_versions(), "cpu_bf16": k})
        folder = moved_study(inline_study, tmp_path / f"unrecorded-{kernels}")
        with sqlite3.connect(folder / STORE_NAME) as db:
            db.execute("UPDATE runs SET versions = json_remove(versions, '$.cpu_bf16')")
        run_grid(extended, folder, resume=True)
        err = " ".join(capsys.readouterr().err.split())
        assert "another CPU" not in err
        said = re.search(r"2 stage\(s\) to run again \(clean \S+ seed 0, attack \S+ seed 0\) were recorded on a CPU named "
                         + re.escape(repr(cpu_name())) + " before antidoor noted a CPU's bf16 kernels", err)
        assert (said is not None and "this one has none (it trains in float32)" in err) == (kernels == "none"), err


def test_cpu_difference_compares_what_both_records_hold() -> None:
    from antidoor.experiment.runner import cpu_difference

    amd, bf16, none = {"cpu": "AMD EPYC"}, {"cpu_bf16": "avx512_bf16"}, {"cpu_bf16": "none"}
    assert cpu_difference({**amd, **bf16}, {**amd, **bf16}) == "same"
    assert cpu_difference({**amd, **bf16}, {**amd, **none}) == "other"
    assert cpu_difference({"cpu": "Intel Xeon", **bf16}, {**amd, **bf16}) == "other"
    assert cpu_difference(amd, {**amd, **bf16}) == "same"  # an old record on a bf16 host: nothing says otherwise
    assert cpu_difference(amd, {**amd, **none}) == "unknown"  # an old record on a float32 host: bf16 or not?
    assert cpu_difference({"cpu": "Intel Xeon"}, {**amd, **none}) == "other"
    assert cpu_difference({}, {}) == "same"


def test_a_narrowed_resume_marks_the_blocks_unplanned_stages_stale_too(inline_study: Path, tmp_path: Path) -> None:
    """A resume narrowed to one new defense (``--set defenses=[...]``) retrains the backdoored model, which does not
    come back the same: the block's FT that this study does not plan was built on the old model. It cannot stand beside
    the new defense's row, so it is recorded as stale at once, and the next resume that plans it runs it again."""
    folder = moved_study(inline_study, tmp_path / "narrowed")
    with Store(folder / STORE_NAME) as store:
        old_ft = next(r["key"] for r in store.runs("purify") if r["status"] == "done")
    narrowed = {**TINY, "defenses": [{"name": "ft", "epochs": 1, "batch_size": 16}]}
    summary = run_grid(load_study(base=narrowed), folder, resume=True)
    assert (summary.done, summary.failed) == (3, 0)  # clean, attack and the new FT; the old FT is not planned here
    with Store(folder / STORE_NAME) as store:
        old = next(r for r in store.runs() if r["key"] == old_ft)
        assert (old["status"], old["error"].startswith("stale:")) == ("failed", True) and store.metrics(old["id"]) == []
    summary = run_grid(load_study(base={**TINY, "defenses": [TINY["defenses"][0], *narrowed["defenses"]]}), folder,
                       resume=True)
    assert (summary.reused, summary.done) == (3, 1)
    with Store(folder / STORE_NAME) as store:
        assert next(r for r in store.runs() if r["key"] == old_ft)["status"] == "done"


def test_stale_results_are_recorded_at_once_and_rerun_after_a_stop(inline_study: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid stops right after the changed rerun: the stale purification is already recorded as failed
    (no table shows its old numbers), and the next --resume runs it again."""
    from antidoor.experiment import backends
    from antidoor.experiment.runner import STOP_NAME

    folder = moved_study(inline_study, tmp_path / "stale")
    real = backends.execute

    def stop_after_attack(job):
        result = real(job)
        if job.stage.kind == "attack":
            (folder / STOP_NAME).touch()
        return result

    monkeypatch.setattr(backends, "execute", stop_after_attack)
    extended = load_study(base={**TINY, "defenses": [TINY["defenses"][0], {"name": "ft", "epochs": 1, "batch_size": 16}]})
    summary = run_grid(extended, folder, resume=True)
    assert (summary.done, summary.left) == (2, 2)  # clean and attack; the new FT and the stale one are left
    with Store(folder / STORE_NAME) as store:
        stale = [r for r in store.runs() if r["error"] and r["error"].startswith("stale:")]
        assert [(r["stage"], r["status"]) for r in stale] == [("purify", "failed")]
        assert store.metrics(stale[0]["id"]) == []
    monkeypatch.setattr(backends, "execute", real)
    summary = run_grid(extended, folder, resume=True)
    assert (summary.reused, summary.done, summary.failed) == (2, 2, 0)
    planned = {s.key for s in plan(extended)}
    with Store(folder / STORE_NAME) as store:
        assert [r["status"] for r in store.runs() if r["key"] in planned] == ["done"] * 4


def test_a_stop_file_ends_the_grid_after_the_stage_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``touch FOLDER/STOP`` during a run: the stage in flight is recorded, nothing new starts, --resume goes on."""
    from antidoor.experiment import backends
    from antidoor.experiment.runner import STOP_NAME

    folder, ran = tmp_path / "stopped", []
    real = backends.execute

    def execute_then_stop(job):  # the user touches STOP while the first stage runs
        ran.append(job.stage.kind)
        (folder / STOP_NAME).touch()
        return real(job)

    monkeypatch.setattr(backends, "execute", execute_then_stop)
    study = load_study(base={**TINY, "defenses": TINY["defenses"][:1]})
    summary = run_grid(study, folder)
    assert (summary.done, summary.failed, summary.left, ran) == (1, 0, 2, ["clean"])
    with Store(folder / STORE_NAME) as store:
        assert [(r["stage"], r["status"]) for r in store.runs()] == [("clean", "done")]
    monkeypatch.setattr(backends, "execute", real)
    summary = run_grid(study, folder, resume=True)  # the old STOP file does not stop the new run
    assert (summary.reused, summary.done, summary.left) == (1, 2, 0) and not (folder / STOP_NAME).exists()


def test_ray_backend_gives_the_same_metrics(inline_study: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is the optional extra antidoor[ray]; `make test` installs it")
    # address="local": a fresh local Ray even where a cluster from `ray start` runs
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        summary = run_grid(load_study(base=TINY), tmp_path / "ray", backend="ray", workers=2)
    finally:
        ray.shutdown()
    assert (summary.done, summary.failed) == (3, 1)
    got, want = scalars(tmp_path / "ray"), scalars(inline_study)
    assert got == want and len(want) >= 10
    with Store(tmp_path / "ray" / STORE_NAME) as store:
        workers = {r["worker"] for r in store.runs()}
    assert f":{os.getpid()}" not in "".join(workers)  # the stages ran in Ray's worker processes


def test_sigkill_mid_grid_then_resume(tmp_path: Path) -> None:
    """Kill the whole grid (driver and its 2 worker processes) after a stage finished; resume; check every row."""
    study = {**TINY, "defenses": [TINY["defenses"][0]], "seeds": [0, 1], "train": {**TINY["train"], "epochs": 1}}
    yaml_path, folder = write_yaml(tmp_path / "study.yaml", study), tmp_path / "study"
    expected = plan(load_study(yaml_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "antidoor.cli", "grid", str(yaml_path), "--out", str(folder), "--workers", "2",
                             "--quiet"], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = folder / STORE_NAME
    done: list[tuple] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if db.is_file():
            with sqlite3.connect(db, timeout=10) as conn, contextlib.suppress(sqlite3.OperationalError):  # not created yet
                done = conn.execute("SELECT key, finished, attempts FROM runs WHERE status = 'done'").fetchall()
            if done:
                break
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) >= 2  # the two pool workers (and multiprocessing's resource tracker)
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its worker processes must notice and end
    proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [w for w in workers if alive(w)]
    os.killpg(proc.pid, signal.SIGKILL)
    assert not orphans, "worker processes outlived the killed driver"
    assert done and len(done) < len(expected), f"the grid was not caught mid-run: {len(done)} of {len(expected)} done"

    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    resumed = subprocess.run([sys.executable, "-m", "antidoor.cli", "grid", "--resume", "--out", str(folder), "--quiet"],
                             env=env, capture_output=True, text=True, timeout=180, check=False)
    assert resumed.returncode == 0, resumed.stderr
    reused = json.loads(resumed.stdout.strip().splitlines()[-1])["reused"]
    assert reused >= len(done)
    with Store(db) as store:
        runs = {r["key"]: r for r in store.runs()}
        assert set(runs) == {s.key for s in expected}  # no row lost, none extra (keys are unique in the table)
        assert all(r["status"] == "done" for r in runs.values())
        for key, finished, attempts in done:  # finished stages were not recomputed
            assert (runs[key]["finished"], runs[key]["attempts"]) == (finished, attempts) == (finished, 1)
        dupes = store.conn.execute("SELECT run_id, stage, name, step, COUNT(*) c FROM metrics "
                                   "GROUP BY run_id, stage, name, IFNULL(step, -1) HAVING c > 1").fetchall()
        assert not dupes
        for s in expected:
            names = {(m["stage"], m["name"]) for m in store.metrics(runs[s.key]["id"]) if m["step"] is None}
            want = {"clean": {("clean", "clean_acc")}, "attack": {("attack", "asr"), ("reference", "asr")},
                    "purify": {("purify", "asr"), ("purify", "der")}}[s.kind]
            assert want <= names
            assert (folder / s.artifact).is_file()
        assert len(result_rows(store)) == 2 * 3  # per seed: clean, none and the defense


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- results and report ------------------------------------------------------------------------------------

def test_results_formats_and_filters(inline_study: Path, run_cli) -> None:
    res = run_cli("results", inline_study, "--format", "json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["defense"] for r in rows] == ["clean", "none", "ft#1", "ft#2"]
    assert rows[3]["status"] == "failed" and "diverged" in rows[3]["error"]
    from typer.testing import CliRunner

    from antidoor.cli import app

    table = CliRunner().invoke(app, ["results", str(inline_study), "--defense", "ft"])
    assert table.exit_code == 0 and "failed" in table.stdout and "ft#1" in table.stdout and "none" not in table.stdout
    with Store(inline_study / STORE_NAME) as store:
        all_rows = result_rows(store)
    assert [r["defense"] for r in filter_rows(all_rows, defense=["none", "ft#2"])] == ["none", "ft#2"]
    assert filter_rows(all_rows, attack=["blended"]) == []
    csv_text = render(all_rows, "csv")
    assert csv_text.splitlines()[0].startswith("dataset,model,attack,defense,seed,clean_acc,asr")
    assert len(csv_text.splitlines()) == 5
    md = render(all_rows, "markdown", aggregated=False)
    assert md.count("\n") == 6 and "| failed |" in md


CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => i.id + ':' + i.naturalWidth + 'x' + i.naturalHeight + ':' + i.complete);
  const tables = [...document.querySelectorAll('table')].map(t => t.rows.length);
  const out = document.createElement('pre');
  out.id = 'render-check';
  out.textContent = JSON.stringify({imgs, tables});
  document.body.appendChild(out);
});
</script></body>"""


def test_report_renders_in_headless_chromium(inline_study: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed here (.ci/run installs Debian's chromium package for CI)")
    html_path, md_path = write_report(inline_study / STORE_NAME, tmp_path / "report")
    page = html_path.read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    # the check script goes into a copy: the report itself carries no test hooks
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK_SCRIPT))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=5000"]
    dom = subprocess.run([*cmd, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=60, check=True).stdout
    start = dom.index('<pre id="render-check">') + len('<pre id="render-check">')
    check = json.loads(dom[start:dom.index("</pre>", start)].replace("&quot;", '"'))
    images = {s.split(":")[0]: s.split(":")[1:] for s in check["imgs"]}
    assert {"defenses", "curves_curve"} <= set(images)
    for size, complete in images.values():
        w, h = map(int, size.split("x"))
        assert w > 100 and h > 100 and complete == "true"
    assert check["tables"] == [5, 5]  # mean over seeds and every run: a header and four rows each
    shot = tmp_path / "shot.png"
    subprocess.run([*cmd, "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", html_path.as_uri()],
                   capture_output=True, timeout=60, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels[..., :3].std() > 0.05  # not a blank page
    md = md_path.read_text()
    assert "| ft#2 |" in md and "failed" in md
    for stem in ("defenses", "curves_curve"):
        assert f"report_files/{stem}.png" in md and (md_path.parent / "report_files" / f"{stem}.png").stat().st_size > 1000


# the stress suite at its smallest: one 1-epoch RA seed, a 1-epoch QRA on 40 images, a 3-point path
STRESS = {"ra": {"epochs": 1, "seeds": [0]}, "qra": {"n_clean": 20, "n_poison": 20, "epochs": 1, "hidden": 16},
          "path": {"points": 3}}


def test_grid_stress_stages_record_p_asr_and_curves_then_report_them(inline_study: Path, tmp_path: Path, run_cli) -> None:
    """The tiny study again with a stress section: only the stress stages run; resumed, nothing finished reruns."""
    study = load_study(base={**TINY, "stress": STRESS})
    stages = plan(study)
    stress = {s.labels["defense"]: s for s in stages if s.kind == "stress"}
    assert sorted(stress) == ["clean", "ft#1", "ft#2", "none"]  # each purification, the backdoored and the clean model
    assert stress["none"].deps == stress["clean"].deps and stress["ft#1"].deps["purify"] in {s.key for s in stages}
    # the references are keyed by the RA settings alone: leaving QRA out reruns only the purifications' stress
    no_qra = {s.key for s in plan(load_study(base={**TINY, "stress": {**STRESS, "qra": None}}))}
    assert {d for d, s in stress.items() if s.key not in no_qra} == {"ft#1", "ft#2"}

    folder = tmp_path / "stress"
    shutil.copytree(inline_study, folder)
    summary = run_grid(study, folder, resume=True)
    # clean, attack and ft#1 reused; the three stress stages run; ft#2 fails again and its stress with it
    assert (summary.stages, summary.reused, summary.done, summary.failed) == (8, 3, 3, 2)
    with Store(folder / STORE_NAME) as store:
        rows = {r["defense"]: r for r in result_rows(store)}
        curves = curve_rows(store)
        report = build_report(store)
        finished = {r["key"]: r["finished"] for r in store.runs() if r["status"] == "done"}
    for d in ("clean", "none", "ft#1"):
        r = rows[d]
        assert r["status"] == "done" and 0 <= r["p_asr"] <= 1 and r["p_asr_std"] == 0 and 0 <= r["p_clean_acc"] <= 1
        assert r["o_asr"] == r["asr"]  # the stress stage measured the very model the upstream stage recorded
        retune = {c["step"]: c["value"] for c in curves if (c["defense"], c["family"], c["metric"]) == (d, "retune", "asr")}
        assert retune == {0: r["asr"], 1: r["p_asr"]}  # epoch 0: before RA; the last epoch: p_asr
    assert 0 <= rows["ft#1"]["qra_asr_purified"] <= 1 and 0 <= rows["ft#1"]["qra_asr_clean"] <= 1
    assert "qra_asr_purified" not in rows["none"] and "qra_asr_purified" not in rows["clean"]  # QRA: purified models only
    assert rows["ft#2"]["status"] == "failed"
    path = {(c["defense"], c["metric"], c["step"]) for c in curves if c["family"] == "path"}
    assert path == {("ft#1", m, t) for m in ("asr", "clean_acc") for t in (0.0, 0.5, 1.0)}
    saved = json.loads((folder / stress["ft#1"].artifact).read_text())
    assert saved["summary"]["p_asr_mean"] == rows["ft#1"]["p_asr"] and len(saved["path"]["t"]) == 3
    stems = {stem for _, stem, _ in report.figures}
    assert {"defenses", "retuning", "curves_path", "curves_retune", "curves_curve"} <= stems
    assert all(png.startswith(b"\x89PNG") for _, _, png in report.figures)
    assert not any("without the stress suite" in n for n in report.notes)
    # the verdict section: ft#1 judged against its seed's clean reference (ft#2 failed, so it has none)
    assert [(v["defense"], v["verdict"] in VERDICTS, v["seeds_agreeing"]) for v in report.verdicts] == [("ft#1", True, "1/1")]
    assert to_markdown(report, "f").splitlines()[2] == "## Verdict" and "<h2>Verdict</h2>" in to_html(report)

    again = run_grid(study, folder, resume=True)
    assert (again.reused, again.done, again.failed) == (6, 0, 2)  # only the failing ft#2 and its stress are tried again
    with Store(folder / STORE_NAME) as store:
        assert {r["key"]: r["finished"] for r in store.runs() if r["status"] == "done"} == finished

    res = run_cli("results", folder, "--format", "csv", "--mean")
    assert res.returncode == 0, res.stderr
    header = res.stdout.splitlines()[0].split(",")
    assert header[4:15] == ["clean_acc", "asr", "robust_acc", "der", "clean_acc_drop", "val_clean_acc", "p_asr", "p_asr_std",
                            "p_clean_acc", "qra_asr_purified", "qra_asr_clean"]
