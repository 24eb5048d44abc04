"""The ``antidoor`` command line: attack, evaluate, demo.

Every command takes ``--config FILE.yaml``, ``--set key=value`` overrides (validated), ``--device``,
``--seed`` and ``--out``. Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from antidoor.errors import AntidoorError
from antidoor.utils import console, set_quiet

app = typer.Typer(
    name="antidoor", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Backdoor purification that holds up under attack: implant, purify, measure, stress, report.",
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (sections: data, model, attack, train, ...)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config key, e.g. --set attack.pratio=0.05 (repeatable)")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: auto)")
SeedOpt = typer.Option(None, "--seed", help="random seed (default 0)")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars or info messages")


def _metrics_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="left" if c in ("model", "attack", "defense") else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in columns])
    return table


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if 0 <= v <= 1 else f"{v:.3g}"
    return str(v)


@app.command()
def attack(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    attack_name: str = typer.Option(None, "--attack", help="attack name (see `antidoor attack --help`; 'none' = clean)"),
    pratio: float = typer.Option(None, "--pratio", help="poisoned fraction of the training set in [0, 1); 0 = clean reference"),
    target: int = typer.Option(None, "--target", help="target class index"),
    model: str = typer.Option(None, "--model", help="architecture: preact_resnet18, resnet18, vgg16_bn, small_cnn"),
    width: int = typer.Option(None, "--width", help="channels of the model's first stage"),
    epochs: int = typer.Option(None, "--epochs", help="training epochs"),
    data: str = typer.Option(None, "--data", help="cifar10-mini (bundled), a .npz path, an image folder or a torchvision name"),
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("runs/attack"), "--out", "-o", help="output folder"),
    quiet: bool = QuietOpt,
) -> None:
    """Train a backdoored model (or a clean reference with --pratio 0 or --attack none)."""
    from antidoor.checkpoint import save_checkpoint
    from antidoor.config import AttackRunConfig, build_config
    from antidoor.pipeline import run_meta, train_attack
    from antidoor.utils import atomic_write_json

    set_quiet(quiet)
    cfg = build_config(AttackRunConfig, config, set_, attack__name=attack_name, attack__pratio=pratio, attack__target=target,
                       model__name=model, model__width=width, train__epochs=epochs, data__name=data, device=device, seed=seed)
    result = train_attack(cfg)
    meta = run_meta(cfg, result)
    save_checkpoint(out / "model.safetensors", result.model, meta, result.scenario.attack, result.scenario.splits)
    atomic_write_json(out / "metrics.json", {"metrics": result.metrics, "history": result.history, "config": cfg.model_dump()})
    console.print(_metrics_table(f"{cfg.attack['name']} on {result.scenario.data.name}", [result.metrics],
                                 ["clean_acc", "asr", "robust_acc"]))
    console.print(f"wrote {out / 'model.safetensors'} (+ model.json, metrics.json)")
    print_json_line(result.metrics)


def print_json_line(obj: dict[str, Any]) -> None:
    """Machine-readable result on stdout (tables and messages go to stderr)."""
    import json

    sys.stdout.write(json.dumps(obj) + "\n")


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="a .safetensors checkpoint with its .json sidecar"),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    attack_name: str = typer.Option(None, "--attack", help="evaluate under this attack instead of the checkpoint's own"),
    data: str = typer.Option(None, "--data", help="test data (default: the checkpoint's dataset)"),
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    out: Path = typer.Option(None, "--out", "-o", help="folder for metrics.json (default: beside the checkpoint)"),
    quiet: bool = QuietOpt,
) -> None:
    """Print and save clean_acc, asr and robust_acc of a checkpoint under an attack."""
    from antidoor.checkpoint import load_checkpoint
    from antidoor.config import EvaluateConfig, build_config
    from antidoor.data import load_dataset
    from antidoor.metrics import Evaluator
    from antidoor.utils import atomic_write_json, resolve_device

    set_quiet(quiet)
    ckpt = load_checkpoint(checkpoint)
    base = {"data": ckpt.meta.get("dataset", {}).get("config", {}), "attack": ckpt.meta.get("attack") or {"name": "none", "pratio": 0}}
    base["attack"] = {k: v for k, v in base["attack"].items()}
    cfg = build_config(EvaluateConfig, config, set_, base=base, attack__name=attack_name, data__name=data, device=device, seed=seed)
    dev = resolve_device(cfg.device)
    d = cfg.data
    dataset = load_dataset(d.name, d.root, d.download, d.hflip, d.image_size)
    arch = ckpt.model.arch
    if dataset.image_shape[0] != arch["in_channels"] or dataset.num_classes != arch["num_classes"]:
        raise AntidoorError(f"checkpoint {str(checkpoint)!r} expects {arch['in_channels']}-channel images and {arch['num_classes']} classes; "
                            f"data {d.name!r} has {dataset.image_shape[0]} channels and {dataset.num_classes} classes")
    from antidoor.attacks import create_attack

    same_attack = ckpt.attack is not None and cfg.attack == {k: v for k, v in ckpt.attack.spec().items() if k != "seed"}
    atk = ckpt.attack if same_attack else create_attack({**cfg.attack, "seed": cfg.seed}, dataset.image_shape, dataset.num_classes)
    atk.to(dev)
    metrics = Evaluator(dataset.x_test.to(dev), dataset.y_test.to(dev), atk)(ckpt.model.to(dev))
    target_dir = out or checkpoint.parent
    atomic_write_json(target_dir / f"{checkpoint.stem}.metrics.json",
                      {"checkpoint": str(checkpoint), "attack": atk.spec(), "data": d.name, "metrics": metrics})
    console.print(_metrics_table(f"{checkpoint.name} under {atk.name} on {d.name}", [metrics], ["clean_acc", "asr", "robust_acc"]))
    print_json_line(metrics)


@app.command()
def demo(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="output folder"),
    quiet: bool = QuietOpt,
) -> None:
    """The main job on the bundled mini CIFAR-10, offline: train a clean and a BadNets model, evaluate both."""
    from antidoor.demo import run_demo

    set_quiet(quiet)
    run_demo(config, set_ or [], device, seed, out)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except AntidoorError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
