"""A study: the product of datasets x models x attacks x defenses x seeds, in one YAML file.

```yaml
name: badnets-vs-defenses
datasets: [{name: cifar10-mini, n_train: 1000, n_test: 500}]   # DataConfig keys + an optional subset
models:   [{name: small_cnn, width: 8}]
attacks:  [{name: badnets, pratio: 0.1}, {name: blended, pratio: 0.1}]
defenses: [{name: ft, epochs: 2}, {name: sau, rounds: 5, batch_size: 32}]
# any attack or defense entry may name its rows: {name: blended, pattern: kitty.png, label: blended-kitty};
# without a label two entries of one name are told apart as blended#1, blended#2
seeds:    [0, 1]
train:    {epochs: 2, lr: 0.05}        # the recipe of the clean and the backdoored models
device: auto                           # each job's device
threads: 1                             # CPU threads per job (jobs run side by side)
curves: true                           # record each defense's per-round clean_acc/asr curves
stress:                                # optional: the stress suite on every purified model and the references
  ra: {epochs: 5, seeds: [0, 1, 2]}    # the retuning attack (RAConfig)
  qra: null                            # QRA (QRAConfig) on the purified models; null leaves it out
  path: {points: 11}                   # the backdoor-connected path (PathConfig); null leaves it out
```
Every section is validated up front with the same models the single-run commands use: a typo
in a defense parameter fails before any job starts.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from antidoor.config import AttackSpec, DataConfig, DefenseSpec, ModelConfig, _merge, parse_override, read_yaml, set_nested
from antidoor.errors import AntidoorError, check_numbers, excerpt, format_validation_error
from antidoor.presets import preset_values
from antidoor.stress.settings import ModelStressConfig
from antidoor.train import TrainConfig


class StudyData(DataConfig):
    """A dataset of the study: :class:`~antidoor.config.DataConfig` plus an optional real subset."""

    n_train: int | None = Field(None, ge=10,
                                description="keep a seeded, class-stratified subset of about this many training images")
    n_test: int | None = Field(None, ge=10, description="likewise for the test images")

    def data_config(self) -> DataConfig:
        """The plain data section (what a single run's checkpoint sidecar expects)."""
        return DataConfig(**self.model_dump(exclude={"n_train", "n_test"}))


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("study", min_length=1)
    datasets: list[StudyData] = Field(default_factory=lambda: [StudyData()], min_length=1)
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()], min_length=1)
    attacks: list[AttackSpec] = Field(default_factory=lambda: [{"name": "badnets"}], min_length=1)
    defenses: list[DefenseSpec] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: TrainConfig = TrainConfig()
    device: str = "auto"
    threads: int = Field(1, ge=1, description="CPU threads each job uses (torch.set_num_threads)")
    curves: bool = Field(True, description="record each defense's clean_acc/asr after every round or epoch")
    stress: ModelStressConfig | None = Field(None, description="stress every purified model (RA, QRA, path) and RA the "
                                                               "backdoored and clean models; null: no stress stages")
    # the entries' own ``label`` keys, taken out before the specs are checked (a label names rows; it is not a
    # parameter, and is not part of any stage's key): one per entry, None where the entry has none
    attack_labels: list[str | None] = Field(default_factory=list, exclude=True)
    defense_labels: list[str | None] = Field(default_factory=list, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _take_labels(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for section in ("attacks", "defenses"):
            if f"{section[:-1]}_labels" in raw:
                raise ValueError(f"{section[:-1]}_labels: not a study key; give an entry a label with "
                                 f"{section}: [{{name: ..., label: my-name}}]")
            entries = raw.get(section)
            if not isinstance(entries, list):
                continue
            labels = [e.get("label") if isinstance(e, dict) else None for e in entries]
            for i, label in enumerate(labels):
                if label is not None and (not isinstance(label, str) or not label.strip() or len(label) > 64
                                          or any(c in label for c in "#[]/\\\n")):
                    raise ValueError(f"{section}[{i}].label {excerpt(label)}: must be a short name (1-64 characters, "
                                     "no #, [, ], slashes or newlines)")
            raw[section] = [{k: v for k, v in e.items() if k != "label"} if isinstance(e, dict) else e for e in entries]
            raw[f"{section[:-1]}_labels"] = labels
        return raw

    @field_validator("attacks")
    @classmethod
    def _poisoned(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for a in v:
            if a["name"] == "none" or a["pratio"] == 0:
                raise ValueError(f"attacks: {a['name']!r} with pratio {a['pratio']} poisons nothing; the clean reference "
                                 "is trained for every (dataset, model, seed) anyway, so list only attacks with pratio > 0")
        return v

    @field_validator("stress", mode="before")
    @classmethod
    def _no_ep(cls, v: Any) -> Any:
        if isinstance(v, dict) and {"ep", "ep_params"} & set(v):
            raise ValueError("stress.ep/ep_params: a study stresses EP when it is one of its defenses; "
                             "list it there (defenses: [..., {name: ep}]) instead")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"seeds {excerpt(v)}: must be distinct integers >= 0")
        return v

    @model_validator(mode="after")
    def _distinct_labels(self) -> StudyConfig:
        for section in ("attacks", "defenses"):
            names = self.row_labels(section)
            if len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(f"{section}: the label(s) {', '.join(twice)} name two entries; give each its own")
        return self

    def dump(self) -> dict[str, Any]:
        """The study as a YAML-like mapping that :func:`load_study` reads back: entries keep their labels."""
        raw = self.model_dump()
        for section, given in (("attacks", self.attack_labels), ("defenses", self.defense_labels)):
            for entry, label in zip(raw[section], given or [], strict=False):
                if label is not None:
                    entry["label"] = label
        return raw

    def row_labels(self, section: str) -> list[str]:
        """The rows' names of ``attacks`` or ``defenses``: each entry's label, else its name (``#i`` where two share one)."""
        entries = self.attacks if section == "attacks" else self.defenses
        given = (self.attack_labels if section == "attacks" else self.defense_labels) or [None] * len(entries)
        named = labels_for([e for e, g in zip(entries, given, strict=True) if g is None])
        it = iter(named)
        return [g if g is not None else next(it) for g in given]


def load_study(path: str | Path | None = None, overrides: list[str] | None = None,
               base: dict[str, Any] | None = None) -> StudyConfig:
    """Defaults < ``base`` < the YAML file < ``--set`` overrides (e.g. ``--set train.epochs=2``)."""
    raw = _merge({}, base or {})
    if path is not None:
        raw = _merge(raw, read_yaml(path))
    for item in overrides or []:
        keys, value = parse_override(item)
        set_nested(raw, keys, value)
    raw = _with_preset(raw)
    try:
        study = StudyConfig.model_validate(raw)  # not StudyConfig(**raw): a YAML key may be a number
    except ValidationError as e:
        raise AntidoorError(f"invalid study: {format_validation_error(e)}") from None
    check_numbers(study.model_dump(), "")
    return study


def _with_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """``preset: NAME`` (or a list) in a study: its model becomes the one model unless ``models`` is
    given, its train values sit under the study's ``train``, its data values under every dataset's."""
    values = preset_values(raw.pop("preset", None))
    if not values:
        return raw
    if "model" in values and "models" not in raw:
        raw["models"] = [values["model"]]
    if "train" in values:
        raw["train"] = _merge(values["train"], raw.get("train") or {})
    if "data" in values:
        datasets = raw.get("datasets") or [{}]
        raw["datasets"] = [_merge(values["data"], d) if isinstance(d, dict) else d for d in datasets]
    return raw


def labels_for(items: list[dict[str, Any]], name: Any = lambda d: d["name"]) -> list[str]:
    """Short row labels: the name, with ``#i`` appended where two entries share a name."""
    names = [name(d) for d in items]
    return [n if names.count(n) == 1 else f"{n}#{names[:i + 1].count(n)}" for i, n in enumerate(names)]


def dataset_label(d: dict[str, Any]) -> str:
    """``cifar10-mini``, or ``cifar10-mini[1000/500]`` for a subset of 1,000 training and 500 test images."""
    if d.get("n_train") is None and d.get("n_test") is None:
        return str(d["name"])
    return f"{d['name']}[{d.get('n_train') or 'all'}/{d.get('n_test') or 'all'}]"


def model_label(m: dict[str, Any]) -> str:
    return f"{m['name']}-w{m['width']}"


@functools.lru_cache(maxsize=4)
def _load_cached(canonical: str) -> Any:
    import json

    from antidoor.data import load_dataset
    from antidoor.data.splits import data_subset

    cfg = StudyData(**json.loads(canonical))
    data = load_dataset(cfg.name, cfg.root, cfg.download, cfg.hflip, cfg.image_size)
    return data_subset(data, cfg.n_train, cfg.n_test, dataset_label(cfg.model_dump()))


def load_study_data(cfg: StudyData) -> Any:
    """The dataset (on the CPU), subset as asked; cached per process so a worker loads it once."""
    from antidoor.experiment.store import canonical_json

    return _load_cached(canonical_json(cfg.model_dump()))
