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
import torch

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


# what a refused input may add to the peak memory of a command that only imports everything. A child's
# ru_maxrss can start from its parent's resident size when it is forked (1,501 MiB late in a full pytest
# run, against ~650-800 MiB alone), so the bound is relative to a command measured the same way, here.
HEADROOM_MIB = 300


@pytest.fixture(scope="module")
def import_footprint() -> int:
    """Peak memory (MiB) of ``antidoor list``: torch, torchvision and every registry imported, nothing read."""
    res, peak, _ = run_measured("list")
    assert res.returncode == 0, res.stderr
    return peak


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


def test_yaml_bomb_memory_is_bounded(tmp_path: Path, import_footprint: int) -> None:
    """The 305-byte bomb of the issue took 4.7 GB; now the whole command stays near the import's footprint."""
    study = tmp_path / "bomb.yaml"
    study.write_text(alias_bomb(10))
    res, peak, seconds = run_measured("grid", study, "--out", tmp_path / "never")
    assert "expands to more than" in short_error(res)
    assert peak < import_footprint + HEADROOM_MIB and seconds < 60, f"{peak} MiB (imports: {import_footprint}), {seconds:.0f} s"


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
    """Real CIFAR-10 images from the bundled set (every class), in the documented .npz layout (NHWC uint8)."""
    tr, te = slice(None, None, len(bundled.y_train) // n_train), slice(None, None, len(bundled.y_test) // n_test)
    return {"x_train": bundled.x_train[tr].permute(0, 2, 3, 1).numpy(), "y_train": bundled.y_train[tr].numpy(),
            "x_test": bundled.x_test[te].permute(0, 2, 3, 1).numpy(), "y_test": bundled.y_test[te].numpy()}


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


def test_npz_label_of_a_trillion_is_refused_before_allocating(bundled, tmp_path: Path, import_footprint: int) -> None:
    arrays = real_arrays(bundled)
    arrays["y_train"] = arrays["y_train"].astype(np.int64)
    arrays["y_train"][7] = 10**12
    npz = save_npz(tmp_path / "huge_label.npz", **arrays)
    res, peak, _ = run_measured("attack", "--data", npz, "--model", "small_cnn", "--epochs", "1", "--device", "cpu",
                                "--out", tmp_path / "out")
    assert "labels range over 0..1000000000000; allowed: 0..9999" in short_error(res)
    assert peak < import_footprint + HEADROOM_MIB, f"{peak} MiB (imports: {import_footprint})"
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


# -- 3, 10, 13: one driver per study, exit codes, lost workers -----------------------------------------

GRID = {
    "name": "hardening",
    "datasets": [{"name": "cifar10-mini", "n_train": 1000, "n_test": 200}],
    "models": [{"name": "small_cnn", "width": 4}],
    "attacks": [{"name": "badnets", "pratio": 0.1}],
    "defenses": [{"name": "ft", "epochs": 1, "batch_size": 16}],
    "seeds": [0],
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "device": "cpu",
}


def write_study(path: Path, **changes: object) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({**GRID, **changes}))
    return path


def grid_process(*args: str | Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "antidoor.cli", "grid", *map(str, args), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_row(db: Path, sql: str, timeout: float = 60) -> list[tuple]:
    import contextlib
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.is_file():
            with contextlib.suppress(sqlite3.OperationalError), sqlite3.connect(db, timeout=10) as conn:
                rows = conn.execute(sql).fetchall()
                if rows:
                    return rows
        time.sleep(0.05)
    pytest.fail(f"no row for {sql!r} within {timeout} s")


def store_rows(db: Path) -> dict[str, dict]:
    from antidoor.experiment import Store

    with Store(db, readonly=True) as store:
        return {r["stage"] + "/" + str(r["defense"]): r for r in store.runs()}


def test_a_second_driver_is_refused_and_the_first_loses_nothing(tmp_path: Path, cli_main) -> None:
    """Two `grid` on one study folder: the second is refused at once (exit 2, one line) and the first
    finishes every stage. The study has a failing defense, so the first exits 1 (issue #10)."""
    failing = {"name": "ft", "epochs": 2, "lr": 1e30}  # diverges in its second epoch: fails at run time
    study = write_study(tmp_path / "study.yaml", defenses=[GRID["defenses"][0], failing])
    folder = tmp_path / "study"
    first = grid_process(study, "--out", folder)
    wait_for_row(folder / "study.sqlite", "SELECT key FROM runs WHERE status = 'running'")
    line = short_error(cli_main("grid", "--resume", "--out", folder))
    assert "is being run by another `antidoor grid` (pid" in line
    assert "is being run by another" in short_error(cli_main("grid", study, "--resume", "--out", folder, "--workers", "2"))
    out, err = first.communicate(timeout=180)
    assert first.returncode == 1, err  # stages failed: not a success
    assert "Traceback" not in err, err
    assert json.loads(out.strip().splitlines()[-1])["failed"] == 1
    rows = store_rows(folder / "study.sqlite")
    assert {k: r["status"] for k, r in rows.items()} == {"clean/None": "done", "attack/None": "done",
                                                         "purify/ft#1": "done", "purify/ft#2": "failed"}
    assert all(r["attempts"] == 1 for r in rows.values())
    assert not list(folder.glob("artifacts/*/.*.tmp"))
    # the lock died with the first driver: a resume runs (the failing stage fails again: exit 1)
    res = cli_main("grid", "--resume", "--out", folder, "--quiet")
    assert res.returncode == 1 and json.loads(res.stdout.strip().splitlines()[-1])["reused"] == 3


def test_lock_is_held_for_the_run_and_released_by_a_killed_driver(tmp_path: Path, cli_main) -> None:
    from antidoor.experiment.runner import driver_lock

    folder = tmp_path / "study"
    with driver_lock(folder):
        assert "is being run by another" in short_error(cli_main("grid", write_study(tmp_path / "s.yaml"), "--out", folder))
        assert not (folder / "study.sqlite").exists()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from antidoor.experiment.runner import driver_lock\n"
                               f"with driver_lock(Path({str(folder)!r})):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match="is being run by another"):
        with driver_lock(folder):
            pass
    holder.kill()  # SIGKILL: the kernel drops the lock
    holder.wait()
    with driver_lock(folder):
        pass


@pytest.mark.parametrize(("args", "expected"), [
    (["--device", "tpu"], "study device: device 'tpu' is not"),
    (["--backend", "ray", "--address", "127.0.0.1:1"], "--address '127.0.0.1:1': nothing answers there"),
    (["--backend", "ray", "--address", "nohost"], "expected HOST:PORT"),
])
def test_grid_refuses_before_creating_anything(tmp_path: Path, cli_main, args: list[str], expected: str) -> None:
    study = write_study(tmp_path / "study.yaml")
    t0 = time.perf_counter()
    assert expected in short_error(cli_main("grid", study, "--out", tmp_path / "study", *args))
    assert time.perf_counter() - t0 < 15
    assert not (tmp_path / "study").exists()


def test_ray_address_that_accepts_but_never_answers_fails_fast(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        study = write_study(tmp_path / "study.yaml")
        os.environ["ANTIDOOR_RAY_CONNECT_TIMEOUT"] = "3"
        try:
            res, _, seconds = run_measured("grid", study, "--out", tmp_path / "study", "--backend", "ray",
                                           "--address", f"127.0.0.1:{silent.getsockname()[1]}", timeout=90)
        finally:
            del os.environ["ANTIDOOR_RAY_CONNECT_TIMEOUT"]
    finally:
        silent.close()
    assert "no Ray cluster answered within 3 s" in res.error_line()
    assert seconds < 60 and not (tmp_path / "study").exists()


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute", ".hidden", "a/b"])
def test_study_name_cannot_leave_runs(tmp_path: Path, cli_main, name: str) -> None:
    study = write_study(tmp_path / "study.yaml", name=name)
    assert "cannot be a folder under runs/" in short_error(cli_main("grid", study))
    assert list(tmp_path.iterdir()) == [study]


def test_killed_worker_is_one_lost_attempt_and_the_grid_exits_1(tmp_path: Path) -> None:
    """SIGKILL the worker running the clean model under --workers 2: that stage is failed with one attempt,
    its downstream stages failed with none, exit code 1; a resume then completes the study."""
    import signal

    study = write_study(tmp_path / "study.yaml")
    folder = tmp_path / "study"
    proc = grid_process(study, "--out", folder, "--workers", "2")
    (worker,) = wait_for_row(folder / "study.sqlite", "SELECT worker FROM runs WHERE stage = 'clean' AND status = 'running'")
    os.kill(int(worker[0].rsplit(":", 1)[1]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    rows = store_rows(folder / "study.sqlite")
    assert rows["clean/None"]["status"] == "failed" and rows["clean/None"]["attempts"] == 1
    assert rows["clean/None"]["error"].startswith("worker lost")
    assert [(rows[k]["status"], rows[k]["attempts"]) for k in ("attack/None", "purify/ft")] == [("failed", 0)] * 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run([sys.executable, "-m", "antidoor.cli", "grid", "--resume", "--out", str(folder), "--quiet",
                              "--workers", "2"], env=env, capture_output=True, text=True, timeout=180, check=False)
    assert resumed.returncode == 0, resumed.stderr
    rows = store_rows(folder / "study.sqlite")
    assert {k: (r["status"], r["attempts"]) for k, r in rows.items()} == {
        "clean/None": ("done", 2), "attack/None": ("done", 1), "purify/ft": ("done", 1)}


# -- 5, 7: reads never change a store; foreign, corrupt and read-only stores --------------------------

def small_store(folder: Path) -> Path:
    """A study store with one finished purification (recorded through the Store API, nothing trained)."""
    from antidoor.experiment import Store
    from antidoor.experiment.store import Metric

    folder.mkdir(parents=True, exist_ok=True)
    with Store(folder / "study.sqlite") as store:
        store.set_meta("study", {"name": "<b>bold</b>", "seeds": [0], "device": "cpu"})
        labels = {"dataset": "<img src=x onerror=alert(1)>", "model": "small_cnn-w4", "attack": "badnets", "seed": 0}
        run = store.start("k1", "purify", {"stage": "purify"}, {**labels, "defense": "ft"})
        store.finish(run, [Metric("purify", "clean_acc", 0.5), Metric("purify", "asr", 0.1)], seconds=1.0)
    return folder / "study.sqlite"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_results_and_report_leave_a_foreign_database_byte_identical(tmp_path: Path, cli_main) -> None:
    import sqlite3

    folder = tmp_path / "theirs"
    folder.mkdir()
    db = folder / "study.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
        conn.execute("INSERT INTO people VALUES ('ada')")
    conn.close()
    before = snapshot(folder)
    for args in (["results", db], ["results", folder, "--format", "json"], ["report", folder, "--out", tmp_path / "rep"],
                 ["grid", "--resume", "--out", folder], ["grid", write_study(tmp_path / "s.yaml"), "--out", folder]):
        line = short_error(cli_main(*args))
        assert "is an SQLite database but not an antidoor study store (no artifacts, meta, metrics, runs table)" in line
    assert snapshot(folder) == before
    assert not (tmp_path / "rep").exists()


def test_results_and_report_read_a_store_without_changing_it(tmp_path: Path, cli_main) -> None:
    db = small_store(tmp_path / "study")
    before = snapshot(db.parent)
    res = cli_main("results", db.parent, "--format", "csv")
    assert res.returncode == 0 and "0.5" in res.stdout
    res = cli_main("report", db.parent, "--out", tmp_path / "rep")
    assert res.returncode == 0, res.stderr
    assert snapshot(db.parent) == before  # no journal mode switched, no -wal/-shm left, nothing added
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "<img" not in md and "<b>" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md  # issue #12


@pytest.mark.parametrize("junk", [b"", b"SQLite format 3\0" + b"\xff" * 200, os.urandom(4096)])
def test_corrupt_store_is_one_line(tmp_path: Path, cli_main, junk: bytes) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "study.sqlite").write_bytes(junk)
    for args in (["results", folder], ["report", folder], ["grid", "--resume", "--out", folder]):
        line = short_error(cli_main(*args))
        assert "study store" in line
    assert (folder / "study.sqlite").read_bytes() == junk


def as_other_user(tmp_path: Path) -> list[str]:
    """A command prefix that runs without write access to folders this user made read-only: as root
    (who writes anywhere) through setpriv as 'nobody', otherwise as this user."""
    if os.geteuid() != 0:
        return []
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be shown")
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import antidoor.cli"], capture_output=True, check=False,
                           env={**os.environ}, cwd="/")
    if probe.returncode != 0:
        pytest.skip("user 'nobody' cannot import antidoor from here")
    return prefix


def test_read_only_study_folder_results_and_report(tmp_path: Path) -> None:
    import stat
    import tempfile as tf

    base = Path(tf.mkdtemp(prefix="antidoor-ro-"))  # world-readable, unlike pytest's tmp_path
    try:
        base.chmod(0o755)
        db = small_store(base / "study")
        prefix = as_other_user(tmp_path)
        for p in (db.parent, base):
            p.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        before = snapshot(db.parent)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

        def cli(*args: str | Path) -> CliResult:
            proc = subprocess.run([*prefix, sys.executable, "-m", "antidoor.cli", *map(str, args)], capture_output=True,
                                  text=True, env=env, cwd="/", timeout=120, check=False)
            return CliResult(proc.returncode, proc.stdout, proc.stderr)

        res = cli("results", db.parent, "--format", "csv")
        assert res.returncode == 0 and "0.5" in res.stdout, res.stderr
        line = short_error(cli("report", db.parent))
        assert "is not writable; choose another folder" in line  # checked before the report is built
        assert snapshot(db.parent) == before
    finally:
        for p in (base, base / "study"):
            p.chmod(0o755)
        import shutil

        shutil.rmtree(base)


# -- 4: output paths checked before any compute -------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["attack", "--model", "small_cnn", "--epochs", "1"],
    ["purify", "nothing.safetensors"],
    ["stress", "nothing.safetensors", "--backdoored", "nothing.safetensors"],
    ["demo"],
    ["evaluate", "nothing.safetensors"],
])
def test_out_that_is_a_file_is_refused_before_any_compute(tmp_path: Path, cli_main, command: list[str]) -> None:
    taken = tmp_path / "taken"
    taken.write_text("someone's notes\n")
    t0 = time.perf_counter()
    line = short_error(cli_main(*command, "--out", taken, "--device", "cpu"))
    assert "--out" in line and "is an existing file; give a folder" in line
    assert time.perf_counter() - t0 < 10  # nothing trained
    assert taken.read_text() == "someone's notes\n"
    below = short_error(cli_main(*command, "--out", taken / "sub", "--device", "cpu"))
    assert "is a file, so the folder cannot be made" in below


def test_out_whose_target_file_is_a_folder(tmp_path: Path, cli_main) -> None:
    (tmp_path / "out" / "model.safetensors").mkdir(parents=True)
    line = short_error(cli_main("attack", "--out", tmp_path / "out", "--device", "cpu"))
    assert "model.safetensors there is a folder" in line


def test_out_in_a_read_only_folder(tmp_path: Path) -> None:
    import shutil
    import tempfile as tf

    prefix = as_other_user(tmp_path)
    base = Path(tf.mkdtemp(prefix="antidoor-ro-"))
    try:
        base.chmod(0o555)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        proc = subprocess.run([*prefix, sys.executable, "-m", "antidoor.cli", "attack", "--model", "small_cnn", "--device",
                               "cpu", "--out", str(base / "run")], capture_output=True, text=True, env=env, cwd="/",
                              timeout=120, check=False)
        line = short_error(CliResult(proc.returncode, proc.stdout, proc.stderr))
        assert "its parent" in line and "is not writable; choose another folder" in line
        assert list(base.iterdir()) == []
    finally:
        base.chmod(0o755)
        shutil.rmtree(base)


# -- 6, 7, 9, 11: checkpoints, their splits and their sidecars -----------------------------------------

def test_grid_checkpoints_work_with_evaluate_and_purify(tmp_path: Path, cli_main) -> None:
    """A study's backdoored model is evaluated on the study's own subset (same metrics as the grid recorded) and
    purified on its recorded split; --data naming the same dataset means the same subset, not the full set."""
    from antidoor.experiment import STORE_NAME, Store, load_study, run_grid

    folder = tmp_path / "study"
    assert run_grid(load_study(base={**GRID, "defenses": []}), folder).failed == 0
    with Store(folder / STORE_NAME, readonly=True) as store:
        (attack_run,) = store.runs("attack")
        recorded = {m["name"]: m["value"] for m in store.metrics(attack_run["id"])
                    if m["stage"] == "attack" and m["step"] is None}
        (ckpt,) = [folder / a["path"] for a in store.artifacts(attack_run["id"])]
    for extra in ([], ["--data", "cifar10-mini"]):
        res = cli_main("evaluate", ckpt, "--device", "cpu", "--out", tmp_path / "eval", *extra)
        assert res.returncode == 0, res.stderr
        metrics = json.loads(res.stdout.strip().splitlines()[-1])
        assert metrics == pytest.approx({k: recorded[k] for k in metrics}, abs=1e-6)
    res = cli_main("purify", ckpt, "--defense", "ft", "--set", "defense.epochs=1", "--set", "defense.batch_size=16",
                   "--device", "cpu", "--quiet",
                   "--out", tmp_path / "purified")
    assert res.returncode == 0, res.stderr


def checkpoint_with_splits(tmp_path: Path, bundled, **splits: object) -> Path:
    from antidoor.checkpoint import save_checkpoint
    from antidoor.data import Splits
    from antidoor.models import build_model

    npz = save_npz(tmp_path / "data.npz", **real_arrays(bundled))
    parts = {"defender_train": torch.arange(0, 8), "defender_val": torch.arange(8, 10), "poison": torch.arange(10, 30)}
    parts.update(splits)
    meta = {"dataset": {"config": {"name": str(npz)}, "image_shape": [3, 32, 32], "n_train": 200}, "seed": 0}
    return save_checkpoint(tmp_path / "ckpt" / "model.safetensors", build_model("small_cnn", 10, 3, width=4), meta,
                           splits=Splits(**parts))


@pytest.mark.parametrize(("change", "expected"), [
    ({"poison": torch.arange(190, 210)}, "split.poison holds indices 190..209; allowed: 0..199"),
    ({"defender_train": torch.arange(0, 8).float()}, "split.defender_train must be a 1-D tensor of integer indices"),
    ({"defender_val": torch.tensor([-1, 9])}, "split.defender_val holds indices -1..9; allowed: >= 0"),
    ({"poison": torch.arange(0, 20)}, "split.defender_train and split.poison share 8 indices"),
    ({"defender_train": torch.arange(8, 10)}, "split.defender_train and split.defender_val share 2 indices"),
    ({"poison": torch.arange(10, 30).reshape(4, 5)}, "must be a 1-D tensor"),
    ({"defender_train": torch.tensor([1, 1, 2])}, "split.defender_train repeats indices"),
    ({"defender_train": torch.zeros(0, dtype=torch.int64)}, "split.defender_train is empty"),
    ({"defender_train": torch.ones(10, dtype=torch.uint8)}, "integer indices"),
])
def test_bad_split_indices_are_refused(tmp_path: Path, bundled, cli_main, change: dict, expected: str) -> None:
    ckpt = checkpoint_with_splits(tmp_path, bundled, **change)
    before = snapshot(ckpt.parent)
    line = short_error(cli_main("purify", ckpt, "--defense", "ft", "--device", "cpu", "--out", tmp_path / "out"))
    assert expected in line
    assert snapshot(ckpt.parent) == before and not (tmp_path / "out").exists()


def test_a_sidecar_cannot_start_a_download_or_make_folders(tmp_path: Path, cli_main) -> None:
    from antidoor.checkpoint import save_checkpoint
    from antidoor.models import build_model

    root = tmp_path / "downloads"
    meta = {"dataset": {"config": {"name": "mnist", "root": str(root), "download": True}, "image_shape": [1, 28, 28]}}
    ckpt = save_checkpoint(tmp_path / "c" / "model.safetensors", build_model("small_cnn", 10, 1, width=4), meta)
    for command in (["evaluate", ckpt], ["purify", ckpt, "--defense", "ft", "--out", tmp_path / "p"]):
        line = short_error(cli_main(*command, "--device", "cpu"))
        assert "dataset 'mnist' not found" in line and "data.download=true" in line
    assert not root.exists()


def test_misleading_messages_are_gone(tmp_path: Path, cli_main) -> None:
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    assert "is a folder; give a file" in short_error(cli_main("evaluate", folder))
    (tmp_path / "data.npz").mkdir()
    assert "data file" in (line := short_error(cli_main("attack", "--data", tmp_path / "data.npz"))) and "is a folder" in line
    rng = np.random.default_rng(0)
    for i in range(5):  # random bytes are not "pickled Python objects"
        junk = tmp_path / f"junk{i}.pt"
        junk.write_bytes(rng.bytes(2000))
        (tmp_path / f"junk{i}.json").write_text("{}")
        line = short_error(cli_main("evaluate", junk))
        assert "is not a readable PyTorch file" in line and "pickled" not in line
