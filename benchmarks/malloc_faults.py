"""What glibc's page faults cost a CPU training step, and what ``keep_freed_memory`` saves.

glibc maps every block above its mmap threshold (32 MiB at most) fresh from the kernel and unmaps it
on ``free``, so each training step whose activations are that large faults its pages in again, one
4 KiB page at a time, zeroed by the kernel. :func:`antidoor.utils.keep_freed_memory` (called by the
CLI and every grid job) turns that off for the process. This times the bare training step (forward,
cross-entropy, backward, SGD step; bf16 autocast where ``antidoor.precision`` turns it on) of the
presets' models with glibc's defaults and with ``keep_freed_memory``, each round in a fresh process
(the setting cannot be undone in a process), the two modes alternating, ``--repeats`` rounds each.
It reports the median ms per step, page faults per step, peak RSS and the ratio keep / default
(below 1: faster). Synthetic inputs: only the speed is measured. A round under ``--min-cpu-share``
of its threads' CPU time ran beside other work and is flagged.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/malloc_faults.py --out benchmarks/results/malloc_faults_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from _common import add_round_args, bare_training_step, device_name

# (model, width, batch): the demo's model, the fast preset's (the regime study's), the paper preset's family
CASES = [("whitened_cnn", 32, 256), ("whitened_cnn", 64, 512), ("preact_resnet18", 16, 128)]
MODES = ("default", "keep")


def child(mode: str, name: str, width: int, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """One round in this (fresh) process: ms/step, minor page faults/step, peak RSS, CPU share."""
    import resource

    from antidoor.precision import autocast
    from antidoor.utils import keep_freed_memory

    took = keep_freed_memory() if mode == "keep" else False
    step = bare_training_step(name, width, batch, lambda: autocast(torch.device("cpu")))
    for _ in range(warmup):
        step()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - usage.ru_minflt
    return {"took": took, "ms": wall / steps * 1000, "faults": faults / steps,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cpu_share": (time.process_time() - c0) / (wall * torch.get_num_threads())}


def run_round(mode: str, case: tuple[str, int, int], steps: int, warmup: int) -> dict[str, float]:
    name, width, batch = case
    cmd = [sys.executable, __file__, "--child", mode, name, str(width), str(batch), str(steps), str(warmup)]
    env = {k: v for k, v in os.environ.items() if k != "ANTIDOOR_MALLOC"}  # the child's mode decides
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_round_args(p, "mode")
    p.add_argument("--child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, name, width, batch, steps, warmup = args.child
        print(json.dumps(child(mode, name, int(width), int(batch), int(steps), int(warmup))))
        return
    results = []
    for case in CASES:
        rounds: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                rounds[mode].append(run_round(mode, case, args.steps, args.warmup))
        med = {m: {k: statistics.median(r[k] for r in rounds[m]) for k in ("ms", "faults", "maxrss_mb")} for m in MODES}
        shares = [r["cpu_share"] for m in MODES for r in rounds[m]]
        row = {"model": case[0], "width": case[1], "batch": case[2],
               **{f"{m}_{k}": round(v, 1) for m in MODES for k, v in med[m].items()},
               "keep_over_default": round(med["keep"]["ms"] / med["default"]["ms"], 3),
               "settings_took": all(r["took"] for r in rounds["keep"]),
               "rounds": rounds, "shared_machine": min(shares) < args.min_cpu_share}
        results.append(row)
        print(f"{case[0]} w{case[1]} batch {case[2]}: default {med['default']['ms']:.0f} ms/step "
              f"({med['default']['faults']:.0f} faults/step, {med['default']['maxrss_mb']:.0f} MB), keep_freed_memory "
              f"{med['keep']['ms']:.0f} ms/step ({med['keep']['faults']:.0f} faults/step, {med['keep']['maxrss_mb']:.0f} MB), "
              f"keep/default {row['keep_over_default']:.2f}{'  (shared machine)' if row['shared_machine'] else ''}",
              flush=True)
    from antidoor.precision import amp_active, cpu_bf16_kernels

    report = {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
              "cpu_bf16": cpu_bf16_kernels(), "bf16_autocast": amp_active(torch.device("cpu")),
              "torch": torch.__version__, "cases": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
