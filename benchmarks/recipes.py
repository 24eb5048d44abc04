"""Accuracy against wall time of the training recipes, and what the ``fast`` recipe does to backdoors.

Each run trains one model with :func:`antidoor.pipeline.train_attack` (the recipe, the data, an
attack or none) and records, after every epoch, the epoch's own training seconds (the trainer's
clock; the evaluation is outside it) and the clean accuracy on the test split; at the end the full
metrics (clean_acc, asr, robust_acc). Runs are named ``RECIPE-ATTACK-sSEED``; each writes its own
JSON under ``--out-dir`` and a run whose JSON exists is skipped, so the script resumes. In the table,
``train s`` is the epochs' training seconds summed (no evaluation) and ``wall s`` the whole run (data,
whitening fit, training, the per-epoch evaluation and the final one).

Recipes: ``fast`` (the preset: whitened_cnn width 64, 15 epochs), ``fast48`` (the same at width 48),
``preact16``/``preact32`` (PreAct-ResNet18 width 16/32 with the recipe antidoor's earlier studies used:
SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine, batch 128, 20 epochs).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/recipes.py --data /path/cifar10-20k.npz \\
        --runs fast-none fast-badnets fast-blended preact16-none preact32-none --out-dir benchmarks/results/recipes
    .venv/bin/python benchmarks/recipes.py --out-dir benchmarks/results/recipes --table benchmarks/recipes.md

One folder per machine (the skip-if-done rule is per folder); ``--also`` adds other folders' runs to the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from _common import device_name
from antidoor.config import AttackRunConfig, build_config
from antidoor.metrics import predict
from antidoor.pipeline import Scenario, train_attack
from antidoor.precision import amp_active
from antidoor.utils import atomic_write_json, atomic_write_text, keep_freed_memory

PREACT = ["model.name=preact_resnet18", "train.epochs=20", "train.lr=0.05", "train.batch_size=128"]
RECIPES: dict[str, tuple[list[str], list[str]]] = {  # name -> (presets, overrides)
    "fast": (["fast"], []),
    "fast48": (["fast"], ["model.width=48"]),  # the preset at 56% of its convolution FLOPs (CPUs without AMX)
    "preact16": ([], [*PREACT, "model.width=16"]),
    "preact32": ([], [*PREACT, "model.width=32"]),
}


def run(name: str, data: str, seed: int, threads: int) -> dict[str, Any]:
    recipe, attack = name.split("-")[:2]
    presets, overrides = RECIPES[recipe]
    overrides = [*overrides, f"data.name={data}", f"seed={seed}", "device=cpu"]
    overrides += ["attack.pratio=0"] if attack == "none" else [f"attack.name={attack}", "attack.pratio=0.1", "attack.target=0"]
    cfg = build_config(AttackRunConfig, overrides=overrides, preset=presets)
    scenario = Scenario.build(cfg.data, cfg.attack, cfg.seed, cfg.device)
    x_test, y_test = scenario.data.x_test, scenario.data.y_test
    curve: list[dict[str, float]] = []
    elapsed = 0.0

    def observe(epoch: int, stats: dict[str, float], model: torch.nn.Module) -> None:
        nonlocal elapsed
        elapsed += stats["seconds"]  # the trainer's own clock: this evaluation is not in it
        acc = (predict(model, x_test) == y_test).float().mean().item()
        curve.append({"epoch": epoch + 1, "train_seconds": round(elapsed, 2), "clean_acc": acc, "train_acc": stats["train_acc"]})
        print(f"{name}: epoch {epoch + 1} at {elapsed:.0f} s, clean_acc {100 * acc:.2f}%", flush=True)

    t0 = time.perf_counter()
    result = train_attack(cfg, scenario, on_epoch_end=observe)
    return {"run": name, "seed": seed, "data": data, "n_train": len(scenario.data.x_train), "n_test": len(scenario.data.x_test),
            "config": cfg.model_dump(), "metrics": result.metrics, "train_seconds": round(result.seconds, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1), "curve": curve, "threads": threads,
            "bf16": amp_active(torch.device("cpu"), cfg.train.amp), "device": device_name(torch.device("cpu"))}


def table(out_dirs: list[Path]) -> str:
    rows = [json.loads(p.read_text()) for d in out_dirs for p in sorted(d.glob("*.json"))]
    lines = ["| run | model | epochs | bf16 | device | train s | wall s | clean_acc | asr | first epoch at ≥ 88% |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        m, cfg = r["metrics"], r["config"]
        hit = next((c for c in r["curve"] if c["clean_acc"] >= 0.88), None)
        model = f"{cfg['model']['name']} w{cfg['model']['width']}"
        lines.append(f"| {r['run']} | {model} | {cfg['train']['epochs']} | {r['bf16']} | {r['device']} | "
                     f"{r['curve'][-1]['train_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                     f"{100 * m['clean_acc']:.2f} | {100 * m['asr']:.2f} | "
                     + (f"{hit['epoch']} ({hit['train_seconds']:.0f} s)" if hit else "-") + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    keep_freed_memory()  # the allocator setting the CLI and the grid run with, so the timings are the product's
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="cifar10-mini")
    p.add_argument("--runs", nargs="*", default=[], help="RECIPE-ATTACK names, e.g. fast-badnets preact16-none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--table", type=Path, help="write the Markdown table of every run in --out-dir (and --also) here")
    p.add_argument("--also", type=Path, nargs="*", default=[], help="more result folders for the table (other machines)")
    args = p.parse_args()
    for name in args.runs:
        path = args.out_dir / f"{name}-s{args.seed}.json"
        if path.exists():
            print(f"{path} exists; skipped")
            continue
        atomic_write_json(path, run(name, args.data, args.seed, torch.get_num_threads()))
    if args.table:
        atomic_write_text(args.table, table([*args.also, args.out_dir]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
