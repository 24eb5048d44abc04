"""PAM's rho ablation: purify one backdoored checkpoint with a PAM defense for each rho and seed.

Reads a YAML (``benchmarks/pam_rho.yaml``: the defense spec, the rho values, the seeds; ``--set``
overrides any key), runs :func:`antidoor.purify` on the checkpoint's recorded defender data for every
(rho, seed) and prints, with the backdoored model's own numbers first:

- ``val_clean_acc``: accuracy on the defender's own validation images, the only number used to choose;
- ``clean_acc``, ``asr``, ``robust_acc``, ``der`` on the test split (measurement only);
- ``p_asr``: asr after the retuning attack (:func:`antidoor.stress.retuning_attack`, its defaults: 5
  poisoned samples among the defender's clean images, 5 epochs), mean over ``ra_seeds``
  (``ra_seeds: []`` leaves it out). The defender cannot run RA (it needs the trigger), so p_asr is
  never used to choose.

The chosen rho (``--max-val-drop``): the largest rho whose mean ``val_clean_acc`` is at most that
much below the rho = 0 run's (the defense without PAM, which the YAML must list). Larger rho pushes
harder off the backdoor-connected path, and the rule spends at most that much validation accuracy
on it. The result is always the model after the defense's last round.

    PYTHONPATH=src .venv/bin/python -m antidoor.cli attack --attack badnets --model small_cnn --width 16 --epochs 20 \\
        --set train.lr=0.05 --out runs/badnets
    PYTHONPATH=src .venv/bin/python benchmarks/pam_rho.py runs/badnets/model.safetensors --config benchmarks/pam_rho.yaml \\
        --out benchmarks/results/pam_rho_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from antidoor.checkpoint import load_checkpoint
from antidoor.config import parse_override, read_yaml, set_nested
from antidoor.defenses import DEFENSES, purify
from antidoor.defenses.base import validate_defense_spec
from antidoor.errors import AntidoorError
from antidoor.metrics import der
from antidoor.pipeline import Scenario
from antidoor.stress import RAConfig, retuning_attack
from antidoor.stress.suite import ra_data_for
from antidoor.utils import atomic_write_json, console

COLUMNS = ["defense", "rho", "seed", "val_clean_acc", "clean_acc", "asr", "robust_acc", "der", "p_asr", "seconds"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a backdoored .safetensors checkpoint (from `antidoor attack`)")
    p.add_argument("--config", type=Path, default=Path(__file__).with_name("pam_rho.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override, e.g. defense.epochs=5")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-val-drop", type=float, default=0.05,
                   help="choose the largest rho whose validation clean_acc is at most this far below rho 0's")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    cfg = read_yaml(args.config)
    for item in args.overrides:
        set_nested(cfg, *parse_override(item))
    spec = validate_defense_spec(dict(cfg["defense"]))
    if "rho" not in DEFENSES.get(spec["name"]).Params.model_fields:
        raise AntidoorError(f"defense {spec['name']!r} has no rho parameter; use a PAM defense (pam, ft-pam, sau-pam)")
    ckpt = load_checkpoint(args.checkpoint)
    scenario = Scenario.from_checkpoint(ckpt, device=args.device)
    defender = scenario.defender_data()
    before = scenario.evaluator(ckpt.model.to(scenario.device))
    params = {k: v for k, v in cfg["defense"].items() if k != "name"}
    ra_seeds = list(cfg.get("ra_seeds", [0, 1, 2]))
    ra_data = ra_data_for(scenario, RAConfig()) if ra_seeds else None

    def p_asr(model: torch.nn.Module) -> float | None:
        if ra_data is None:
            return None
        return retuning_attack(model, ra_data, scenario.evaluator, seeds=ra_seeds).summary()["p_asr_mean"]

    rows: list[dict[str, Any]] = [{"defense": "none", "val_clean_acc": defender.val_accuracy(ckpt.model), **before,
                                   "p_asr": p_asr(ckpt.model)}]
    for rho in cfg["rho"]:
        for seed in cfg.get("seeds", [0]):
            t0 = time.perf_counter()
            purified = purify(ckpt.model, defender, spec["name"], seed=seed, **{**params, "rho": rho})
            seconds = time.perf_counter() - t0
            after = scenario.evaluator(purified)
            rows.append({"defense": spec["name"], "rho": rho, "seed": seed, "val_clean_acc": defender.val_accuracy(purified),
                         **after, "der": der(before, after), "p_asr": p_asr(purified), "seconds": round(seconds, 1)})
            shown = "" if rows[-1]["p_asr"] is None else f" p_asr {rows[-1]['p_asr']:.3f}"
            console.print(f"rho {rho} seed {seed}: val_clean_acc {rows[-1]['val_clean_acc']:.3f} | test clean_acc "
                          f"{after['clean_acc']:.3f} asr {after['asr']:.3f}{shown} ({seconds:.0f} s)")
    chosen = choose_rho(rows[1:], args.max_val_drop)
    table = Table(title=f"{spec['name']}: rho ablation on {args.checkpoint}")
    for c in COLUMNS:
        table.add_column(c)
    for r in rows:
        table.add_row(*(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c) if r.get(c) is not None else "")
                        for c in COLUMNS))
    console.print(table)
    rule = f"largest rho with mean val_clean_acc >= rho 0's - {args.max_val_drop}"
    console.print(f"chosen on the defender's validation data ({rule}): rho = {chosen}")
    if args.out is not None:
        atomic_write_json(args.out, {"checkpoint": str(args.checkpoint), "defense": spec, "rho": cfg["rho"], "rows": rows,
                                     "chosen_rho": chosen, "rule": rule, "ra_seeds": ra_seeds})
    return rows


def choose_rho(rows: list[dict[str, Any]], max_val_drop: float) -> float | None:
    """The largest rho whose mean validation clean_acc is within ``max_val_drop`` of rho 0's (None without rho 0)."""
    by_rho: dict[float, list[float]] = {}
    for r in rows:
        by_rho.setdefault(float(r["rho"]), []).append(r["val_clean_acc"])
    if 0.0 not in by_rho:
        return None
    floor = statistics.fmean(by_rho[0.0]) - max_val_drop
    return max(rho for rho, accs in by_rho.items() if statistics.fmean(accs) >= floor - 1e-9)


if __name__ == "__main__":
    main()
