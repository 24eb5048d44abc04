"""Shared fixtures: the bundled real data (loaded once), real subsets of it, the shared real files
beside the repository, one BadNets model trained once per session and a helper to run the CLI.

Everything that poses as data is real: CIFAR-10 images from the bundled ``cifar10-mini`` or the
files in ``<repo>/../shared/data``. Synthetic tensors appear only in pure shape tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from antidoor.data import ImageData, load_dataset
from antidoor.utils import keep_freed_memory

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
# CI runs in a fresh clone with ../shared beside the repository.
SHARED_DATA = REPO_DIR.parent / "shared" / "data"

# Tiny models train 10-80x faster on one thread than on two busy cores (OpenMP threads spin and
# fight over the CPUs); the CLI subprocesses get the same setting through OMP_NUM_THREADS.
# Set OMP_NUM_THREADS yourself to choose another count. So one process uses one core: `make test` runs one
# pytest-xdist worker per core, each with its own copy of the session fixtures below.
THREADS = int(os.environ.get("OMP_NUM_THREADS", "1"))
torch.set_num_threads(THREADS)
keep_freed_memory()  # as the CLI and every grid job do

# The session's trained BadNets model (see ``badnets_run``), measured before choosing thresholds:
# over seeds 0-11 this recipe gives asr 0.947-0.988, clean_acc 0.31-0.35, and sends 9-26% of clean
# non-target test images to the target. Width 8 is faster but one seed in six stalls (asr ~0.6,
# the model leaning towards the target class); the default pratio 0.1 needs many more epochs on
# the full 5,000 images (8 epochs at width 8: asr 0.31-0.94).
E2E_RECIPE = {"n_train": 2000, "epochs": 4, "lr": 0.05, "pratio": 0.2, "width": 16, "seed": 0}


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared real data {path} is absent (expected <repo>/../shared/data/{name})")
    return path


@pytest.fixture(scope="session")
def bundled() -> ImageData:
    """The bundled cifar10-mini (5,000 train + 1,000 test real CIFAR-10 images), loaded once."""
    return load_dataset("cifar10-mini")


def _subset(data: ImageData, n_train: int | None = None, n_test: int | None = None, seed: int = 0,
            classes: list[int] | None = None, name: str | None = None) -> ImageData:
    """A real subset of ``data``: optionally some classes only (relabelled 0..k-1), then a seeded draw."""
    g = torch.Generator().manual_seed(seed)

    def pick(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if classes is not None:
            keep = torch.isin(y, torch.tensor(classes))
            x, y = x[keep], y[keep]
            y = torch.tensor([classes.index(int(c)) for c in y], dtype=torch.int64)
        if n is not None and n < len(x):
            idx = torch.randperm(len(x), generator=g)[:n].sort().values
            x, y = x[idx], y[idx]
        return x, y

    x_train, y_train = pick(data.x_train, data.y_train, n_train)
    x_test, y_test = pick(data.x_test, data.y_test, n_test)
    names = [data.classes[c] for c in classes] if classes is not None else list(data.classes)
    return ImageData(name or f"{data.name}-subset", x_train, y_train, x_test, y_test, names, hflip=data.hflip)


@pytest.fixture(scope="session")
def subset() -> Callable[..., ImageData]:
    """``subset(data, n_train, n_test, seed=0, classes=None)``: a real, seeded subset of a dataset."""
    return _subset


@pytest.fixture(scope="session")
def fixture500() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """500 real CIFAR-10 test images (50 per class) from the shared data, as uint8 NCHW."""
    with np.load(shared_file("cifar10-fixture500.npz")) as f:
        x = torch.from_numpy(np.ascontiguousarray(f["x"].transpose(0, 3, 1, 2)))
        return x, torch.from_numpy(f["y"].astype(np.int64)), [str(c) for c in f["classes"]]


@pytest.fixture(scope="session")
def mnist_npz_arrays() -> dict[str, np.ndarray]:
    """A real MNIST subset from the shared data: digits 5..9 relabelled 0..4, 60 train and 20 test per class."""
    with np.load(shared_file("mnist.npz")) as f:
        out = {}
        for split, n in (("train", 60), ("test", 20)):
            x, y = f[f"x_{split}"], f[f"y_{split}"]
            idx = np.sort(np.concatenate([np.flatnonzero(y == d)[:n] for d in range(5, 10)]))
            out[f"x_{split}"], out[f"y_{split}"] = x[idx], (y[idx] - 5).astype(np.uint8)
        out["classes"] = np.array([str(d) for d in range(5, 10)])
        return out


@dataclass
class TrainedRun:
    result: object  # antidoor.pipeline.AttackResult
    cfg: object  # antidoor.config.AttackRunConfig
    data: ImageData


@pytest.fixture(scope="session")
def badnets_run(bundled: ImageData) -> TrainedRun:
    """small_cnn (width 16) trained with BadNets on 2,000 real bundled images, once per session, on the CPU."""
    from antidoor.config import AttackRunConfig, build_config
    from antidoor.pipeline import Scenario, train_attack

    r = E2E_RECIPE
    data = _subset(bundled, r["n_train"], None, seed=0, name="cifar10-mini-2k")
    cfg = build_config(AttackRunConfig, overrides=[
        "model.name=small_cnn", f"model.width={r['width']}", f"train.epochs={r['epochs']}", f"train.lr={r['lr']}",
        f"attack.pratio={r['pratio']}", "attack.name=badnets", "attack.target=0", f"seed={r['seed']}", "device=cpu"])
    scenario = Scenario.build(cfg.data, cfg.attack, cfg.seed, "cpu", data=data)
    return TrainedRun(train_attack(cfg, scenario), cfg, data)


@pytest.fixture(scope="session")
def clean_run(bundled: ImageData, badnets_run: TrainedRun) -> TrainedRun:
    """The clean reference of ``badnets_run``: same 2,000 images, recipe, seed and defender split, nothing poisoned."""
    from antidoor.config import AttackRunConfig, build_config
    from antidoor.pipeline import Scenario, train_attack

    cfg = build_config(AttackRunConfig, base=badnets_run.cfg.model_dump(), overrides=["attack.pratio=0"])
    scenario = Scenario.build(cfg.data, cfg.attack, cfg.seed, "cpu", data=badnets_run.data)
    return TrainedRun(train_attack(cfg, scenario, description="clean reference"), cfg, badnets_run.data)


@pytest.fixture(scope="session")
def saved_run(badnets_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's trained model saved as a checkpoint (model.safetensors + model.json)."""
    from antidoor.checkpoint import save_checkpoint
    from antidoor.pipeline import run_meta

    res = badnets_run.result
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return save_checkpoint(path, res.model, run_meta(badnets_run.cfg, res), res.scenario.attack, res.scenario.splits)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """Assert the CLI's contract for bad input and return its one ``error:`` line."""
        assert self.returncode == 2, f"exit code {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}"
        assert "Traceback" not in self.stderr and "Traceback" not in self.stdout, self.stderr
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1, f"expected one 'error:' line, got: {self.stderr!r}"
        return errors[0]


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., CliResult]:
    """Run ``python -m antidoor.cli ARGS`` in a real subprocess (the installed package, the real entry point)."""

    def run(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> CliResult:
        env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": str(THREADS)}
        proc = subprocess.run([sys.executable, "-m", "antidoor.cli", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=timeout, check=False)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


def invoke_main(*args: str | Path, cwd: Path | None = None) -> CliResult:
    """Run the console entry point ``antidoor.cli.main`` in this process (in ``cwd`` if given), capturing its
    output; an uncaught exception propagates (as a traceback would). It takes the same arguments as ``run_cli``,
    so a parametrized test can send its first case through a real subprocess and the rest through this, which
    spares each the 2 s a new interpreter spends importing torch."""
    from antidoor.cli import main
    from antidoor.utils import set_quiet

    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    sys.argv = ["antidoor", *map(str, args)]
    if cwd is not None:
        os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(here)
        set_quiet(False)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli_main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., CliResult]:
    """``invoke_main`` (for the long tail of bad input; the main cases run in real subprocesses), in a
    temporary working directory. An uncaught exception fails the test, as a traceback would."""
    monkeypatch.chdir(tmp_path)
    return invoke_main
