"""Issue 18, item 5: is the verdict from an inverted trigger the verdict from the true one?

A user auditing a downloaded model rarely holds the attacker's trigger. ``antidoor stress --set
inversion={}`` then recovers one from the backdoored model (BTI-DBF's inversion) and runs the retuning
attack with it. This script checks, through the public CLI only, whether that gives the verdict the
true trigger gives:

1. per attack and seed, ``antidoor attack`` trains a backdoored model and (once per seed) a clean
   reference with the demo's recipe (``whitened_cnn`` width 32, the ``fast`` preset, 16 epochs);
2. ``antidoor purify`` with FT, SAU, PAM and EP;
3. ``antidoor stress`` on the four purified models twice: with the attacker's trigger and recorded
   poisoned samples, and with ``--set inversion={}``.

Both stress runs use the same references so that only the trigger differs: the clean model, and no EP
reference (``--set ep=false``), since with an unknown trigger EP's poisoned samples are unknown too; EP
is stressed as a purified model instead. QRA and the path are off: the verdict reads o_asr and p_asr.
Every step's output is kept under ``--runs`` and reused, so an interrupted run resumes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inverted_verdict.py --runs runs/inverted \\
        --out benchmarks/results/inverted_verdict.json --md benchmarks/inverted_verdict.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPE = ["--preset", "fast", "--model", "whitened_cnn", "--width", "32", "--epochs", "16",
          "--set", "train.batch_size=256", "--set", "train.lr=0.2"]  # the demo's (antidoor.demo.DEMO_DEFAULTS)
DEFENSES: dict[str, list[str]] = {
    "ft": [],
    "sau": ["--set", "defense.rounds=20", "--set", "defense.batch_size=100", "--set", "defense.lr=5e-4"],  # the demo's
    # the regime study's cut-down PAM (benchmarks/regime_study.yaml), rho: auto
    "pam": ["--set", "defense.rounds=2", "--set", "defense.pretrain_epochs=5", "--set", "defense.mask_epochs=5",
            "--set", "defense.generator_epochs=5", "--set", "defense.epochs=10"],
    "ep": [],
}
STRESS = ["--set", "ep=false", "--set", "qra=null", "--set", "path=null"]


def antidoor() -> str:
    exe = shutil.which("antidoor", path=str(Path(sys.executable).parent))
    if exe is None:
        sys.exit("the antidoor command is not installed beside this python")
    return exe


def step(args: list[str], done: Path, log: Path) -> dict[str, Any]:
    """Run one CLI command unless ``done`` exists; its exit code and seconds (None when reused)."""
    if done.exists():
        return {"rc": 0, "seconds": None}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run([antidoor(), *args, "--quiet"], stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = round(time.perf_counter() - t0, 1)
    print(f"  {' '.join(args[:2])} ... -> rc {rc} in {seconds} s", flush=True)
    return {"rc": rc, "seconds": seconds, "log": str(log)}


def run_cell(runs: Path, attack: str, seed: int, defenses: list[str]) -> dict[str, Any]:
    clean, cell = runs / f"clean-s{seed}", runs / f"{attack}-s{seed}"
    common = [*RECIPE, "--seed", str(seed)]
    step(["attack", "--attack", "badnets", "--pratio", "0", *common, "--out", str(clean)],
         clean / "model.safetensors", clean / "log.txt")
    r = step(["attack", "--attack", attack, "--pratio", "0.1", "--target", "0", *common, "--out", str(cell / "backdoored")],
             cell / "backdoored" / "model.safetensors", cell / "backdoored" / "log.txt")
    if r["rc"] != 0:
        return {"error": f"attack failed: {r}"}
    purified = []
    for d in defenses:
        out = cell / d
        r = step(["purify", str(cell / "backdoored" / "model.safetensors"), "--defense", d, *DEFENSES[d],
                  "--seed", str(seed), "--out", str(out)], out / "model.safetensors", out / "log.txt")
        if r["rc"] == 0:
            # "ep" names the EP reference in a stress run; as a purified model it needs another name
            purified.append(f"{'ep-purified' if d == 'ep' else d}={out / 'model.safetensors'}")
    result: dict[str, Any] = {"attack": attack, "seed": seed}
    for trigger, extra in (("true", []), ("inverted", ["--set", "inversion={}"])):
        out = cell / f"stress-{trigger}"
        r = step(["stress", *purified, "--backdoored", str(cell / "backdoored" / "model.safetensors"),
                  "--clean-ref", str(clean / "model.safetensors"), *STRESS, *extra, "--seed", str(seed), "--out", str(out)],
                 out / "stress.json", out / "log.txt")
        if (out / "stress.json").exists():
            result[trigger] = summarise(json.loads((out / "stress.json").read_text()))
        else:  # a refusal (exit 2) is an outcome: the guardrail found the recovered trigger does not work
            log = Path(r.get("log", out / "log.txt"))
            result[trigger] = {"refused": log.read_text().strip().splitlines()[-6:] if log.exists() else [], "rc": r["rc"]}
    return result


def summarise(stress: dict[str, Any]) -> dict[str, Any]:
    models = {name: {k: m["summary"].get(k) for k in ("o_asr", "p_asr_mean", "p_asr_std", "clean_acc")}
              for name, m in stress["models"].items()}
    verdicts = {name: {"verdict": v["verdict"], "confident": v.get("confident")} for name, v in stress["verdicts"].items()}
    return {"models": models, "verdicts": verdicts, "attack": stress["data"]["attack"]}


def markdown(cells: list[dict[str, Any]]) -> str:
    lines = ["| attack | seed | defense | verdict, true trigger | verdict, inverted | o_asr true / inverted | "
             "p_asr true / inverted | agree |", "|---|---:|---|---|---|---:|---:|---|"]
    agree = total = 0
    for c in cells:
        true, inv = c.get("true", {}), c.get("inverted", {})
        for name, v in true.get("verdicts", {}).items():
            mt = true["models"][name]
            if "refused" in inv:
                lines.append(f"| {c['attack']} | {c['seed']} | {name} | {word(v)} | refused | "
                             f"{pct(mt['o_asr'])} / - | {pct(mt['p_asr_mean'])} / - | no |")
                total += 1
                continue
            vi, mi = inv["verdicts"][name], inv["models"][name]
            same = v["verdict"] == vi["verdict"]
            agree, total = agree + same, total + 1
            lines.append(f"| {c['attack']} | {c['seed']} | {name} | {word(v)} | {word(vi)} | "
                         f"{pct(mt['o_asr'])} / {pct(mi['o_asr'])} | {pct(mt['p_asr_mean'])} / {pct(mi['p_asr_mean'])} | "
                         f"{'yes' if same else '**no**'} |")
    refs = ["", "The references under each trigger (the inverted trigger's target is the class the inversion detected):", "",
            "| attack | seed | target true / inverted | backdoored o_asr true / inverted | clean p_asr true / inverted |",
            "|---|---:|---|---:|---:|"]
    for c in cells:
        true, inv = c.get("true", {}), c.get("inverted", {})
        if "models" not in true:
            continue
        tt = true["attack"].get("target")
        if "refused" in inv:
            bd = pct(true["models"]["backdoored"]["o_asr"])
            refs.append(f"| {c['attack']} | {c['seed']} | {tt} / - | {bd} / refused | - |")
            continue
        refs.append(f"| {c['attack']} | {c['seed']} | {tt} / {inv['attack'].get('target')} | "
                    f"{pct(true['models']['backdoored']['o_asr'])} / {pct(inv['models']['backdoored']['o_asr'])} | "
                    f"{pct(true['models']['clean']['p_asr_mean'])} / {pct(inv['models']['clean']['p_asr_mean'])} |")
    return "\n".join([*lines, "", f"Agreement: {agree} of {total} verdicts.", *refs])


def word(v: dict[str, Any]) -> str:
    return v["verdict"] + ("" if v.get("confident", True) else " (uncertain)")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blended", "sig"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=list(DEFENSES))
    ap.add_argument("--runs", type=Path, default=Path("runs/inverted"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/inverted_verdict.json"))
    ap.add_argument("--md", type=Path, default=None, help="also write the table as Markdown here")
    args = ap.parse_args()
    cells = []
    for seed in args.seeds:
        for attack in args.attacks:
            print(f"{attack} seed {seed}", flush=True)
            cells.append(run_cell(args.runs, attack, seed, args.defenses))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"recipe": RECIPE, "defenses": DEFENSES, "stress": STRESS, "cells": cells}, indent=1))
    table = markdown(cells)
    print(table)
    if args.md:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
