"""Chores every benchmark script shares: device clocks, the machine's name, CPU-share bookkeeping.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and they import
``from _common import ...``.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
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
