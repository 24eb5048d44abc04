"""SAU's unlearning term -log(1 - s) three ways, round by round: exact, the official code's, clamped.

s = softmax(f(x + d))[y_adv_ref] is the purified model's probability of the reference model's
adversarial label. The unlearning term pushes it down; which form of log(1 - s) is used decides
what happens to the samples the backdoor is surest of (s near 1):

* ``exact`` (antidoor now): logsumexp of the other classes' logits minus logsumexp of all; no clamp.
* ``official``: the official code's average of log(1e-6 + sum of the other probabilities, capped
  at 0.999) and log(1 + 1e-6 - s, with s floored at 0.001) -- a gradient at s near 1 survives.
* ``clamped`` (antidoor before): log(1 - s) with s clamped to [1e-3, 0.999] -- no gradient at all
  for s > 0.999.

Everything else is antidoor's SAU (same model, data, seeds, settings); only the term is swapped.
After every round the test split's asr and clean_acc are recorded (for this benchmark only; the
defense never sees them). Seconds per run are recorded too.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sau_unlearning_term.py --out benchmarks/results/sau_unlearning_term_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import antidoor.defenses.sau as sau
from _common import device_name
from antidoor.checkpoint import load_checkpoint
from antidoor.config import AttackRunConfig, build_config
from antidoor.defenses import purify
from antidoor.pipeline import Scenario, train_attack
from antidoor.utils import atomic_write_json

TermFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def official_term(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    probs = logits.float().softmax(1)
    s = probs.gather(1, k[:, None]).squeeze(1)
    others = probs.scatter(1, k[:, None], 0.0).sum(1)
    return 0.5 * (torch.log(1e-6 + others.clamp(max=0.999)) + torch.log(1 + 1e-6 - s.clamp(min=0.001)))


def clamped_term(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    s = logits.float().softmax(1).gather(1, k[:, None]).squeeze(1).clamp(1e-3, 0.999)
    return torch.log1p(-s)


TERMS: dict[str, TermFn] = {"exact": sau.log_one_minus_softmax, "official": official_term, "clamped": clamped_term}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a backdoored model from `antidoor attack` (default: train one here)")
    p.add_argument("--preset", default=None, help="training preset of the model trained here (default: the demo's small CNN)")
    p.add_argument("--data", default="cifar10-mini")
    p.add_argument("--attack", default="badnets")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        scenario, model = Scenario.from_checkpoint(ckpt, device="cpu"), ckpt.model
        source = str(args.checkpoint)
    else:
        overrides = [f"data.name={args.data}", f"attack.name={args.attack}", "attack.pratio=0.1", "device=cpu"]
        if args.preset is None:
            overrides += ["model.name=small_cnn", "model.width=16", "train.epochs=20", "train.lr=0.05"]
        cfg = build_config(AttackRunConfig, overrides=overrides, preset=[args.preset] if args.preset else None)
        result = train_attack(cfg)
        scenario, model, source = result.scenario, result.model, cfg.model_dump()
    before = scenario.evaluator(model)
    defender = scenario.defender_data()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in TERMS}
    original = sau.log_one_minus_softmax
    try:
        for seed in args.seeds:
            for name, term in TERMS.items():
                sau.log_one_minus_softmax = term
                curve: list[dict[str, float]] = []
                t0 = time.perf_counter()
                purify(model, defender, "sau", seed=seed, rounds=args.rounds, batch_size=args.batch_size, lr=args.lr,
                       amp=args.amp, monitor=lambda r, f, c=curve: c.append({"round": r, **scenario.evaluator(f)}))
                runs[name].append({"seed": seed, "seconds": round(time.perf_counter() - t0, 1), "curve": curve})
                print(f"seed {seed} {name:8s} asr by round: " + " ".join(f"{100 * c['asr']:.1f}" for c in curve), flush=True)
    finally:
        sau.log_one_minus_softmax = original
    mean = {name: [{"round": r + 1,
                    "asr": statistics.mean(run["curve"][r]["asr"] for run in rs),
                    "clean_acc": statistics.mean(run["curve"][r]["clean_acc"] for run in rs)} for r in range(args.rounds)]
            for name, rs in runs.items()}
    atomic_write_json(args.out, {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
                                 "model": source, "before": before, "n_defender_train": len(defender.x),
                                 "settings": {k: v for k, v in vars(args).items() if k not in ("out", "checkpoint")},
                                 "mean_by_round": mean, "runs": runs})
    print("round  " + "  ".join(f"{n + ' asr':>14}" for n in TERMS))
    for r in range(args.rounds):
        print(f"{r + 1:5d}  " + "  ".join(f"{100 * mean[n][r]['asr']:14.1f}" for n in TERMS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
