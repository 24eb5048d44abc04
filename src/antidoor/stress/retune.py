"""RA (retuning attack): does a purified model relearn its backdoor from a handful of poisoned samples?

Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense",
NeurIPS 2024 (arXiv 2410.09838), Section 3. The purified model is fine-tuned on a small set that
mixes a few poisoned training samples, relabelled to the attack's target, into clean data; its asr
afterwards is ``p_asr`` (its asr before is ``o_asr``). A deep purification keeps ``p_asr`` low, as a
model that never saw the backdoor does; a superficial one regains it within a few epochs.

Paper defaults (CIFAR-10): 1,000 images (2% of 50,000) of which 5 are poisoned; SGD lr 0.01,
momentum 0.9, no weight decay, batch 128, 5 epochs. The RA is always run with the same set and the
same seeds on every model it is compared with (clean reference, backdoored model, EP).

Scaling to small datasets: the clean part is the defender's clean data (training and validation
parts; never the test split), capped at ``n_total - n_poison`` = 995 images; the poisoned part stays at
5 samples. On the bundled 5,000-image set the defender holds 250 clean images, so the RA set is
255 images with 5 poisoned (2% instead of 0.5%). Scaling the 5 down with the set would leave about
one poisoned sample, too few to tell anything; keeping 5 keeps every poisoned sample seen 5 times
per run, as in the paper. The clean reference tells whether the set is too strong: if RA implants
the backdoor into a model that never had it, the set, not the purification, is to blame.

The poisoned samples are the attacker's own poisoned training samples (the checkpoint's recorded
``split.poison``), with the trigger stamped on and relabelled to the target; for dirty-label attacks
only those of non-target classes are used (a target-class image relabelled to its own class teaches
nothing). A model from elsewhere, with no recorded poisoned samples, gets non-target training images
outside the defender's data with the trigger stamped on.

Deviation from the official code: the official RA augments the set once when it is built, so every
epoch sees the same crops; here crop-and-flip is drawn per batch by the shared trainer. The set is
drawn once (``data_seed``); the seeds change the batch order and augmentation. The schedule is
constant (the paper states none). The result is the model after the last epoch.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from antidoor.attacks.base import Attack
from antidoor.defenses.base import DefenderData
from antidoor.errors import AntidoorError, validate_params
from antidoor.metrics import Evaluator
from antidoor.models.registry import Classifier
from antidoor.stress.verdict import pack_hits
from antidoor.train import TrainConfig, train
from antidoor.utils import info


class RAConfig(BaseModel):
    """The retuning attack's set and recipe (methods.md defaults)."""

    model_config = ConfigDict(extra="forbid")
    # added after studies were stored: at its default, the behaviour before it, it stays out of their stage keys
    # (experiment.stages.key_dump)
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {"curves": True}
    n_total: int = Field(1000, ge=1, description="RA set size cap: clean images used = min(n_total - n_poison, defender's)")
    n_poison: int = Field(5, ge=0, description="poisoned training samples in the set, relabelled to the target")
    epochs: int = Field(5, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)
    augment: bool = Field(True, description="crop and flip, drawn per batch")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="one RA run per seed")
    data_seed: int = Field(0, ge=0, description="which clean and poisoned images form the set")
    curve_images: int | None = Field(None, ge=10, description="test images (a fixed stratified subset) for the per-epoch "
                                     "asr curves; null: the whole split. o_asr and p_asr always use the whole split")
    curves: bool = Field(True, description="measure asr and clean_acc after every epoch (the RA curves); false: only "
                                           "before and after RA (the curves keep only the point before RA): one evaluation "
                                           "less per epoch and seed")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer="sgd", lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, schedule="constant", augment=self.augment, drop_last=False)


@dataclass
class RAData:
    """The RA set: uint8 images on the device and labels (poisoned samples already relabelled to the target)."""

    x: torch.Tensor
    y: torch.Tensor
    n_poison: int
    target: int
    hflip: bool = True
    source: str = "recorded poisoned training samples"

    def describe(self) -> dict[str, Any]:
        return {"n_total": len(self.x), "n_clean": len(self.x) - self.n_poison, "n_poison": self.n_poison,
                "target": self.target, "poisoned_from": self.source}


def make_ra_data(defender: DefenderData, attack: Attack, poison_pool: torch.Tensor, pool_labels: torch.Tensor,
                 n_total: int = 1000, n_poison: int = 5, seed: int = 0,
                 source: str = "recorded poisoned training samples", stamped: bool = False) -> RAData:
    """Draw the RA set: ``n_poison`` images of ``poison_pool`` (clean uint8 originals) triggered and
    relabelled to the target, plus up to ``n_total - n_poison`` of the defender's clean images.

    ``pool_labels`` are the pool's true labels; for dirty-label attacks target-class images are skipped.
    ``stamped``: the pool already carries the trigger (the attacker's own poisoned images, given as files).
    """
    if n_poison > n_total:
        raise AntidoorError(f"ra.n_poison {n_poison} is larger than ra.n_total {n_total}")
    dev = defender.device
    clean_x = torch.cat([defender.x, defender.x_val])
    clean_y = torch.cat([defender.y, defender.y_val])
    g = torch.Generator().manual_seed(seed)
    n_clean = min(n_total - n_poison, len(clean_x))
    pick = torch.randperm(len(clean_x), generator=g)[:n_clean].to(dev)
    usable = torch.ones(len(poison_pool), dtype=torch.bool) if attack.clean_label else (pool_labels.cpu() != attack.target)
    candidates = usable.nonzero().flatten()
    if n_poison > len(candidates):
        skipped = len(poison_pool) - len(candidates)
        why = (f"; {skipped} of the {len(poison_pool)} are of the target class {attack.target}, which a dirty-label "
               "attack does not poison" if skipped else "")
        raise AntidoorError(f"ra.n_poison {n_poison} asks for more poisoned samples than the {len(candidates)} available "
                            f"({source}{why}); allowed: 0..{len(candidates)}")
    chosen = candidates[torch.randperm(len(candidates), generator=g)[:n_poison]].to(poison_pool.device)
    px = poison_pool[chosen].to(dev) if stamped else attack.apply_uint8(poison_pool[chosen].to(dev))
    py = torch.full((n_poison,), attack.target, dtype=torch.int64, device=dev)
    return RAData(torch.cat([clean_x[pick], px]), torch.cat([clean_y[pick], py]), n_poison, attack.target,
                  defender.hflip, source)


@dataclass
class RARun:
    seed: int
    p_asr: float
    clean_acc: float
    robust_acc: float
    asr_curve: list[float]  # index e: after e epochs (0: before RA)
    clean_acc_curve: list[float]
    seconds: float
    hits: str = ""  # per triggered test image after RA, went to the target: packed bits (see antidoor.stress.verdict)


@dataclass
class RAResult:
    """RA of one model over several seeds: before (``o_asr``), after (``p_asr``) and per-epoch curves."""

    before: dict[str, float]
    runs: list[RARun]
    config: dict[str, Any]
    data: dict[str, Any]
    retuned: list[Classifier] = field(default_factory=list, repr=False)  # one per seed, kept only when asked
    before_hits: str = ""  # per triggered test image before RA, went to the target (packed bits)

    @property
    def o_asr(self) -> float:
        return self.before["asr"]

    def summary(self) -> dict[str, Any]:
        """Mean and sample standard deviation (n - 1; 0 for one seed) over the seeds."""
        p = [r.p_asr for r in self.runs]
        acc = [r.clean_acc for r in self.runs]
        curves = list(zip(*(r.asr_curve for r in self.runs), strict=True))
        return {"o_asr": self.o_asr, "o_clean_acc": self.before["clean_acc"],
                "p_asr_mean": _mean(p), "p_asr_std": _std(p), "clean_acc_mean": _mean(acc), "clean_acc_std": _std(acc),
                "asr_curve_mean": [_mean(list(c)) for c in curves], "asr_curve_std": [_std(list(c)) for c in curves],
                "seeds": [r.seed for r in self.runs]}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "before": self.before, "before_hits": self.before_hits,
                "runs": [r.__dict__ for r in self.runs], "config": self.config, "data": self.data}


def _mean(v: list[float]) -> float:
    return statistics.fmean(v)


def _std(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def retuning_attack(model: Classifier, data: RAData, evaluator: Evaluator, config: RAConfig | None = None,
                    keep_models: bool = False, description: str = "RA",
                    before: tuple[dict[str, float], torch.Tensor | None] | None = None, **overrides: Any) -> RAResult:
    """Run the retuning attack on copies of ``model`` (left untouched), once per seed.

    ``evaluator`` measures asr and clean_acc (on the test split: measurement only, nothing is chosen
    with it) before RA and after every epoch. ``overrides`` replace fields of ``config``:

    >>> result = retuning_attack(purified, ra_data, scenario.evaluator, seeds=[0, 1, 2])
    >>> result.summary()["p_asr_mean"]
    """
    cfg = validate_params(RAConfig, {**(config or RAConfig()).model_dump(), **overrides}, "ra", "retuning attack")
    if evaluator.attack is None:
        raise AntidoorError("the retuning attack needs an evaluator with an attack (asr cannot be measured without a trigger)")
    train_cfg = cfg.train_config()
    device = data.x.device
    before, before_hits = before if before is not None else evaluator.measure(model.to(device))
    # the curves on a fixed subset when asked (every epoch of every seed is a measurement); the model
    # before and after RA always on the whole split
    curve_eval = evaluator.subset(cfg.curve_images)
    curve_start = before if curve_eval is evaluator else curve_eval(model)
    runs, retuned = [], []
    for seed in cfg.seeds:
        work = copy.deepcopy(model).to(device)
        asr_curve, acc_curve, last = [curve_start["asr"]], [curve_start["clean_acc"]], [(before, before_hits)]

        def record(_epoch: int, _stats: dict[str, float], work: Classifier = work, asr_curve: list[float] = asr_curve,
                   acc_curve: list[float] = acc_curve, last: list[tuple] = last) -> None:
            m, hits = curve_eval.measure(work)
            asr_curve.append(m["asr"])
            acc_curve.append(m["clean_acc"])
            last[0] = (m, hits)

        t0 = time.perf_counter()
        train(work, data.x, data.y, train_cfg, seed=seed, hflip=data.hflip, description=f"{description} seed {seed}",
              on_epoch_end=record if cfg.curves else None)
        # the final model's numbers, on the whole split
        final, final_hits = last[0] if curve_eval is evaluator and cfg.curves else evaluator.measure(work)
        runs.append(RARun(seed, final["asr"], final["clean_acc"], final["robust_acc"], asr_curve, acc_curve,
                          round(time.perf_counter() - t0, 2), pack_hits(final_hits)))
        if keep_models:
            retuned.append(work.eval())
    result = RAResult(before, runs, cfg.model_dump(), data.describe(), retuned, pack_hits(before_hits))
    s = result.summary()
    info(f"{description}: o_asr {100 * s['o_asr']:.1f}% -> p_asr {100 * s['p_asr_mean']:.1f}% ± {100 * s['p_asr_std']:.1f} "
         f"over {len(cfg.seeds)} seed(s)")
    return result


__all__ = ["RAConfig", "RAData", "RAResult", "RARun", "make_ra_data", "retuning_attack"]
