"""``antidoor import``: a plain state dict trained elsewhere -> an antidoor checkpoint (weights + sidecar).

A user's ``.safetensors`` or ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``; pickled objects
are refused) holds the network's own keys, e.g. torchvision's ``conv1.weight``. Given the architecture
(``torchvision:resnet18``, ``timm:resnet18`` or an antidoor name), the class count and the input
normalisation the network was trained with, the weights are checked key by key and shape by shape
(the first mismatch is named, with what the architecture expects) and saved as an antidoor checkpoint
whose sidecar records the architecture, the normalisation, the dataset and, for a backdoored model,
the attack (its trigger), so ``evaluate``, ``purify`` and ``stress`` take it as it is.

A ``module.`` prefix (``nn.DataParallel``) is removed; missing BatchNorm ``num_batches_tracked`` counters
are filled in (they do not change the function).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from antidoor.checkpoint import _read_tensors as read_tensors  # the one safe reader (weights_only)
from antidoor.checkpoint import save_checkpoint
from antidoor.data.splits import Splits
from antidoor.errors import AntidoorError
from antidoor.models.registry import Classifier, build_model


class ImportedModel(BaseModel):
    """The architecture a state dict belongs to and how its inputs were normalised."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="torchvision:<arch>, timm:<arch> or an antidoor model (small_cnn, preact_resnet18, ...)")
    num_classes: int = Field(..., ge=2)
    mean: list[float] = Field(..., min_length=1, max_length=3, description="per-channel mean the network was trained with")
    std: list[float] = Field(..., min_length=1, max_length=3, description="per-channel std the network was trained with")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="architecture arguments (antidoor's: width)")


def load_state_dict_into(model: Classifier, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a network's own state dict into ``model.backbone``, naming the first mismatching key or shape."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    prefix = "net." if hasattr(model.backbone, "net") and not any(k.startswith("net.") for k in state) else ""
    own = model.backbone.state_dict()
    state = {prefix + k: v for k, v in state.items()}
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    arch = model.arch["name"]
    hint = ("; antidoor's resnet18/vgg16_bn/preact_resnet18 are CIFAR variants: a torchvision network is "
            "torchvision:<arch>" if ":" not in arch else "")
    for k in own:
        if k not in state:
            raise AntidoorError(f"{source}: architecture {arch!r} expects weight {k.removeprefix(prefix)!r} "
                                f"{tuple(own[k].shape)}, which the file lacks (it has {len(state)} tensors){hint}")
        if state[k].shape != own[k].shape:
            raise AntidoorError(f"{source}: tensor {k.removeprefix(prefix)!r} has shape {tuple(state[k].shape)}, "
                                f"architecture {arch!r} with {model.arch['num_classes']} classes expects "
                                f"{tuple(own[k].shape)}{hint}")
    extra = [k.removeprefix(prefix) for k in state if k not in own]
    if extra:
        raise AntidoorError(f"{source}: tensor {extra[0]!r} is not part of architecture {arch!r} "
                            f"({len(extra)} such tensors){hint}")
    model.backbone.load_state_dict(state)
    model.eval()


def import_model(weights: str | Path, spec: ImportedModel) -> Classifier:
    """Build ``spec``'s architecture and load a user's plain state dict into it."""
    if len(spec.mean) != len(spec.std):
        raise AntidoorError(f"mean has {len(spec.mean)} values and std {len(spec.std)}; give one of each per channel")
    if any(s <= 0 for s in spec.std):
        raise AntidoorError(f"std {spec.std}: every value must be positive")
    model = build_model(spec.name, spec.num_classes, len(spec.mean), tuple(spec.mean), tuple(spec.std), **spec.kwargs)
    load_state_dict_into(model, read_tensors(Path(weights)), f"weights {str(weights)!r}")
    return model


def import_checkpoint(weights: str | Path, out: str | Path, spec: ImportedModel, meta: dict[str, Any] | None = None,
                      attack: Any = None, splits: Splits | None = None) -> Path:
    """``import_model`` then ``save_checkpoint``: ``out`` (``.safetensors``) and its sidecar ``out.json``."""
    model = import_model(weights, spec)
    return save_checkpoint(out, model, {**(meta or {}), "imported_from": str(weights)}, attack, splits)


def import_run(weights: list[Path], cfg: Any, out: Path) -> list[tuple[Path, dict[str, float]]]:
    """What ``antidoor import`` does: each weights file -> ``out/<stem>.safetensors``, measured on the test split
    (clean_acc, and asr under the recorded trigger), with the dataset, its classes and the attack recorded."""
    from antidoor.attacks.base import create_attack
    from antidoor.data import load_dataset
    from antidoor.metrics import Evaluator

    d = cfg.data
    data = load_dataset(d.name, d.root, d.download, d.hflip, d.image_size)
    if data.num_classes != cfg.model.num_classes or data.image_shape[0] != len(cfg.model.mean):
        raise AntidoorError(f"model.num_classes {cfg.model.num_classes} with {len(cfg.model.mean)} channels, but data "
                            f"{d.name!r} has {data.num_classes} classes and {data.image_shape[0]} channels")
    attack = None
    if cfg.attack is not None and cfg.attack["name"] != "none":
        attack = create_attack({**cfg.attack, "seed": cfg.seed}, data.image_shape, data.num_classes)
    evaluator = Evaluator(data.x_test, data.y_test, attack)
    meta = {"classes": data.classes, "dataset": {**data.describe(), "config": d.model_dump()}, "seed": cfg.seed}
    done = []
    for w in weights:
        model = import_model(w, cfg.model)
        metrics = evaluator(model)
        path = save_checkpoint(out / f"{Path(w).stem}.safetensors", model,
                               {**meta, "imported_from": str(w), "metrics": metrics}, attack)
        done.append((path, metrics))
    return done


__all__ = ["ImportedModel", "import_checkpoint", "import_model", "import_run", "load_state_dict_into"]
