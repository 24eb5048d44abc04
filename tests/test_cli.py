"""cli.py through real subprocesses (``python -m antidoor.cli``): successful runs on real data, and
bad input answered with exit code 2 and one ``error:`` line, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from antidoor.attacks import ATTACKS
from antidoor.checkpoint import load_checkpoint
from antidoor.cli import app
from antidoor.data import ImageData, load_dataset
from antidoor.models import build_model
from conftest import invoke_main

ATTACK_NAMES = ", ".join(ATTACKS.names())  # every registered attack, as errors list them

TINY = ["--model", "small_cnn", "--width", "8", "--epochs", "1", "--device", "cpu", "--quiet"]


def write_npz(data: ImageData, path: Path) -> Path:
    """An .npz in the documented layout (uint8 NHWC images, integer labels, class names)."""
    np.savez(path, x_train=data.x_train.permute(0, 2, 3, 1).numpy(), y_train=data.y_train.numpy().astype(np.uint8),
             x_test=data.x_test.permute(0, 2, 3, 1).numpy(), y_test=data.y_test.numpy().astype(np.uint8),
             classes=np.array(data.classes))
    return path


def json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def mini_npz(bundled: ImageData, subset: object, workdir: Path) -> Path:
    """600 training and 200 test images of the bundled real CIFAR-10, all ten classes."""
    return write_npz(subset(bundled, 600, 200, seed=2, name="mini"), workdir / "mini.npz")


@pytest.fixture(scope="module")
def mini_run(run_cli: object, mini_npz: Path, workdir: Path) -> Path:
    out = workdir / "run"
    res = run_cli("attack", "--data", mini_npz, "--attack", "badnets", "--pratio", "0.1", *TINY, "--out", out, cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    (out / "stdout.json").write_text(res.stdout)
    return out


# --- successful runs ----------------------------------------------------------------------------


def test_attack_writes_checkpoint_sidecar_and_metrics(mini_run: Path, mini_npz: Path) -> None:
    assert {"model.safetensors", "model.json", "metrics.json"} <= {p.name for p in mini_run.iterdir()}
    metrics = json.loads((mini_run / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"clean_acc", "asr", "robust_acc"}
    assert len(metrics["history"]) == 1 and metrics["config"]["model"] == {"name": "small_cnn", "width": 8}
    assert json_line((mini_run / "stdout.json").read_text()) == metrics["metrics"]
    ckpt = load_checkpoint(mini_run / "model.safetensors")
    assert ckpt.meta["dataset"]["source"]["path"] == str(mini_npz)
    assert ckpt.meta["dataset"]["n_train"] == 600 and ckpt.meta["dataset"]["n_poison"] == 60
    assert ckpt.attack is not None and ckpt.attack.name == "badnets" and ckpt.splits is not None
    assert ckpt.meta["metrics"] == metrics["metrics"]


def test_evaluate_reproduces_the_attack_metrics(run_cli: object, mini_run: Path, workdir: Path) -> None:
    res = run_cli("evaluate", mini_run / "model.safetensors", "--device", "cpu", "--quiet", cwd=workdir)
    assert res.returncode == 0, res.stderr
    expected = json.loads((mini_run / "metrics.json").read_text())["metrics"]
    assert json_line(res.stdout) == expected  # same model, data and trigger on the CPU: identical numbers
    written = json.loads((mini_run / "model.metrics.json").read_text())
    assert written["metrics"] == expected and written["attack"]["name"] == "badnets"


@pytest.mark.parametrize("attack", ["blended", "sig", "wanet", "none"])
def test_evaluate_under_another_attack(run_cli: object, mini_run: Path, workdir: Path, attack: str) -> None:
    out = workdir / f"eval-{attack}"
    res = run_cli("evaluate", mini_run / "model.safetensors", "--attack", attack, "--device", "cpu", "--quiet", "--out", out,
                  cwd=workdir)
    assert res.returncode == 0, res.stderr
    metrics = json_line(res.stdout)
    assert set(metrics) == ({"clean_acc"} if attack == "none" else {"clean_acc", "asr", "robust_acc"})
    written = json.loads((out / "model.metrics.json").read_text())
    assert written["attack"]["name"] == attack and written["metrics"] == metrics


def test_fitted_trigger_is_reused_by_evaluate_without_refitting(run_cli: object, mini_npz: Path, workdir: Path) -> None:
    """An attack that fits its trigger (LF) fits it once in `attack`; `evaluate` rebuilds it from the checkpoint."""
    out = workdir / "lf"
    fit = ["--set", "attack.surrogate_width=4", "--set", "attack.surrogate_epochs=1", "--set", "attack.steps=5"]
    res = run_cli("attack", "--data", mini_npz, "--attack", "lf", *fit, *TINY[:-1], "--out", out, cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert "fitting the lf trigger" in res.stderr
    meta = json.loads((out / "model.json").read_text())
    assert meta["attack"]["name"] == "lf" and "surrogate_fooling_rate" in meta["attack_fit"]
    again = run_cli("evaluate", out / "model.safetensors", "--device", "cpu", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "fitting" not in again.stderr and "not been fitted" not in again.stderr
    assert json_line(again.stdout) == json_line(res.stdout)


def test_clean_reference_with_attack_none(cli_main: object, mini_npz: Path, tmp_path: Path) -> None:
    """`--attack none` alone trains the clean reference (its pratio defaults to 0)."""
    res = cli_main("attack", "--attack", "none", "--data", mini_npz, *TINY, "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    assert set(json_line(res.stdout)) == {"clean_acc"}
    shown = " ".join(res.stderr.split())  # the table, its title wrapped to the table's width
    assert "clean model on mini" in shown and "none on" not in shown
    ckpt = load_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.meta["dataset"]["n_poison"] == 0 and ckpt.attack.name == "none" and len(ckpt.splits.poison) == 0


def test_clean_reference_is_not_called_by_its_attack(cli_main: object, mini_npz: Path, tmp_path: Path) -> None:
    """`--pratio 0` keeps the attack's trigger for asr; the table calls the model a clean reference, not 'badnets'."""
    res = cli_main("attack", "--attack", "badnets", "--pratio", "0", "--data", mini_npz, *TINY, "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    assert set(json_line(res.stdout)) == {"clean_acc", "asr", "robust_acc"}
    shown = " ".join(res.stderr.split())
    assert "clean reference on mini (asr: badnets trigger)" in shown and "badnets on" not in shown


def test_npz_with_four_classes_and_a_yaml_config(run_cli: object, cli_main: object, bundled: ImageData, subset: object,
                                                 workdir: Path) -> None:
    """Another .npz (4 real CIFAR-10 classes) through the CLI; YAML file < --set < explicit options."""
    data = subset(bundled, 400, 120, classes=[3, 5, 7, 9], name="four")
    four = write_npz(data, workdir / "four.npz")
    config = workdir / "four.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": str(four), "clean_ratio": 0.1},
        "model": {"name": "small_cnn", "width": 16},
        "attack": {"name": "blended", "target": 1, "alpha": 0.3},
        "train": {"epochs": 3, "lr": 0.02, "batch_size": 64},
    }))
    out = workdir / "four-run"
    res = run_cli("attack", "--config", config, "--set", "train.lr=0.03", "--set", "attack.target=2", "--target", "3",
                  "--width", "8", "--epochs", "1", "--device", "cpu", "--quiet", "--out", out, cwd=workdir)
    assert res.returncode == 0, res.stderr
    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.model.arch["num_classes"] == 4 and ckpt.meta["classes"] == ["cat", "dog", "horse", "truck"]
    cfg = ckpt.meta["config"]
    assert cfg["attack"]["name"] == "blended" and cfg["attack"]["alpha"] == 0.3  # from the file
    assert cfg["data"]["clean_ratio"] == 0.1 and cfg["train"]["batch_size"] == 64  # from the file
    assert cfg["train"]["lr"] == 0.03  # --set beats the file
    assert cfg["attack"]["target"] == 3 and ckpt.attack.target == 3  # --target beats --set
    assert cfg["model"]["width"] == 8 and cfg["train"]["epochs"] == 1  # explicit options beat the file
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 1
    per_class = torch.bincount(data.y_train).tolist()
    n_defender = ckpt.meta["dataset"]["n_defender_train"] + ckpt.meta["dataset"]["n_defender_val"]
    assert n_defender == sum(round(0.1 * n) for n in per_class)  # data.clean_ratio from the file
    bad = cli_main("attack", "--data", four, "--target", "4", *TINY, "--out", workdir / "x")
    assert "attack.target 4 is not a class; allowed: 0..3" in bad.error_line()


def test_grayscale_mnist_npz_end_to_end(run_cli: object, cli_main: object, mnist_npz_arrays: dict, workdir: Path) -> None:
    """Real grayscale 28x28 digits, five classes relabelled 0..4, with WaNet and no flips; then evaluate."""
    path = workdir / "digits.npz"
    np.savez(path, **mnist_npz_arrays)
    out = workdir / "digits-run"
    res = run_cli("attack", "--data", path, "--set", "data.hflip=false", "--set", "attack.name=wanet", "--target", "4",
                  *TINY, "--out", out, cwd=workdir)
    assert res.returncode == 0, res.stderr
    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.model.arch["in_channels"] == 1 and ckpt.model.arch["num_classes"] == 5
    assert ckpt.meta["dataset"]["image_shape"] == [1, 28, 28] and ckpt.meta["dataset"]["hflip"] is False
    assert ckpt.attack.tensors["grid"].shape == (1, 28, 28, 2)
    ev = run_cli("evaluate", out / "model.safetensors", "--device", "cpu", "--quiet", cwd=workdir)
    assert ev.returncode == 0, ev.stderr
    assert json_line(ev.stdout) == json.loads((out / "metrics.json").read_text())["metrics"]
    # a grayscale model cannot be measured on colour data
    wrong = cli_main("evaluate", out / "model.safetensors", "--data", "cifar10-mini", "--device", "cpu")
    assert "1-channel images and 5 classes" in wrong.error_line()


def test_image_folder_through_the_cli(run_cli: object, bundled: ImageData, workdir: Path) -> None:
    from PIL import Image

    root = workdir / "folder"
    for split, x, y in (("train", bundled.x_train, bundled.y_train), ("test", bundled.x_test, bundled.y_test)):
        for c in (0, 1, 8):
            d = root / split / bundled.classes[c]
            d.mkdir(parents=True)
            for i, img in enumerate(x[y == c][: 40 if split == "train" else 10]):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    out = workdir / "folder-run"
    res = run_cli("attack", "--data", root, *TINY, "--out", out, cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(out / "model.safetensors").meta["classes"] == ["airplane", "automobile", "ship"]


@pytest.mark.parametrize("command", [None, *[c.name or c.callback.__name__ for c in app.registered_commands]])
def test_help(run_cli: object, command: str | None) -> None:
    run = run_cli if command in (None, "attack") else invoke_main  # two through a real subprocess, the rest in-process
    res = run(*([command] if command else []), "--help")
    assert res.returncode == 0, res.stderr
    assert "--help" in res.stdout
    if command in ("attack", "evaluate"):
        assert "--set" in res.stdout and "--config" in res.stdout and "--device" in res.stdout


def test_help_lists_the_commands(run_cli: object) -> None:
    out = run_cli("--help").stdout
    assert all(name in out for name in ("attack", "evaluate", "demo"))


# --- bad input ----------------------------------------------------------------------------------


BAD_ATTACK_INPUT = [
    (["--set", "attack.name=nope"], f"unknown attack 'nope'; available: {ATTACK_NAMES}"),
    (["--pratio", "1.5"], "attack.pratio = 1.5"),
    (["--target", "12"], "attack.target 12 is not a class; allowed: 0..9"),
    (["--model", "nope"], "unknown model 'nope'; available:"),
    (["--set", "train.nope=1"], "train.nope: unknown key"),
    (["--set", "attack.pratio"], "--set 'attack.pratio': expected key=value"),
    (["--set", "attack.name=lc", "--set", "attack.eps=0"], "attack.eps = 0"),
    (["--set", "attack.name=trojannn", "--set", "attack.surrogate_model=vit"], "attack.surrogate_model 'vit' is not a model"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_ATTACK_INPUT)
def test_attack_bad_input(run_cli: object, workdir: Path, args: list[str], expected: str) -> None:
    run = run_cli if args == BAD_ATTACK_INPUT[0][0] else invoke_main  # the first through a real subprocess
    res = run("attack", *args, "--out", workdir / "never", cwd=workdir)
    line = res.error_line()
    assert expected in line, line
    assert len([s for s in res.stderr.splitlines() if s.strip()]) == 1, res.stderr
    assert not (workdir / "never").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--attack", "nope"], f"unknown attack 'nope'; available: {ATTACK_NAMES}"),
    (["--pratio", "-0.1"], "attack.pratio = -0.1"),
    (["--set", "nope=1"], "nope: unknown key"),
    (["--set", "attack.alpha=0.5"], "attack.alpha: unknown key"),
    (["--set", "=1"], "bad key"),
    (["--epochs", "0"], "train.epochs = 0"),
    (["--width", "0"], "model.width = 0"),
    (["--data", "no_such_file.npz"], "data file 'no_such_file.npz' does not exist"),
    (["--data", "imagenet"], "data.name 'imagenet' is neither a known dataset"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--attack", "none", "--pratio", "0.1"], "attack 'none' poisons nothing"),
])
def test_attack_more_bad_input(cli_main: object, tmp_path: Path, args: list[str], expected: str) -> None:
    res = cli_main("attack", *args, "--out", tmp_path / "never")
    line = res.error_line()
    assert expected in line, line
    assert len([s for s in res.stderr.splitlines() if s.strip()]) == 1, res.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_attack_cuda_without_cuda(cli_main: object) -> None:
    assert "CUDA is not available" in cli_main("attack", "--device", "cuda").error_line()


def test_attack_invalid_yaml(run_cli: object, workdir: Path) -> None:
    path = workdir / "bad.yaml"
    path.write_text("model: [small_cnn,\n")
    assert "is not valid YAML" in run_cli("attack", "--config", path, cwd=workdir).error_line()


@pytest.mark.parametrize(("text", "expected"), [
    ("- a\n- b\n", "must hold a mapping"),
    ("train:\n  lr: 0.1\n  warmup_epochs: 3\n", "train.warmup_epochs: unknown key"),
    ("attack: badnets\n", "attack must be a mapping"),
])
def test_attack_bad_yaml_content(cli_main: object, tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert expected in cli_main("attack", "--config", path).error_line()


def test_set_beats_yaml_and_options_beat_set(cli_main: object, tmp_path: Path) -> None:
    path = tmp_path / "target.yaml"
    path.write_text("attack: {target: 3}\n")
    assert "attack.target 12 is not" in cli_main("attack", "--config", path, "--set", "attack.target=12").error_line()
    res = cli_main("attack", "--config", path, "--set", "attack.target=12", "--target", "11")
    assert "attack.target 11 is not" in res.error_line()


def test_evaluate_missing_checkpoint(run_cli: object, workdir: Path) -> None:
    assert "does not exist" in run_cli("evaluate", workdir / "nothing.safetensors", cwd=workdir).error_line()


def test_evaluate_corrupt_checkpoint(run_cli: object, mini_run: Path, workdir: Path) -> None:
    bad = workdir / "corrupt"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((mini_run / "model.safetensors").read_bytes()[:1000])
    (bad / "model.json").write_text((mini_run / "model.json").read_text())
    line = run_cli("evaluate", bad / "model.safetensors", cwd=workdir).error_line()
    assert "is not a valid safetensors file" in line


def test_evaluate_missing_sidecar(run_cli: object, mini_run: Path, workdir: Path) -> None:
    lonely = workdir / "lonely"
    lonely.mkdir()
    (lonely / "model.safetensors").write_bytes((mini_run / "model.safetensors").read_bytes())
    assert "has no sidecar" in run_cli("evaluate", lonely / "model.safetensors", cwd=workdir).error_line()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_evaluate_refuses_a_malicious_pickle(run_cli: object, mini_run: Path, workdir: Path) -> None:
    evil = workdir / "evil"
    evil.mkdir()
    marker = workdir / "PWNED"
    (evil / "model.json").write_text((mini_run / "model.json").read_text())
    state = build_model("small_cnn", 10, width=8).state_dict()
    torch.save({**state, "payload": _RunsCode(marker)}, evil / "model.pt")
    line = run_cli("evaluate", evil / "model.pt", cwd=workdir).error_line()
    assert "refusing to load" in line and "pickled Python objects" in line
    assert not marker.exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "attack.name=nope"], "unknown attack 'nope'"),
    (["--set", "model.width=8"], "model: unknown key"),
    (["--set", "attack.target=10"], "attack.target 10 is not a class"),
    (["--data", "no_such.npz"], "does not exist"),
])
def test_evaluate_bad_input(cli_main: object, mini_run: Path, args: list[str], expected: str) -> None:
    assert expected in cli_main("evaluate", mini_run / "model.safetensors", *args, "--device", "cpu").error_line()


def test_bundled_default_dataset_is_found_by_the_cli(cli_main: object) -> None:
    """Without --data the bundled cifar10-mini is loaded (the bad target is refused only once it is known)."""
    assert load_dataset("cifar10-mini").num_classes == 10
    assert "allowed: 0..9" in cli_main("attack", "--target", "10", "--model", "small_cnn").error_line()


@pytest.mark.parametrize(("args", "message"), [
    (["attack", "--pratio", "abc"], "Invalid value for '--pratio'"),
    (["no-such-command"], "No such command"),
    (["purify"], "Missing argument"),
])
def test_usage_errors_are_one_line_with_exit_2(run_cli, args, message):
    line = run_cli(*args).error_line()  # exit 2, no traceback, exactly one error line
    assert message in line and "--help" in line
