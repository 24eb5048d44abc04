"""``antidoor demo``: the main job on the bundled mini CIFAR-10, offline, in a few minutes on a CPU.

Trains a clean reference and a BadNets model with the same data, seed and recipe, evaluates both
under the same trigger and writes checkpoints, ``results.json`` and ``results.md`` to ``--out``.
The demo's small settings (a small CNN, 20 epochs, lr 0.05) are chosen for speed; the API and
the other commands keep BackdoorBench's full defaults.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from antidoor.checkpoint import save_checkpoint
from antidoor.config import AttackRunConfig, build_config
from antidoor.pipeline import Scenario, run_meta, train_attack
from antidoor.utils import atomic_write_json, atomic_write_text, console, info

DEMO_DEFAULTS: dict[str, Any] = {
    "data": {"name": "cifar10-mini"},
    "model": {"name": "small_cnn", "width": 16},
    "attack": {"name": "badnets", "pratio": 0.1, "target": 0},
    "train": {"epochs": 20, "lr": 0.05, "batch_size": 128},
}

COLUMNS = ["model", "clean_acc", "asr", "robust_acc", "train_s"]


def run_demo(config: Path | None, overrides: list[str], device: str | None, seed: int | None,
             out: Path) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    cfg = build_config(AttackRunConfig, config, overrides, base=DEMO_DEFAULTS, device=device, seed=seed)
    clean_cfg = cfg.model_copy(update={"attack": {**cfg.attack, "pratio": 0.0}})
    backdoor = Scenario.build(cfg.data, cfg.attack, cfg.seed, cfg.device)
    # the clean reference: same data (already on the device), same defender split and trigger, no poison
    clean = Scenario.build(cfg.data, clean_cfg.attack, cfg.seed, cfg.device, data=backdoor.data)
    rows = []
    for label, run_cfg, scenario in (("clean", clean_cfg, clean), (cfg.attack["name"], cfg, backdoor)):
        result = train_attack(run_cfg, scenario, description=f"demo: {label} model")
        metrics = backdoor.evaluator(result.model)  # both measured under the same trigger
        result.metrics = metrics
        save_checkpoint(out / f"{label}.safetensors", result.model, run_meta(run_cfg, result), scenario.attack, scenario.splits)
        rows.append({"model": label, **metrics, "train_s": round(result.seconds, 1)})
    title = f"antidoor demo: {cfg.attack['name']} on {backdoor.data.name} ({cfg.model.name}, width {cfg.model.width})"
    table = Table(title=title, title_justify="left")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "model" else "right")
    for r in rows:
        table.add_row(r["model"], *(f"{100 * r[c]:.1f}%" for c in COLUMNS[1:4]), f"{r['train_s']:.0f}")
    console.print(table)
    seconds = time.perf_counter() - t0
    atomic_write_json(out / "results.json", {"rows": rows, "config": cfg.model_dump(), "seconds": round(seconds, 1)})
    atomic_write_text(out / "results.md", markdown_table(rows, COLUMNS))
    info(f"wrote {out}/results.json, results.md and checkpoints in {seconds:.0f} s")
    return rows


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{100 * v:.1f}" if isinstance(v, float) and 0 <= v <= 1 else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
