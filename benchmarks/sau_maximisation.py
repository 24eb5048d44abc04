"""Does SAU's maximisation find the trigger it should unlearn? Shared adversarial examples, searched and actual.

SAU unlearns the shared adversarial examples its maximisation finds (perturbations within an L-inf bound
that take the purified model ``f`` and the frozen backdoored model ``f_ref`` to the same wrong class). When
a purified model keeps a backdoor, this asks whether the search is why. For a SAU-purified checkpoint and
its backdoored parent, on a stratified set of test images outside the target class and on the defender's
validation images:

- ``trigger_shared``: the share of test images whose *triggered* version is a shared adversarial example
  (both models leave their clean prediction and agree on the new class), and the share where both say the
  target: the examples SAU should have unlearned and has not. It needs the trigger (test side only);
- for each maximisation setting (bound, PGD steps, step size, initial perturbation), the share of images
  for which it finds a shared adversarial example, and how many of those are the target class. On the
  validation images this is the defender's own measure (``val_shared_rate``): it needs no trigger, so a
  defender may compare maximisation settings with it; the test columns only explain.

SAU's default search (bound 0.2, 5 steps of size 0.2 from +bound) takes each pixel to a corner of the box
(+-0.2). A Blended trigger moves pixel i by alpha (p_i - x_i), anywhere inside the box.

    python benchmarks/sau_maximisation.py runs/regime/artifacts/purify/<sau key>.safetensors \
        --out benchmarks/results/regime/sau_maximisation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from antidoor.checkpoint import load_checkpoint
from antidoor.data.splits import stratified_subset
from antidoor.defenses.sau import SAUParams, is_shared, shared_adversarial_predictions
from antidoor.metrics import predict
from antidoor.models import frozen_copy
from antidoor.pipeline import Scenario
from antidoor.utils import atomic_write_json

# (name, SAU maximisation parameters): SAU's default first, then finer searches of the same box
SEARCHES: list[tuple[str, dict[str, Any]]] = [
    ("default: 5 steps of 0.2 from +bound", {"pgd_steps": 5, "step_size": 0.2, "init": "max"}),
    ("10 steps of 0.05 from +bound", {"pgd_steps": 10, "step_size": 0.05, "init": "max"}),
    ("20 steps of 0.02 from 0", {"pgd_steps": 20, "step_size": 0.02, "init": "zero"}),
    ("10 steps of 0.05 from uniform", {"pgd_steps": 10, "step_size": 0.05, "init": "random"}),
]


def search(f: torch.nn.Module, f_ref: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int,
           params: SAUParams, seed: int) -> dict[str, float]:
    """Share of images where the maximisation finds a shared adversarial example, and where it is the target."""
    shared, classes = shared_adversarial_predictions(f, f_ref, images, labels, params, seed)
    to_target = shared & (classes == target)
    return {"shared_rate": float(shared.float().mean()), "shared_target_rate": float(to_target.float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("purified", type=Path, nargs="+", help="SAU-purified checkpoints (their sidecar names the parent)")
    ap.add_argument("--test-images", type=int, default=1000, help="stratified test images outside the target class")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for path in args.purified:
        purified = load_checkpoint(path)
        parent = Path(purified.meta["parent"])
        backdoored = load_checkpoint(parent)
        scenario = Scenario.from_checkpoint(backdoored, device="cpu")
        data = scenario.defender_data()
        attack = scenario.attack
        x_test, y_test = scenario.data.x_test, scenario.data.y_test
        keep = (y_test != attack.target).nonzero().squeeze(1)
        pick = keep[stratified_subset(y_test[keep], 0.0, torch.Generator().manual_seed(0), count=args.test_images)]
        x, y = x_test[pick], y_test[pick]
        f, f_ref = purified.model.eval(), frozen_copy(backdoored.model)
        seed = purified.meta.get("seed", 0)
        xf = x.float().div(255)
        xt = attack.apply(xf)
        pred_c, pred_rc = predict(f, xf, 256), predict(f_ref, xf, 256)
        pred_t, pred_rt = predict(f, xt, 256), predict(f_ref, xt, 256)
        shared_t = is_shared(pred_t, pred_rt, pred_c, pred_rc)
        row: dict[str, Any] = {
            "purified": str(path), "backdoored": str(parent), "attack": attack.spec(), "test_images": len(x),
            "validation_images": len(data.x_val), "asr_purified": float((pred_t == attack.target).float().mean()),
            "asr_backdoored": float((pred_rt == attack.target).float().mean()),
            "trigger_shared_rate": float(shared_t.float().mean()),
            "trigger_shared_target_rate": float((shared_t & (pred_t == attack.target)).float().mean()),
            # how far the trigger moves a pixel: SAU's box is +-bound
            "trigger_linf": float((xt - xf).abs().amax()), "trigger_mean_abs": float((xt - xf).abs().mean()),
            "searches": {}}
        print(f"{path.name}: asr purified {row['asr_purified']:.3f} backdoored {row['asr_backdoored']:.3f}; the trigger is "
              f"a shared adversarial example for {row['trigger_shared_rate']:.3f} "
              f"(to the target {row['trigger_shared_target_rate']:.3f}); "
              f"trigger L-inf {row['trigger_linf']:.3f}, mean |d| {row['trigger_mean_abs']:.3f}", flush=True)
        for name, kw in SEARCHES:
            params = SAUParams(batch_size=128, **kw)
            t = time.perf_counter()
            test = search(f, f_ref, x, y, attack.target, params, seed)
            val = search(f, f_ref, data.x_val, data.y_val, attack.target, params, seed)
            row["searches"][name] = {"params": kw, "test": test, "validation": val, "seconds": time.perf_counter() - t}
            print(f"  {name}: test shared {test['shared_rate']:.3f} (target {test['shared_target_rate']:.3f}) | "
                  f"validation shared {val['shared_rate']:.3f} (target {val['shared_target_rate']:.3f}) "
                  f"[{time.perf_counter() - t:.0f} s]", flush=True)
        results.append(row)
        atomic_write_json(args.out, {"results": results, "threads": torch.get_num_threads(), "torch": torch.__version__})
    print(json.dumps({"wrote": str(args.out)}))


if __name__ == "__main__":
    main()
