"""Where does PAM's clean-accuracy cost come from? Round 1 of PAM, from one inversion, under several recipes.

PAM at its full defaults removed the regime study's BadNets seed 2 (asr 96.5% -> 2.4%) but cost 4.80 points of
clean accuracy, and its own run at rho 0 was already 8 points below the given model on the defender's
validation images (90.4% against 98.4%; ``benchmarks/regime.md``). This script separates the suspects. It runs
round 1 of PAM's inversion once, at the defaults (the expensive part: pretraining, mask, generator), with the
defense's seed, then round 1 of unlearning from the same start under each recipe below and measures

- ``val_clean_acc``: the defender's validation accuracy (what a defense may choose with);
- ``clean_acc`` and ``asr`` on the test split (what the user is told; read here to *explain*, never to choose);
- ``g_asr``: the share of G(x) over the defender's validation images outside the detected class that the
  purified model still gives to that class (round 1's generator, fixed): a backdoor signal the defender has.

Recipes (``--recipes``, default all): ``epochs30`` (the official round: 30 epochs of SGD 0.01, momentum 0.9, cosine,
20% G(x), rho 0), ``no-generated`` (the same fine-tuning on clean images only: what G(x) costs), ``epochs10``,
``lr0.003``, ``wd5e-4`` and ``rho0.3`` (the path-aware step itself, at the rho the full run kept). With ``--full`` each recipe
runs as the defense does with no settings (its rounds, ``rho: auto``), from the same cached round-1 inversion, and
every rho candidate it tries is measured too (``--base rho_tolerance=0`` tries them all).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pam_cost_probe.py runs/regime/artifacts/attack/X.safetensors \\
        --cache runs/pam_cost_probe/inversion.pt --out benchmarks/results/regime/pam_cost/round1_rho0.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from antidoor.checkpoint import load_checkpoint
from antidoor.defenses.btidbf import UNetGenerator, first_round_inversion, new_inversion
from antidoor.defenses.pam import PAMDefense, PAMParams
from antidoor.defenses.tuning import tune
from antidoor.metrics import predict
from antidoor.pipeline import Scenario
from inversion_probe import generated

RECIPES: dict[str, dict[str, Any]] = {
    "epochs30": {"epochs": 30},  # the official length of a round (antidoor's default until 2026-12-05)
    "no-generated": {"epochs": 30},  # same optimiser and schedule, clean images only (tune's plain cross-entropy)
    "epochs10": {"epochs": 10},
    "lr0.003": {"epochs": 30, "lr": 0.003},
    "wd5e-4": {"epochs": 30, "weight_decay": 5e-4},
    "rho0.3": {"epochs": 30, "rho": 0.3},
}


def inversion(model: torch.nn.Module, data: Any, p: PAMParams, seed: int, cache: Path | None) -> tuple:
    """Round 1's inversion as PAMDefense computes it (same seed, same generator stream), cached on disk."""
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)  # our own file, tensors only
        return saved["gen"], saved["opt"], saved["mask"], int(saved["target"]), saved["rng"], float(saved["seconds"])
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # G's initial weights, as rho: auto seeds them before each run
    gen, gen_opt, g = new_inversion(data, p, seed)
    mask, target = first_round_inversion(gen, gen_opt, copy.deepcopy(model).eval().requires_grad_(False), data, p, g)
    seconds = time.perf_counter() - t0
    state = (gen.state_dict(), gen_opt.state_dict(), mask, target, g.get_state(), seconds)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"gen": state[0], "opt": state[1], "mask": mask, "target": target, "rng": state[4],
                    "seconds": seconds}, cache)
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a backdoored checkpoint (.safetensors with sidecar)")
    ap.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    ap.add_argument("--seed", type=int, default=0, help="the defense's seed (the CLI's default: 0)")
    ap.add_argument("--cache", type=Path, help="keep round 1's inversion here and reuse it")
    ap.add_argument("--out", type=Path, help="write the results to this JSON file")
    ap.add_argument("--full", action="store_true",
                    help="run each recipe as the defense does (its rounds, rho: auto), from the cached round-1 inversion")
    ap.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE",
                    help="PAM parameters under every recipe (e.g. pretrain_epochs=1 for a quick check)")
    args = ap.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    sc = Scenario.from_checkpoint(ckpt, device="cpu")
    data = sc.defender_data()
    backdoored = ckpt.model.eval()
    overrides = dict(kv.split("=", 1) for kv in args.base)
    # round 1 at rho 0, or (--full) what `antidoor purify --defense pam` runs: every round, rho: auto
    base = PAMParams(**overrides) if args.full else PAMParams(rounds=1, rho=0.0, **overrides)
    first = inversion(backdoored, data, base, args.seed, args.cache)
    gen_state, target = first[0], first[3]
    gen = UNetGenerator(data.x.shape[1], base.generator_width)
    gen.load_state_dict(gen_state)
    gx = generated(gen, data.x_val[data.y_val != target].float().div(255))

    def measure(model: torch.nn.Module) -> dict[str, float]:
        m = sc.evaluator(model)
        return {"val_clean_acc": data.val_accuracy(model), "clean_acc": m["clean_acc"], "asr": m["asr"],
                "g_asr": (predict(model, gx) == target).float().mean().item()}

    results: dict[str, Any] = {"checkpoint": str(args.checkpoint), "seed": args.seed, "detected_target": target,
                               "true_target": sc.attack.target, "inversion_seconds": round(first[5], 1),
                               "n_defender_train": len(data.x), "n_defender_val": len(data.x_val),
                               "base": args.base, "full": args.full,
                               "given": measure(backdoored), "recipes": {}}
    print(f"detected class {target} (true {sc.attack.target}); given model: {results['given']}", flush=True)
    # rho: auto's candidates, each measured as it finishes (the defense keeps only the one it chose)
    candidates: dict[str, dict[str, float]] = {}
    at_rho = PAMDefense.purify_at_rho

    def measured_at_rho(self: PAMDefense, model: torch.nn.Module, data: Any) -> torch.nn.Module:
        result = at_rho(self, model, data)
        candidates[f"{self.rho_in_use:g}"] = measure(result.eval())
        return result

    PAMDefense.purify_at_rho = measured_at_rho  # type: ignore[method-assign]
    for name in args.recipes:
        t0 = time.perf_counter()
        candidates.clear()
        p = PAMParams(**{**base.model_dump(), **RECIPES[name]})
        defense = PAMDefense(seed=args.seed, **p.model_dump())
        model = copy.deepcopy(backdoored)
        if name == "no-generated":
            tune(model, data, defense.unlearning_config(), seed=args.seed + 1, description="fine-tune, clean images only")
        else:
            defense.first_inversion = copy.deepcopy(first[:5])
            model = defense.purify(model, data)
        row = {**measure(model.eval()), "seconds": round(time.perf_counter() - t0, 1), "overrides": RECIPES[name],
               "chosen": dict(defense.chosen)}
        if defense.chosen.get("rho_runs"):
            row["candidates"] = dict(candidates)
        results["recipes"][name] = row
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
