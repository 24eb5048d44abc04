"""Does bf16 autocast pay on this CPU? One training step, float32 against bf16, in one process.

``antidoor.precision`` turns bf16 autocast on wherever the CPU has native bf16 arithmetic (AMX or
AVX512-BF16). This times the bare training step (forward, cross-entropy, backward, SGD step; no data
pipeline) of the models the presets use, on the same batch and initial weights, float32 and bf16
interleaved (``--repeats`` rounds of each, after warm-up steps), and reports the median ms per step
and the ratio bf16 / float32 (below 1: bf16 is faster). Synthetic inputs: only the speed is measured.
Each round also records its CPU share; a round under ``--min-cpu-share`` ran beside other work.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bf16_step.py --out benchmarks/results/bf16_step_cpu_amd.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from _common import add_round_args, bare_training_step, device_name, with_cpu_share
from antidoor.precision import cpu_has_fast_bf16
from antidoor.utils import keep_freed_memory

# (model, width, batch): the demo's model, the fast preset's, the paper preset's family at a CPU width
CASES = [("whitened_cnn", 32, 256), ("whitened_cnn", 64, 512), ("preact_resnet18", 16, 128)]


def step_ms(name: str, width: int, batch: int, bf16: bool, steps: int, warmup: int) -> float:
    step = bare_training_step(name, width, batch, lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16))
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    keep_freed_memory()  # the allocator setting the CLI and the grid run with, so the timings are the product's
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_round_args(p, "precision")
    args = p.parse_args()
    results = []
    for name, width, batch in CASES:
        times: dict[str, list[float]] = {"float32": [], "bf16": []}
        shares = []
        for _ in range(args.repeats):
            for label, bf16 in (("float32", False), ("bf16", True)):
                run = functools.partial(step_ms, name, width, batch, bf16, args.steps, args.warmup)
                ms, share = with_cpu_share(run)
                times[label].append(round(ms, 1))
                shares.append(round(share, 3))
        f32, b16 = statistics.median(times["float32"]), statistics.median(times["bf16"])
        row = {"model": name, "width": width, "batch": batch, "float32_ms": f32, "bf16_ms": b16,
               "bf16_over_float32": round(b16 / f32, 3), "rounds_ms": times, "cpu_share": shares,
               "shared_machine": min(shares) < args.min_cpu_share}
        results.append(row)
        print(f"{name} w{width} batch {batch}: float32 {f32:.0f} ms/step, bf16 {b16:.0f} ms/step, "
              f"bf16/float32 {b16 / f32:.2f}{'  (shared machine)' if row['shared_machine'] else ''}", flush=True)
    report = {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
              "fast_bf16_detected": cpu_has_fast_bf16(), "torch": torch.__version__, "cases": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
