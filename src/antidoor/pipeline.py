"""The attack stage of the main job: data + attack + splits -> a trained (backdoored) model.

A :class:`Scenario` is everything about one (dataset, attack, seed): the data on the device, the
trigger, who holds which training images, and the evaluator for the test split. Training hooks
poison the batches by index, so the poisoned training set is never a second copy of the data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from antidoor.attacks.base import Attack, AttackerData, create_attack
from antidoor.checkpoint import Checkpoint
from antidoor.config import AttackRunConfig, DataConfig
from antidoor.data import ImageData, Splits, load_dataset, make_splits
from antidoor.data.splits import check_split_tensors, data_subset
from antidoor.defenses.base import DefenderData
from antidoor.errors import AntidoorError, format_validation_error
from antidoor.metrics import Evaluator
from antidoor.models import Classifier, build_model
from antidoor.poisoned import PoisonedSamples
from antidoor.train import BatchHook, TrainConfig, train
from antidoor.utils import info, resolve_device, seed_everything, warn


@dataclass
class Scenario:
    data: ImageData
    attack: Attack
    splits: Splits
    data_config: DataConfig
    seed: int
    notes: list[str] = field(default_factory=list)
    _evaluator: Evaluator | None = None
    poisoned_samples: PoisonedSamples | None = None  # the attacker's triggered images, given as files (antidoor.poisoned)

    @classmethod
    def build(cls, data_cfg: DataConfig, attack_spec: dict[str, Any], seed: int = 0,
              device: str | torch.device = "auto", data: ImageData | None = None) -> Scenario:
        """Load the data (or reuse ``data``), move it to the device once, draw trigger and splits."""
        dev = resolve_device(device)
        if data is None:
            data = load_dataset(data_cfg.name, data_cfg.root, data_cfg.download, data_cfg.hflip, data_cfg.image_size)
        data = data.to(dev)
        attack = create_attack({**attack_spec, "seed": seed}, data.image_shape, data.num_classes).to(dev)
        splits, note = make_splits(data.y_train, clean_ratio=data_cfg.clean_ratio, val_ratio=data_cfg.val_ratio,
                                   pratio=attack.pratio, target=attack.target, clean_label=attack.clean_label, seed=seed,
                                   clean_count=data_cfg.clean_count)
        notes = [note] if note else []
        for n in notes:
            warn(n)
        return cls(data, attack, splits, data_cfg, seed, notes)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, data_cfg: DataConfig | None = None, device: str | torch.device = "auto",
                        seed: int | None = None) -> Scenario:
        """Rebuild the scenario a checkpoint was trained in: its data (a study's subset included), its
        trigger and its splits.

        A checkpoint without recorded splits (a model from elsewhere), or one used with other data,
        gets a fresh seeded defender split of ``data_cfg``'s training set and no poisoned indices (so no
        oracle references). Recorded splits are checked against the data before a defense sees them.
        """
        meta = ckpt.meta
        recorded, subset = recorded_data_config(meta)
        data_cfg = data_cfg or (_data_config(recorded, "the checkpoint's sidecar dataset.config") if recorded
                                else DataConfig())
        seed = meta.get("seed", 0) if seed is None else seed
        dev = resolve_device(device)
        data = load_dataset(data_cfg.name, data_cfg.root, data_cfg.download, data_cfg.hflip, data_cfg.image_size)
        same_data = recorded is not None and recorded.get("name") == data_cfg.name
        if same_data and subset:  # the study's subset: the data the checkpoint's split indices point into
            data = data_subset(data, subset.get("n_train"), subset.get("n_test"), data.name)
        data = data.to(dev)
        arch = ckpt.model.arch
        if data.image_shape[0] != arch["in_channels"] or data.num_classes != arch["num_classes"]:
            raise AntidoorError(f"the checkpoint expects {arch['in_channels']}-channel images and {arch['num_classes']} classes; "
                                f"data {data_cfg.name!r} has {data.image_shape[0]} channels and {data.num_classes} classes")
        attack = ckpt.attack or create_attack({"name": "none", "pratio": 0.0}, data.image_shape, data.num_classes)
        splits = ckpt.splits
        if splits is not None and recorded is None and _indexes(splits, len(data.y_train)):
            # saved without its dataset (save_checkpoint(path, model, {}, attack, splits)): keep the recorded splits
            warn(f"the checkpoint records splits but not its dataset; they are taken as indices into {data_cfg.name!r}")
            same_data = True
        n_recorded = (meta.get("dataset") or {}).get("n_train")
        if splits is not None and same_data and n_recorded not in (None, len(data.x_train)):
            warn(f"the checkpoint's splits index {n_recorded} training images, {data_cfg.name!r} has {len(data.x_train)}: "
                 "drawing a fresh defender split")
            same_data = False
        if splits is None or not same_data:
            splits, _ = make_splits(data.y_train, clean_ratio=data_cfg.clean_ratio, val_ratio=data_cfg.val_ratio, pratio=0.0,
                                    target=attack.target, clean_label=False, seed=seed, clean_count=data_cfg.clean_count)
        else:
            check_split_tensors(splits, "the checkpoint", n_train=len(data.x_train))
        return cls(data, attack.to(dev), splits, data_cfg, seed)

    @property
    def device(self) -> torch.device:
        return self.data.x_train.device

    def use_poisoned(self, indices: torch.Tensor | None = None, samples: PoisonedSamples | None = None) -> None:
        """The attacker's poisoned samples for a model trained elsewhere: training indices, or triggered images."""
        s, n = self.splits, len(self.data.y_train)
        if indices is not None:
            if int(indices.min()) < 0 or int(indices.max()) >= n:
                raise AntidoorError(f"poisoned index {int(indices.max())} is outside the training set of "
                                    f"{self.data.name!r}; allowed: 0..{n - 1}")
            # the defender's data must be clean: poisoned images drawn into it (a split drawn without knowing them) leave it
            keep_train, keep_val = ~torch.isin(s.defender_train, indices), ~torch.isin(s.defender_val, indices)
            dropped = int((~keep_train).sum() + (~keep_val).sum())
            if dropped:
                warn(f"{dropped} of the poisoned indices were among the defender's clean images; they leave the defender's data")
            if not keep_train.any() or not keep_val.any():
                raise AntidoorError("the poisoned indices cover the defender's whole clean training or validation set")
            self.splits = Splits(s.defender_train[keep_train], s.defender_val[keep_val], indices)
        if samples is not None:
            if tuple(samples.x.shape[1:]) != tuple(self.data.image_shape):
                raise AntidoorError(f"poisoned samples ({samples.source}) are {tuple(samples.x.shape[1:])} images; "
                                    f"the data's are {tuple(self.data.image_shape)}")
            if samples.y is not None and (int(samples.y.min()) < 0 or int(samples.y.max()) >= self.data.num_classes):
                raise AntidoorError(f"poisoned samples ({samples.source}): label {int(samples.y.max())} is not a class")
            self.poisoned_samples = PoisonedSamples(samples.x.to(self.device), None if samples.y is None
                                                    else samples.y.to(self.device), samples.source)

    def oracle_available(self) -> bool:
        """Whether EP can be purified: the poisoned samples are known with their true labels."""
        p = self.poisoned_samples
        return bool(len(self.splits.poison)) or (p is not None and p.y is not None)

    def attacker_data(self) -> AttackerData:
        """The training set the attacker poisons, which attacks that fit their trigger may use."""
        d = self.data
        return AttackerData(d.x_train, d.y_train, self.splits.poison.to(self.device), d.num_classes, d.mean, d.std, d.hflip)

    def prepare_attack(self) -> Attack:
        """Fit the trigger once, if the attack has one to fit (LC, LF, TrojanNN, Input-aware, SSBA-style)."""
        if not self.attack.prepared:
            info(f"fitting the {self.attack.name} trigger on the attacker's {len(self.data.x_train)} training images")
            self.attack.prepare(self.attacker_data())
        return self.attack

    def poison_hooks(self) -> dict[str, BatchHook | None]:
        """The ``before_augment``/``after_augment`` hooks that poison batches by training index."""
        if len(self.splits.poison) == 0:
            return {"before_augment": None, "after_augment": None}
        mask = torch.zeros(len(self.data.x_train), dtype=torch.bool, device=self.device)
        mask[self.splits.poison.to(self.device)] = True
        attack = self.prepare_attack()

        def hook(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            return attack.poison_batch(x, y, mask[idx], g)

        def swap_then_hook(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                           g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            return hook(attack.replace_sources(x, idx), y, idx, g)

        def swap(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            return attack.replace_sources(x, idx), y

        # the attacker's own versions of its images (LC) are part of the image: swapped in before augmentation
        replaces = type(attack).replace_sources is not Attack.replace_sources
        if attack.params.stage == "before_augment":
            return {"before_augment": swap_then_hook if replaces else hook, "after_augment": None}
        return {"before_augment": swap if replaces else None, "after_augment": hook}

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self.prepare_attack()
            self._evaluator = Evaluator(self.data.x_test, self.data.y_test, self.attack)
        return self._evaluator

    def defender_data(self, oracle: bool = False) -> DefenderData:
        """The defender's clean images; with ``oracle`` also the poisoned ones with their true labels."""
        d, s = self.data, self.splits
        poisoned_x = poisoned_y = None
        given = self.poisoned_samples
        if oracle and given is not None and given.y is not None:
            poisoned_x, poisoned_y = given.x, given.y
        elif oracle and len(s.poison):
            idx = s.poison.to(self.device)
            x = self.prepare_attack().replace_sources(d.x_train[idx].float().div_(255), idx)
            poisoned_x = self.attack.apply(x).mul_(255).round_().to(torch.uint8)
            poisoned_y = d.y_train[idx]
        dev = self.device
        return DefenderData(d.x_train[s.defender_train.to(dev)], d.y_train[s.defender_train.to(dev)],
                            d.x_train[s.defender_val.to(dev)], d.y_train[s.defender_val.to(dev)],
                            d.num_classes, d.hflip, poisoned_x, poisoned_y)

    def describe(self) -> dict[str, Any]:
        return {**self.data.describe(), "config": self.data_config.model_dump(), "split_seed": self.seed,
                "n_poison": len(self.splits.poison), "n_defender_train": len(self.splits.defender_train),
                "n_defender_val": len(self.splits.defender_val), "notes": self.notes}


def _indexes(splits: Splits, n: int) -> bool:
    """Whether every recorded index lies in a training set of ``n`` images."""
    parts = [t for t in (splits.defender_train, splits.defender_val, splits.poison) if len(t)]
    return all(int(t.min()) >= 0 and int(t.max()) < n for t in parts)


SUBSET_KEYS = ("n_train", "n_test")  # a study's subset of a dataset (antidoor.experiment.study.StudyData)


def recorded_data_config(meta: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """The data section a checkpoint's sidecar records, as ``DataConfig`` keys, and a study's subset
    (``n_train``/``n_test``) apart. A sidecar never starts a download (``download`` is off; the user
    may turn it on with ``--set data.download=true``)."""
    dataset = meta.get("dataset")
    recorded = dataset.get("config") if isinstance(dataset, dict) else None
    if not isinstance(recorded, dict):
        return None, {}
    subset = {k: recorded[k] for k in SUBSET_KEYS if recorded.get(k) is not None}
    return {**{k: v for k, v in recorded.items() if k not in SUBSET_KEYS}, "download": False}, subset


def _data_config(raw: dict[str, Any], where: str) -> DataConfig:
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as e:
        raise AntidoorError(f"{where}: {format_validation_error(e, 'data')}") from None


@dataclass
class AttackResult:
    model: Classifier
    metrics: dict[str, float]
    history: list[dict[str, float]]
    scenario: Scenario
    seconds: float
    prepare_seconds: float = 0.0  # fitting the trigger (attacks with needs_prepare), before training


def new_model(scenario: Scenario, name: str, width: int) -> Classifier:
    d = scenario.data
    return build_model(name, d.num_classes, d.image_shape[0], d.mean, d.std, width=width)


# enough 2x2 patches for a stable covariance (airbench fits on 5,000 images too)
FIT_IMAGES = 5000


def fit_to_clean_images(model: Classifier, scenario: Scenario) -> None:
    """Fit a data-dependent first layer (whitening) on up to 5,000 training images *before* poisoning.

    The images are a seeded draw of the training set as loaded, so no trigger is in them: the
    layer describes the data, and the backdoor has to live in the layers that train.
    """
    x = scenario.data.x_train
    g = torch.Generator().manual_seed(scenario.seed)
    pick = torch.randperm(len(x), generator=g)[:FIT_IMAGES].to(x.device)
    if model.to(x.device).fit_to_data(x[pick]):
        info(f"fitted {model.arch['name']}'s input whitening on {len(pick)} clean training images")


def train_attack(cfg: AttackRunConfig, scenario: Scenario | None = None, description: str | None = None,
                 on_epoch_end: Callable[[int, dict[str, float], Classifier], None] | None = None) -> AttackResult:
    """Train a model on the (poisoned) training set and measure it on the test split.

    ``on_epoch_end(epoch, stats, model)`` observes training after every epoch (benchmarks' curves).
    """
    scenario = scenario or Scenario.build(cfg.data, cfg.attack, cfg.seed, cfg.device)
    label = description or (f"{cfg.attack['name']} (pratio {cfg.attack['pratio']})" if cfg.attack["pratio"] else "clean")
    info(f"training {cfg.model.name} (width {cfg.model.width}) on {scenario.data.name}: {label}, "
         f"{len(scenario.splits.poison)} poisoned of {len(scenario.data.x_train)}, {cfg.train.epochs} epochs, {scenario.device}")
    t0 = time.perf_counter()
    scenario.prepare_attack()
    prepare_seconds = time.perf_counter() - t0
    seed_everything(cfg.seed)  # the model's initial weights do not depend on whether a trigger was fitted
    model = new_model(scenario, cfg.model.name, cfg.model.width)
    fit_to_clean_images(model, scenario)
    t0 = time.perf_counter()
    history = train(model, scenario.data.x_train, scenario.data.y_train, cfg.train, seed=cfg.seed,
                    hflip=scenario.data.hflip, description=label, **scenario.poison_hooks(),
                    on_epoch_end=None if on_epoch_end is None else lambda epoch, stats: on_epoch_end(epoch, stats, model))
    seconds = time.perf_counter() - t0
    metrics = scenario.evaluator(model)
    return AttackResult(model, metrics, history, scenario, seconds, prepare_seconds)


def run_meta(cfg: AttackRunConfig, result: AttackResult) -> dict[str, Any]:
    """What the checkpoint sidecar records about an attack run."""
    return {"classes": result.scenario.data.classes, "dataset": result.scenario.describe(), "seed": cfg.seed,
            "config": cfg.model_dump(), "metrics": result.metrics, "train_seconds": round(result.seconds, 2),
            **({"attack_fit": {**result.scenario.attack.fit_report, "seconds": round(result.prepare_seconds, 2)}}
               if result.scenario.attack.needs_prepare else {})}


__all__ = ["AttackResult", "Scenario", "TrainConfig", "new_model", "recorded_data_config", "run_meta", "train_attack"]
