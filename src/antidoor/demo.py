"""``antidoor demo``: the main job on the bundled CIFAR-10 (``cifar10-10k``), offline, in a few minutes on a CPU.

Trains a BadNets model, purifies it with SAU and the oracle reference EP (on the defender's clean
data only), then runs the retuning attack (RA) on every purified model: the superficial-safety
table (``o_asr`` before RA, ``p_asr`` after). ``clean_reference: true`` also trains a clean model with
the same data, seed and recipe, measures it under the same trigger and retunes it too (one more
training run: EP already plays the part of a model whose backdoor is really gone).
Writes checkpoints, ``results.json`` and ``results.md`` to ``--out``. The demo's small settings (the
``fast`` recipe's ``whitened_cnn`` at width 32, batch 256, lr 0.2, 12 epochs; SAU 10 rounds of batch
100 at lr 2e-4, chosen on the defender's validation data; EP 5 epochs; RA with 2 seeds and no
per-epoch curves) are chosen for speed (165 s on a 2-core AMD EPYC with AVX512-BF16, 425 s in float32
on one without: README, "The demo"); the API and the other commands keep the methods' full defaults
(RA: 3 seeds; `antidoor stress` adds QRA and the backdoor-connected path).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from antidoor.checkpoint import save_checkpoint
from antidoor.config import AttackRunConfig, DemoConfig, build_config
from antidoor.defenses import DEFENSES, purify
from antidoor.defenses.base import defense_record
from antidoor.metrics import der
from antidoor.pipeline import Scenario, run_meta, train_attack
from antidoor.presets import PRESETS
from antidoor.stress import ra_data_for, retuning_attack
from antidoor.utils import atomic_write_json, atomic_write_text, console, info

DEMO_DEFAULTS: dict[str, Any] = {
    # the larger bundled subset: 10,000 training images take this recipe to ~83% where 5,000 stop at ~75%
    "data": {"name": "cifar10-10k"},
    # the fast preset's recipe (antidoor.presets), narrower and shorter for 10,000 images and a ~3-minute demo on 2 cores
    "model": {"name": "whitened_cnn", "width": 32},
    "attack": {"name": "badnets", "pratio": 0.1, "target": 0},
    "train": {**PRESETS["fast"]["train"], "epochs": 12, "batch_size": 256, "lr": 0.2},
    # small settings for a CPU demo: the defenses' own defaults (SAU: 100 rounds, batch 256, lr 1e-4;
    # EP: 10 epochs) stay the defaults of the API and the CLI. No FT: on this model it leaves the backdoor
    # in place (asr 93%), so neither its row nor its RA (11 s of a 3-minute budget) has anything to show
    # SAU was measured at 4 batches of 100 a round on the 400 defender images (min_batches 1 keeps them)
    "defenses": [{"name": "sau", "rounds": 10, "batch_size": 100, "lr": 2e-4, "min_batches": 1}, {"name": "ep", "epochs": 5}],
    # the retuning attack at its defaults (5 poisoned samples, SGD lr 0.01, 5 epochs) but 2 seeds instead of 3
    # the demo shows p_asr, not the curves: no evaluation after every RA epoch
    "ra": {"seeds": [0, 1], "curves": False},
}

TRAIN_COLUMNS = ["model", "clean_acc", "asr", "robust_acc", "train_s"]
DEFENSE_COLUMNS = ["model", "clean_acc", "asr", "robust_acc", "der", "seconds"]
RA_COLUMNS = ["model", "o_asr", "p_asr", "p_asr_std", "clean_acc", "ra_clean_acc", "seconds"]


def run_demo(config: Path | None, overrides: list[str], device: str | None, seed: int | None,
             out: Path, preset: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    t0 = time.perf_counter()
    cfg = build_config(DemoConfig, config, overrides, base=DEMO_DEFAULTS, device=device, seed=seed, preset=preset)
    attack_cfg = AttackRunConfig(**cfg.model_dump(exclude={"defenses", "ra", "clean_reference"}))
    backdoor = Scenario.build(cfg.data, cfg.attack, cfg.seed, cfg.device)
    runs = [(cfg.attack["name"], attack_cfg, backdoor)]
    if cfg.clean_reference:
        clean_cfg = attack_cfg.model_copy(update={"attack": {**cfg.attack, "pratio": 0.0}})
        # the clean reference: same data (already on the device), same defender split and trigger, no poison
        clean = Scenario.build(cfg.data, clean_cfg.attack, cfg.seed, cfg.device, data=backdoor.data)
        runs.insert(0, ("clean", clean_cfg, clean))
    models, rows = {}, []
    for label, run_cfg, scenario in runs:
        result = train_attack(run_cfg, scenario, description=f"demo: {label} model")
        if scenario is not backdoor:
            result.metrics = backdoor.evaluator(result.model)  # measured under the backdoored model's trigger
        meta = run_meta(run_cfg, result)
        save_checkpoint(out / f"{label}.safetensors", result.model, meta, scenario.attack, scenario.splits)
        models[label] = result
        rows.append({"model": label, **result.metrics, "train_s": round(result.seconds, 1)})
    title = f"antidoor demo: {cfg.attack['name']} on {backdoor.data.name} ({cfg.model.name}, width {cfg.model.width})"
    console.print(_table(title, rows, TRAIN_COLUMNS))

    bd = models[cfg.attack["name"]]
    defense_rows = [{"model": f"{cfg.attack['name']} (no defense)", **bd.metrics, "der": None, "seconds": None}]
    purified_models, measured = {}, {}
    for spec in cfg.defenses:
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
        t = time.perf_counter()
        defender = backdoor.defender_data(oracle=DEFENSES.get(name).needs_poisoned)
        chosen: dict[str, float] = {}
        purified = purify(bd.model, defender, name, seed=cfg.seed, chosen=chosen, **params)
        seconds = time.perf_counter() - t
        measured[name] = backdoor.evaluator.measure(purified)  # also RA's point before retuning
        metrics = {**measured[name][0], "der": der(bd.metrics, measured[name][0])}
        meta = {**run_meta(attack_cfg, bd), "defense": defense_record(spec, cfg.seed, chosen),
                "metrics_before": bd.metrics, "metrics": metrics}
        save_checkpoint(out / f"{cfg.attack['name']}-{name}.safetensors", purified, meta, backdoor.attack, backdoor.splits)
        defense_rows.append({"model": name, **metrics, "seconds": round(seconds, 1)})
        purified_models[name] = purified
    if cfg.defenses:
        console.print(_table("purification of the backdoored model (defender data only; metrics on the test split)",
                             defense_rows, DEFENSE_COLUMNS))

    ra_rows: list[dict[str, Any]] = []
    if cfg.ra is not None:
        # the same RA set and seeds for every purified model, then the clean reference; not for the backdoored
        # model itself: its backdoor is active already (p_asr ~ o_asr), so RA has nothing to show there
        ra_data = ra_data_for(backdoor, cfg.ra)
        targets = {**purified_models, **({"clean": models["clean"].model} if "clean" in models else {})}
        for name, model in targets.items():
            t = time.perf_counter()
            s = retuning_attack(model, ra_data, backdoor.evaluator, cfg.ra, description=f"RA on {name}",
                                before=measured.get(name)).summary()
            ra_rows.append({"model": name, "o_asr": s["o_asr"], "p_asr": s["p_asr_mean"], "p_asr_std": s["p_asr_std"],
                            "clean_acc": s["o_clean_acc"], "ra_clean_acc": s["clean_acc_mean"],
                            "seconds": round(time.perf_counter() - t, 1)})
        d = ra_data.describe()
        console.print(_table(f"superficial safety: retuning attack ({d['n_total']} images, {d['n_poison']} poisoned, "
                             f"{cfg.ra.epochs} epochs, mean of {len(cfg.ra.seeds)} seeds; ep is an oracle reference)",
                             ra_rows, RA_COLUMNS))

    seconds = time.perf_counter() - t0
    results = {"training": rows, "purification": defense_rows, "superficial_safety": ra_rows}
    atomic_write_json(out / "results.json", {**results, "config": cfg.model_dump(), "seconds": round(seconds, 1)})
    md = markdown_table(rows, TRAIN_COLUMNS) + "\n" + markdown_table(defense_rows, DEFENSE_COLUMNS)
    if ra_rows:
        md += "\nSuperficial safety (o_asr: before the retuning attack, p_asr: after it; mean and std over seeds)\n\n"
        md += markdown_table(ra_rows, RA_COLUMNS)
    atomic_write_text(out / "results.md", md)
    info(f"wrote {out}/results.json, results.md and checkpoints in {seconds:.0f} s")
    return results


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="left" if c == "model" else "right")
    for r in rows:
        table.add_row(*(_cell(r.get(c), c) for c in columns))
    return table


def _cell(v: Any, column: str) -> str:
    if v is None:
        return "-"
    if column in ("clean_acc", "asr", "robust_acc", "o_asr", "p_asr", "p_asr_std", "ra_clean_acc"):
        return f"{100 * v:.1f}%"
    if column == "der":
        return f"{v:.3f}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rates in percent (clean_acc, asr, robust_acc, o_asr, p_asr, ...), der in [0, 1], times in seconds."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c), c).rstrip("%") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
