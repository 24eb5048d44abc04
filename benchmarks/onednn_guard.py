"""What the oneDNN guard (:func:`antidoor.train.guard_onednn`) costs a narrow PreAct-ResNet18 on the CPU.

oneDNN's weight-gradient kernel for a strided 1x1 convolution with fewer than 16 input channels writes
past its buffer in channels_last (uxlfoundation/oneDNN#6035). ``prepare_model`` therefore computes such a
convolution as subsampling + a unit-stride 1x1 convolution. This times one training step of
``preact_resnet18`` at widths 4 and 8 on real bundled images, in one process, three ways:

* **guarded** -- channels_last, the two narrow shortcuts rerouted (what antidoor runs);
* **contiguous** -- the whole model in the contiguous layout, the other safe choice;
* **unguarded** -- channels_last with the faulty kernel, only with ``--unguarded`` (it may crash the
  process: on the 2-core development machine a training run at batch 127 does at 2 threads; this
  script's batch 128 has survived there).

Every variant starts from the same weights and sees the same batches; after one warm-up pass, passes of
``--steps`` steps alternate between the variants ``--repeats`` times; the report is the median seconds
per step and each variant's ratio to ``guarded``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onednn_guard.py --unguarded --out benchmarks/results/onednn_guard_1thread.json
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/onednn_guard.py --unguarded --out benchmarks/results/onednn_guard_2thread.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _common import device_name
from antidoor.data import load_dataset
from antidoor.models import build_model
from antidoor.precision import amp_active, autocast
from antidoor.train import prepare_model
from antidoor.utils import atomic_write_json, keep_freed_memory


def variant(base: nn.Module, name: str) -> nn.Module:
    model = copy.deepcopy(base)
    if name == "guarded":  # what every antidoor training loop runs
        return prepare_model(model, torch.device("cpu"))
    return model.to(memory_format=torch.channels_last) if name == "unguarded" else model


def seconds_per_step(model: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor], channels_last: bool) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t0 = time.perf_counter()
    for x, y in zip(xs, ys, strict=True):
        with autocast(x.device):
            loss = F.cross_entropy(model(x.contiguous(memory_format=fmt)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / len(xs)


def main() -> None:
    keep_freed_memory()  # the allocator setting the CLI and the grid run with, so the timings are the product's
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--unguarded", action="store_true", help="also time the faulty kernel (may crash the process)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    data = load_dataset("cifar10-mini")
    n = args.steps * args.batch_size
    x = data.x_train[:n].float().div(255)
    xs, ys = list(x.split(args.batch_size)), list(data.y_train[:n].split(args.batch_size))
    names = ["guarded", "contiguous"] + (["unguarded"] if args.unguarded else [])
    cpu = torch.device("cpu")
    report = {"device": device_name(cpu), "threads": torch.get_num_threads(), "torch": torch.__version__, "bf16": amp_active(cpu),
              "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats, "widths": {}}
    for width in args.widths:
        torch.manual_seed(0)
        base = build_model("preact_resnet18", num_classes=10, width=width)
        times: dict[str, list[float]] = {k: [] for k in names}
        for rep in range(args.repeats + 1):  # the first pass warms up and is not counted
            for name in names:
                s = seconds_per_step(variant(base, name), xs, ys, channels_last=name != "contiguous")
                if rep:
                    times[name].append(s)
        median = {k: statistics.median(v) for k, v in times.items()}
        report["widths"][str(width)] = {"seconds_per_step": times, "median": median,
                                        "ratio_to_guarded": {k: v / median["guarded"] for k, v in median.items()}}
        print(f"width {width}: " + ", ".join(f"{k} {v * 1000:.1f} ms/step ({v / median['guarded']:.2f}x)"
                                             for k, v in median.items()), flush=True)
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
