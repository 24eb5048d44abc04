"""PAM's rho ablation: purify one backdoored checkpoint with a PAM defense for each rho and seed.

Reads a YAML (``benchmarks/pam_rho.yaml``: the defense spec, the rho values, the seeds; ``--set``
overrides any key), runs :func:`antidoor.purify` on the checkpoint's recorded defender data for every
(rho, seed) and prints ``clean_acc``, ``asr``, ``robust_acc`` and ``der`` on the test split, with the
backdoored model's own numbers first. The result is the model after the defense's last round; no
choice is made on test data (the table only reports). ``p_asr`` (asr after the retuning attack)
is not measured here yet: it comes with the stress suite.

    PYTHONPATH=src .venv/bin/python -m antidoor.cli attack --attack badnets --model small_cnn --width 16 --epochs 20 \\
        --set train.lr=0.05 --out runs/badnets
    PYTHONPATH=src .venv/bin/python benchmarks/pam_rho.py runs/badnets/model.safetensors --config benchmarks/pam_rho.yaml \\
        --out benchmarks/results/pam_rho_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from antidoor.checkpoint import load_checkpoint
from antidoor.config import parse_override, read_yaml, set_nested
from antidoor.defenses import DEFENSES, purify
from antidoor.defenses.base import validate_defense_spec
from antidoor.errors import AntidoorError
from antidoor.metrics import der
from antidoor.pipeline import Scenario
from antidoor.utils import atomic_write_json, console

COLUMNS = ["defense", "rho", "seed", "clean_acc", "asr", "robust_acc", "der", "seconds"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a backdoored .safetensors checkpoint (from `antidoor attack`)")
    p.add_argument("--config", type=Path, default=Path(__file__).with_name("pam_rho.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override, e.g. defense.epochs=5")
    p.add_argument("--device", default="cpu")
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
    rows: list[dict[str, Any]] = [{"defense": "none", **before}]
    params = {k: v for k, v in cfg["defense"].items() if k != "name"}
    for rho in cfg["rho"]:
        for seed in cfg.get("seeds", [0]):
            t0 = time.perf_counter()
            purified = purify(ckpt.model, defender, spec["name"], seed=seed, **{**params, "rho": rho})
            seconds = time.perf_counter() - t0
            after = scenario.evaluator(purified)
            rows.append({"defense": spec["name"], "rho": rho, "seed": seed, **after, "der": der(before, after),
                         "seconds": round(seconds, 1)})
            console.print(f"rho {rho} seed {seed}: clean_acc {after['clean_acc']:.3f} asr {after['asr']:.3f} ({seconds:.0f} s)")
    table = Table(title=f"{spec['name']}: rho ablation on {args.checkpoint}")
    for c in COLUMNS:
        table.add_column(c)
    for r in rows:
        table.add_row(*(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in COLUMNS))
    console.print(table)
    if args.out is not None:
        atomic_write_json(args.out, {"checkpoint": str(args.checkpoint), "defense": spec, "rho": cfg["rho"], "rows": rows})
    return rows


if __name__ == "__main__":
    main()
