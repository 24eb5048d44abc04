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
