"""Every registered attack on the bundled data at demo scale: clean_acc, asr and robust_acc.

Each attack trains the demo's model (small_cnn width 16, 20 epochs, lr 0.05, batch 128, pratio 0.1,
target 0; see ``antidoor.demo.DEMO_DEFAULTS``) on the bundled cifar10-mini (5,000 training, 1,000
test images) through ``pipeline.train_attack``, the code path of ``antidoor attack``, fitting the
trigger first where the attack has one to fit. The attacks' own defaults are used except where
``BENCH_PARAMS`` says otherwise (smaller trigger-fitting networks and fewer fitting epochs, to stay
within a CPU budget; each entry says why). Writes JSON (every row, fit reports, timings) and a
Markdown table with the command.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/attacks.py --out benchmarks/results/attacks_cpu.json \\
        --markdown benchmarks/attacks.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from antidoor.attacks import ATTACKS
from antidoor.config import AttackRunConfig, build_config
from antidoor.data import load_dataset
from antidoor.demo import DEMO_DEFAULTS
from antidoor.pipeline import Scenario, train_attack
from antidoor.utils import atomic_write_json, atomic_write_text, keep_freed_memory

# Changes from an attack's own defaults at this scale, and why.
BENCH_PARAMS: dict[str, dict[str, Any]] = {
    # BackdoorBench's G and M are 32-64-128 channels and M pre-trains 25 epochs: about 10x the
    # victim's cost per image on a CPU. Width 8 and 10 mask epochs keep fitting near a minute.
    "input_aware": {"generator_width": 8, "mask_epochs": 10},
}


def run(name: str, seed: int, epochs: int, device: str, data: Any, extra: dict[str, Any]) -> dict[str, Any]:
    base = {k: v for k, v in DEMO_DEFAULTS.items() if k != "defenses"}
    attack = {"name": name, "pratio": 0.0 if name == "none" else 0.1, "target": 0, **BENCH_PARAMS.get(name, {}), **extra}
    cfg = build_config(AttackRunConfig, base={**base, "attack": attack, "train": {**base["train"], "epochs": epochs}},
                       seed=seed, device=device)
    scenario = Scenario.build(cfg.data, cfg.attack, cfg.seed, cfg.device, data=data)
    result = train_attack(cfg, scenario, description=f"bench: {name}")
    return {"attack": name, **result.metrics, "n_poison": len(scenario.splits.poison),
            "prepare_s": round(result.prepare_seconds, 1), "train_s": round(result.seconds, 1),
            "fit": scenario.attack.fit_report, "params": {k: v for k, v in cfg.attack.items() if k != "name"}}


def markdown(runs: list[dict[str, Any]]) -> str:
    """One table over the rows of one or more runs (JSON files of this script), each run's command above it."""
    lines = []
    for meta in runs:
        lines += [f"    {meta['command']}", ""] + ([f"({meta['note']})", ""] if meta.get("note") else [])
    m = runs[0]
    epochs = ", ".join(sorted({str(r["epochs"]) for r in runs}))
    walls = " + ".join(f"{r['seconds'] / 60:.1f}" for r in runs)
    lines += [f"Machine: {m['machine']}; torch {m['torch']}; device {m['device']}; seed {m['seed']}; epochs {epochs}; "
              f"wall time {walls} min (a shared, overloaded machine: wall time is not cost).", "",
              "| attack | epochs | clean_acc | asr | robust_acc | poisoned | fit s | train s | non-default parameters |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for meta in runs:
        for r in meta["rows"]:
            lines.append(_row(r, meta))
    return "\n".join(lines) + "\n"


def _row(r: dict[str, Any], meta: dict[str, Any]) -> str:
    params = {**meta["bench_params"].get(r["attack"], {}), **meta["extra"].get(r["attack"], {})}
    changed = ", ".join(f"{k}={v}" for k, v in params.items())
    return (f"| {r['attack']} | {meta['epochs']} | {100 * r['clean_acc']:.1f} | {100 * r['asr']:.1f} | "
            f"{100 * r['robust_acc']:.1f} | {r['n_poison']} | {r['prepare_s']} | {r['train_s']} | {changed or '-'} |")


def main() -> None:
    keep_freed_memory()  # the allocator setting the CLI and the grid run with, so the timings are the product's
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", nargs="*", default=[n for n in ATTACKS.names() if n != "none"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["train"]["epochs"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="ATTACK.KEY=VALUE: an extra attack parameter, e.g. --set lc.eps=16 (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attacks_cpu.json"))
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="write --markdown from these JSON results of earlier runs (runs nothing)")
    args = ap.parse_args()
    if args.combine:
        import json

        atomic_write_text(args.markdown, markdown([json.loads(f.read_text()) for f in args.combine]))
        return
    extra: dict[str, dict[str, Any]] = {}
    for item in args.sets:
        import yaml

        key, value = item.split("=", 1)
        attack, param = key.split(".", 1)
        extra.setdefault(attack, {})[param] = yaml.safe_load(value)
    data = load_dataset(DEMO_DEFAULTS["data"]["name"])
    meta = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "seed": args.seed, "epochs": args.epochs,
            "device": args.device, "extra": extra, "bench_params": BENCH_PARAMS}
    command = "OMP_NUM_THREADS=1 PYTHONPATH=src python " + shlex.join(["benchmarks/attacks.py", *sys.argv[1:]])
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name in args.attacks:
        rows.append(run(name, args.seed, args.epochs, args.device, data, extra.get(name, {})))
        meta["seconds"] = time.perf_counter() - t0
        atomic_write_json(args.out, {"command": command, **meta, "rows": rows})
        print(f"{name}: clean_acc {rows[-1]['clean_acc']:.3f} asr {rows[-1]['asr']:.3f} "
              f"(fit {rows[-1]['prepare_s']} s, train {rows[-1]['train_s']} s) {rows[-1]['fit']}", flush=True)
    if args.markdown:
        atomic_write_text(args.markdown, markdown([{"command": command, **meta, "rows": rows}]))


if __name__ == "__main__":
    main()
