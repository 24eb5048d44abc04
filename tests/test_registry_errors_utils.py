"""registry.py, errors.py and utils.py."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from antidoor import utils
from antidoor.attacks import ATTACKS
from antidoor.errors import AntidoorError, format_validation_error
from antidoor.models import MODELS
from antidoor.registry import Registry

# --- registry ---------------------------------------------------------------------------------


def test_registry_register_get_and_list() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register("b")
    def b() -> str:
        return "b"

    @reg.register("a")
    def a() -> str:
        return "a"

    assert reg.get("a") is a and reg.get("b") is b
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"]
    assert "a" in reg and "c" not in reg and len(reg) == 2


def test_registry_refuses_duplicates() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("x")(object)
    with pytest.raises(KeyError, match="registered twice"):
        reg.register("x")(object)


def test_registry_aliases_resolve_to_the_current_name_and_are_not_listed() -> None:
    reg: Registry[object] = Registry("widget")
    new = reg.register("ft-sam", aliases=("ftsam",))(object)
    assert reg.get("ftsam") is new and reg.canonical("ftsam") == "ft-sam" and reg.canonical("ft-sam") == "ft-sam"
    assert "ftsam" in reg and reg.names() == ["ft-sam"] and len(reg) == 1
    with pytest.raises(KeyError, match="'ftsam' is registered twice"):
        reg.register("ftsam")(object)
    with pytest.raises(KeyError, match="'ft-sam' is registered twice"):
        reg.register("other", aliases=("ft-sam",))(object)


def test_defenses_renamed_with_a_dash_keep_their_old_names() -> None:
    from antidoor.defenses import DEFENSES

    assert DEFENSES.get("ftsam") is DEFENSES.get("ft-sam") and DEFENSES.get("ftsam").name == "ft-sam"
    assert DEFENSES.get("ibau") is DEFENSES.get("i-bau") and DEFENSES.get("ibau").name == "i-bau"


def test_registry_unknown_name_lists_available() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("alpha")(object)
    reg.register("beta")(object)
    with pytest.raises(AntidoorError, match=r"unknown widget 'gamma'; available: alpha, beta"):
        reg.get("gamma")


def test_project_registries_hold_the_documented_entries() -> None:
    assert {"small_cnn", "preact_resnet18", "resnet18", "vgg16_bn"} <= set(MODELS)
    assert {"badnets", "blended", "sig", "wanet", "none"} <= set(ATTACKS)


# --- errors -----------------------------------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.1, ge=0, lt=1)


def test_format_validation_error_names_key_value_and_rule() -> None:
    with pytest.raises(ValidationError) as exc:
        _Params(ratio=1.5, colour="red")
    msg = format_validation_error(exc.value, "attack")
    assert "attack.ratio = 1.5" in msg and "less than 1" in msg
    assert "attack.colour: unknown key" in msg
    assert "\n" not in msg


def test_antidoor_error_is_a_value_error() -> None:
    assert issubclass(AntidoorError, ValueError)


# --- utils ------------------------------------------------------------------------------------


def test_resolve_device_cpu_auto_and_bad_names() -> None:
    assert utils.resolve_device("cpu") == torch.device("cpu")
    assert utils.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert utils.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert utils.resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(AntidoorError, match="is not a device"):
        utils.resolve_device("gpu-please")
    with pytest.raises(AntidoorError, match="not supported"):
        utils.resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_resolve_device_cuda_without_cuda() -> None:
    with pytest.raises(AntidoorError, match="CUDA is not available"):
        utils.resolve_device("cuda")


def test_seed_everything_seeds_all_generators() -> None:
    def draw(g: torch.Generator) -> tuple:
        return random.random(), np.random.rand(), torch.rand(3).tolist(), torch.rand(3, generator=g).tolist()

    first = draw(utils.seed_everything(5))
    second = draw(utils.seed_everything(5))
    third = draw(utils.seed_everything(6))
    assert first == second
    assert all(a != b for a, b in zip(first, third, strict=True))


def test_generator_for_is_seeded() -> None:
    dev = torch.device("cpu")
    a = torch.rand(4, generator=utils.generator_for(dev, 1))
    b = torch.rand(4, generator=utils.generator_for(dev, 1))
    assert torch.equal(a, b)


def test_atomic_write_json_handles_paths_numpy_and_scalar_tensors(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "out.json"
    utils.atomic_write_json(path, {"p": Path("a/b"), "i": np.int64(3), "f": np.float32(0.5), "t": torch.tensor(2.0)})
    assert json.loads(path.read_text()) == {"p": "a/b", "i": 3, "f": 0.5, "t": 2.0}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary files left behind


def test_atomic_write_keeps_old_file_when_serialisation_fails(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    utils.atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError, match="cannot write"):
        utils.atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    utils.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_write_gives_the_permissions_open_would_and_keeps_an_existing_files(tmp_path: Path) -> None:
    import os
    import stat

    mask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.json"
        utils._NEW_FILE_MODE, saved = 0o644, utils._NEW_FILE_MODE  # the umask-derived mode, as read at import
        utils.atomic_write_json(fresh, {"a": 1})
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's private 0600
        private = tmp_path / "private.json"
        private.write_text("{}")
        private.chmod(0o600)
        utils.atomic_write_json(private, {"b": 2})
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        utils._NEW_FILE_MODE = saved
        os.umask(mask)


def test_new_file_mode_follows_the_umask() -> None:
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert utils._NEW_FILE_MODE == 0o666 & ~mask


def test_quiet_silences_info_but_not_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        utils.set_quiet(True)
        utils.info("hidden-message")
        utils.warn("shown-warning")
        assert not utils.show_progress()
        utils.set_quiet(False)
        utils.info("visible-message")
    finally:
        utils.set_quiet(False)
    err = capsys.readouterr().err
    assert "hidden-message" not in err
    assert "shown-warning" in err and "visible-message" in err


def test_progress_bar_off_a_terminal_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    with utils.progress_bar(3, "work") as advance:
        for _ in range(3):
            advance(1, loss=0.5)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("module", "must_not_load"), [
    ("antidoor.config", ["antidoor.pipeline", "antidoor.stress.suite"]),
    ("antidoor.stress.settings", ["antidoor.pipeline", "antidoor.config"]),
])
def test_layers_point_down(module: str, must_not_load: list[str]) -> None:
    """No import circles: a lower layer imported alone loads none of the layers above it."""
    import subprocess
    import sys

    code = f"import sys, {module}; print([m for m in {must_not_load!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{module} loads {out}"


def test_report_markdown_and_document_do_not_import_the_html_writer() -> None:
    import antidoor.report.document as document
    import antidoor.report.markdown as markdown

    for module in (markdown, document):
        imports = [line for line in __import__("pathlib").Path(module.__file__).read_text().splitlines()
                   if line.lstrip().startswith(("import ", "from "))]
        assert not [line for line in imports if "report.html" in line or "report import html" in line], module.__name__


class FakeClock:
    def __init__(self, step_seconds: float) -> None:
        self.now, self.step = 0.0, step_seconds

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_long_loop_is_announced_once_with_its_estimate(capsys):
    from antidoor.utils import Pace

    # 1,000 steps of 2 s: the estimate (2,000 s) is made after the first step + 3 timed ones
    pace = Pace(1000, "train", "a hint", clock=FakeClock(2.0))
    for _ in range(10):
        pace()
    assert pace.estimate == pytest.approx(2000.0)
    err = " ".join(capsys.readouterr().err.split())  # rich wraps at the console's width
    assert err.count("train: about 33 min on this machine (1000 steps, at the pace of the first 4); a hint") == 1


def test_a_short_loop_is_not_announced(capsys):
    from antidoor.utils import Pace

    pace = Pace(100, "SAU", clock=FakeClock(1.0))  # 100 s in all: below the threshold
    for _ in range(100):
        pace()
    assert pace.estimate == pytest.approx(100.0)
    assert "about" not in capsys.readouterr().err


def test_without_a_terminal_a_running_loop_says_where_it_is_every_few_minutes(capsys):
    from antidoor.utils import Pace

    # 100 steps of 60 s with a 300-s heartbeat: a line at steps 6, 11, ..., 96 (every 5 steps after the first)
    pace = Pace(100, "pam: unlearn round 1", clock=FakeClock(60.0), heartbeat=300.0)
    for _ in range(100):
        pace()
    lines = [" ".join(line.split()) for line in capsys.readouterr().err.splitlines() if "steps (" in line]
    assert len(lines) == 19
    assert lines[0] == "pam: unlearn round 1: 6/100 steps (6%), about 1 h 34 min left"
    assert lines[-1] == "pam: unlearn round 1: 96/100 steps (96%), about 4 min left"


def test_short_loops_in_a_row_share_the_heartbeat_interval(capsys):
    from antidoor.utils import BeatClock, Pace

    # a stress stage: loops of 4 steps of 60 s, none as long as the 300-s interval; the shared clock starts at
    # the first loop's first step (t=60), so lines come at t=360, 660 and 1080 (a loop's first step only starts
    # its own estimate, its last needs no line)
    clock, beats = FakeClock(60.0), BeatClock()
    for k in range(5):
        pace = Pace(4, f"RA seed {k}", clock=clock, heartbeat=300.0, beats=beats)
        for _ in range(4):
            pace()
    lines = [" ".join(line.split()) for line in capsys.readouterr().err.splitlines() if "steps (" in line]
    assert lines == ["RA seed 1: 2/4 steps (50%), about 2 min left", "RA seed 2: 3/4 steps (75%), about 60 s left",
                     "RA seed 4: 2/4 steps (50%), about 2 min left"]
    # alone, each loop keeps its own interval: none of them reaches it
    for k in range(5):
        pace = Pace(4, f"RA seed {k}", clock=clock, heartbeat=300.0)
        for _ in range(4):
            pace()
    assert "steps (" not in capsys.readouterr().err


def test_no_heartbeat_without_asking(capsys):
    from antidoor.utils import Pace

    pace = Pace(100, "train", clock=FakeClock(60.0))
    for _ in range(100):
        pace()
    assert "steps (" not in capsys.readouterr().err


def test_a_progress_bar_in_a_log_file_beats_and_a_quiet_one_does_not(monkeypatch, capsys):
    import antidoor.utils as utils

    monkeypatch.setattr(utils, "HEARTBEAT_SECONDS", 0.0)  # every step
    for quiet, expected in ((False, 2), (True, 0)):
        monkeypatch.setattr(utils, "_quiet", quiet)
        with utils.progress_bar(4, "loop") as advance:
            for _ in range(4):
                advance()
        beats = [line for line in capsys.readouterr().err.splitlines() if "steps (" in line]
        assert len(beats) == expected  # steps 2 and 3 (the first starts the clock; the last needs no line)


def test_a_quiet_grid_job_still_beats_under_its_stage_label(monkeypatch, capsys):
    import antidoor.utils as utils

    monkeypatch.setattr(utils, "HEARTBEAT_SECONDS", 0.0)
    monkeypatch.setattr(utils, "_quiet", True)
    monkeypatch.setattr(utils, "_beat_label", "purify cifar10/badnets/pam seed 2")
    with utils.progress_bar(4, "pam: unlearn round 1") as advance:
        for _ in range(4):
            advance()
    utils.info("an info line")  # still silent: only the heartbeats pass
    err = [" ".join(line.split()) for line in capsys.readouterr().err.splitlines()]
    assert len(err) == 2 and all(line.startswith("purify cifar10/badnets/pam seed 2: pam: unlearn round 1: ") for line in err)


def test_a_grid_job_beats_with_its_stage_label_and_a_quiet_grid_does_not(tmp_path, monkeypatch, capsys):
    import antidoor.utils as utils
    from antidoor.experiment import stages

    seen: list[str | None] = []
    monkeypatch.setattr(stages, "_execute", lambda job: seen.append(utils._beat_label) or {"status": "done"})
    job = stages.Job(stage=stages.Stage("purify", {}, {"dataset": "d", "defense": "pam", "seed": 2}),
                     study_dir=str(tmp_path), device="cpu", threads=1, versions={})
    for quiet in (False, True):
        monkeypatch.setattr(utils, "_quiet", quiet)
        stages.execute(job)
        assert utils._quiet is quiet and utils._beat_label is None  # restored for the driver
    assert seen[0] == job.stage.describe() and seen[1] is None


@pytest.mark.parametrize(("seconds", "text"), [(42, "42 s"), (420, "7 min"), (7500, "2 h 05 min")])
def test_format_duration(seconds, text):
    from antidoor.utils import format_duration

    assert format_duration(seconds) == text


_FAULTS_PROBE = """
import resource, sys, torch
from antidoor.utils import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(6):  # a block above glibc's largest mmap threshold (32 MiB), filled, freed, allocated again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(48 * 2**20 // 4)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, min(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_stops_the_page_faults_of_large_reallocations() -> None:
    """By default every 48 MB tensor is a fresh mapping, faulted in page by page (~12,000 faults); with
    ``keep_freed_memory`` the freed block is reused and the next allocation faults (almost) nothing.
    ``ANTIDOOR_MALLOC=default`` keeps glibc's behaviour."""
    def probe(mode: str, **env: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_PROBE, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split()
        return out[0], int(out[1])

    took, faults = probe("keep")
    assert took == "True" and faults < 100
    took, faults = probe("default")
    assert took == "False" and faults > 10_000
    took, faults = probe("keep", ANTIDOOR_MALLOC="default")
    assert took == "False" and faults > 10_000
