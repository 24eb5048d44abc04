"""SAU's quality on the bundled data: asr and clean_acc after purification, FT beside it, several seeds.

For every backdoored checkpoint (``--runs DIR/{attack}-s{seed}/model.safetensors``, made by
``antidoor attack``; see ``benchmarks/README.md`` for the exact commands) this script

1. rebuilds its scenario (data, trigger, the defender's split) and the defender's data;
2. purifies with FT (its defaults) and with SAU for each learning rate in ``--lrs``, ``--rounds``
   rounds each, with a monitor that records after every ``--eval-every`` rounds:
   - on the defender's own validation images (the only numbers used to choose): ``val_clean_acc``
     and ``val_shared_rate``, the share of validation images for which SAU's maximisation still
     finds a shared adversarial example against the frozen backdoored model (SAU's paper bounds the
     backdoor risk by this shared adversarial risk; the defender needs no trigger to measure it);
   - on the test split (recorded for the investigation, never used to choose): clean_acc, asr, robust_acc;
3. chooses (lr, rounds) per run on validation data only: among the recorded points whose
   ``val_clean_acc`` is at most ``--max-val-drop`` below the backdoored model's, the lowest
   ``val_shared_rate`` (ties: fewer rounds, then the smaller lr). SAU has no schedule, so the model
   after R rounds of a longer run is the model a run with ``rounds=R`` returns (tested in
   ``tests/test_defenses.py``): the chosen point is a real final model, not a best-on-test pick.

It writes every curve to ``--out`` (JSON) and the table (mean and std over seeds) to ``--md``.

    .venv/bin/python benchmarks/sau_quality.py --runs /tmp/q --out benchmarks/results/sau_quality.json \
        --md benchmarks/results/sau_quality.md
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
from torch import nn

from antidoor.checkpoint import load_checkpoint
from antidoor.defenses import DefenderData, purify
from antidoor.defenses.sau import SAUParams, shared_adversarial_rate
from antidoor.metrics import der
from antidoor.models import frozen_copy
from antidoor.pipeline import Scenario
from antidoor.utils import atomic_write_json, keep_freed_memory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, help="folder with {attack}-s{seed}/model.safetensors")
    p.add_argument("--aggregate", nargs="+", type=Path, default=None,
                   help="only build the table from the JSON files of earlier runs of this script (e.g. one per seed)")
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-3])
    p.add_argument("--bounds", nargs="+", type=float, default=[0.2], help="SAU perturbation bounds to try")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--max-val-drop", type=float, default=0.05)
    p.add_argument("--extra-clean", type=int, default=0,
                   help="investigation: add this many clean, never-poisoned training images to the defender's set")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--wait", type=float, default=0, help="minutes to wait for a checkpoint still being trained")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    return p.parse_args(argv)


def with_extra_clean(scenario: Scenario, data: DefenderData, n: int, seed: int) -> DefenderData:
    """The defender's set plus ``n`` training images that are neither poisoned nor already the defender's."""
    s = scenario.splits
    taken = torch.zeros(len(scenario.data.x_train), dtype=torch.bool)
    for idx in (s.defender_train, s.defender_val, s.poison):
        taken[idx.cpu()] = True
    free = (~taken).nonzero().squeeze(1)
    pick = free[torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))[:n]]
    x, y = scenario.data.x_train[pick.to(data.device)], scenario.data.y_train[pick.to(data.device)]
    return DefenderData(torch.cat([data.x, x]), torch.cat([data.y, y]), data.x_val, data.y_val, data.num_classes, data.hflip)


def one_run(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    scenario = Scenario.from_checkpoint(ckpt, device="cpu")
    data = scenario.defender_data()
    if args.extra_clean:
        data = with_extra_clean(scenario, data, args.extra_clean, ckpt.meta.get("seed", 0))
    evaluate = scenario.evaluator
    model = ckpt.model.eval()
    seed = ckpt.meta.get("seed", 0)
    before = evaluate(model)
    val_before = data.val_accuracy(model)
    f_ref = frozen_copy(model)
    out: dict[str, Any] = {"checkpoint": str(path), "seed": seed, "extra_clean": args.extra_clean, "defender_images": len(data.x),
                           "validation_images": len(data.x_val), "backdoored": before, "val_clean_acc_backdoored": val_before}
    t0 = time.perf_counter()
    ft = purify(model, data, "ft", seed=seed)
    out["ft"] = {**evaluate(ft), "seconds": time.perf_counter() - t0}
    out["ft"]["der"] = der(before, out["ft"])
    curves: dict[str, list[dict[str, Any]]] = {}
    # one yardstick for every candidate: SAU's default maximisation (bound 0.2, 5 steps), on validation images
    probe = SAUParams(batch_size=min(args.batch_size, len(data.x_val)))
    out["val_shared_rate_backdoored"] = shared_adversarial_rate(model, f_ref, data.x_val, data.y_val, probe, seed)
    for lr in args.lrs:
        for bound in args.bounds:
            params = {"rounds": args.rounds, "lr": lr, "batch_size": args.batch_size, "bound": bound,
                      "step_size": bound}  # the official step size equals the bound
            key = f"lr={lr:g},bound={bound:g}"
            curve: list[dict[str, Any]] = []

            def monitor(r: int, f: nn.Module, curve: list[dict[str, Any]] = curve, key: str = key) -> None:
                if r % args.eval_every and r != args.rounds:
                    return
                point = {"rounds": r, "val_clean_acc": data.val_accuracy(f),
                         "val_shared_rate": shared_adversarial_rate(f, f_ref, data.x_val, data.y_val, probe, seed),
                         **evaluate(f)}
                curve.append(point)
                print(f"    {key} round {r:4d}: val_clean_acc {point['val_clean_acc']:.3f} "
                      f"val_shared_rate {point['val_shared_rate']:.3f} | test clean_acc {point['clean_acc']:.3f} "
                      f"asr {point['asr']:.3f}", flush=True)

            t0 = time.perf_counter()
            purify(model, data, "sau", seed=seed, monitor=monitor, **params)
            curves[key] = curve
            out[f"sau_seconds_{key}"] = time.perf_counter() - t0
    out["curves"] = curves
    candidates = [(pt["val_shared_rate"], pt["rounds"], key, pt) for key, c in curves.items() for pt in c
                  if pt["val_clean_acc"] >= val_before - args.max_val_drop]
    if not candidates:  # nothing keeps validation accuracy: fall back to the mildest point
        candidates = [(1 - pt["val_clean_acc"], pt["rounds"], key, pt) for key, c in curves.items() for pt in c]
    _, rounds, key, pt = min(candidates, key=lambda c: c[:3])
    out["sau_chosen"] = {"setting": key, "rounds": rounds, **{k: pt[k] for k in ("clean_acc", "asr", "robust_acc",
                                                                                 "val_clean_acc", "val_shared_rate")}}
    out["sau_chosen"]["der"] = der(before, out["sau_chosen"])
    official = curves.get("lr=0.0001,bound=0.2", [])
    if official and official[-1]["rounds"] == args.rounds:
        out["sau_official"] = {**{k: official[-1][k] for k in ("clean_acc", "asr", "robust_acc")}, "lr": 1e-4,
                               "rounds": args.rounds}
        out["sau_official"]["der"] = der(before, out["sau_official"])
    return out


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = ["| attack | model | clean_acc (%) | asr (%) | robust_acc (%) | der (%) | seeds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for attack, runs in results.items():
        rows = [("backdoored", "backdoored"), ("FT (defaults)", "ft"),
                (f"SAU official (lr 1e-4, {args.rounds} rounds)", "sau_official"),
                ("SAU, chosen on defender validation", "sau_chosen")]
        for label, key in rows:
            have = [r[key] for r in runs if key in r]
            if not have:
                continue
            cells = [mean_std([h[m] for h in have]) if all(m in h for h in have) else "" for m in
                     ("clean_acc", "asr", "robust_acc", "der")]
            lines.append(f"| {attack} | {label} | " + " | ".join(cells) + f" | {len(have)} |")
    chosen = [(a, r["seed"], r["sau_chosen"]["setting"], r["sau_chosen"]["rounds"]) for a, runs in results.items() for r in runs]
    lines.append("")
    lines.append("Chosen SAU settings per run: " + "; ".join(f"{a} seed {s}: {k}, {n} rounds" for a, s, k, n in chosen))
    return "\n".join(lines) + "\n"


def aggregate(files: list[Path]) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Merge the ``results`` of several output files (one run per (attack, seed) kept) and their rounds."""
    merged: dict[str, dict[int, dict[str, Any]]] = {}
    rounds = 0
    for f in files:
        data = json.loads(f.read_text())
        rounds = max(rounds, int(data["args"]["rounds"]))
        for attack, runs in data["results"].items():
            for run in runs:
                merged.setdefault(attack, {})[run["seed"]] = run
    return {a: [runs[s] for s in sorted(runs)] for a, runs in merged.items()}, rounds


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # the allocator setting the CLI and the grid run with, so the timings are the product's
    args = parse_args(argv)
    if args.aggregate:
        results, args.rounds = aggregate(args.aggregate)
        md = table(results, args)
        print(md)
        if args.md is not None:
            args.md.write_text(md)
        return 0
    if args.runs is None:
        raise SystemExit("--runs is required (or --aggregate FILES)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for attack in args.attacks:
            path = args.runs / f"{attack}-s{seed}" / "model.safetensors"
            deadline = time.time() + 60 * args.wait
            while not path.with_suffix(".json").exists() and time.time() < deadline:
                time.sleep(10)
            print(f"{attack} seed {seed}: {path}", flush=True)
            run = one_run(path, args)
            results.setdefault(attack, []).append(run)
            print(f"  backdoored {run['backdoored']}\n  ft {run['ft']}\n  sau chosen {run['sau_chosen']}", flush=True)
            if args.out is not None:  # after every run, so a long study can be read while it goes
                atomic_write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                             "torch": torch.__version__, "python": platform.python_version(),
                                             "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t_start,
                                             "command": " ".join([Path(sys.executable).name, *sys.argv])})
    md = table(results, args)
    print(md)
    if args.md is not None:
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
