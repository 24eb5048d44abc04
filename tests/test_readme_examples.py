"""Every example in the README runs: its bash blocks' ``antidoor`` commands (in order, in one working
directory) and its Python blocks (in order, in one namespace), at tiny scale.

Tiny scale changes numbers only, never a command's shape: epochs, widths, rounds and seeds are
rewritten or appended as ``--set`` overrides (:data:`TINY_SET`, :func:`tiny`). Files the examples name
(``mnist.npz``, ``bd.pt``, ``study.yaml``, ...) are made from the bundled real CIFAR-10 first. Two
commands are skipped, each with the reason: one needs a Ray cluster, one a download.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from antidoor.data import load_dataset

README = Path(__file__).resolve().parents[1] / "README.md"

SKIP = {  # what cannot run here, and why
    "--backend ray": "needs a running Ray cluster (`ray start`); the Ray backend has its own tests",
    "data.download=true": "downloads CIFAR-10",
}
# appended per command (explicit options are rewritten in tiny() instead: they win over --set)
TINY_SET = {
    "attack": ["train.epochs=1", "model.width=4"],
    "demo": ["train.epochs=1", "model.width=4", "defenses=[{name: sau, rounds: 1, batch_size: 100}, {name: ep, epochs: 1}]",
             "ra.seeds=[0]", "ra.epochs=1"],
    "stress": ["ra.seeds=[0]", "ra.epochs=1", "qra.epochs=1", "qra.n_clean=50", "qra.n_poison=50", "path.points=2",
               "ep_params={epochs: 1}"],
    "grid": [],
    # the imported torchvision ResNet-18s run at full width: 200 test images instead of cifar10-mini's 1,000
    "import": ["data.name=cifar10-mini-200.npz"],
}
TINY_DEFENSE = {
    "sau": ["defense.rounds=1"],
    "ep": ["defense.epochs=1"],
    "pam": ["defense.rounds=1", "defense.pretrain_epochs=1", "defense.mask_epochs=1", "defense.generator_epochs=1",
            "defense.epochs=1", "defense.generator_width=4", "defense.rho_candidates=[0.5, 0.1]"],
}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def commands() -> list[str]:
    """The README's ``antidoor`` command lines, continuation lines joined, comments dropped, in order."""
    out = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("antidoor "):
                out.append(line)
    return out


def tiny(command: str) -> list[str]:
    args = shlex.split(command)[1:]
    for i, a in enumerate(args[:-1]):
        if a == "--epochs":
            args[i + 1] = "1"
        elif a == "--width":
            args[i + 1] = "4"
    name = args[0]
    extra = list(TINY_SET.get(name, []))
    if name == "purify":
        extra += TINY_DEFENSE.get(args[args.index("--defense") + 1], [])
    if name == "stress" and "runs/mine" in command:
        # the imported models are untrained stand-ins: the guardrails would (rightly) refuse them
        extra += ["guards.enforce=false"]
    return args + [x for s in extra for x in ("--set", s)]


def write_npz(path: Path, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, classes: list[str]) -> None:
    np.savez(path, x_train=x.permute(0, 2, 3, 1).numpy(), y_train=y.numpy(), x_test=xt.permute(0, 2, 3, 1).numpy(),
             y_test=yt.numpy(), classes=np.array(classes))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the examples name, made from the bundled real images."""
    d = tmp_path_factory.mktemp("readme")
    data = load_dataset("cifar10-mini")
    write_npz(d / "cifar10-20k.npz", data.x_train[:3000], data.y_train[:3000], data.x_test[:300], data.y_test[:300],
              data.classes)
    # cifar10-mini with the first 200 of its test images: the same training images, so poisoned.txt's indices hold
    write_npz(d / "cifar10-mini-200.npz", data.x_train, data.y_train, data.x_test[:200], data.y_test[:200], data.classes)
    gray = data.x_train.float().mean(1, keepdim=True).round().to(torch.uint8)  # a one-channel stand-in for MNIST
    gray_test = data.x_test.float().mean(1, keepdim=True).round().to(torch.uint8)
    write_npz(d / "mnist.npz", gray[:1000], data.y_train[:1000], gray_test[:300], data.y_test[:300], data.classes)
    import torchvision

    for i, name in enumerate(("bd.pt", "ft.pt", "clean.pt")):  # state dicts trained "elsewhere" (here: initialised)
        torch.manual_seed(i)
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / name)
    not_target = (data.y_train != 0).nonzero().flatten()  # a dirty-label attack poisons other classes' images
    (d / "poisoned.txt").write_text("\n".join(str(int(i)) for i in not_target[::90][:50]))
    study = yaml.safe_load(next(b for b in code_blocks("yaml") if "defenses:" in b and "seeds:" in b))
    tiny_defense = {"ft": {"epochs": 1}, "sau": {"rounds": 1}}
    study.update(seeds=[0], train={"epochs": 1}, models=[{"name": "small_cnn", "width": 4}],
                 defenses=[{**d, **tiny_defense[d["name"]]} for d in study["defenses"]])
    study["stress"] = {"ra": {"epochs": 1, "seeds": [0]}, "qra": None, "path": {"points": 2}}
    (d / "study.yaml").write_text(yaml.safe_dump(study))
    return d


def test_the_readme_has_the_examples_this_test_runs():
    cmds = commands()
    assert len(cmds) >= 20
    for name in ("attack", "evaluate", "purify", "stress", "demo", "list", "describe", "import", "grid", "results", "report"):
        assert any(shlex.split(c)[1] == name for c in cmds), name
    assert len(code_blocks("python")) >= 2


def test_every_readme_command_runs_at_tiny_scale(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    from conftest import invoke_main

    monkeypatch.chdir(workdir)
    ran = 0
    for command in commands():
        if any(key in command for key in SKIP):
            continue
        res = invoke_main(*tiny(command), "--quiet") if shlex.split(command)[1] in ("attack", "purify", "stress", "demo") \
            else invoke_main(*tiny(command))
        assert res.returncode == 0, f"{command}\n{res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr
        ran += 1
    assert ran == len(commands()) - 2


def test_the_readme_python_examples_run_at_tiny_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from antidoor.stress import StressConfig

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in code_blocks("python"):
        code = block.replace('"train.epochs=20"', '"train.epochs=1"').replace("rounds=20", "rounds=1")
        code = code.replace("seeds=[0, 1, 2]", "seeds=[0], epochs=1").replace("points=21", "points=2")
        code = code.replace("clean_model, sc)", "clean_model, sc, config=TINY_STRESS)")
        # one epoch of training leaves the backdoor too weak for the guardrails, which would (rightly) refuse it
        namespace["TINY_STRESS"] = StressConfig(ra={"epochs": 1, "seeds": [0]}, qra=None, path={"points": 2},
                                                guards={"enforce": False}, ep_params={"epochs": 1})
        exec(compile(code, str(README), "exec"), namespace)  # the README's own examples
    assert "purified" in namespace and "report" in namespace
