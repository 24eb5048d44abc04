"""The ``antidoor`` command line: attack, evaluate, purify, stress, demo; grid, results, report for studies.

Every command takes ``--config FILE.yaml``, ``--set key=value`` overrides (validated), ``--device``,
``--seed`` and ``--out``. Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.table import Table

from antidoor.errors import AntidoorError

try:  # recent typer vendors click; older ones use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions  # type: ignore[no-redef]
from antidoor.utils import console, set_quiet
from antidoor.validate import check_output_dir

CHECKPOINT_FILES = ("model.safetensors", "model.json", "metrics.json")  # what attack and purify write into --out

app = typer.Typer(
    name="antidoor", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Backdoor purification that holds up under attack: implant, purify, measure, stress, report.",
)

@app.callback()
def _plugins(plugin: list[Path] = typer.Option(None, "--plugin", help="a Python file registering your own attack (or "
                                               "defense, model); RUNS ITS CODE, so name only files you trust. Repeatable; "
                                               "e.g. antidoor --plugin my_attack.py attack --attack stripe")) -> None:
    from antidoor.plugins import load_plugin

    for p in plugin or []:
        load_plugin(p)


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (sections: data, model, attack, train, ...)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config key, e.g. --set attack.pratio=0.05 (repeatable)")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: auto)")
SeedOpt = typer.Option(None, "--seed", help="random seed (default 0)")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars or info messages")
PresetOpt = typer.Option(None, "--preset", help="a named recipe, repeatable: fast (whitened_cnn, ~88% on CIFAR-10 in minutes on "
                                                "a CPU), paper (BackdoorBench's PreAct-ResNet18, 100 epochs), paper-defender "
                                                "(2,500 clean defender images); your settings win over it")


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
    model: str = typer.Option(None, "--model", help="architecture: whitened_cnn, preact_resnet18, resnet18, vgg16_bn, small_cnn"),
    width: int = typer.Option(None, "--width", help="channels of the model's first stage"),
    epochs: int = typer.Option(None, "--epochs", help="training epochs"),
    data: str = typer.Option(None, "--data", help="cifar10-mini (bundled), a .npz path, an image folder or a torchvision name"),
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("runs/attack"), "--out", "-o", help="output folder"),
    preset: list[str] = PresetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train a backdoored model (or a clean reference with --pratio 0 or --attack none).

    Example: antidoor attack --preset fast --attack blended --pratio 0.1 --out runs/blended

    Attacks and their parameters: `antidoor list`, `antidoor describe badnets`.
    """
    from antidoor.checkpoint import save_checkpoint
    from antidoor.config import AttackRunConfig, build_config
    from antidoor.pipeline import run_meta, train_attack
    from antidoor.utils import atomic_write_json

    set_quiet(quiet)
    cfg = build_config(AttackRunConfig, config, set_, attack__name=attack_name, attack__pratio=pratio, attack__target=target,
                       model__name=model, model__width=width, train__epochs=epochs, data__name=data, device=device, seed=seed,
                       preset=preset)
    check_output_dir(out, CHECKPOINT_FILES)
    result = train_attack(cfg)
    meta = run_meta(cfg, result)
    save_checkpoint(out / "model.safetensors", result.model, meta, result.scenario.attack, result.scenario.splits)
    atomic_write_json(out / "metrics.json", {"metrics": result.metrics, "history": result.history, "config": cfg.model_dump()})
    # a clean reference's asr is measured under the attack's trigger: say so rather than call the model by the attack
    name, where = cfg.attack["name"], result.scenario.data.name
    title = (f"{name} on {where}" if cfg.attack["pratio"] else f"clean model on {where}" if name == "none"
             else f"clean reference on {where} (asr: {name} trigger)")
    console.print(_metrics_table(title, [result.metrics],
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
    """Print and save clean_acc, asr and robust_acc of a checkpoint under an attack.

    Example: antidoor evaluate runs/badnets/model.safetensors --attack blended
    """
    from antidoor.attacks import create_attack
    from antidoor.checkpoint import load_checkpoint
    from antidoor.config import EvaluateConfig, build_config
    from antidoor.pipeline import Scenario, recorded_data_config
    from antidoor.utils import atomic_write_json

    set_quiet(quiet)
    check_output_dir(out or checkpoint.parent, (f"{checkpoint.stem}.metrics.json",))
    ckpt = load_checkpoint(checkpoint)
    recorded = ckpt.meta.get("attack") or {"name": "none", "pratio": 0}
    # under another attack (--attack, --set attack.name, a config file) only the recorded target carries over,
    # not the recorded attack's own parameters (which the other attack would refuse)
    base = {"data": recorded_data_config(ckpt.meta)[0] or {},  # a study's subset is the checkpoint's own, not a key
            "attack": {"name": recorded["name"], "target": recorded.get("target", 0)}}
    options = {"attack__name": attack_name, "data__name": data, "device": device, "seed": seed}
    if build_config(EvaluateConfig, config, set_, base=base, **options).attack["name"] == recorded["name"]:
        base["attack"] = recorded
    cfg = build_config(EvaluateConfig, config, set_, base=base, **options)
    scenario = Scenario.from_checkpoint(ckpt, cfg.data, cfg.device)
    own = ckpt.attack is not None and cfg.attack == {k: v for k, v in ckpt.attack.spec().items() if k != "seed"}
    if not own:
        d = scenario.data
        scenario.attack = create_attack({**cfg.attack, "seed": cfg.seed}, d.image_shape, d.num_classes).to(scenario.device)
    metrics = scenario.evaluator(ckpt.model.to(scenario.device))
    atk = scenario.attack
    atomic_write_json((out or checkpoint.parent) / f"{checkpoint.stem}.metrics.json",
                      {"checkpoint": str(checkpoint), "attack": atk.spec(), "data": cfg.data.name, "metrics": metrics})
    title = f"{checkpoint.name} under {atk.name} on {cfg.data.name}"
    console.print(_metrics_table(title, [metrics], ["clean_acc", "asr", "robust_acc"]))
    print_json_line(metrics)


@app.command()
def purify(
    checkpoint: Path = typer.Argument(..., help="the (backdoored) model: a .safetensors checkpoint with its .json sidecar"),
    defense: str = typer.Option(None, "--defense", "-d", help="defense name (default sau); all of them: `antidoor list`"),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    data: str = typer.Option(None, "--data", help="defender data (default: the checkpoint's dataset and recorded split)"),
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("runs/purify"), "--out", "-o", help="output folder"),
    quiet: bool = QuietOpt,
) -> None:
    """Purify a checkpoint with a defense: checkpoint in, checkpoint out, metrics before and after.

    The defense sees only the defender's clean data (and its validation part); the test split is
    used afterwards, to measure. Parameters: --set defense.rounds=20 and so on.

    Example: antidoor purify runs/badnets/model.safetensors --defense sau --set defense.rounds=20 --out runs/sau

    Defenses: `antidoor list`; a defense's parameters and defaults: `antidoor describe sau`.
    """
    from antidoor.checkpoint import load_checkpoint, save_checkpoint
    from antidoor.config import PurifyConfig, build_config
    from antidoor.defenses import DEFENSES
    from antidoor.defenses import purify as run_defense
    from antidoor.defenses.base import defense_record
    from antidoor.metrics import der
    from antidoor.pipeline import Scenario
    from antidoor.utils import atomic_write_json

    set_quiet(quiet)
    cfg = build_config(PurifyConfig, config, set_, defense__name=defense, data__name=data, device=device, seed=seed)
    check_output_dir(out, CHECKPOINT_FILES)
    ckpt = load_checkpoint(checkpoint)
    scenario = Scenario.from_checkpoint(ckpt, cfg.data, cfg.device)
    name = cfg.defense["name"]
    params = {k: v for k, v in cfg.defense.items() if k != "name"}
    defender = scenario.defender_data(oracle=DEFENSES.get(name).needs_poisoned)
    before = scenario.evaluator(ckpt.model.to(scenario.device))
    # the defender's own validation accuracy beside the test metrics: what a user may compare settings by
    before["val_clean_acc"] = defender.val_accuracy(ckpt.model)
    chosen: dict[str, float] = {}
    purified = run_defense(ckpt.model, defender, name, seed=cfg.seed, chosen=chosen, **params)
    after = scenario.evaluator(purified)
    after["val_clean_acc"] = defender.val_accuracy(purified)
    if "asr" in before:
        after["der"] = der(before, after)
    # the sidecar's own fields (arch, attack, versions, ...) are rewritten by save_checkpoint
    inherited = {k: v for k, v in ckpt.meta.items() if k in ("classes", "dataset", "seed", "config")}
    meta = {**inherited, "defense": defense_record(cfg.defense, cfg.seed, chosen), "parent": str(checkpoint),
            "metrics_before": before, "metrics": after}
    save_checkpoint(out / "model.safetensors", purified, meta, ckpt.attack, ckpt.splits)
    atomic_write_json(out / "metrics.json",
                      {"before": before, "after": after, "defense": meta["defense"], "parent": str(checkpoint)})
    console.print(_metrics_table(f"{name} on {checkpoint.name}", [{"model": "before", **before}, {"model": name, **after}],
                                 ["model", "clean_acc", "asr", "robust_acc", "der", "val_clean_acc"]))
    if chosen:
        console.print(f"chosen by the defense on the defender's data: {', '.join(f'{k} {v:g}' for k, v in chosen.items())}")
    console.print(f"wrote {out / 'model.safetensors'} (+ model.json, metrics.json)")
    print_json_line({"before": before, "after": after})


@app.command()
def demo(
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="output folder"),
    preset: list[str] = PresetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """The main job on the bundled CIFAR-10 (cifar10-10k), offline: train a BadNets model, purify it with SAU and the
    oracle reference EP, then the superficial-safety table (asr before and after the retuning attack).

    Example: antidoor demo --out runs/demo   (--set clean_reference=true adds a clean model as a reference)
    """
    from antidoor.demo import run_demo

    set_quiet(quiet)
    check_output_dir(out)
    run_demo(config, set_ or [], device, seed, out, preset)


@app.command()
def stress(
    purified: list[str] = typer.Argument(..., help="one or more purified checkpoints (.safetensors with .json sidecar); "
                                              "NAME=PATH names one (default: its defense's name)"),
    backdoored: Path = typer.Option(None, "--backdoored", "-b", help="the backdoored checkpoint the purified models came from"),
    clean_ref: Path = typer.Option(None, "--clean-ref", help="clean reference checkpoint (same data and recipe, no poison)"),
    ep: Path = typer.Option(None, "--ep", help="an EP checkpoint (default: purified here from --backdoored when its "
                                               "poisoned samples are recorded; --set ep=false for none)"),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    data: str = typer.Option(None, "--data", help="data (default: the backdoored checkpoint's dataset and recorded split)"),
    poisoned: Path = typer.Option(None, "--poisoned", help="the attacker's poisoned images, trigger on: an .npz with x "
                                                           "(+ y, their true labels, for EP) or a folder of images"),
    poisoned_indices: Path = typer.Option(None, "--poisoned-indices", help="the attacker's poisoned training images as "
                                                                           "indices into the data (.txt, .json or .npy)"),
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("runs/stress"), "--out", "-o", help="output folder"),
    quiet: bool = QuietOpt,
) -> None:
    """Stress purified models: retuning attack (RA), QRA and the backdoor-connected path, with references.

    Writes stress.json, stress.md, ra_curve.png and path.png. Settings: --set ra.seeds=[0,1,2],
    --set ra.epochs=5, --set qra.epochs=50, --set path.points=21, --set path.bn=interpolate,
    --set qra=null (skip QRA), --set path=null (skip the path).

    Example: antidoor stress runs/sau/model.safetensors --backdoored runs/badnets/model.safetensors
    --clean-ref runs/clean/model.safetensors --out runs/stress

    The verdict per purified model (not purified, superficial, deep, inconclusive) comes first. Before anything runs, guardrails
    refuse a trigger the backdoored model does not know and models near chance (--set guards.enforce=false to
    override).
    """
    import time

    from rich.markup import escape

    from antidoor.checkpoint import load_checkpoint
    from antidoor.config import StressRunConfig, build_config
    from antidoor.pipeline import Scenario
    from antidoor.stress import run_stress, write_report

    set_quiet(quiet)
    t0 = time.perf_counter()
    cfg = build_config(StressRunConfig, config, set_, data__name=data, device=device, seed=seed)
    if backdoored is None:
        raise AntidoorError("--backdoored is required: the backdoored checkpoint the purified models came from")
    check_output_dir(out, ("stress.json", "stress.md", "ra_curve.png", "path.png"))
    bd = load_checkpoint(backdoored)
    known = bd.attack is not None and bd.attack.name != "none"
    if not known and cfg.inversion is None:
        raise AntidoorError(f"the backdoored checkpoint {str(backdoored)!r} records no attack, so asr cannot be measured; "
                            "give its trigger (antidoor import --attack ...) or recover one with --set inversion={}")
    spec = {k: v for k, v in bd.attack.spec().items() if k != "pratio"} if known else None
    models, paths = {}, []
    for arg in purified:
        label, path = None, Path(arg)
        if "=" in arg and not path.exists():
            label, path = arg.split("=", 1)[0], Path(arg.split("=", 1)[1])
        paths.append(path)
        ckpt = load_checkpoint(path)
        own = {k: v for k, v in ckpt.attack.spec().items() if k != "pratio"} if ckpt.attack is not None else None
        if spec is not None and own is not None and own != spec:
            raise AntidoorError(f"{str(path)!r} records attack {ckpt.attack.spec()}, "
                                f"but the backdoored model has {bd.attack.spec()}")
        name = label or str((ckpt.meta.get("defense") or {}).get("name") or path.stem)
        while name in models or name in ("backdoored", "clean", "ep"):
            name += "'"
        models[name] = ckpt.model
    scenario = Scenario.from_checkpoint(bd, cfg.data, cfg.device)
    if poisoned is not None or poisoned_indices is not None:
        from antidoor.poisoned import read_indices, read_samples

        scenario.use_poisoned(read_indices(poisoned_indices) if poisoned_indices is not None else None,
                              read_samples(poisoned) if poisoned is not None else None)
    clean = load_checkpoint(clean_ref).model if clean_ref is not None else None
    ep_model = load_checkpoint(ep).model if ep is not None else None
    if clean is None:
        from antidoor.utils import warn

        warn("no --clean-ref: RA has no clean reference and QRA drops its clean-model term")
    result = run_stress(models, bd.model, clean, scenario, cfg, ep=ep_model, seed=cfg.seed)
    result.meta.update({"backdoored": str(backdoored), "purified": {n: str(p) for n, p in zip(models, paths, strict=True)},
                        "clean_ref": str(clean_ref) if clean_ref else None, "ep": str(ep) if ep else "auto" if cfg.ep else None})
    result.seconds = round(time.perf_counter() - t0, 1)  # the whole command, loading included
    written = write_report(result, out)
    verdicts = result.verdicts()
    for v in verdicts.values():  # the verdict first; the table that backs it follows
        color = {"deep": "green", "superficial": "yellow", "inconclusive": "blue"}.get(v.verdict, "red")
        console.print(f"[bold {color}]{escape(v.model)}: {v.word}[/]. {escape(v.details())}", highlight=False, soft_wrap=True)
    rows = result.table()
    console.print(_metrics_table("superficial safety (RA; metrics on the test split)", rows,
                                 ["model", "clean_acc", "o_asr", "p_asr_mean", "p_asr_std", "qra_asr_purified", "qra_asr_clean"]))
    console.print(f"wrote {', '.join(str(w) for w in written)} in {result.seconds:.0f} s")
    print_json_line({"verdicts": {n: v.verdict for n, v in verdicts.items()}, "table": rows, "seconds": result.seconds})


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise AntidoorError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.4914,0.4822,0.4465") from None


@app.command("import")
def import_(
    weights: list[Path] = typer.Argument(..., help="state dicts trained elsewhere: .safetensors, or .pt/.pth of tensors only"),
    arch: str = typer.Option(None, "--arch", help="torchvision:<arch>, timm:<arch> or an antidoor model name"),
    num_classes: int = typer.Option(None, "--num-classes", help="classes the network was trained for"),
    mean: str = typer.Option(None, "--mean", help="input normalisation mean per channel, e.g. 0.4914,0.4822,0.4465"),
    std: str = typer.Option(None, "--std", help="input normalisation std per channel, e.g. 0.247,0.243,0.261"),
    attack_name: str = typer.Option(None, "--attack", help="the backdoor's trigger (badnets, blended, ...; see `antidoor list`)"),
    target: int = typer.Option(None, "--target", help="the backdoor's target class"),
    data: str = typer.Option(None, "--data", help="the data the network belongs to (default cifar10-mini)"),
    config: Path = ConfigOpt,
    set_: list[str] = SetOpt,
    seed: int = SeedOpt,
    out: Path = typer.Option(Path("runs/imported"), "--out", "-o", help="output folder: <stem>.safetensors + <stem>.json each"),
    quiet: bool = QuietOpt,
) -> None:
    """Turn plain state dicts trained elsewhere into antidoor checkpoints (weights + sidecar) for evaluate, purify, stress.

    Example: antidoor import bd.pt ft.pt clean.pt --arch torchvision:resnet18 --num-classes 10
    --mean 0.4914,0.4822,0.4465 --std 0.247,0.243,0.261 --attack badnets --target 0 --out runs/mine

    (a torchvision ResNet-18 backdoored with a 3x3 corner patch, its purification and a clean one; then
    antidoor stress runs/mine/ft.safetensors --backdoored runs/mine/bd.safetensors --clean-ref runs/mine/clean.safetensors)

    A mismatching key or shape is named with what the architecture expects.
    """
    from antidoor.config import ImportConfig, build_config
    from antidoor.importer import import_run

    set_quiet(quiet)
    cfg = build_config(ImportConfig, config, set_, model__name=arch, model__num_classes=num_classes,
                       model__mean=_floats(mean, "--mean"), model__std=_floats(std, "--std"), attack__name=attack_name,
                       attack__target=target, data__name=data, seed=seed)
    done = import_run(weights, cfg, out)
    rows = [{"model": str(p), **m} for p, m in done]
    console.print(_metrics_table(f"imported as {cfg.model.name} (test split of {cfg.data.name})", rows,
                                 ["model", "clean_acc", "asr", "robust_acc"]))
    print_json_line({"checkpoints": [str(p) for p, _ in done], "metrics": [m for _, m in done]})


@app.command("list")
def list_() -> None:
    """List the attacks, defenses and models, one line each (`antidoor describe NAME` for parameters).

    Example: antidoor list
    """
    from rich.markup import escape

    from antidoor.catalog import catalog

    for kind, entries in catalog().items():
        console.print(f"[bold]{kind}[/bold]")
        for name, summary in entries.items():
            console.print(f"  {escape(name):<22} {escape(summary)}", highlight=False, soft_wrap=True)
    print_json_line({k: list(v) for k, v in catalog().items()})


@app.command()
def describe(name: str = typer.Argument(..., help="an attack, defense or model name (see `antidoor list`)")) -> None:
    """Describe an attack, defense or model: its paper, defaults, deviations and every parameter.

    Example: antidoor describe sau   (then: antidoor purify M --defense sau --set defense.rounds=20)
    """
    from rich.markup import escape

    from antidoor.catalog import describe as describe_entry

    d = describe_entry(name)
    console.print(f"[bold]{d['kind']} {escape(d['name'])}[/bold]\n\n{escape(d['doc'])}\n", highlight=False)
    section = {"attack": "attack", "defense": "defense", "model": "model"}[d["kind"]]
    if d["params"]:
        table = Table(title=f"parameters (--set {section}.NAME=VALUE)", title_justify="left")
        for c in ("name", "default", "description"):
            table.add_column(c, overflow="fold")
        for p in d["params"]:
            table.add_row(escape(p["name"]), escape(p["default"]), escape(p["description"]))
        console.print(table)
    print_json_line(d)


# -- studies: grid, results, report -------------------------------------------------------------------

def _study_store(folder: Path) -> Path:
    from antidoor.experiment import STORE_NAME

    path = folder / STORE_NAME if folder.is_dir() or folder.suffix != ".sqlite" else folder
    if folder.is_file() and path != folder:
        raise AntidoorError(f"{str(folder)!r} is a file; give a study folder (the `antidoor grid --out` folder, which "
                            f"holds {STORE_NAME}) or its {STORE_NAME}")
    if not path.is_file():
        raise AntidoorError(f"no study store at {str(path)!r}; run `antidoor grid STUDY.yaml --out {folder}` first")
    return path


@app.command()
def grid(
    study: Path = typer.Argument(None, help="the study YAML (datasets, models, attacks, defenses, seeds, train, stress); "
                                            "optional with --resume (the stored study is reused)"),
    set_: list[str] = SetOpt,
    out: Path = typer.Option(None, "--out", "-o", help="study folder: study.sqlite + artifacts/ (default runs/<study name>)"),
    backend: str = typer.Option("local", "--backend", help="local (this process or --workers processes) or ray"),
    workers: int = typer.Option(None, "--workers", "-w", help="jobs at once (local default 1; ray default: the cluster's CPUs)"),
    address: str = typer.Option(None, "--address", help="Ray cluster address (from `ray start`), e.g. auto or HOST:6379"),
    resume: bool = typer.Option(False, "--resume", help="continue a study: rerun nothing that finished"),
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run a study: every (dataset, model, attack, defense, seed), shared stages computed once, into a SQLite store.

    Example: antidoor grid study.yaml --out runs/study   (then: antidoor grid --resume --out runs/study)

    To stop a long study cleanly: touch runs/study/STOP (the stages in flight finish and are recorded).
    """
    from rich.markup import escape

    from antidoor.experiment import STORE_NAME, Store, load_study, run_grid
    from antidoor.validate import study_folder_name

    set_quiet(quiet)
    base = None
    if study is None:
        if not resume or out is None:
            raise AntidoorError("give a study YAML (antidoor grid STUDY.yaml), "
                                "or --resume --out FOLDER to continue a stored study")
        with Store(_study_store(out), readonly=True) as store:
            base = store.get_meta("study")
        if not isinstance(base, dict):
            raise AntidoorError(f"the store in {str(out)!r} records no study config; give the study YAML again")
    cfg = load_study(study, set_, base=base)
    if device is not None:
        cfg = cfg.model_copy(update={"device": device})
    folder = out or Path("runs") / study_folder_name(cfg.name)
    summary = run_grid(cfg, folder, backend=backend, workers=workers, address=address, resume=resume)
    left = f", {summary.left} left (stopped; --resume goes on)" if summary.left else ""
    console.print(f"{summary.stages} stages: {summary.reused} reused, {summary.done} run, {summary.failed} failed{left} "
                  f"({summary.seconds:.1f} s); store {folder / STORE_NAME}")
    for f in summary.failures:
        console.print(f"[red]failed:[/red] {escape(f)}", highlight=False, soft_wrap=True)
    print_json_line({"stages": summary.stages, "reused": summary.reused, "done": summary.done, "failed": summary.failed,
                     "left": summary.left})
    if summary.failed:  # a study with failed stages is not a success, whatever was recorded
        raise typer.Exit(1)


@app.command()
def results(
    folder: Path = typer.Argument(..., help="a study folder (or its study.sqlite)"),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, markdown or json"),
    attack_: list[str] = typer.Option(None, "--attack", help="only these attacks: a row label or a registered name (repeatable)"),
    defense: list[str] = typer.Option(None, "--defense",
                                      help="only these defenses (repeatable; none = backdoored, clean = reference)"),
    dataset: list[str] = typer.Option(None, "--dataset", help="only these datasets (repeatable)"),
    mean: bool = typer.Option(False, "--mean", help="mean (and sd) over seeds instead of one row per seed"),
) -> None:
    """Print a study's results: one row per model (clean reference, backdoored, each defense) and seed.

    Example: antidoor results runs/study --format markdown --attack badnets --mean
    """
    from rich.markup import escape

    from antidoor.experiment import Store
    from antidoor.report.tables import (
        FORMATS,
        aggregate,
        cell,
        display_columns,
        filter_rows,
        mixed_settings,
        registered_names,
        render,
        result_rows,
    )

    if fmt not in FORMATS:
        raise AntidoorError(f"--format {fmt!r}: unknown; allowed: {', '.join(FORMATS)}")
    with Store(_study_store(folder), readonly=True) as store:
        rows = filter_rows(result_rows(store), attack_, defense, dataset, names=registered_names(store))
        mixed = mixed_settings(store) if mean else {}
    if mean:
        rows = aggregate(rows)
        # a resumed study whose defaults changed can hold seeds purified under different settings: say so (on
        # stderr, so csv and json stay parseable) rather than average them silently
        for r in rows:
            if text := mixed.get((r["dataset"], r["model"], r["attack"], r["defense"])):
                sys.stderr.write(f"note: the mean of {r['defense']} on {r['attack']} ({r['model']}, {r['dataset']}) "
                                 f"mixes settings: {text}\n")
    if fmt != "table":
        sys.stdout.write(render(rows, fmt, aggregated=mean))
        return
    columns = display_columns(rows, aggregated=mean)
    table = Table(title=f"results: {folder}", title_justify="left")
    for c in columns:
        table.add_column(c, justify="left" if c in ("dataset", "model", "attack", "defense", "status", "error") else "right",
                         overflow="fold")
    for r in rows:
        style = None if r["status"] == "done" else "red"
        table.add_row(*[escape(cell(r, c)) for c in columns], style=style)
    from rich.console import Console

    Console(width=max(160, console.width)).print(table)


@app.command()
def report(
    folder: Path = typer.Argument(..., help="a study folder (or its study.sqlite)"),
    out: Path = typer.Option(None, "--out", "-o", help="where report.html and report.md go (default: the study folder)"),
) -> None:
    """Write a self-contained HTML report (verdict first, then tables and plots) and a Markdown version of a study.

    Example: antidoor report runs/study
    """
    from antidoor.report import write_report

    store = _study_store(folder)
    html_path, md_path = write_report(store, check_output_dir(out or store.parent, ("report.html", "report.md")))
    console.print(f"wrote {html_path} and {md_path}")
    print_json_line({"html": str(html_path), "markdown": str(md_path)})


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    from antidoor.utils import keep_freed_memory

    keep_freed_memory()  # CPU training steps reuse freed blocks instead of page-faulting fresh ones
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as e:  # bare `antidoor` or a group without its command: the help
        console.print(e.format_message(), highlight=False, markup=False)
        sys.exit(2)
    except click_exceptions.UsageError as e:  # click's own parsing errors, e.g. --pratio abc: one line too
        where = e.ctx.command_path if e.ctx is not None else "antidoor"
        _error(f"{e.format_message()} (see `{where} --help`)")
    except click_exceptions.ClickException as e:  # e.g. an unreadable file given to a click option
        _error(e.format_message())
    except AntidoorError as e:
        _error(str(e))
    except sqlite3.DatabaseError as e:  # a study store damaged inside, found only when a page is read
        _error(f"the study store cannot be read ({e}); it was left unchanged")
    except (KeyboardInterrupt, typer.Abort):
        console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _error(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
