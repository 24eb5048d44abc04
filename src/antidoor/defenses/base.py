"""The defense contract: a model and the defender's own data in, a purified model out.

A defense never sees the test split: :class:`DefenderData` has no field for it, and
:meth:`Defense.purify` takes nothing else. Oracle references (EP) declare the extra data they
need (``needs_poisoned``) and get it explicitly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from antidoor.errors import AntidoorError, validate_params
from antidoor.metrics import predict
from antidoor.models.registry import Classifier
from antidoor.registry import Registry
from antidoor.train import steps_per_epoch
from antidoor.utils import info, resolve_device

DEFENSES: Registry[type[Defense]] = Registry("defense")
# every defense's batch_size help: what a batch larger than the clean set means (Defense.note_full_batch)
BATCH_SIZE_HELP = "clean images per step (more than the defender has: one batch of all)"
# (round or epoch starting at 1, model) -> None; observes, never steers (no model selection)
Monitor = Callable[[int, Classifier], None]


@dataclass
class DefenderData:
    """The defender's clean images (uint8, N x C x H x W, on the device) and their validation part.

    ``poisoned_x``/``poisoned_y`` are the attacker's poisoned training images with their *true*
    labels; only oracle references receive them (and only when they are known).
    """

    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    hflip: bool = True
    poisoned_x: torch.Tensor | None = None
    poisoned_y: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.x) == 0:
            raise AntidoorError("the defender's clean set is empty")
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise AntidoorError(f"defender images must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")

    @property
    def device(self) -> torch.device:
        return self.x.device

    @torch.no_grad()
    def val_accuracy(self, model: torch.nn.Module) -> float:
        """The model's accuracy on the defender's own validation images (what a defense may choose with)."""
        return (predict(model, self.x_val) == self.y_val.to(next(model.parameters()).device)).float().mean().item()

    def without_oracle(self) -> DefenderData:
        return DefenderData(self.x, self.y, self.x_val, self.y_val, self.num_classes, self.hflip)

    def to(self, device: torch.device) -> DefenderData:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return DefenderData(self.x.to(device), self.y.to(device), self.x_val.to(device), self.y_val.to(device),
                            self.num_classes, self.hflip, mv(self.poisoned_x), mv(self.poisoned_y))


class DefenseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Defense:
    """Base class: subclasses set ``name`` and ``Params`` and implement :meth:`purify`.

    ``purify`` may change the model it is given in place; :func:`antidoor.purify` hands it a copy.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = DefenseParams
    needs_poisoned: ClassVar[bool] = False  # oracle references only

    def __init__(self, seed: int = 0, monitor: Monitor | None = None, **params: Any) -> None:
        self.params = validate_params(self.Params, params, "defense", self.name)
        self.seed = seed
        self.monitor = monitor
        # what the defense chose itself from the defender's data: rho: auto (on validation), a detected target class
        self.chosen: dict[str, float] = {}

    def report(self, epoch: int, model: Classifier) -> None:
        """Call the monitor after each round/epoch (for curves only: the result is always the last model)."""
        if self.monitor is not None:
            was_training = model.training
            self.monitor(epoch, model)
            model.train(was_training)

    def batch_for(self, batch_size: int, n_images: int, min_batches: int = 1) -> int:
        """The batch the defense trains with on ``n_images``: ``batch_size``, or, where that would cut a pass over the
        set into fewer than ``min_batches`` batches, ``n_images // min_batches`` (at least 1), so that a small defender
        set still gets the optimiser steps the defaults were set for (the schedule counts passes, the optimiser
        steps). A smaller batch is said in the log and recorded in ``chosen["batch_size"]``."""
        given = steps_per_epoch(n_images, batch_size, drop_last=False)
        if min_batches > 1 and given < min_batches:
            batch = max(1, n_images // min_batches)
            info(f"{self.name}: {n_images} training images at defense.batch_size {batch_size} would make {given} "
                 f"batch{'es' if given > 1 else ''} per pass; batches of {batch} make "
                 f"{steps_per_epoch(n_images, batch, drop_last=False)} "
                 f"(defense.min_batches {min_batches}; 1 keeps {batch_size})")
            self.chosen["batch_size"] = float(batch)
            return batch
        self.note_full_batch(batch_size, n_images)
        return batch_size

    def note_full_batch(self, batch_size: int, n_images: int) -> None:
        """Say so when every batch is the whole set the defense trains on (``n_images``). A batch larger than the
        set is one batch of all of it (``train.batches`` yields that even with ``drop_last``), as a DataLoader's
        would be: the defaults (SAU's 256) then run on a small defender set, e.g. 5% of a 5,000-image training
        set, instead of failing."""
        if batch_size > n_images:
            info(f"defense.batch_size {batch_size} is more than the {n_images} images {self.name} trains on: "
                 f"every step uses all {n_images}")

    def purify(self, model: Classifier, data: DefenderData) -> Classifier:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, **self.params.model_dump(), "seed": self.seed}


def validate_defense_spec(spec: Any) -> dict[str, Any]:
    """Check a ``{name, **params}`` defense section early; return it with every default filled in."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise AntidoorError("defense must be a mapping with a name, e.g. {name: sau, rounds: 20}; "
                            f"available: {', '.join(DEFENSES.names())}")
    cls = DEFENSES.get(str(spec["name"]))
    params = {k: v for k, v in spec.items() if k not in ("name", "seed")}
    return {"name": spec["name"], **validate_params(cls.Params, params, "defense", cls.name).model_dump()}


def defense_record(spec: dict[str, Any], seed: int, chosen: dict[str, float] | None = None) -> dict[str, Any]:
    """What a purified checkpoint's sidecar says of its defense: every parameter, the seed and what the
    defense chose itself from the defender's data (``chosen``, when it chose anything)."""
    return {**spec, "seed": seed, **({"chosen": dict(chosen)} if chosen else {})}


def purify(model: Classifier, data: DefenderData, method: str, seed: int = 0, device: str | torch.device | None = None,
           monitor: Monitor | None = None, chosen: dict[str, float] | None = None, **params: Any) -> Classifier:
    """Purify ``model`` with a registered defense; returns a new model and leaves ``model`` untouched.

    ``monitor(epoch, model)``, if given, is called after every round or epoch, e.g. to record
    curves; it cannot change the result, which is always the model after the last round.
    ``chosen``, if given, receives the settings the defense chose on the defender's validation data
    (e.g. ``{"rho": 0.3, ...}`` for ``rho: auto``).

    >>> purified = purify(backdoored, defender_data, "sau", rounds=20, batch_size=128)
    """
    defense = DEFENSES.get(method)(seed=seed, monitor=monitor, **params)
    if defense.needs_poisoned and data.poisoned_x is None:
        raise AntidoorError(f"defense {method!r} is an oracle reference and needs the real poisoned training samples, "
                            "which are not available here (a checkpoint trained by `antidoor attack` records them)")
    if not defense.needs_poisoned:
        data = data.without_oracle()
    dev = resolve_device(device) if device is not None else data.device
    work = copy.deepcopy(model).to(dev)
    torch.manual_seed(seed)
    purified = defense.purify(work, data.to(dev))
    purified.eval()
    if chosen is not None:
        chosen.update(defense.chosen)
    return purified
