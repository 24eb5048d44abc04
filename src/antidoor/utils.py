"""Chores that live once: device choice, seeding, progress bars, atomic writes, console, the allocator's settings."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import random
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from antidoor.errors import AntidoorError

console = Console(stderr=True)
_quiet = False
_beat_label: str | None = None  # a grid job's stage: its loops' heartbeats still print, under this label


class BeatClock:
    """When the last heartbeat line was written (``None``: not yet). One is shared by every progress bar of
    the process, so a job made of many short loops (a stress stage: RA's seeds, QRA, the path) still writes a
    line every few minutes, from whichever loop is running then; a loop alone would never reach the interval."""

    def __init__(self) -> None:
        self.last: float | None = None


_beats = BeatClock()


def set_beat_label(label: str | None) -> None:
    """While a grid job runs quiet, keep its loops' heartbeat lines, prefixed by ``label`` (the stage):
    a stage of an hour otherwise leaves a background grid's log silent for that hour. ``None`` ends it.
    The heartbeat clock restarts: a job's first line comes a full interval after its first loop starts."""
    global _beat_label
    _beat_label = label
    _beats.last = None


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and info messages (``--quiet``)."""
    global _quiet
    _quiet = quiet


def info(message: str) -> None:
    if not _quiet:
        console.print(message, highlight=False)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep freed memory there, for this process.

    By default glibc hands each block above its mmap threshold (at most 32 MiB) to the kernel on ``free`` and maps
    fresh zeroed pages for the next one, so a CPU training step whose activations are that large (whitened_cnn,
    batch 256: 33.5 MB) takes tens of thousands of page faults every step: 12% of the demo model's float32 step and
    37% of the ``fast`` preset's on a 2-core AMD EPYC without AVX512 (``benchmarks/malloc_faults.py``). With mmap
    off and the heap never trimmed below 2 GiB of free memory, the same blocks are reused and the faults are gone;
    the price is that the process keeps its peak memory.
    Called by the CLI and every grid job; API users call it once, early. Linux with glibc only (elsewhere, or with
    ``ANTIDOOR_MALLOC=default`` in the environment, nothing changes). Returns whether the settings took.
    """
    if os.environ.get("ANTIDOOR_MALLOC", "").strip().lower() == "default":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else must be a valid, present device."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AntidoorError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AntidoorError(f"device {device!r} asked for, but CUDA is not available here; use cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise AntidoorError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit, reproducible draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def generator_for(device: torch.device, seed: int) -> torch.Generator:
    """A generator living on ``device`` so random draws in hot loops need no host round trip."""
    return torch.Generator(device=device).manual_seed(seed)


def show_progress() -> bool:
    return not _quiet and sys.stderr.isatty()


LONG_RUN_SECONDS = 600.0  # a loop whose estimate exceeds this is announced, with the estimate, once
HEARTBEAT_SECONDS = 300.0  # without a terminal (a log file), a running loop says where it is this often


def format_duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Pace:
    """Estimates a loop's duration from its first steps and announces a long one once.

    The clock starts at the first step (which pays for warm-up), and the estimate is made once
    ``min_steps`` further steps and ``min_seconds`` have passed: on a 2-core CPU a paper's default
    (width 64 x 100 epochs, SAU's 100 rounds) is then announced as hours, not discovered.

    With ``heartbeat`` (seconds; where no progress bar is drawn, e.g. output redirected to a log), a
    line saying how far the loop is and how long it has left is written at most that often, so a
    background run's log shows it moving. ``beats`` times that interval: the loop's own by default,
    one shared with the loops before it (:class:`BeatClock`) from :func:`progress_bar`.
    """

    def __init__(self, total: int, description: str, hint: str = "", min_steps: int = 3, min_seconds: float = 2.0,
                 clock: Any = time.perf_counter, heartbeat: float | None = None, beats: BeatClock | None = None) -> None:
        self.total, self.description, self.hint = total, description, hint
        self.min_steps, self.min_seconds, self.clock = min_steps, min_seconds, clock
        self.heartbeat = heartbeat
        self.beats = beats if beats is not None else BeatClock()
        self.done = 0
        self.start: float | None = None  # the clock and the step count at the first step
        self.first = 0
        self.estimate: float | None = None  # seconds for the whole loop, once made

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self.total <= 0:
            return
        if self.estimate is not None and self.heartbeat is None:
            return  # the common case, a terminal: nothing to do after the estimate, not even read the clock
        now = self.clock()
        if self.start is None:
            self.start, self.first = now, self.done
            if self.beats.last is None:
                self.beats.last = now
            return
        if self.heartbeat is not None and now - self.beats.last >= self.heartbeat and self.done < self.total:
            self.beats.last = now
            left = (now - self.start) / max(self.done - self.first, 1) * (self.total - self.done)
            line = f"{self.description}: {self.done}/{self.total} steps ({self.done / self.total:.0%}), " \
                   f"about {format_duration(left)} left"
            if _beat_label is not None:
                console.print(f"{_beat_label}: {line}", highlight=False, markup=False, soft_wrap=True)  # one line in a log
            else:
                info(line)
        if self.estimate is not None:
            return
        timed = self.done - self.first
        if timed < self.min_steps or now - self.start < self.min_seconds:
            return
        self.estimate = (now - self.start) / timed * self.total
        if self.estimate > LONG_RUN_SECONDS:
            hint = f"; {self.hint}" if self.hint else ""
            info(f"{self.description}: about {format_duration(self.estimate)} on this machine ({self.total} steps, "
                 f"at the pace of the first {self.done}){hint}")


@contextlib.contextmanager
def progress_bar(total: int, description: str, hint: str = "") -> Iterator[Any]:
    """A rich progress bar; when quiet, a silent stand-in; without a terminal, a line every few minutes.

    Yields a callable ``advance(n=1, **fields)``; ``fields`` fill the bar's status text. Either way a
    loop estimated to take longer than :data:`LONG_RUN_SECONDS` is announced once with its estimate
    (:class:`Pace`) and ``hint`` (how to make it shorter).
    """
    shown = show_progress()
    beating = not shown and (not _quiet or _beat_label is not None)
    pace = Pace(total, description, hint, heartbeat=HEARTBEAT_SECONDS if beating else None, beats=_beats)
    if not shown:
        def quiet_advance(n: int = 1, **fields: Any) -> None:
            pace(n)

        yield quiet_advance
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        console=console, transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields: Any) -> None:
            status = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            bar.update(task, advance=n, status=status)
            pace(n)

        yield advance


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; read once, at import (single-threaded)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (a checkpoint or a dataset need not fit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: readers never see half a file.

    The file gets the permissions ``open()`` would give it (an existing file keeps its own), not
    the private 0600 of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
