"""bf16 against float32: does the precision change any result beyond noise, and what does it save?

Two parts, each resumable (a run whose JSON exists under ``--out-dir`` is skipped):

* ``train``: the demo's recipe (``antidoor.demo.DEMO_DEFAULTS``: whitened_cnn width 32, 16 epochs, the
  bundled data), BadNets and Blended (pratio 0.1, target 0), seeds 0-2, once with bf16 autocast and
  once in float32 (``ANTIDOOR_AMP=off``, which switches every loop: training, evaluation, SAU's PGD).
  Each BadNets model is then purified with the demo's SAU (20 rounds, batch 100, lr 5e-4) in the same
  precision. Records clean_acc, asr, training seconds (the trainer's clock), SAU's asr, clean_acc and
  seconds.
* ``sau``: SAU's precision alone. One BadNets model per seed (the demo's recipe, bf16), then the demo's
  SAU on that same model once in bf16 and once in float32, both measured in float32: a paired
  comparison that training's precision cannot confound.
* ``pam``: PAM's precision alone, the same way. One BadNets model per seed in ``pam_study.yaml``'s setting
  (small_cnn width 16, 20 epochs, the bundled ``cifar10-mini``; trained in bf16, or ``--trained-in fp32``),
  then that study's ``pam`` (at the current defaults otherwise, recorded) on the same model once in bf16
  and once in float32, and RA at its defaults on both purified models in float32.
* ``demo``: ``antidoor demo`` end to end, in a subprocess, bf16 and float32 alternately (``--repeats``
  times each): wall seconds and its table.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/precision.py --part train --out-dir benchmarks/results/precision
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision.py --part sau --seeds 0 1 2 3 --out-dir benchmarks/results/precision
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision.py --part pam --out-dir benchmarks/results/precision
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/precision.py --part demo --out-dir benchmarks/results/precision
    .venv/bin/python benchmarks/precision.py --table --out-dir benchmarks/results/precision

Timings need an idle machine: the CPU share of each run is recorded (well below 1: contended).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from _common import device_name, with_cpu_share
from antidoor.config import AttackRunConfig, build_config
from antidoor.defenses import purify
from antidoor.defenses.base import validate_defense_spec
from antidoor.demo import DEMO_DEFAULTS
from antidoor.pipeline import Scenario, train_attack
from antidoor.precision import amp_active
from antidoor.stress import StressConfig, run_stress
from antidoor.utils import atomic_write_json, keep_freed_memory

PRECISIONS = {"bf16": "", "fp32": "off"}  # -> ANTIDOOR_AMP
SAU = next(d for d in DEMO_DEFAULTS["defenses"] if d["name"] == "sau")


def set_precision(name: str) -> None:
    os.environ["ANTIDOOR_AMP"] = PRECISIONS[name]


def train_run(attack: str, seed: int, precision: str) -> dict[str, Any]:
    set_precision(precision)
    base = {k: DEMO_DEFAULTS[k] for k in ("data", "model", "train")}
    cfg = build_config(AttackRunConfig, overrides=[f"attack.name={attack}", "attack.pratio=0.1", "attack.target=0",
                                                   f"seed={seed}", "device=cpu"], base=base)
    scenario = Scenario.build(cfg.data, cfg.attack, cfg.seed, cfg.device)
    result, share = with_cpu_share(lambda: train_attack(cfg, scenario, description=f"{attack} s{seed} {precision}"))
    row: dict[str, Any] = {"attack": attack, "seed": seed, "precision": precision,
                           "bf16_active": amp_active(torch.device("cpu")), **result.metrics,
                           "train_seconds": round(sum(h["seconds"] for h in result.history), 2), "cpu_share": round(share, 3)}
    if attack == "badnets":
        params = {k: v for k, v in SAU.items() if k != "name"}
        t0 = time.perf_counter()
        purified, share = with_cpu_share(lambda: purify(result.model, scenario.defender_data(), "sau", seed=seed, **params))
        row["sau"] = {**scenario.evaluator(purified), "seconds": round(time.perf_counter() - t0, 2), "cpu_share": round(share, 3),
                      "settings": SAU}
    return row


def backdoored_model(seed: int, base: dict[str, Any], overrides: list[str], trained_in: str) -> tuple[Scenario, Any]:
    """A BadNets-style model trained in ``trained_in`` precision, with the scenario it was trained in."""
    set_precision(trained_in)
    cfg = build_config(AttackRunConfig, overrides=[*overrides, f"seed={seed}", "device=cpu"], base=base)
    scenario = Scenario.build(cfg.data, cfg.attack, cfg.seed, cfg.device)
    return scenario, train_attack(cfg, scenario, description=f"{cfg.attack['name']} s{seed} ({trained_in})")


def purify_in_each_precision(model: torch.nn.Module, scenario: Scenario, defense: dict[str, Any],
                             seed: int) -> tuple[dict[str, torch.nn.Module], dict[str, dict[str, Any]]]:
    """The same defense on the same model once per precision: the purified models and each run's seconds and CPU share."""
    name, params = defense["name"], {k: v for k, v in defense.items() if k != "name"}
    purified, timing = {}, {}
    for prec in PRECISIONS:
        set_precision(prec)
        t0 = time.perf_counter()
        purified[prec], share = with_cpu_share(lambda: purify(model, scenario.defender_data(), name, seed=seed, **params))
        timing[prec] = {"seconds": round(time.perf_counter() - t0, 2), "cpu_share": round(share, 3)}
    set_precision("fp32")  # whatever follows measures every purified model the same way
    return purified, timing


def sau_pair(seed: int) -> dict[str, Any]:
    base = {k: DEMO_DEFAULTS[k] for k in ("data", "model", "train")}
    scenario, result = backdoored_model(seed, base, ["attack.name=badnets", "attack.pratio=0.1", "attack.target=0"], "bf16")
    set_precision("fp32")
    row: dict[str, Any] = {"attack": "badnets", "seed": seed, "trained_in": "bf16",
                           "backdoored": scenario.evaluator(result.model), "settings": SAU}
    purified, timing = purify_in_each_precision(result.model, scenario, SAU, seed)
    for prec, m in purified.items():
        row[prec] = {**scenario.evaluator(m), **timing[prec]}
    return row


def pam_pair(seed: int, trained_in: str = "bf16") -> dict[str, Any]:
    study = yaml.safe_load((Path(__file__).parent / "pam_study.yaml").read_text())
    model, attack = study["models"][0], study["attacks"][0]
    overrides = [f"model.{k}={v}" for k, v in model.items()] + [f"attack.{k}={v}" for k, v in attack.items()]
    scenario, result = backdoored_model(seed, {"data": {"name": "cifar10-mini"}, "train": study["train"]}, overrides, trained_in)
    settings = validate_defense_spec(next(d for d in study["defenses"] if d["name"] == "pam"))  # every default, as run
    row: dict[str, Any] = {"attack": attack["name"], "seed": seed, "trained_in": trained_in, "settings": settings}
    purified, timing = purify_in_each_precision(result.model, scenario, settings, seed)
    stress = run_stress(purified, result.model, None, scenario, StressConfig(qra=None, path=None, ep=False), seed=seed)
    row["backdoored"] = scenario.evaluator(result.model)
    for prec, m in purified.items():
        row[prec] = {**timing[prec], **scenario.evaluator(m), "ra": stress.models[prec].row()}
    return row


def demo_run(precision: str, out: Path) -> dict[str, Any]:
    env = {**os.environ, "ANTIDOOR_AMP": PRECISIONS[precision]}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "antidoor.cli", "demo", "--quiet", "--out", str(out)], env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({precision}): {proc.stderr[-2000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"precision": precision, "wall_seconds": round(wall, 1), "results": results}


def table(out_dir: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out_dir.glob("train-*.json"))]
    lines = ["| attack | precision | clean_acc | asr | train s | SAU clean_acc | SAU asr | SAU s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for attack in ("badnets", "blended"):
        for prec in PRECISIONS:
            sel = [r for r in rows if r["attack"] == attack and r["precision"] == prec]
            if not sel:
                continue

            def ms(values: list[float], pct: bool = True) -> str:
                k = 100 if pct else 1
                sd = statistics.stdev(values) * k if len(values) > 1 else 0.0
                return f"{statistics.mean(values) * k:.1f} ± {sd:.1f}"

            sau = [r["sau"] for r in sel if "sau" in r]
            cells = [ms([r["clean_acc"] for r in sel]), ms([r["asr"] for r in sel]), ms([r["train_seconds"] for r in sel], False)]
            cells += [ms([s["clean_acc"] for s in sau]), ms([s["asr"] for s in sau]), ms([s["seconds"] for s in sau], False)] \
                if sau else ["—"] * 3
            lines.append(f"| {attack} | {prec} ({len(sel)} seeds) | " + " | ".join(cells) + " |")
    pairs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("sau-badnets-s*.json"))]
    if pairs:
        lines += ["", "SAU on the same bf16-trained BadNets model, in each precision (measured in float32):", "",
                  "| seed | backdoored clean_acc / asr | SAU bf16 clean_acc / asr | SAU fp32 clean_acc / asr | bf16 - fp32 asr |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in pairs:
            b, lo, hi = r["backdoored"], r["bf16"], r["fp32"]
            lines.append(f"| {r['seed']} | {b['clean_acc']:.1%} / {b['asr']:.1%} | {lo['clean_acc']:.1%} / {lo['asr']:.1%} | "
                         f"{hi['clean_acc']:.1%} / {hi['asr']:.1%} | {100 * (lo['asr'] - hi['asr']):+.1f} |")
        d_asr = [100 * (r["bf16"]["asr"] - r["fp32"]["asr"]) for r in pairs]
        d_acc = [100 * (r["bf16"]["clean_acc"] - r["fp32"]["clean_acc"]) for r in pairs]
        sd = statistics.stdev(d_asr) if len(d_asr) > 1 else 0.0
        lines.append(f"| mean | | | | {statistics.mean(d_asr):+.1f} ± {sd:.1f} (clean_acc {statistics.mean(d_acc):+.1f}) |")
    demos = [json.loads(p.read_text()) for p in sorted(out_dir.glob("demo-*.json"))]
    if demos:
        lines += ["", "| demo | wall s (each run) | clean model | BadNets clean_acc / asr | SAU clean_acc / asr |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for prec in PRECISIONS:
            sel = [d for d in demos if d["precision"] == prec]
            if not sel:
                continue
            res = sel[-1]["results"]
            train = {r["model"]: r for r in res["training"]}
            sau = next(r for r in res["purification"] if r["model"] == "sau")
            bd = train["badnets"]
            lines.append(f"| {prec} | {', '.join(str(d['wall_seconds']) for d in sel)} | {train['clean']['clean_acc']:.1%} | "
                         f"{bd['clean_acc']:.1%} / {bd['asr']:.1%} | {sau['clean_acc']:.1%} / {sau['asr']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    keep_freed_memory()  # the allocator setting the CLI and the grid run with, so the timings are the product's
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["train", "sau", "pam", "demo"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
    p.add_argument("--trained-in", choices=list(PRECISIONS), default="bf16", help="--part pam: the backdoored model's precision")
    p.add_argument("--repeats", type=int, default=1, help="demo runs of each precision, alternating")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--table", action="store_true", help="print the markdown tables of what --out-dir holds")
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.part == "train":
        for seed in args.seeds:
            for attack in args.attacks:
                for prec in PRECISIONS:  # bf16 and fp32 of one (attack, seed) back to back: the same machine state
                    path = args.out_dir / f"train-{attack}-s{seed}-{prec}.json"
                    if not path.exists():
                        atomic_write_json(path, {**train_run(attack, seed, prec), "machine": machine})
                        print(path.read_text(), flush=True)
    elif args.part == "sau":
        for seed in args.seeds:
            path = args.out_dir / f"sau-badnets-s{seed}.json"
            if not path.exists():
                atomic_write_json(path, {**sau_pair(seed), "machine": machine})
                print(path.read_text()[:600], flush=True)
    elif args.part == "pam":
        for seed in args.seeds:
            suffix = "" if args.trained_in == "bf16" else f"-trained-{args.trained_in}"
            path = args.out_dir / f"pam-badnets-s{seed}{suffix}.json"
            if not path.exists():
                atomic_write_json(path, {**pam_pair(seed, args.trained_in), "machine": machine})
                print(path.read_text()[:800], flush=True)
    elif args.part == "demo":
        for i in range(args.repeats):
            for prec in PRECISIONS:
                path = args.out_dir / f"demo-{prec}-{i}.json"
                if not path.exists():
                    atomic_write_json(path, {**demo_run(prec, Path(f"/tmp/precision-demo-{prec}")), "machine": machine})
                    print(path.read_text()[:400], flush=True)
    if args.table:
        print(table(args.out_dir))


if __name__ == "__main__":
    main()
