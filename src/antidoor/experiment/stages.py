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
- ``stress`` (with the study's ``stress:`` section): the stress suite (:mod:`antidoor.stress`) on one
  model, under its attack's trigger and with the same RA set and seeds for every model. One per
  purification (upstream: purify; RA, then QRA and the backdoor-connected path when configured) and,
  as references, one for the backdoored model and one for the clean model per (dataset, model,
  attack, seed) (upstream: attack; RA only, keyed by the RA settings alone, so changing QRA or the
  path reruns neither). EP is stressed like any purification when it is one of the defenses.
  Scalars: ``o_asr``, ``p_asr`` (mean over the RA seeds), ``p_asr_std``, ``p_clean_acc``,
  ``qra_asr_purified``, ``qra_asr_clean``; curves ``retune.asr``/``retune.clean_acc`` per RA epoch (mean
  over seeds; step 0: before RA) and ``path.asr``/``path.clean_acc`` per t. The reference stages are
  labelled with the defense ``none`` (backdoored) or ``clean``, so their numbers join those rows.

Artifacts are checkpoints under the study folder, written atomically by ``save_checkpoint``; a
stress stage's is the JSON of its full result (every RA seed, QRA, the path), written atomically.
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

from pydantic import BaseModel

from antidoor.experiment.store import Artifact, Metric, Store, config_key
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


def artifact_path(kind: str, key: str) -> str:
    return f"artifacts/{kind}/{key[:20]}{'.json' if kind == 'stress' else '.safetensors'}"


def key_neutral(cls: type) -> dict[str, Any]:
    """The fields a config or ``Params`` class lists in ``KEY_NEUTRAL``: each was added after studies were stored,
    mapped to the value that reproduces the behaviour before it (not necessarily today's default). At that value the
    field stays out of stage keys, so those studies' stages keep their keys and resume. Every base class's list
    counts (PAM's parameters combine BTI-DBF's with the shared ``PAMSettings``), the nearer class winning a clash."""
    return {name: value for base in reversed(cls.__mro__) for name, value in vars(base).get("KEY_NEUTRAL", {}).items()}


def key_dump(config: BaseModel) -> dict[str, Any]:
    """A config as it enters stage keys: ``model_dump()`` without the ``KEY_NEUTRAL`` fields that hold their neutral
    value. A stage rebuilds such a config from the dump, where a left-out field takes its default: so, unlike a
    defense's parameter (:func:`defense_key_spec`), a config field's neutral value must be its default."""

    def neutral(model: BaseModel) -> dict[str, Any]:
        fields, skip = type(model).model_fields, key_neutral(type(model))
        out: dict[str, Any] = {}
        for name in fields:
            value = getattr(model, name)
            if name in skip and skip[name] != fields[name].default:
                raise TypeError(f"{type(model).__name__}.KEY_NEUTRAL[{name!r}] must be the field's default "
                                f"({fields[name].default!r}), not {skip[name]!r}")
            if name in skip and value == skip[name]:
                out[name] = True
            elif isinstance(value, BaseModel) and (inner := neutral(value)):
                out[name] = inner
        return out

    return config.model_dump(exclude=neutral(config) or None)


def defense_key_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A defense spec (every parameter filled in) as it enters stage keys: without the parameters its ``Params``
    lists in ``KEY_NEUTRAL`` while they hold their neutral value. :func:`defense_run_spec` puts them back."""
    from antidoor.defenses.base import DEFENSES

    skip = key_neutral(DEFENSES.get(str(spec["name"])).Params)
    return {k: v for k, v in spec.items() if not (k in skip and v == skip[k])}


def defense_run_spec(keyed: dict[str, Any]) -> dict[str, Any]:
    """The parameters a keyed defense spec runs with: a ``KEY_NEUTRAL`` parameter left out of the key takes its
    neutral value, the behaviour the stored stages under that key had, not today's default (PAM: 1 start, not 3)."""
    from antidoor.defenses.base import DEFENSES

    return {**key_neutral(DEFENSES.get(str(keyed["name"])).Params), **keyed}


def plan(study: StudyConfig) -> list[Stage]:
    """Every stage of the study, each once (shared stages deduplicated by key), upstream first."""
    stages: dict[str, Stage] = {}

    def add(stage: Stage) -> Stage:
        stages.setdefault(stage.key, stage)
        return stages[stage.key]

    dumped_data = [key_dump(d) for d in study.datasets]
    data_labels = labels_for(dumped_data, dataset_label)
    dumped_models = [key_dump(m) for m in study.models]
    model_labels = labels_for(dumped_models, model_label)
    attack_labels = study.row_labels("attacks")
    defense_labels = study.row_labels("defenses")
    train = key_dump(study.train)
    stress = key_dump(study.stress) if study.stress is not None else None
    for data, d_label in zip(dumped_data, data_labels, strict=True):
        for model, m_label in zip(dumped_models, model_labels, strict=True):
            for seed in study.seeds:
                base = {"data": data, "model": model, "train": train, "seed": seed}
                lab = {"dataset": d_label, "model": m_label, "seed": seed}
                clean = add(Stage("clean", {"stage": "clean", **base}, {**lab, "attack": None, "defense": None}))
                for attack, a_label in zip(study.attacks, attack_labels, strict=True):
                    atk = add(Stage("attack", {"stage": "attack", **base, "attack": attack, "clean": clean.config},
                                    {**lab, "attack": a_label, "defense": None}, {"clean": clean.key}))
                    refs = {"attack": atk.key, "clean": clean.key}
                    if stress is not None:  # the references: RA only, so only the RA settings key them
                        for role, row in (("backdoored", "none"), ("clean", "clean")):
                            add(Stage("stress", {"stage": "stress", "role": role, "stress": {"ra": stress["ra"]},
                                                 "upstream": atk.config}, {**lab, "attack": a_label, "defense": row}, refs))
                    for defense, p_label in zip(map(defense_key_spec, study.defenses), defense_labels, strict=True):
                        pur = add(Stage("purify", {"stage": "purify", "defense": defense, "curves": study.curves,
                                                   "upstream": atk.config},
                                        {**lab, "attack": a_label, "defense": p_label}, {"attack": atk.key}))
                        if stress is not None:
                            add(Stage("stress", {"stage": "stress", "role": "purified", "stress": stress, "upstream": pur.config},
                                      pur.labels, {"purify": pur.key, **refs}))
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
    # the loop's name only: a job's heartbeat lines and the driver's report already name the stage
    run_cfg, result = _train(stage, ctx, {"name": "none", "pratio": 0.0}, "clean reference")
    path = _save(ctx.artifact(stage), run_cfg, result, {"stage_key": stage.key})
    return StageOutput(_scalars("clean", result.metrics) + _history("clean", result.history), [path])


def run_attack(stage: Stage, ctx: StageContext) -> StageOutput:
    """Train the backdoored model; measure it and the clean reference under its trigger."""
    from antidoor.checkpoint import load_checkpoint

    run_cfg, result = _train(stage, ctx, stage.config["attack"], "backdoored model")
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
    from antidoor.defenses.base import defense_record
    from antidoor.metrics import der

    up = stage.config["upstream"]
    ckpt = load_checkpoint(ctx.deps["attack"])
    scenario = scenario_of(ckpt, up["data"], up["seed"], ctx.device)
    backdoored = ckpt.model.to(scenario.device)
    before = scenario.evaluator(backdoored)
    spec = defense_run_spec(stage.config["defense"])
    name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    curves: list[Metric] = []

    def monitor(step: int, model: Any) -> None:  # observes only: the result is the last model whatever this sees
        for k, v in scenario.evaluator(model).items():
            curves.append(Metric("purify", f"curve.{k}", float(v), step=step))

    defender = scenario.defender_data(oracle=DEFENSES.get(name).needs_poisoned)
    chosen: dict[str, float] = {}
    purified = purify(backdoored, defender, name, seed=up["seed"], monitor=monitor if stage.config["curves"] else None,
                      chosen=chosen, **params)
    after = scenario.evaluator(purified)
    # the defender's own validation accuracy, beside the test metrics: what a study may choose settings with
    after["val_clean_acc"] = defender.val_accuracy(purified)
    if "asr" in before:
        after["der"] = der(before, after)
    meta = {**{k: v for k, v in ckpt.meta.items() if k in ("classes", "dataset", "seed", "config")},
            "defense": defense_record(spec, up["seed"], chosen),
            "parent": str(ctx.deps["attack"]), "metrics_before": before,
            "metrics": after, "stage_key": stage.key}
    path = save_checkpoint(ctx.artifact(stage), purified, meta, ckpt.attack, ckpt.splits)
    # what the defense chose on validation data (rho: auto) is a result too: chosen.rho, ...
    metrics = _scalars("purify", after) + _scalars("purify", {f"chosen.{k}": v for k, v in chosen.items()}) + curves
    return StageOutput(metrics, [path])


def run_stress(stage: Stage, ctx: StageContext) -> StageOutput:
    """The stress suite on one model (purified, backdoored or clean) under its attack's trigger."""
    from antidoor.checkpoint import load_checkpoint
    from antidoor.stress.settings import ModelStressConfig
    from antidoor.stress.suite import qra_data_for, ra_data_for, stress_model
    from antidoor.utils import atomic_write_json

    c = stage.config
    role = c["role"]
    cfg = ModelStressConfig(**c["stress"])
    up = c["upstream"]["upstream"] if role == "purified" else c["upstream"]  # the attack stage's config
    atk = load_checkpoint(ctx.deps["attack"])
    scenario = scenario_of(atk, up["data"], up["seed"], ctx.device)
    clean = load_checkpoint(ctx.deps["clean"]).model  # the model stressed, or QRA's clean surrogate
    purified = role == "purified"
    model = load_checkpoint(ctx.deps["purify"]).model if purified else atk.model if role == "backdoored" else clean
    qra_data = qra_data_for(scenario, cfg.qra) if purified and cfg.qra is not None else None
    res = stress_model(str(stage.labels["defense"]), "purified" if purified else f"{role} reference", model, scenario,
                       atk.model, clean, cfg, ra_data_for(scenario, cfg.ra), qra_data)
    s = res.ra.summary()
    scalars = {"o_asr": s["o_asr"], "p_asr": s["p_asr_mean"], "p_asr_std": s["p_asr_std"], "p_clean_acc": s["clean_acc_mean"]}
    if res.qra is not None:
        scalars["qra_asr_purified"] = res.qra.qra_asr_purified
        if res.qra.qra_asr_clean is not None:
            scalars["qra_asr_clean"] = res.qra.qra_asr_clean
    metrics = _scalars("stress", scalars)
    acc_mean = [sum(v) / len(v) for v in zip(*(r.clean_acc_curve for r in res.ra.runs), strict=True)]
    for epoch, (asr, acc) in enumerate(zip(s["asr_curve_mean"], acc_mean, strict=True)):  # epoch 0: before RA
        metrics += [Metric("stress", "retune.asr", asr, step=epoch), Metric("stress", "retune.clean_acc", acc, step=epoch)]
    if res.path is not None:
        for t, asr, acc in zip(res.path.t, res.path.asr, res.path.clean_acc, strict=True):
            metrics += [Metric("stress", "path.asr", asr, step=t), Metric("stress", "path.clean_acc", acc, step=t)]
    path = ctx.artifact(stage)
    atomic_write_json(path, {"stage_key": stage.key, "labels": stage.labels, "config": c["stress"], **res.to_dict()})
    return StageOutput(metrics, [path])


# A stage kind whose recorded results measure an upstream checkpoint too, by that upstream's kind: the attack stage
# records the clean model under its trigger (``reference.*``). Its own rerun then tells whether the clean model its
# block was built on came back, whatever the store's clean row (retrained for another attack's block) now holds.
MEASURES_UPSTREAM: dict[str, str] = {"attack": "clean"}

RUNNERS: dict[str, Runner] = {"clean": run_clean, "attack": run_attack, "purify": run_purify, "stress": run_stress}


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

    utils.keep_freed_memory()  # once per process: a worker's steps reuse their blocks instead of faulting in new pages
    quiet, threads = utils._quiet, torch.get_num_threads()
    utils.set_quiet(True)  # a job prints nothing but its heartbeats; the driver reports each finished stage
    utils.set_beat_label(None if quiet else job.stage.describe())
    try:
        torch.set_num_threads(job.threads)
        return _execute(job)
    finally:  # the inline backend runs jobs in the driver's own process
        utils.set_quiet(quiet)
        utils.set_beat_label(None)
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
