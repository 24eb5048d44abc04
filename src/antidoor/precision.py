"""Mixed precision, decided in one place: bf16 autocast wherever the device runs it fast.

bfloat16 has float32's range, so autocast needs no loss scaling; convolutions and matrix products
run in bf16 and reductions (losses, softmax, batch-norm statistics) stay in float32. It pays on
CUDA and on CPUs with native bf16 arithmetic (Intel AMX or AVX512-BF16: about half the time of a
float32 step here, see ``benchmarks/README.md``). Elsewhere bf16 is emulated and slower than
float32, so ``amp`` then runs float32 and says so once.

Every training loop, PGD, defense, evaluation and stress test takes its context from
:func:`autocast`. Each config's ``amp: false`` turns it off for that loop; ``ANTIDOOR_AMP=off`` in
the environment turns it off everywhere (worker processes inherit it), for bit-for-bit float32
results.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from antidoor.utils import info

_OFF = {"0", "off", "false", "no", "fp32"}
_noted: set[str] = set()


def amp_switched_off() -> bool:
    """``ANTIDOOR_AMP=off`` (or 0/false/no/fp32): float32 everywhere, whatever the configs say."""
    return os.environ.get("ANTIDOOR_AMP", "").strip().lower() in _OFF


@functools.cache
def cpu_bf16_kernels() -> str:
    """The CPU's native bf16 arithmetic: ``"amx"`` (AMX tiles), ``"avx512_bf16"`` or ``"none"`` (bf16 would be
    emulated, so :func:`autocast` runs float32). Two CPUs with the same model name can differ here (an AMD EPYC
    of one generation has AVX512-BF16, of another only AVX2), and with it the kernels a seeded run uses."""
    for kernels, probe in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        if bool(getattr(torch.cpu, probe, lambda: False)()):
            return kernels
    return "none"


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AMX tiles or AVX512-BF16), where oneDNN runs bf16 fast."""
    return cpu_bf16_kernels() != "none"


@functools.cache
def _cuda_has_bf16() -> bool:
    return torch.cuda.is_bf16_supported()  # queried once: autocast is asked per batch and per PGD step


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return _cuda_has_bf16()
    return device.type == "cpu" and cpu_has_fast_bf16()


def amp_active(device: torch.device, enabled: bool = True) -> bool:
    """Whether :func:`autocast` switches bf16 on for ``device`` (for records and benchmarks)."""
    return enabled and not amp_switched_off() and bf16_is_fast(device)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled`` and the device runs it fast; otherwise float32."""
    if amp_active(device, enabled):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if enabled and not amp_switched_off() and device.type not in _noted:
        _noted.add(device.type)
        info(f"amp: this {device.type} has no fast bf16 (CUDA, or a CPU with AMX or AVX512-BF16), so float32 is used")
    return contextlib.nullcontext()
