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
