"""Every defense against BadNets and Blended on the bundled data: clean_acc, asr, robust_acc, der over seeds.

For each attack and seed, trains one backdoored model with the demo's recipe (``antidoor.demo``'s
``DEMO_DEFAULTS``: small_cnn width 16, 20 epochs, lr 0.05, batch 128, pratio 0.1, target 0; the
bundled ``cifar10-mini``: 5,000 training and 1,000 test images), then purifies it with every
defense in ``SETTINGS`` on the defender's clean data only (5% of the training set: 200 training
and 50 validation images) and measures the result on the test split. The defense seed is the run
seed. Writes every run to a JSON file and a markdown table (mean ± std over the seeds; rates in
percent, der in [0, 1]) with the command that made it.

The settings are scaled down for two CPU cores and 200 clean images (``SETTINGS`` says how; the
methods' own defaults stay the defaults of the API and the CLI).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/defenses.py \\
        --out benchmarks/results/defenses_cpu.json --md benchmarks/defenses.md --cache runs/bench-models
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from antidoor.checkpoint import load_checkpoint, save_checkpoint
from antidoor.config import AttackRunConfig, build_config
from antidoor.defenses import DEFENSES, purify
from antidoor.demo import DEMO_DEFAULTS
from antidoor.metrics import der
from antidoor.pipeline import Scenario, run_meta, train_attack
from antidoor.utils import atomic_write_json, atomic_write_text, keep_freed_memory, set_quiet

# Per row: the defense, its parameters here and, in words, how they differ from its defaults. The
# defaults assume about 2,500 clean images (5% of CIFAR-10; batch 256 in BackdoorBench: ~10 steps an
# epoch); here a defense has 200 (2 steps an epoch), so plain FT and NAD also run with 5x the epochs
# (the defaults' number of optimiser steps), labelled "x5".
SETTINGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ft": ("ft", {}, "defaults (10 epochs, lr 0.01)"),
    "ft x5": ("ft", {"epochs": 50}, "50 epochs"),
    "fp": ("fp", {"epochs": 20}, "20 fine-tuning epochs (default 100)"),
    "anp": ("anp", {"iterations": 200, "batch_size": 64},
            "200 mask steps of batch 64 (default 2,000 of 128); threshold chosen on validation accuracy"),
    "nad": ("nad", {}, "defaults (teacher 10 + student 10 epochs)"),
    "nad x5": ("nad", {"teacher_epochs": 50, "epochs": 50}, "teacher 50 + student 50 epochs"),
    "ibau": ("i-bau", {"rounds": 5, "batch_size": 32}, "batch 32 (default 128), so 35 outer steps in 5 rounds"),
    "ftsam": ("ft-sam", {"epochs": 20}, "20 epochs (default 100)"),
    "fst": ("fst", {}, "defaults (10 epochs, alpha 0.1)"),
    "sau": ("sau", {"rounds": 20, "batch_size": 100, "lr": 1e-3},
            "the demo's: 20 rounds, batch 100, lr 1e-3 (default 100, 256, 1e-4)"),
}
METRICS = ["clean_acc", "asr", "robust_acc", "der"]


def backdoored(attack: str, seed: int, cache: Path | None) -> tuple[Scenario, Any, dict[str, float], float]:
    """Train (or load from ``cache``) the backdoored model of one (attack, seed)."""
    path = cache / f"{attack}-s{seed}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        ckpt = load_checkpoint(path)
        scenario = Scenario.from_checkpoint(ckpt, device="cpu")
        return scenario, ckpt.model, ckpt.meta["metrics"], ckpt.meta["train_seconds"]
    base = {k: v for k, v in DEMO_DEFAULTS.items() if k != "defenses"}
    cfg = build_config(AttackRunConfig, overrides=[f"attack.name={attack}", f"seed={seed}", "device=cpu"], base=base)
    result = train_attack(cfg)
    if path is not None:
        save_checkpoint(path, result.model, run_meta(cfg, result), result.scenario.attack, result.scenario.splits)
    return result.scenario, result.model, result.metrics, round(result.seconds, 1)


def run(attacks: list[str], seeds: list[int], labels: list[str], cache: Path | None) -> list[dict[str, Any]]:
    rows = []
    for attack in attacks:
        for seed in seeds:
            scenario, model, before, train_seconds = backdoored(attack, seed, cache)
            rows.append({"attack": attack, "seed": seed, "defense": "none", **before, "der": None, "seconds": train_seconds})
            print(f"{attack} seed {seed}: backdoored {fmt(before)}", flush=True)
            data = scenario.defender_data()
            for label in labels:
                name, params, _ = SETTINGS[label]
                t = time.perf_counter()
                purified = purify(model, data, name, seed=seed, **params)
                seconds = time.perf_counter() - t
                after = scenario.evaluator(purified)
                after["der"] = der(before, after)
                rows.append({"attack": attack, "seed": seed, "defense": label, **after, "seconds": round(seconds, 1),
                             "method": name, "params": params})
                print(f"  {label:8s} {fmt(after)}  {seconds:.1f} s", flush=True)
    return rows


def fmt(m: dict[str, Any]) -> str:
    return "  ".join(f"{k} {m[k]:.3f}" for k in METRICS if m.get(k) is not None)


def mean_std(values: list[float], scale: float) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}" if scale == 100 else f"{mean:.3f} ± {std:.3f}"


def markdown(rows: list[dict[str, Any]], command: str, seeds: list[int], seconds: float) -> str:
    lines = ["# Baseline defenses on the bundled data", "",
             "Made by (on this project's 2-core CPU machine, shared with other jobs; "
             f"{seconds / 60:.1f} min in all):", "", f"    {command}", "",
             f"Backdoored models: `antidoor.demo` recipe (small_cnn width 16, 20 epochs, lr 0.05, pratio 0.1, "
             f"target 0) on `cifar10-mini`, seeds {', '.join(map(str, seeds))}. Each defense sees only the "
             "defender's 200 clean training and 50 validation images; metrics on the 1,000-image test split. "
             "Rates in percent, der in [0, 1]; mean ± std over the seeds (sample std). The defaults assume about "
             "2,500 clean images (about 10 optimiser steps an epoch); 200 give 2, so rows marked x5 run plain FT "
             "and NAD with 5x their default epochs as well.", ""]
    for attack in dict.fromkeys(r["attack"] for r in rows):
        lines += [f"## {attack}", "", "| defense | clean_acc | asr | robust_acc | der | seconds | settings |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name in dict.fromkeys(r["defense"] for r in rows if r["attack"] == attack):
            sel = [r for r in rows if r["attack"] == attack and r["defense"] == name]
            cells = [mean_std([r[k] for r in sel], 100) for k in ("clean_acc", "asr", "robust_acc")]
            cells.append("-" if name == "none" else mean_std([r["der"] for r in sel], 1))
            cells.append(f"{statistics.fmean(r['seconds'] for r in sel):.1f}")
            label = "no defense (backdoored)" if name == "none" else name
            settings = "training time" if name == "none" else SETTINGS[name][2]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {settings} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    keep_freed_memory()  # the allocator setting the CLI and the grid run with, so the timings are the product's
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--defenses", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="rows of SETTINGS")
    parser.add_argument("--cache", type=Path, default=None, help="save the backdoored models here and reuse them")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/defenses_cpu.json"))
    parser.add_argument("--md", type=Path, default=Path("benchmarks/defenses.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_quiet(True)
    assert {v[0] for v in SETTINGS.values()} <= set(DEFENSES.names())
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/defenses.py " + " ".join(sys.argv[1:])
    t0 = time.perf_counter()
    rows = run(args.attacks, args.seeds, args.defenses, args.cache)
    seconds = time.perf_counter() - t0
    meta = {"command": command, "seconds": round(seconds, 1), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "settings": {k: {"defense": v[0], **v[1]} for k, v in SETTINGS.items()}}
    atomic_write_json(args.out, {**meta, "rows": rows})
    atomic_write_text(args.md, markdown(rows, command, args.seeds, seconds))
    print(json.dumps({"seconds": round(seconds, 1), "out": str(args.out), "md": str(args.md)}))


if __name__ == "__main__":
    main()
