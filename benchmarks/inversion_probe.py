"""Did the trigger inversion find the backdoor? A probe of the regime study's PAM and BTI-DBF failures.

PAM and BTI-DBF unlearn the images their inversion generator G makes (BTI-DBF's round 1: pretrain G,
train the benign-feature mask, train G, then detect the target class as the one the model gives most
often to G(x + noise)). On the regime study's BadNets seed 2, PAM left 40.7% asr and BTI-DBF 65.9%
(``benchmarks/regime.md``), and the likely cause was an inversion that missed the trigger. This script
measures it: it runs that round-1 inversion on a backdoored checkpoint, with the defense's seed and
budget, and reports

- the detected class, against the attack's true target (the defender never sees the latter; we do);
- the classes the backdoored model gives to G(x) on the defender's validation images outside the
  target class, and the share
  sent to the true target, with the same for the true trigger (the model's asr on those images);
- with ``--clean``, the same shares for a clean model of the same data and seed (how much of G(x) is
  a universal perturbation rather than the backdoor).

Round 1 depends only on the starting weights, the defender's data and the seed, so with the study's
budget and the checkpoint's seed this is the inversion the study's PAM and BTI-DBF stages computed
(on the same CPU; bf16 kernels differ between CPUs). The test split is not read.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inversion_probe.py runs/regime/artifacts/attack/X.safetensors \\
        --clean runs/regime/artifacts/clean/Y.safetensors --budget study --out benchmarks/results/regime/probe.json

``--universal STARTS`` asks whether the generator or the objective is what misses the trigger: it trains round 1's
benign-feature mask as the defense does, then maximises the generator phase's own objective with one additive
perturbation shared by every image (no G; Adam, projected onto ``norm_bound``) from STARTS random starts, and reports
where each lands against the real trigger.
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
from antidoor.defenses.base import DefenderData
from antidoor.defenses.btidbf import (
    LOW_TARGET_SHARE,
    BTIDBFParams,
    FeatureSplit,
    UNetGenerator,
    feature_terms,
    first_round_inversion,
    input_mse,
    new_inversion,
    objective_terms,
    target_share,
    train_feature_mask,
)
from antidoor.metrics import predict
from antidoor.models.registry import Classifier
from antidoor.pipeline import Scenario
from antidoor.train import batches, prepare_model
from antidoor.utils import generator_for

BUDGETS: dict[str, dict[str, int]] = {
    # benchmarks/regime_study.yaml's cut for bti-dbf and pam
    "study": {"pretrain_epochs": 5, "mask_epochs": 5, "generator_epochs": 5},
    # BTI-DBF's defaults (the official ones)
    "defaults": {},
}


def class_shares(model: Classifier, x: torch.Tensor) -> list[float]:
    """The share of ``x`` (float images in [0, 1]) the model gives to each class (float32, as first measured)."""
    counts = torch.bincount(predict(model, x, amp=False).cpu(), minlength=model.arch["num_classes"])
    return (counts.float() / len(x)).tolist()


@torch.no_grad()
def generated(gen: UNetGenerator, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    gen.eval()
    return torch.cat([gen(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def _load(path: Path, clean_path: Path | None) -> tuple[Any, Scenario, DefenderData, Classifier | None, torch.Tensor]:
    """The checkpoint, its scenario, the defender's data, the clean model (if given) and the defender's validation
    images outside the target (as asr is measured: images of other classes), in [0, 1]."""
    ckpt = load_checkpoint(path)
    sc = Scenario.from_checkpoint(ckpt, device="cpu")
    data = sc.defender_data()
    clean = load_checkpoint(clean_path).model.eval() if clean_path is not None else None
    return ckpt, sc, data, clean, data.x_val[data.y_val != sc.attack.target].float().div(255)


@torch.no_grad()
def trigger_scales(path: Path, clean_path: Path | None, scales: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)) -> dict[str, Any]:
    """The real trigger's change x' - x scaled by each factor (alpha 0.05-0.2 for a blend at 0.2): its pixel MSE in
    normalised units (what ``norm_bound`` bounds) and the share of the validation images outside the target that the
    backdoored (and clean) model then gives to the target. No inversion runs."""
    ckpt, sc, _, clean, x = _load(path, clean_path)
    model, target = ckpt.model.eval(), sc.attack.target
    delta = sc.attack.apply(x) - x
    rows = []
    for k in scales:
        xs = x + k * delta
        row = {"scale": k, "input_mse": float(input_mse(model, xs, x)), "asr": class_shares(model, xs)[target]}
        if clean is not None:
            row["clean_model_to_target"] = class_shares(clean, xs)[target]
        rows.append(row)
    return {"checkpoint": str(path), "attack": ckpt.meta.get("attack"), "true_target": target, "n_images": len(x),
            "trigger_scales": rows}


def probe(path: Path, clean_path: Path | None, budget: str, overrides: dict[str, Any] | None = None,
          seed: int | None = None) -> dict[str, Any]:
    ckpt, sc, data, clean, x_val = _load(path, clean_path)
    seed = int(ckpt.meta.get("seed", 0)) if seed is None else seed
    p = BTIDBFParams(**{**BUDGETS[budget], **(overrides or {})})
    model = prepare_model(ckpt.model.eval(), data.device)  # channels_last, as the defense computes with it
    t0 = time.perf_counter()
    # the defense's own round 1 (BTIDBF.purify): G's initial weights and the inversion's stream from its seed
    torch.manual_seed(seed)
    gen, gen_opt, g = new_inversion(data, p, seed)
    mask, detected = first_round_inversion(gen, gen_opt, copy.deepcopy(model).eval().requires_grad_(False), data, p, g)
    seconds = time.perf_counter() - t0

    target = sc.attack.target
    share = target_share(gen, model, data, detected, p.amp)
    gx = generated(gen, x_val)
    stamped = sc.attack.apply(x_val)
    out: dict[str, Any] = {
        "checkpoint": str(path), "attack": ckpt.meta.get("attack"), "seed": seed, "budget": budget,
        "params": {k: getattr(p, k) for k in ("pretrain_epochs", "mask_epochs", "generator_epochs")} | (overrides or {}),
        "g_init": "seeded as the defense seeds it",  # records without this field built G from an unseeded generator
        # found: the target detected AND G moving the images there (the defense's target_share); before 2026-12-08
        # "found" was the first test only, true for a G that moved nothing when the tie-broken argmax was the target
        "detected_target": detected, "true_target": target, "target_share": share,
        "found": detected == target and share >= LOW_TARGET_SHARE,
        "n_images": len(x_val), "pixel_mse": float((gx - x_val).pow(2).mean()),
        "input_mse": float(input_mse(model, gx, x_val)),  # what norm_bound bounds (normalised units)
        "backdoored": {"g_x": class_shares(model, gx), "trigger": class_shares(model, stamped)},
        # the generator objective's terms (with round 1's mask) for G(x) and for the real trigger
        "objective": {"g_x": objective_terms(model, mask, x_val, gx), "trigger": objective_terms(model, mask, x_val, stamped)},
        "seconds": round(seconds, 1),
    }
    if clean is not None:
        out["clean"] = {"g_x": class_shares(clean, gx), "trigger": class_shares(clean, stamped)}
    return out


def universal(path: Path, clean_path: Path | None, budget: str, starts: int, epochs: int, lr: float,
              overrides: dict[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
    """A benign-feature mask from the defense's mask phase and seed (drawn first: the defense pretrains G before it,
    so this is not the mask a G start would use; each start is compared with the trigger on it), then for each start
    one additive perturbation delta, shared by all images, that maximises the generator objective (backdoor-feature
    MSE minus ``benign_weight`` x benign-feature MSE) over ``epochs`` passes of the defender's images, rescaled after
    every step so that the input MSE of clamp(x + delta) stays within ``norm_bound``. Measured on the validation
    images outside the target, beside the real trigger (objective terms, and the share of delta's energy on the
    pixels the trigger changes)."""
    ckpt, sc, data, clean, x_val = _load(path, clean_path)
    seed = int(ckpt.meta.get("seed", 0)) if seed is None else seed
    p = BTIDBFParams(**{**BUDGETS[budget], **(overrides or {})})
    model = prepare_model(ckpt.model.eval(), data.device).requires_grad_(False)
    torch.manual_seed(seed)
    g = generator_for(data.device, seed)
    t0 = time.perf_counter()
    mask = train_feature_mask(model, data, p, g)
    split = FeatureSplit(model)
    target = sc.attack.target
    stamped = sc.attack.apply(x_val)
    support = (stamped - x_val).abs().amax(dim=(0, 1)) > 0  # the pixels (H x W) the trigger changes, on any image
    with torch.no_grad():  # the images are not augmented here, so their features are the same in every step
        feats = torch.cat([split.features(data.x[i:i + 500].float().div(255)).float() for i in range(0, len(data.x), 500)])
    rows = []
    for start in range(starts):
        torch.manual_seed(seed + 1 + start)
        delta = (torch.randn(1, *x_val.shape[1:], device=data.device) * 0.01).requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=lr)
        for _ in range(epochs):
            for x, _, idx in batches(data.x, data.y, p.batch_size, g, drop_last=False, channels_last=False):
                benign, backdoor = feature_terms(mask, feats[idx], split.features((x + delta).clamp(0, 1)).float())
                opt.zero_grad(set_to_none=True)
                (p.benign_weight * benign - backdoor).backward()
                opt.step()
                with torch.no_grad():
                    mse = float(input_mse(model, (x + delta).clamp(0, 1), x))
                    if mse > p.norm_bound:
                        delta.mul_((p.norm_bound / mse) ** 0.5)
        xs = (x_val + delta.detach()).clamp(0, 1)
        shares = class_shares(model, xs)
        detected = max(range(len(shares)), key=shares.__getitem__)
        energy = delta.detach().pow(2).sum(1)[0]
        row = {"start": start, "objective": objective_terms(model, mask, x_val, xs), "detected_target": detected,
               "backdoored": {"to_detected": shares[detected], "to_target": shares[target]},
               "energy_on_trigger_pixels": float(energy[support].sum() / energy.sum())}
        if clean is not None:
            clean_shares = class_shares(clean, xs)
            row["clean"] = {"to_detected": clean_shares[detected], "to_target": clean_shares[target]}
        rows.append(row)
    return {"checkpoint": str(path), "attack": ckpt.meta.get("attack"), "seed": seed, "budget": budget,
            "mode": "universal", "epochs": epochs, "lr": lr, "true_target": target, "n_images": len(x_val),
            "trigger": {"objective": objective_terms(model, mask, x_val, stamped),
                        "pixel_share": float(support.float().mean())},
            "starts": rows, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="backdoored checkpoints (.safetensors with sidecar)")
    ap.add_argument("--clean", type=Path, help="a clean model of the same data and seed, for comparison")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="study")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="another BTI-DBF parameter for the inversion, e.g. --set norm_bound=0.1 (repeatable)")
    ap.add_argument("--seed", type=int, help="the defense's seed (default: the checkpoint's, as the study uses)")
    ap.add_argument("--trigger-scales", action="store_true",
                    help="no inversion: measure the real trigger scaled by 0.25-1 (pixel MSE against norm_bound, asr)")
    ap.add_argument("--universal", type=int, metavar="STARTS",
                    help="no G: maximise the generator objective with one additive perturbation from STARTS starts")
    ap.add_argument("--universal-epochs", type=int, default=150, help="passes over the defender's images per start")
    ap.add_argument("--universal-lr", type=float, default=0.01)
    ap.add_argument("--out", type=Path, help="append the results to this JSON file (a list)")
    args = ap.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    for path in args.checkpoints:
        if args.trigger_scales:
            res = trigger_scales(path, args.clean)
            for row in res["trigger_scales"]:
                print(f"{path.name}: trigger x {row['scale']:g}: pixel MSE (normalised) {row['input_mse']:.3f}, "
                      f"asr {row['asr']:.1%}, clean model to the target {row.get('clean_model_to_target', float('nan')):.1%}")
            _append(args.out, res)
            continue
        if args.universal:
            res = universal(path, args.clean, args.budget, args.universal, args.universal_epochs, args.universal_lr,
                            overrides, args.seed)
            trig = res["trigger"]["objective"]
            for row in res["starts"]:
                o = row["objective"]
                print(f"{path.name}: universal start {row['start']}: backdoor term {o['backdoor']:.3f} (trigger "
                      f"{trig['backdoor']:.3f}), input MSE {o['input_mse']:.3f} (trigger {trig['input_mse']:.3f}); "
                      f"backdoored model -> class {row['detected_target']} {row['backdoored']['to_detected']:.1%}, "
                      f"to the target {row['backdoored']['to_target']:.1%}; "
                      + (f"clean model -> class {row['detected_target']} {row['clean']['to_detected']:.1%}; "
                         if "clean" in row else "")
                      + f"{row['energy_on_trigger_pixels']:.1%} of the energy on the trigger's pixels", flush=True)
            _append(args.out, res)
            continue
        res = probe(path, args.clean, args.budget, overrides, args.seed)
        t = res["true_target"]
        line = (f"{path.name}: {res['attack']['name']} seed {res['seed']}, budget {args.budget}: detected class "
                f"{res['detected_target']} (target {t}); backdoored model sends {res['backdoored']['g_x'][t]:.1%} of G(x) "
                f"and {res['backdoored']['trigger'][t]:.1%} of triggered images to the target")
        if "clean" in res:
            line += f"; the clean model {res['clean']['g_x'][t]:.1%} of G(x)"
        print(line + f" ({res['seconds']} s)", flush=True)
        _append(args.out, res)


def _append(out: Path | None, res: dict[str, Any]) -> None:
    if out:
        prior = json.loads(out.read_text()) if out.exists() else []
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([*prior, res], indent=1))


if __name__ == "__main__":
    main()
