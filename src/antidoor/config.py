"""Typed run configurations (pydantic), YAML files and ``--set key=value`` overrides.

Every key reaches the code that uses it: models refuse unknown keys (``extra="forbid"``), and
attack parameters are checked against the chosen attack's own parameter model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from antidoor.attacks.base import validate_attack_spec
from antidoor.defenses.base import validate_defense_spec
from antidoor.errors import AntidoorError, check_numbers, format_validation_error
from antidoor.importer import ImportedModel
from antidoor.models import model_factory
from antidoor.presets import preset_values
from antidoor.stress.retune import RAConfig
from antidoor.stress.settings import StressConfig
from antidoor.train import TrainConfig
from antidoor.validate import MAX_CONFIG_BYTES, InvalidYAML, load_yaml, read_user_text

DEFAULT_ATTACK = "badnets"


def _attack_spec(v: Any) -> dict[str, Any]:
    return validate_attack_spec({"name": DEFAULT_ATTACK, **v} if isinstance(v, dict) else v)


# An attack section: ``name`` (default badnets) plus that attack's own parameters, all checked.
AttackSpec = Annotated[dict[str, Any], BeforeValidator(_attack_spec)]


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("cifar10-mini",
                      description="cifar10-mini or cifar10-10k (bundled), a .npz path, an image folder, "
                                  "or cifar10/cifar100/gtsrb/mnist/svhn")
    root: str = Field("~/.cache/antidoor", description="where torchvision datasets live or are downloaded to (and the "
                                                       "bundled images, decoded)")
    download: bool = False
    clean_ratio: float = Field(0.05, gt=0, lt=1, description="the defender's clean share of the training set")
    clean_count: int | None = Field(None, ge=2, description="the defender's clean images as a count (overrides clean_ratio); "
                                                           "2500 is the papers' budget (preset paper-defender)")
    val_ratio: float = Field(0.2, gt=0, lt=1, description="share of the defender's data held out for validation")
    hflip: bool | None = Field(None, description="horizontal flips in augmentation; None: the dataset's default")
    image_size: int | None = Field(None, ge=8, description="resize images (folders, GTSRB) to this size")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "preact_resnet18"
    width: int = Field(64, ge=1, description="channels of the first stage")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        model_factory(v)  # raises with the list of models (or the namespace's)
        return v


class AttackRunConfig(BaseModel):
    """``antidoor attack``: train a backdoored (or, with pratio 0, a clean) model."""

    model_config = ConfigDict(extra="forbid")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attack: AttackSpec = Field(default_factory=lambda: {"name": DEFAULT_ATTACK}, validate_default=True)
    train: TrainConfig = TrainConfig()
    seed: int = Field(0, ge=0)
    device: str = "auto"



C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise AntidoorError(f"--set {item!r}: expected key=value, e.g. --set attack.pratio=0.05")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise AntidoorError(f"--set {item!r}: bad key {key!r}")
    try:
        value = load_yaml(raw, f"--set {key}") if raw != "" else ""
    except InvalidYAML:
        value = raw
    return key.split("."), value


def set_nested(d: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        nxt = d.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise AntidoorError(f"--set {'.'.join(keys)}: {k!r} is a value, not a section")
        d = nxt
    d[keys[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    loaded = load_yaml(read_user_text(path, "config file", MAX_CONFIG_BYTES), f"config file {str(path)!r}")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise AntidoorError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def build_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                 base: dict[str, Any] | None = None, **explicit: Any) -> C:
    """Defaults < ``base`` < presets < YAML file < ``--set`` overrides < explicit CLI options (None = not given).

    Presets (:mod:`antidoor.presets`) are named by a ``preset`` key (YAML, ``--set preset=fast``) or
    the ``--preset`` option (``explicit`` ``preset=[...]``); what they set, anything else overrides.
    """
    user: dict[str, Any] = {}
    if path is not None:
        user = _merge(user, read_yaml(path))
    for item in overrides or []:
        keys, value = parse_override(item)
        set_nested(user, keys, value)
    for dotted, value in explicit.items():
        if value is not None and dotted != "preset":
            set_nested(user, dotted.split("__"), value)
    named = user.pop("preset", None)
    if explicit.get("preset"):
        named = [*([named] if isinstance(named, str) else named or []), *explicit["preset"]]
    raw = _merge(_merge({}, base or {}), _preset_for(cls, named))
    raw = _merge(raw, user)
    try:
        cfg = cls.model_validate(raw)  # not cls(**raw): a YAML key may be a number
    except ValidationError as e:
        raise AntidoorError(f"invalid config: {format_validation_error(e)}") from None
    check_numbers(cfg.model_dump(), "")
    return cfg


def _preset_for(cls: type[BaseModel], names: Any) -> dict[str, Any]:
    values = preset_values(names)
    unused = set(values) - set(cls.model_fields)
    if unused:
        raise AntidoorError(f"preset {names!r} sets {', '.join(sorted(unused))}, which this command does not take; "
                            "presets are for attack, demo and grid")
    return values


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class EvaluateConfig(BaseModel):
    """``antidoor evaluate``: which test data and which attack a checkpoint is measured under."""

    model_config = ConfigDict(extra="forbid")
    data: DataConfig = DataConfig()
    attack: AttackSpec = Field(default_factory=lambda: {"name": DEFAULT_ATTACK}, validate_default=True)
    seed: int = Field(0, ge=0)
    device: str = "auto"



# A defense section: ``name`` plus that defense's own parameters, all checked against it.
DefenseSpec = Annotated[dict[str, Any], BeforeValidator(validate_defense_spec)]


class DemoConfig(AttackRunConfig):
    """``antidoor demo``: an attack run plus the defenses applied to its backdoored model."""

    defenses: list[DefenseSpec] = Field(default_factory=list)
    ra: RAConfig | None = Field(None, description="retuning attack on every purified model (and the clean reference); "
                                "null: none")
    clean_reference: bool = Field(False, description="also train a clean model with the same data, seed and recipe, and "
                                  "retune it too: one more training run")


class PurifyConfig(BaseModel):
    """``antidoor purify``: a defense and its parameters; data defaults to the checkpoint's own."""

    model_config = ConfigDict(extra="forbid")
    defense: DefenseSpec = Field(default_factory=lambda: {"name": "sau"}, validate_default=True)
    data: DataConfig | None = None
    seed: int = Field(0, ge=0)
    device: str = "auto"


class ImportConfig(BaseModel):
    """``antidoor import``: the architecture and normalisation of a state dict trained elsewhere, its data and trigger."""

    model_config = ConfigDict(extra="forbid")
    model: ImportedModel
    data: DataConfig = DataConfig()
    attack: AttackSpec | None = Field(None, description="the backdoor's trigger (for a backdoored model and its purifications)")
    seed: int = Field(0, ge=0, description="seed of the trigger's random parts (Blended's pattern, ...)")


class StressRunConfig(StressConfig):
    """``antidoor stress``: RA, QRA and path settings; data defaults to the backdoored checkpoint's own."""

    data: DataConfig | None = None
    seed: int = Field(0, ge=0)
    device: str = "auto"
