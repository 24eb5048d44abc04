"""Checkpoints: weights in safetensors plus a JSON sidecar; loading never unpickles.

``save_checkpoint("out/model.safetensors", model, meta)`` writes ``out/model.safetensors``
(model weights under ``model.``, trigger tensors under ``trigger.``, split indices under
``split.``) and ``out/model.json`` (architecture and its arguments, classes, normalisation,
attack spec, dataset, seed, library versions). A ``.pt``/``.pth`` state dict is read only with
``torch.load(weights_only=True)``; anything that needs real unpickling is refused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from antidoor.attacks.base import Attack, create_attack
from antidoor.data.splits import Splits, check_split_tensors
from antidoor.errors import AntidoorError, clip, excerpt
from antidoor.models.registry import Classifier, build_model
from antidoor.precision import cpu_bf16_kernels
from antidoor.utils import atomic_write_bytes, atomic_write_json
from antidoor.validate import MAX_SIDECAR_BYTES, check_image_shape, check_num_classes, read_user_text, user_file

FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import torchvision

    from antidoor import __version__

    return {"antidoor": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "cpu": cpu_name(), "cpu_bf16": cpu_bf16_kernels()}


@functools.cache  # read once: every checkpoint saved records it
def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else the platform's word for it): bf16 kernels differ between CPUs,
    so a model retrained on another one does not come back bit for bit, and a resumed study says so. The name alone
    does not tell two generations apart; ``versions()`` records the bf16 kernels beside it
    (:func:`antidoor.precision.cpu_bf16_kernels`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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
    user_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AntidoorError(f"checkpoint {str(path)!r} is not a valid safetensors file ({clip(str(e), 200)})") from None
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            said = "".join(str(e).split("\n")[-1:]) or str(e)
            if "global" not in str(e).lower():  # not a refused object, just bytes that are no pickle at all
                raise AntidoorError(f"checkpoint {str(path)!r} is not a readable PyTorch file ({clip(said, 200)})") from None
            raise AntidoorError(
                f"refusing to load {str(path)!r}: it holds pickled Python objects, and unpickling a file from "
                f"someone else can run arbitrary code. Only plain tensor state dicts are accepted "
                f"(torch.load weights_only=True said: {clip(said, 200)}). Convert it to safetensors."
            ) from None
        except Exception as e:  # torch.load fails on junk with RuntimeError, IndexError, EOFError, BadZipFile, ...
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AntidoorError(f"checkpoint {str(path)!r} is not a readable PyTorch file ({clip(first, 200)})") from None
        _check_state_dict(obj, path)
        return obj
    raise AntidoorError(f"checkpoint {str(path)!r}: unknown file type {path.suffix!r}; allowed: .safetensors, .pt, .pth")


def _check_state_dict(obj: object, path: Path) -> None:
    """A .pt file must hold a flat {name: tensor} dict; say which entry is not, and where a training checkpoint
    ({"state_dict": {...}, "epoch": ...}) keeps its weights."""
    if not isinstance(obj, dict):
        raise AntidoorError(f"checkpoint {str(path)!r} must hold a dict of tensors (a state dict), got {type(obj).__name__}")
    bad = next(((k, v) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is None:
        return
    nested = [k for k, v in obj.items() if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values())]
    hint = (f"; its weights look nested under {nested[0]!r}: save that entry alone, "
            f"torch.save(checkpoint[{nested[0]!r}], path)" if nested else "")
    raise AntidoorError(f"checkpoint {str(path)!r} must hold a dict of tensors (a state dict); its entry {bad[0]!r} "
                        f"is of type {type(bad[1]).__name__}{hint}")


def _few(keys: list[str]) -> str:
    return str(keys[:3])[:-1] + (", ...]" if len(keys) > 3 else "]")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint and its sidecar ``<stem>.json``; check every shape before using it."""
    path = Path(path)
    tensors = _read_tensors(path)
    meta_path = sidecar_path(path)
    if not meta_path.exists():
        raise AntidoorError(f"checkpoint {str(path)!r} has no sidecar {str(meta_path)!r} describing its architecture")
    meta = _read_sidecar(meta_path)
    arch = meta["arch"]
    model = _build(arch, meta, meta_path, on_meta=True)  # shapes only: a sidecar cannot make us allocate
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
    model = _build(arch, meta, meta_path)  # as large as the weights the file holds
    model.load_state_dict(state)
    model.eval()
    attack = None
    if meta.get("attack"):
        trigger = {k.removeprefix("trigger."): v for k, v in tensors.items() if k.startswith("trigger.")}
        dataset = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
        image_shape = check_image_shape(dataset.get("image_shape") or [arch["in_channels"], 32, 32],
                                        f"sidecar {str(meta_path)!r} dataset.image_shape")
        try:
            attack = create_attack(meta["attack"], image_shape, arch["num_classes"], tensors=trigger)
        except AntidoorError as e:
            raise AntidoorError(f"sidecar {str(meta_path)!r}: {e}") from None
        except Exception as e:  # a spec or trigger tensors the attack cannot use
            raise AntidoorError(f"sidecar {str(meta_path)!r}: attack {excerpt(meta['attack'])} cannot be rebuilt "
                                f"({type(e).__name__}: {clip(str(e), 200)})") from None
    extra = {k: v for k, v in tensors.items() if not k.startswith(("model.", "trigger.", "split."))}
    splits = Splits.from_tensors(tensors)
    if splits is not None:
        check_split_tensors(splits, f"checkpoint {str(path)!r}")
    return Checkpoint(model, meta, attack, splits, extra)


_KINDS = {"seed": "an integer >= 0", "classes": "a list", "dataset.n_train": "an integer"}


def _read_sidecar(meta_path: Path) -> dict[str, Any]:
    """The sidecar's JSON, size-checked, with an ``arch`` section naming a buildable model."""
    text = read_user_text(meta_path, "sidecar", MAX_SIDECAR_BYTES)
    bad = f"sidecar {str(meta_path)!r} is not a valid antidoor sidecar"
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise AntidoorError(f"{bad} ({type(e).__name__}: {clip(str(e), 200)})") from None
    arch = meta.get("arch") if isinstance(meta, dict) else None
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs", {}), dict):
        raise AntidoorError(f"{bad} (no arch section with a name and kwargs)")
    check_num_classes(arch.get("num_classes"), f"sidecar {str(meta_path)!r} arch.num_classes")
    if arch.get("in_channels") not in (1, 3) or isinstance(arch.get("in_channels"), bool):
        raise AntidoorError(f"{bad} (arch.in_channels {excerpt(arch.get('in_channels'))}; allowed: 1 or 3)")
    # the fields later code reads without looking twice: their types here, their values where they are used
    dataset = meta.get("dataset", {})
    expected = [("dataset", dataset, dict), ("attack", meta.get("attack"), (dict, type(None))),
                ("seed", meta.get("seed", 0), int), ("classes", meta.get("classes", []), list)]
    if isinstance(dataset, dict):
        expected += [("dataset.config", dataset.get("config", {}), (dict, type(None))),
                     ("dataset.n_train", dataset.get("n_train"), (int, type(None)))]
    for key, value, kind in expected:
        if not isinstance(value, kind) or isinstance(value, bool) or (key == "seed" and value < 0):
            raise AntidoorError(f"{bad} ({key} {excerpt(value)} is not {_KINDS.get(key, 'a mapping')})")
    for key in ("mean", "std"):
        values = meta.get(key)
        if not (isinstance(values, list) and len(values) == arch["in_channels"]
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise AntidoorError(f"{bad} ({key} {excerpt(values)}: one number per channel)")
    return meta


def _build(arch: dict[str, Any], meta: dict[str, Any], meta_path: Path, on_meta: bool = False) -> Classifier:
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            return build_model(arch["name"], arch["num_classes"], arch["in_channels"], tuple(meta["mean"]), tuple(meta["std"]),
                               **arch.get("kwargs", {}))
    except AntidoorError as e:
        raise AntidoorError(f"sidecar {str(meta_path)!r}: {e}") from None
    except Exception as e:  # kwargs the architecture cannot take
        raise AntidoorError(f"sidecar {str(meta_path)!r}: architecture {excerpt(arch)} cannot be built "
                            f"({type(e).__name__}: {clip(str(e), 200)})") from None
