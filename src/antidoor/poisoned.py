"""The attacker's poisoned samples given by the user: as indices into the training set, or as image files.

RA needs a few of them (relabelled to the target) and EP needs them with their true labels. A checkpoint
trained by antidoor records them (``split.poison``); for a model trained elsewhere the user gives them:

- ``--poisoned-indices FILE``: indices into the data's training set (``.txt``/``.csv`` of integers, ``.json``
  list, or ``.npy`` integer array); the trigger is stamped on those images, and EP sees their true labels;
- ``--poisoned FILE``: the poisoned images themselves, trigger already on, as an ``.npz`` with ``x`` (uint8,
  NHWC or NCHW) and optionally ``y`` (their true labels; without them no EP), or a folder of image files.

No file is unpickled (``np.load(allow_pickle=False)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from antidoor.data.sources import IMAGE_SUFFIXES, _labels, _read_images, _to_nchw
from antidoor.errors import AntidoorError


@dataclass
class PoisonedSamples:
    """Triggered images (uint8, N x C x H x W) and, when known, their true labels."""

    x: torch.Tensor
    y: torch.Tensor | None
    source: str


def read_indices(path: str | Path) -> torch.Tensor:
    """Sorted unique int64 indices from a ``.txt``/``.csv``, ``.json`` or ``.npy`` file."""
    path = Path(path)
    if not path.is_file():
        raise AntidoorError(f"poisoned indices file {str(path)!r} does not exist")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            arr = np.asarray(json.loads(path.read_text()))
        else:
            arr = np.asarray([int(t) for t in path.read_text().replace(",", " ").split()])
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise AntidoorError(f"poisoned indices file {str(path)!r}: expected integers ({str(e).splitlines()[0]}); "
                            "allowed: .txt/.csv of integers, a .json list, an .npy integer array") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or len(arr) == 0:
        raise AntidoorError(f"poisoned indices file {str(path)!r}: expected a non-empty list of integers, "
                            f"got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.unique(arr.astype(np.int64)))


def read_samples(path: str | Path) -> PoisonedSamples:
    """Poisoned images from an ``.npz`` (``x``, optional ``y``) or a folder of image files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise AntidoorError(f"poisoned samples folder {str(path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return PoisonedSamples(_to_nchw(_read_images(files, None), str(path)), None, f"{len(files)} images in {path}")
    if path.suffix != ".npz" or not path.is_file():
        raise AntidoorError(f"poisoned samples {str(path)!r}: expected an existing .npz (x[, y]) or a folder of images")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f:
                raise AntidoorError(f"poisoned samples {str(path)!r} has no array 'x' (it has {sorted(f.files)})")
            x = _to_nchw(f["x"], str(path))
            y = _labels(f["y"], str(path)) if "y" in f else None
    except (OSError, ValueError) as e:
        raise AntidoorError(f"poisoned samples {str(path)!r}: not a readable .npz ({str(e).splitlines()[0]})") from None
    if y is not None and len(y) != len(x):
        raise AntidoorError(f"poisoned samples {str(path)!r}: {len(x)} images but {len(y)} labels")
    return PoisonedSamples(x, y, f"{len(x)} poisoned images from {path}")


__all__ = ["PoisonedSamples", "read_indices", "read_samples"]
