"""The attack base class: a trigger in pixel space plus the poisoning of training batches.

An attack is built for one image shape and class count. Its random parts (a blend pattern, a
warp field) are drawn once from ``seed`` and kept in ``tensors``, which the checkpoint stores, so
the same trigger is used at evaluation time and by later stress tests.

Some attacks fit their trigger on data before poisoning (``needs_prepare``): a universal
perturbation against a surrogate model (LF), neurons to excite (TrojanNN), a trigger generator
trained with a classifier (Input-aware), a steganographic encoder (SSBA-style), adversarial
versions of the poisoned images (LC). ``build`` draws their initial tensors from the seed;
:meth:`Attack.prepare` fits them once on the attacker's training data (``pipeline.train_attack``
does this before training) and replaces them with fitted tensors of the same shapes (an attack may
add keys, such as LC's replaced images). A checkpoint stores the fitted tensors, so
``create_attack(spec, tensors=...)`` rebuilds the fitted trigger without fitting again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from antidoor.errors import AntidoorError, validate_params
from antidoor.registry import Registry
from antidoor.utils import info

ATTACKS: Registry[type[Attack]] = Registry("attack")


class AttackParams(BaseModel):
    """Parameters every attack takes; subclasses add their own (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")
    target: int = Field(0, ge=0, description="the class triggered inputs are sent to (all-to-one)")
    pratio: float = Field(0.1, ge=0, lt=1, description="fraction of the training set poisoned; 0 trains a clean reference")
    stage: Literal["before_augment", "after_augment"] = Field(
        "after_augment",
        description="stamp the trigger before or after crop/flip augmentation (BackdoorBench: before)",
    )


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels: a triggered image is an image that could be stored as PNG."""
    return x.mul(255).round_().div_(255)


Corner = Literal["bottom_right", "top_left", "top_right", "bottom_left"]


def corner_mask(size: int, image_shape: tuple[int, int, int], corner: Corner = "bottom_right") -> torch.Tensor:
    """A (1, H, W) mask of ones on a ``size`` x ``size`` square in one corner; ``attack.patch_size`` must fit."""
    _, h, w = image_shape
    if size > min(h, w):
        raise AntidoorError(f"attack.patch_size {size} does not fit {h}x{w} images; allowed: 1..{min(h, w)}")
    mask = torch.zeros(1, h, w)
    rows = slice(h - size, h) if corner.startswith("bottom") else slice(0, size)
    cols = slice(w - size, w) if corner.endswith("right") else slice(0, size)
    mask[:, rows, cols] = 1
    return mask


@dataclass
class AttackerData:
    """What an attack may fit its trigger on: the training set it poisons (never the test split).

    ``x`` are uint8 images (N, C, H, W) on the device, ``poison`` the sorted indices into ``x``
    that will be poisoned; ``mean``/``std`` normalise surrogate models like the victim's.
    """

    x: torch.Tensor
    y: torch.Tensor
    poison: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True

    @property
    def device(self) -> torch.device:
        return self.x.device


class Attack:
    """Base class. Subclasses set ``name``, ``Params`` and implement :meth:`stamp`.

    ``apply(x)`` stamps the trigger on a float batch in [0, 1] (B, C, H, W) and returns a new
    tensor; ``poison_batch`` turns the poisoned members of a training batch into backdoor samples.
    Attacks with ``needs_prepare`` also implement :meth:`fit` (see the module docstring).
    """

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False  # poisons only target-class images, labels unchanged
    needs_prepare: ClassVar[bool] = False  # the trigger is fitted on data by prepare() before use
    Params: ClassVar[type[AttackParams]] = AttackParams

    def __init__(self, params: AttackParams, image_shape: tuple[int, int, int], num_classes: int,
                 seed: int = 0, tensors: dict[str, torch.Tensor] | None = None) -> None:
        if params.target >= num_classes:
            raise AntidoorError(f"attack.target {params.target} is not a class; allowed: 0..{num_classes - 1}")
        self.params = params
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.seed = seed
        # given tensors come from a checkpoint: already fitted
        self.prepared = tensors is not None or not self.needs_prepare
        self.fit_report: dict[str, float] = {}
        self.tensors = tensors if tensors is not None else self.build(torch.Generator().manual_seed(seed))
        expected = self.build(torch.Generator().manual_seed(seed)) if tensors is not None else self.tensors
        for key, t in expected.items():
            if key not in self.tensors or self.tensors[key].shape != t.shape:
                got = tuple(self.tensors[key].shape) if key in self.tensors else "missing"
                raise AntidoorError(f"attack {self.name!r}: trigger tensor {key!r} has shape {got}, expected {tuple(t.shape)}")

    @property
    def target(self) -> int:
        return self.params.target

    @property
    def pratio(self) -> float:
        return self.params.pratio

    def build(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw the trigger's fixed tensors (on the CPU). Default: none."""
        return {}

    def prepare(self, data: AttackerData) -> Attack:
        """Fit the trigger on the attacker's data, once (a no-op when prepared or nothing to fit).

        Deterministic by ``seed`` (the global RNG is forked, so callers' random state is untouched).
        The fitted tensors keep the built shapes, so checkpoints and ``create_attack`` stay valid.
        """
        if self.prepared:
            return self
        if tuple(data.x.shape[1:]) != self.image_shape:
            raise AntidoorError(f"attack {self.name!r} was built for images {self.image_shape}, "
                                f"the attacker's data has {tuple(data.x.shape[1:])}")
        devices = [data.device] if data.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            fitted = self.fit(data)
        for key, t in fitted.items():
            if key in self.tensors and self.tensors[key].shape != t.shape:
                raise RuntimeError(f"attack {self.name!r}: fit changed the shape of {key!r}")  # a bug, not bad input
        self.tensors = {**self.tensors, **{k: v.detach().to(data.device) for k, v in fitted.items()}}
        self.prepared = True
        if self.fit_report:
            info(f"{self.name}: trigger fitted (" + ", ".join(f"{k} {v:.4g}" for k, v in self.fit_report.items()) + ")")
        return self

    def fit(self, data: AttackerData) -> dict[str, torch.Tensor]:
        """Fitted trigger tensors (attacks with ``needs_prepare`` implement this); may fill ``fit_report``."""
        raise NotImplementedError

    def replace_sources(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The attacker's own versions of training images ``idx`` (before any trigger or augmentation).

        Default: unchanged. LC swaps in adversarially perturbed versions of the poisoned images.
        """
        return x

    def to(self, device: torch.device) -> Attack:
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The triggered batch, rounded to 8-bit levels like an image file would be."""
        return quantize(self.stamp(x))

    def apply_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` on uint8 images, returned as uint8: the poisoned image as it would be stored."""
        return self.apply(x.float().div(255)).mul_(255).round_().to(torch.uint8)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger itself, in float pixel space (subclasses implement this)."""
        raise NotImplementedError

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, poison: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stamp the trigger on ``x[poison]``; dirty-label attacks also relabel them to the target."""
        if not poison.any():
            return x, y
        x, y = x.clone(), y.clone()
        x[poison] = self.apply(x[poison])
        if not self.clean_label:
            y[poison] = self.target
        return x, y

    def spec(self) -> dict[str, Any]:
        """Name and parameters: everything but the tensors needed to rebuild this attack."""
        return {"name": self.name, **self.params.model_dump(), "seed": self.seed}


class NoAttackParams(AttackParams):
    pratio: float = Field(0.0, ge=0, lt=1, description="must be 0: 'none' poisons nothing")


class NoAttack(Attack):
    """No trigger: trains and evaluates a clean reference (``pratio`` must be 0)."""

    name = "none"
    Params = NoAttackParams

    def __init__(self, params: AttackParams, *args: Any, **kwargs: Any) -> None:
        if params.pratio != 0:
            raise AntidoorError(f"attack 'none' poisons nothing; attack.pratio must be 0, got {params.pratio}")
        super().__init__(params, *args, **kwargs)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return x


ATTACKS.register("none")(NoAttack)


def create_attack(spec: dict[str, Any], image_shape: tuple[int, int, int], num_classes: int,
                  tensors: dict[str, torch.Tensor] | None = None) -> Attack:
    """Build an attack from ``{"name": ..., **params}`` (a config section or a checkpoint's spec).

    >>> attack = create_attack({"name": "badnets", "target": 0, "pratio": 0.1}, (3, 32, 32), 10)
    """
    spec = dict(spec)
    name = spec.pop("name", None)
    if name is None:
        raise AntidoorError(f"attack.name is missing; available: {', '.join(ATTACKS.names())}")
    seed = int(spec.pop("seed", 0))
    full = validate_attack_spec({"name": name, **spec})
    cls = ATTACKS.get(name)
    params = cls.Params(**{k: v for k, v in full.items() if k != "name"})
    return cls(params, image_shape, num_classes, seed=seed, tensors=tensors)


def validate_attack_spec(spec: Any) -> dict[str, Any]:
    """Check name and parameters early (before any data is loaded); return the full spec with defaults."""
    if not isinstance(spec, dict):
        raise AntidoorError(f"attack must be a mapping like {{name: badnets, pratio: 0.1}}, got {spec!r}")
    spec = dict(spec)
    name = spec.get("name")
    if name is None:
        raise AntidoorError(f"attack.name is missing; available: {', '.join(ATTACKS.names())}")
    cls = ATTACKS.get(str(name))
    params = {k: v for k, v in spec.items() if k not in ("name", "seed")}
    return {"name": name, **validate_params(cls.Params, params, "attack", str(name)).model_dump()}
