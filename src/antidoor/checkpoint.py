"""Checkpoints: weights in safetensors plus a JSON sidecar; loading never unpickles.

``save_checkpoint("out/model.safetensors", model, meta)`` writes ``out/model.safetensors``
(model weights under ``model.``, trigger tensors under ``trigger.``, split indices under
``split.``) and ``out/model.json`` (architecture and its arguments, classes, normalisation,
attack spec, dataset, seed, library versions). A ``.pt``/``.pth`` state dict is read only with
``torch.load(weights_only=True)``; anything that needs real unpickling is refused.
"""

from __future__ import annotations

import json
import pickle
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from antidoor.attacks.base import Attack, create_attack
from antidoor.data.splits import Splits
from antidoor.errors import AntidoorError
from antidoor.models.registry import Classifier, build_model
from antidoor.utils import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import torchvision

    from antidoor import __version__

    return {"antidoor": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (on the CPU, eval mode), its attack, splits and metadata."""

    model: Classifier
    meta: dict[str, Any]
    attack: Attack | None = None
    splits: Splits | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def save_checkpoint(path: str | Path, model: Classifier, meta: dict[str, Any], attack: Attack | None = None,
                    splits: Splits | None = None) -> Path:
    """Write weights (+ trigger and split tensors) and the sidecar, each atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AntidoorError(f"checkpoint path {str(path)!r} must end in .safetensors")
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if attack is not None:
        tensors.update({f"trigger.{k}": v.detach().cpu().contiguous() for k, v in attack.tensors.items()})
    if splits is not None:
        tensors.update({k: v.cpu().contiguous() for k, v in splits.tensors().items()})
    sidecar = {
        "format": "antidoor-checkpoint", "format_version": FORMAT_VERSION,
        "arch": model.arch, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
        "attack": attack.spec() if attack is not None else None,
        **meta, "versions": versions(),
    }
    atomic_write_bytes(path, save(tensors, metadata={"format": "antidoor-checkpoint"}))
    atomic_write_json(sidecar_path(path), sidecar)
    return path


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AntidoorError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise AntidoorError(f"checkpoint {str(path)!r} is not a valid safetensors file ({e})") from None
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise AntidoorError(
                f"refusing to load {str(path)!r}: it holds pickled Python objects, and unpickling a file from "
                f"someone else can run arbitrary code. Only plain tensor state dicts are accepted "
                f"(torch.load weights_only=True said: {str(e).splitlines()[0]}). Convert it to safetensors."
            ) from None
        except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise AntidoorError(f"checkpoint {str(path)!r} is not a readable PyTorch file ({str(e).splitlines()[0]})") from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            raise AntidoorError(f"checkpoint {str(path)!r} must hold a dict of tensors (a state dict), got {type(obj).__name__}")
        return obj
    raise AntidoorError(f"checkpoint {str(path)!r}: unknown file type {path.suffix!r}; allowed: .safetensors, .pt, .pth")


def _few(keys: list[str]) -> str:
    return str(keys[:3])[:-1] + (", ...]" if len(keys) > 3 else "]")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint and its sidecar ``<stem>.json``; check every shape before using it."""
    path = Path(path)
    tensors = _read_tensors(path)
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        raise AntidoorError(f"checkpoint {str(path)!r} has no sidecar {str(meta_path)!r} describing its architecture")
    try:
        meta = json.loads(meta_path.read_text())
        arch = meta["arch"]
        model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], tuple(meta["mean"]),
                            tuple(meta["std"]), **arch.get("kwargs", {}))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AntidoorError(f"sidecar {str(meta_path)!r} is not a valid antidoor sidecar ({type(e).__name__}: {e})") from None
    # plain state dicts (a .pt from elsewhere) have no "model." prefix
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")} or tensors
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise AntidoorError(f"checkpoint {str(path)!r} does not match architecture {arch['name']!r}: "
                            f"missing {_few(missing)}, unexpected {_few(unexpected)}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise AntidoorError(f"checkpoint {str(path)!r}: tensor {k!r} has shape {tuple(v.shape)}, "
                                f"architecture {arch['name']!r} expects {tuple(own[k].shape)}")
    model.load_state_dict(state)
    model.eval()
    attack = None
    if meta.get("attack"):
        trigger = {k.removeprefix("trigger."): v for k, v in tensors.items() if k.startswith("trigger.")}
        image_shape = tuple(meta.get("dataset", {}).get("image_shape") or (arch["in_channels"], 32, 32))
        attack = create_attack(meta["attack"], image_shape, arch["num_classes"], tensors=trigger)
    extra = {k: v for k, v in tensors.items() if not k.startswith(("model.", "trigger.", "split."))}
    return Checkpoint(model, meta, attack, Splits.from_tensors(tensors), extra)
