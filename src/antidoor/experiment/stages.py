"""The stages of a study and how each one runs.

A study expands into stages, each keyed by the hash of the canonical JSON of the config that
produces it, its upstream stages' configs included:

- ``clean``  (dataset, model, train, seed): the clean reference model. The attack plays no part
  in training it (nothing is poisoned; the defender split is drawn before the poison), so one
  clean model serves every attack and defense of a (dataset, model, seed).
- ``attack`` (dataset, model, attack, train, seed; upstream: clean): the backdoored model, measured
  (``clean_acc``, ``asr``, ``robust_acc``), and the clean reference measured under the same trigger.
  One per (dataset, model, attack, seed) serves every defense.
- ``purify`` (defense; upstream: attack): purify the backdoored model on the defender's data only,
  then evaluate on the test split: ``clean_acc``, ``asr``, ``robust_acc``, ``der``; with
  ``curves``, the per-round clean_acc/asr (a monitor that observes and never selects).

The stress suite becomes one more kind after ``purify``: a ``run_stress`` in ``RUNNERS`` and a few
lines in :func:`plan` adding a ``Stage("stress", {"stage": "stress", "stress": params, "upstream":
purify.config}, labels, {"purify": ..., "attack": ..., "clean": ...})`` per purification (and per
reference, to retune the clean and the backdoored models too). Its runner reads the checkpoints of
its ``deps`` and returns its scalars (``p_asr``, ``qra_asr_purified``, ...) and its curves as
``Metric("stress", "path.asr", value, step=t)`` / ``Metric("stress", "retune.asr", value, step=epoch)``;
the scheduler, the store, ``antidoor results`` and the report already handle such rows.
Artifacts are checkpoints under the study folder, written atomically by ``save_checkpoint``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antidoor.experiment.store import Artifact, Metric, Store, canonical_json
from antidoor.experiment.study import StudyConfig, dataset_label, labels_for, model_label

STORE_NAME = "study.sqlite"


@dataclass(frozen=True)
class Stage:
    kind: str
    config: dict[str, Any]  # everything that determines the result, upstream configs included
    labels: dict[str, Any]  # dataset, model, attack, defense, seed: for tables and filters
    deps: dict[str, str] = field(default_factory=dict)  # kind -> key of the upstream stage

    @functools.cached_property
    def key(self) -> str:
        return config_key(self.config)

    @property
    def artifact(self) -> str:
        """The stage's checkpoint, relative to the study folder."""
        return artifact_path(self.kind, self.key)

    def describe(self) -> str:
        parts = [str(self.labels[k]) for k in ("dataset", "model", "attack", "defense") if self.labels.get(k)]
        return f"{self.kind} {'/'.join(parts)} seed {self.labels.get('seed')}"


def config_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def artifact_path(kind: str, key: str) -> str:
    return f"artifacts/{kind}/{key[:20]}.safetensors"


def plan(study: StudyConfig) -> list[Stage]:
    """Every stage of the study, each once (shared stages deduplicated by key), upstream first."""
    stages: dict[str, Stage] = {}

    def add(stage: Stage) -> Stage:
        stages.setdefault(stage.key, stage)
        return stages[stage.key]

    dumped_data = [d.model_dump() for d in study.datasets]
    data_labels = labels_for(dumped_data, dataset_label)
    model_labels = labels_for([m.model_dump() for m in study.models], model_label)
    attack_labels = labels_for(study.attacks)
    defense_labels = labels_for(study.defenses)
    train = study.train.model_dump()
    for data, d_label in zip(dumped_data, data_labels, strict=True):
        for model, m_label in zip(study.models, model_labels, strict=True):
            for seed in study.seeds:
                base = {"data": data, "model": model.model_dump(), "train": train, "seed": seed}
                lab = {"dataset": d_label, "model": m_label, "seed": seed}
                clean = add(Stage("clean", {"stage": "clean", **base}, {**lab, "attack": None, "defense": None}))
                for attack, a_label in zip(study.attacks, attack_labels, strict=True):
                    atk = add(Stage("attack", {"stage": "attack", **base, "attack": attack, "clean": clean.config},
                                    {**lab, "attack": a_label, "defense": None}, {"clean": clean.key}))
                    for defense, p_label in zip(study.defenses, defense_labels, strict=True):
                        add(Stage("purify", {"stage": "purify", "defense": defense, "curves": study.curves,
                                             "upstream": atk.config},
                                  {**lab, "attack": a_label, "defense": p_label}, {"attack": atk.key}))
    return list(stages.values())


# -- running one stage ---------------------------------------------------------------------------------

@dataclass
class StageContext:
    """What a stage runner gets: the study folder, the job settings and its upstream checkpoints."""

    study_dir: Path
    device: str
    deps: dict[str, Path]  # kind -> absolute checkpoint path of the upstream stage

    def artifact(self, stage: Stage) -> Path:
        return self.study_dir / stage.artifact


@dataclass
class StageOutput:
    metrics: list[Metric]
    artifacts: list[Path]


Runner = Callable[[Stage, StageContext], StageOutput]


def _scalars(stage: str, values: dict[str, float]) -> list[Metric]:
    return [Metric(stage, k, float(v)) for k, v in values.items()]


def _history(stage: str, history: list[dict[str, float]]) -> list[Metric]:
    return [Metric(stage, f"train.{k}", float(v), step=i + 1)
            for i, epoch in enumerate(history) for k, v in epoch.items() if isinstance(v, (int, float))]


def _train_config(stage: Stage, attack: dict[str, Any]) -> Any:
    from antidoor.config import AttackRunConfig
    from antidoor.experiment.study import StudyData

    c = stage.config
    return AttackRunConfig(data=StudyData(**c["data"]).data_config(), model=c["model"], attack=attack, train=c["train"],
                           seed=c["seed"])


def _train(stage: Stage, ctx: StageContext, attack: dict[str, Any], description: str) -> tuple[Any, Any]:
    from antidoor.experiment.study import StudyData, load_study_data
    from antidoor.pipeline import Scenario, train_attack

    data_cfg = StudyData(**stage.config["data"])
    run_cfg = _train_config(stage, attack)
    scenario = Scenario.build(data_cfg, run_cfg.attack, run_cfg.seed, ctx.device, data=load_study_data(data_cfg))
    return run_cfg, train_attack(run_cfg, scenario, description=description)


def _save(path: Path, run_cfg: Any, result: Any, extra: dict[str, Any] | None = None) -> Path:
    from antidoor.checkpoint import save_checkpoint
    from antidoor.pipeline import run_meta

    meta = {**run_meta(run_cfg, result), **(extra or {})}
    return save_checkpoint(path, result.model, meta, result.scenario.attack, result.scenario.splits)


def run_clean(stage: Stage, ctx: StageContext) -> StageOutput:
    """Train the clean reference: the study's recipe, nothing poisoned."""
    run_cfg, result = _train(stage, ctx, {"name": "none", "pratio": 0.0}, f"{stage.describe()}: clean reference")
    path = _save(ctx.artifact(stage), run_cfg, result, {"stage_key": stage.key})
    return StageOutput(_scalars("clean", result.metrics) + _history("clean", result.history), [path])


def run_attack(stage: Stage, ctx: StageContext) -> StageOutput:
    """Train the backdoored model; measure it and the clean reference under its trigger."""
    from antidoor.checkpoint import load_checkpoint

    run_cfg, result = _train(stage, ctx, stage.config["attack"], f"{stage.describe()}: backdoored model")
    path = _save(ctx.artifact(stage), run_cfg, result, {"stage_key": stage.key})
    clean = load_checkpoint(ctx.deps["clean"]).model.to(result.scenario.device)
    reference = result.scenario.evaluator(clean)
    metrics = _scalars("attack", result.metrics) + _history("attack", result.history) + _scalars("reference", reference)
    return StageOutput(metrics, [path])


def scenario_of(checkpoint: Any, data: dict[str, Any], seed: int, device: str) -> Any:
    """The scenario a study checkpoint was trained in: the study's data (subset included), its trigger and splits."""
    from antidoor.experiment.study import StudyData, load_study_data
    from antidoor.pipeline import Scenario
    from antidoor.utils import resolve_device

    dev = resolve_device(device)
    data_cfg = StudyData(**data)
    return Scenario(load_study_data(data_cfg).to(dev), checkpoint.attack.to(dev), checkpoint.splits, data_cfg, seed)


def run_purify(stage: Stage, ctx: StageContext) -> StageOutput:
    """Purify the backdoored model (defender data only), then evaluate on the test split."""
    from antidoor.checkpoint import load_checkpoint, save_checkpoint
    from antidoor.defenses import DEFENSES, purify
    from antidoor.metrics import der

    up = stage.config["upstream"]
    ckpt = load_checkpoint(ctx.deps["attack"])
    scenario = scenario_of(ckpt, up["data"], up["seed"], ctx.device)
    backdoored = ckpt.model.to(scenario.device)
    before = scenario.evaluator(backdoored)
    spec = stage.config["defense"]
    name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    curves: list[Metric] = []

    def monitor(step: int, model: Any) -> None:  # observes only: the result is the last model whatever this sees
        for k, v in scenario.evaluator(model).items():
            curves.append(Metric("purify", f"curve.{k}", float(v), step=step))

    purified = purify(backdoored, scenario.defender_data(oracle=DEFENSES.get(name).needs_poisoned), name, seed=up["seed"],
                      monitor=monitor if stage.config["curves"] else None, **params)
    after = scenario.evaluator(purified)
    if "asr" in before:
        after["der"] = der(before, after)
    meta = {**{k: v for k, v in ckpt.meta.items() if k in ("classes", "dataset", "seed", "config")},
            "defense": {**spec, "seed": up["seed"]}, "parent": str(ctx.deps["attack"]), "metrics_before": before,
            "metrics": after, "stage_key": stage.key}
    path = save_checkpoint(ctx.artifact(stage), purified, meta, ckpt.attack, ckpt.splits)
    metrics = _scalars("purify", after) + curves
    return StageOutput(metrics, [path])


RUNNERS: dict[str, Runner] = {"clean": run_clean, "attack": run_attack, "purify": run_purify}


@dataclass(frozen=True)
class Job:
    """What travels to a worker: the stage, the job settings and the record keeping."""

    stage: Stage
    study_dir: str
    device: str = "auto"
    threads: int = 1
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None


def execute(job: Job) -> dict[str, Any]:
    """Run one stage in this process and record it in the store; never raises for a failing stage.

    Returns ``{"key", "status", "error", "seconds"}``.
    """
    import torch

    from antidoor import utils

    quiet, threads = utils._quiet, torch.get_num_threads()
    utils.set_quiet(True)  # a job prints nothing; the driver reports each finished stage
    try:
        torch.set_num_threads(job.threads)
        return _execute(job)
    finally:  # the inline backend runs jobs in the driver's own process
        utils.set_quiet(quiet)
        torch.set_num_threads(threads)


def _execute(job: Job) -> dict[str, Any]:
    stage, study_dir = job.stage, Path(job.study_dir)
    with Store(study_dir / STORE_NAME) as store:
        run_id = store.start(stage.key, stage.kind, stage.config, stage.labels, job.versions, job.git_commit)
        t0 = time.perf_counter()
        try:
            ctx = StageContext(study_dir, job.device, {k: study_dir / artifact_path(k, v) for k, v in stage.deps.items()})
            out = RUNNERS[stage.kind](stage, ctx)
            seconds = time.perf_counter() - t0
            store.finish(run_id, out.metrics, [_artifact(study_dir, p) for p in out.artifacts], seconds)
            return {"key": stage.key, "status": "done", "error": None, "seconds": seconds}
        except Exception as e:  # a failing job is recorded and the study goes on
            seconds = time.perf_counter() - t0
            error = f"{type(e).__name__}: {e}"
            store.fail(run_id, error + "\n" + traceback.format_exc(limit=-3), seconds)
            return {"key": stage.key, "status": "failed", "error": error, "seconds": seconds}


def _artifact(study_dir: Path, path: Path) -> Artifact:
    data = path.read_bytes()
    return Artifact(path.stem, os.path.relpath(path, study_dir), len(data), hashlib.sha256(data).hexdigest())
