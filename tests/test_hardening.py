"""Issue 17: hostile and mistaken input. Every case ends with exit code 2 and one short ``error:`` line,
never a traceback, with bounded memory and time, and nothing already written changed. The grid's
concurrency (one driver per study), its exit code and its bookkeeping of lost workers are here too.
(The property-based fuzz suite over every loader is ``test_fuzz_loaders.py``.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import THREADS, CliResult

MAX_LINE = 500  # characters of an error line: a short excerpt of the input at most


def run_measured(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> tuple[CliResult, int, float]:
    """``python -m antidoor.cli ARGS`` in a subprocess: its result, its own peak memory (MiB) and seconds."""
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": str(THREADS)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "antidoor.cli", *map(str, args)], stdout=out, stderr=err,
                                cwd=cwd, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own rusage, not all children's
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode == -9:
            pytest.fail(f"antidoor {' '.join(map(str, args))} ran longer than {timeout} s (or was killed)")
        out.seek(0)
        err.seek(0)
        res = CliResult(proc.returncode, out.read().decode(), err.read().decode())
    return res, usage.ru_maxrss // 1024, time.perf_counter() - t0


def short_error(res: CliResult) -> str:
    line = res.error_line()
    assert len(line) < MAX_LINE, f"{len(line)} characters: {line[:200]}..."
    return line


# -- 2: YAML alias and merge-key bombs ---------------------------------------------------------------

def alias_bomb(levels: int, key: str = "seeds") -> str:
    """A few hundred bytes of YAML whose ``key`` expands to 9**levels integers."""
    lines = ["name: bomb", "x0: &x0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"{key}: *x{levels - 1}", ""])


@pytest.mark.parametrize("levels", [8, 10])
def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, cli_main, levels: int) -> None:
    study = tmp_path / "bomb.yaml"
    study.write_text(alias_bomb(levels))
    t0 = time.perf_counter()
    line = short_error(cli_main("grid", study, "--out", tmp_path / "never"))
    assert time.perf_counter() - t0 < 5
    assert "expands to more than 100,000 values" in line
    assert not (tmp_path / "never").exists()


def test_yaml_merge_key_bomb_and_aliases_in_set(tmp_path: Path, cli_main) -> None:
    study = tmp_path / "merge.yaml"
    study.write_text("a0: &a0 {k: 1}\n" + "".join(f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}\n" for i in range(1, 40)))
    assert "expands to more than" in short_error(cli_main("grid", study))
    bomb = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&a{i} [{', '.join(['*a' if i == 1 else f'*a{i - 1}'] * 8)}]"
                                                                for i in range(1, 9)]) + "]"
    assert "expands to more than" in short_error(cli_main("attack", "--set", f"train.epochs={bomb}"))


def test_yaml_bomb_memory_is_bounded(tmp_path: Path) -> None:
    """The 305-byte bomb of the issue took 4.7 GB; now the whole command stays near the import's footprint."""
    study = tmp_path / "bomb.yaml"
    study.write_text(alias_bomb(10))
    res, peak, seconds = run_measured("grid", study, "--out", tmp_path / "never")
    assert "expands to more than" in short_error(res)
    assert peak < 1500 and seconds < 60, f"{peak} MiB, {seconds:.0f} s"


@pytest.mark.parametrize(("text", "expected"), [
    ("seeds: [" + "9" * 5000 + "]\n", "cannot be read"),
    ("train:\n" + "  " * 1 + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("name: " + "x" * 2_000_000 + "\n", "at most 1,048,576 are allowed"),
    ("1: 2\n", "Keys should be strings"),
    ("seeds: [" + ", ".join(["-1"] * 5000) + "]\n", "must be distinct integers"),
])
def test_hostile_study_files(tmp_path: Path, cli_main, text: str, expected: str) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(text)
    assert expected in short_error(cli_main("grid", study, "--out", tmp_path / "never"))


def test_config_path_errors_say_what_is_wrong(tmp_path: Path, cli_main) -> None:
    assert "is a folder; give a file" in short_error(cli_main("attack", "--config", tmp_path))
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    assert "is not UTF-8 text" in short_error(cli_main("grid", tmp_path / "latin1.yaml"))


def test_validation_errors_echo_only_an_excerpt() -> None:
    from antidoor.errors import AntidoorError
    from antidoor.experiment import load_study

    with pytest.raises(AntidoorError) as e:
        load_study(base={"name": "x", "datasets": [{"name": "y" * 100_000, "n_train": list(range(100_000))}]})
    assert len(str(e.value)) < MAX_LINE
