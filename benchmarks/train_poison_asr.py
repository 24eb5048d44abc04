"""Did the backdoored model learn its trigger, or only fail on it? asr on its own poisoned training images.

For each checkpoint (from ``antidoor attack``, which records the poisoned indices) this prints:

- ``train_asr``: the share of the poisoned training images (non-target classes, trigger applied
  as at test time) that the model sends to the target: how well training fitted the backdoor;
- ``plain_to_target``: the same images *without* the trigger sent to the target (memorised images
  rather than a learnt trigger would show here);
- the test split's ``asr`` and ``clean_acc``.

A low ``train_asr`` means the model did not even fit the trigger on the images it was trained
with (an optimisation or capacity limit); a high one with a low test asr means it memorised them.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/train_poison_asr.py runs/wanet/model.safetensors ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from antidoor.checkpoint import load_checkpoint
from antidoor.metrics import predict
from antidoor.pipeline import Scenario
from antidoor.utils import atomic_write_json


def measure(path: Path, device: str = "cpu") -> dict[str, float]:
    ckpt = load_checkpoint(path)
    scenario = Scenario.from_checkpoint(ckpt, device=device)
    model, attack = ckpt.model.to(scenario.device), scenario.attack
    x = scenario.data.x_train[scenario.splits.poison]
    x = x[scenario.data.y_train[scenario.splits.poison] != attack.target]
    triggered = attack.apply_uint8(x)
    test = scenario.evaluator(model)
    return {"poisoned_images": len(x),
            "train_asr": (predict(model, triggered) == attack.target).float().mean().item(),
            "plain_to_target": (predict(model, x) == attack.target).float().mean().item(),
            "asr": test["asr"], "clean_acc": test["clean_acc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write {checkpoint: numbers} as JSON here")
    args = ap.parse_args()
    results = {}
    for path in args.checkpoints:
        results[str(path)] = r = measure(path, args.device)
        print(f"{path}: train_asr {r['train_asr']:.3f} on {r['poisoned_images']} poisoned training images "
              f"(without trigger -> target {r['plain_to_target']:.3f}); test asr {r['asr']:.3f}, clean_acc {r['clean_acc']:.3f}")
    if args.out is not None:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
