"""Chores that live once: device choice, seeding, progress bars, atomic writes, console."""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
import sys
import tempfile
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


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and info messages (``--quiet``)."""
    global _quiet
    _quiet = quiet


def info(message: str) -> None:
    if not _quiet:
        console.print(message, highlight=False)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


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


@contextlib.contextmanager
def progress_bar(total: int, description: str) -> Iterator[Any]:
    """A rich progress bar, or a silent stand-in when quiet or not on a terminal.

    Yields a callable ``advance(n=1, **fields)``; ``fields`` fill the bar's status text.
    """
    if not show_progress():
        yield lambda n=1, **fields: None
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

        yield advance


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; read once, at import (single-threaded)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


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
