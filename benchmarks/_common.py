"""Chores every benchmark script shares: device clocks, the machine's name, CPU-share bookkeeping.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and they import
``from _common import ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device, so a clock read after it measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def with_cpu_share(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the share of the wall time its process spent on the CPU, per torch thread.

    On an otherwise idle CPU this stays near 1 (the loops are compute-bound); well below 1 means
    other processes took cores away and the timing is not trustworthy.
    """
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, (time.process_time() - c0) / ((time.perf_counter() - t0) * torch.get_num_threads())


def bare_training_step(name: str, width: int, batch: int,
                       precision: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
    """One bare CPU training step of a registered model on one seeded synthetic batch (only speed is measured):
    forward and cross-entropy under ``precision()``, backward, SGD step; channels_last, as antidoor trains."""
    from antidoor.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes=10, width=width).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        with precision():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def add_round_args(parser: argparse.ArgumentParser, rounds_of: str) -> None:
    """The options of a benchmark that times rounds of bare training steps (``rounds_of``: what alternates)."""
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each round")
    parser.add_argument("--repeats", type=int, default=3, help=f"rounds of each {rounds_of}, alternating")
    parser.add_argument("--min-cpu-share", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=None)
