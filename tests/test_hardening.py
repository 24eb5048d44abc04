"""Issue 17: hostile and mistaken input. Every case ends with exit code 2 and one short ``error:`` line,
never a traceback, with bounded memory and time, and nothing already written changed. The grid's
concurrency (one driver per study), its exit code and its bookkeeping of lost workers are here too.
(The property-based fuzz suite over every loader is ``test_fuzz_loaders.py``.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
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


# -- 1: labels that would size everything -------------------------------------------------------------

def real_arrays(bundled, n_train: int = 200, n_test: int = 100) -> dict[str, np.ndarray]:
    """Real CIFAR-10 images from the bundled set, in the documented .npz layout (NHWC uint8)."""
    return {"x_train": bundled.x_train[:n_train].permute(0, 2, 3, 1).numpy(), "y_train": bundled.y_train[:n_train].numpy(),
            "x_test": bundled.x_test[:n_test].permute(0, 2, 3, 1).numpy(), "y_test": bundled.y_test[:n_test].numpy()}


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def tiny_checkpoint(folder: Path, data: str | Path, **meta: object) -> Path:
    """An (untrained) small_cnn checkpoint whose sidecar names ``data`` as its dataset."""
    from antidoor.checkpoint import save_checkpoint
    from antidoor.models import build_model

    model = build_model("small_cnn", 10, 3, width=4)
    base = {"dataset": {"config": {"name": str(data)}, "image_shape": [3, 32, 32], "n_train": 200}, "seed": 0}
    return save_checkpoint(folder / "model.safetensors", model, {**base, **meta})


def test_npz_label_of_a_trillion_is_refused_before_allocating(bundled, tmp_path: Path) -> None:
    arrays = real_arrays(bundled)
    arrays["y_train"] = arrays["y_train"].astype(np.int64)
    arrays["y_train"][7] = 10**12
    npz = save_npz(tmp_path / "huge_label.npz", **arrays)
    res, peak, _ = run_measured("attack", "--data", npz, "--model", "small_cnn", "--epochs", "1", "--device", "cpu",
                                "--out", tmp_path / "out")
    assert "labels range over 0..1000000000000; allowed: 0..9999" in short_error(res)
    assert peak < 1500, f"{peak} MiB"
    assert not (tmp_path / "out").exists()


def test_a_sidecar_naming_a_hostile_npz_or_huge_model_is_refused(bundled, tmp_path: Path, cli_main) -> None:
    arrays = real_arrays(bundled)
    arrays["y_test"] = np.full(100, 2**63 + 5, dtype=np.uint64)  # would wrap to a negative int64
    npz = save_npz(tmp_path / "huge_label.npz", **arrays)
    ckpt = tiny_checkpoint(tmp_path / "a", npz)
    assert "allowed: 0..9999" in short_error(cli_main("evaluate", ckpt, "--device", "cpu"))
    # the sidecar's own architecture asks for 10^12 classes: refused before any model is built
    sidecar = ckpt.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["arch"]["num_classes"] = 10**12
    sidecar.write_text(json.dumps(meta))
    assert "1000000000000 classes; allowed: 1..10,000" in short_error(cli_main("evaluate", ckpt, "--device", "cpu"))
    meta["arch"]["num_classes"], meta["arch"]["kwargs"] = 10, {"width": 10**5}
    sidecar.write_text(json.dumps(meta))
    assert "expects (100000, 3, 3, 3)" in short_error(cli_main("evaluate", ckpt, "--device", "cpu"))  # on the meta device


@pytest.mark.parametrize(("change", "expected"), [
    ({"y_train": np.zeros((100, 2), np.int64)}, "labels must have shape (N,) or (N, 1)"),
    ({"y_train": np.zeros((0,), np.int64), "x_train": np.zeros((0, 32, 32, 3), np.uint8)}, "no labels (the split is empty)"),
    ({"y_train": -np.ones(200, np.int64)}, "labels range over -1..-1"),
    ({"classes": np.array([["a", "b"], ["c", "d"]])}, "classes must be a list"),
    ({"x_train": np.zeros((200, 4, 4, 3), np.uint8)}, "images of 4x4 pixels"),
])
def test_npz_shapes_and_ranges(bundled, tmp_path: Path, cli_main, change: dict, expected: str) -> None:
    arrays = {**real_arrays(bundled), **change}
    npz = save_npz(tmp_path / "bad.npz", **arrays)
    assert expected in short_error(cli_main("attack", "--data", npz, "--out", tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_npz_declaring_more_than_memory_is_refused_from_its_header(tmp_path: Path, cli_main) -> None:
    """A hand-made .npy header that claims 10^13 bytes: refused before numpy allocates."""
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.uint8))
    header["shape"] = (10**7, 1000, 1000)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(f"{key}.npy", buf.getvalue() + b"\0" * 64)
    assert "GiB are allowed" in short_error(cli_main("attack", "--data", path))
