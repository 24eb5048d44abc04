"""Does the retuning attack implant a Blended trigger in a *clean* model? One answer per blend pattern.

RA (its defaults: 5 poisoned samples among 1,000, SGD lr 0.01, 5 epochs) on the clean reference of a study,
with the trigger of ``blended`` (alpha 0.2) for each pattern given. If RA takes the clean model's asr near
100%, p_asr cannot tell a deep purification from a superficial one on that trigger (the verdict says
*inconclusive*): this chooses a Blended pattern for which finding (2) is testable, from the clean model
alone, before any backdoored model is trained or purified. ``smooth`` is seeded 4x4 uniform noise,
bilinearly upsampled (written next to the output).

    python benchmarks/ra_blend_patterns.py runs/regime/artifacts/clean/<key>.safetensors \
        --data runs/data/cifar10-20k.npz --clean-count 2500 noise benchmarks/patterns/mnist-digit7.png smooth
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from antidoor.checkpoint import load_checkpoint
from antidoor.config import DataConfig
from antidoor.pipeline import Scenario
from antidoor.stress.retune import RAConfig, retuning_attack
from antidoor.stress.suite import ra_data_for


def smooth_pattern(path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    img = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear", align_corners=False)[0]
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clean", type=Path, help="the clean reference's checkpoint")
    ap.add_argument("patterns", nargs="+", help="noise, smooth, or image files")
    ap.add_argument("--data", required=True, help="the study's dataset (.npz or a dataset name)")
    ap.add_argument("--clean-count", type=int, default=2500, help="the defender's images (RA mixes its clean part from them)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="RA seeds")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/regime/ra_blend_patterns.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.clean).model
    data_cfg = DataConfig(name=args.data, clean_count=args.clean_count)
    ra_cfg = RAConfig(seeds=args.seeds, curves=False)
    results = {}
    for pattern in args.patterns:
        source = str(smooth_pattern(args.out.with_name("smooth_pattern.png"))) if pattern == "smooth" else pattern
        # seed 0: the study's seed-0 poisoned indices are RA's pool, as in the grid's stress stages
        scenario = Scenario.build(data_cfg, {"name": "blended", "pratio": 0.1, "target": 0, "pattern": source}, seed=0,
                                  device="cpu")
        t = time.perf_counter()
        s = retuning_attack(model, ra_data_for(scenario, ra_cfg), scenario.evaluator, ra_cfg).summary()
        results[pattern] = {"o_asr": s["o_asr"], "p_asr_mean": s["p_asr_mean"], "p_asr_std": s["p_asr_std"],
                            "clean_acc": s["o_clean_acc"], "ra_clean_acc_mean": s["clean_acc_mean"],
                            "seconds": round(time.perf_counter() - t, 1)}
        print(pattern, results[pattern], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"clean_checkpoint": str(args.clean), "data": args.data, "ra": ra_cfg.model_dump(),
                                    "threads": args.threads, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
