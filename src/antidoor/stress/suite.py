"""The whole stress test of one or more purified models: RA, QRA and the backdoor-connected path,
with the references that make the numbers readable (clean model, backdoored model, EP).

``run_stress`` builds the RA and QRA sets once from the scenario (the data stay on the device) and
runs the same RA (same set, same seeds) on every model; QRA and the path run for the purified
models and EP. ``stress_model`` is that treatment for one model (a study's ``stress`` stage calls it).
``write_report`` writes ``stress.json``, ``stress.md``, ``ra_curve.png`` and ``path.png``,
each atomically. Nothing here chooses anything with the test split: it is only measured on.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from antidoor.defenses import purify
from antidoor.errors import AntidoorError
from antidoor.models.registry import Classifier
from antidoor.stress.guards import check_scenario, require_classifier
from antidoor.stress.inverted import inverted_attack
from antidoor.stress.path import PathResult, _describe, backdoor_path, check_same_architecture
from antidoor.stress.plots import path_png, ra_curve_png
from antidoor.stress.qra import QRAConfig, QRAData, QRAResult, make_qra_data, qra
from antidoor.stress.retune import RAConfig, RAData, RAResult, make_ra_data, retuning_attack
from antidoor.stress.settings import ModelStressConfig, StressConfig
from antidoor.stress.verdict import Verdict, VerdictConfig, judge
from antidoor.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, info

if TYPE_CHECKING:
    from antidoor.pipeline import Scenario


def ra_data_for(scenario: Scenario, cfg: RAConfig) -> RAData:
    """The RA set of a scenario: the defender's clean images plus the attacker's recorded poisoned samples."""
    d, s = scenario.data, scenario.splits
    given = scenario.poisoned_samples
    if given is not None:  # the attacker's own triggered images; unknown labels (-1) are never the target
        labels = given.y if given.y is not None else torch.full((len(given.x),), -1, dtype=torch.int64)
        return make_ra_data(scenario.defender_data(), scenario.attack, given.x, labels, cfg.n_total, cfg.n_poison,
                            cfg.data_seed, given.source, stamped=True)
    pool = s.poison
    source = "recorded poisoned training samples"
    if scenario.attack.name == "inverted" and len(pool):
        # a recovered trigger relabels to the target it detected: the attacker's images of that class are no
        # poisoned samples for it (all of a clean-label attack's, SIG's say); too few left -> outside images
        usable = pool[d.y_train[pool.to(d.y_train.device)].to(pool.device) != scenario.attack.params.target]
        pool = usable if len(usable) >= cfg.n_poison else pool[:0]
        source = "recorded poisoned training samples' originals of other classes, recovered trigger stamped"
    if len(pool) == 0:  # a model from elsewhere: stamp the trigger on images the defender does not hold
        free = torch.ones(len(d.y_train), dtype=torch.bool)
        free[torch.cat([s.defender_train, s.defender_val])] = False
        pool = free.nonzero().flatten()
        source = "training images outside the defender's data, trigger stamped (no recorded poisoned samples)"
    pool = pool.to(scenario.device)
    return make_ra_data(scenario.defender_data(), scenario.attack, d.x_train[pool], d.y_train[pool], cfg.n_total,
                        cfg.n_poison, cfg.data_seed, source)


def qra_data_for(scenario: Scenario, cfg: QRAConfig) -> QRAData:
    """The QRA generator's training set: training images outside the defender's data (see :mod:`qra`)."""
    d, s = scenario.data, scenario.splits
    return make_qra_data(d.x_train, d.y_train, scenario.attack, torch.cat([s.defender_train, s.defender_val]),
                         avoid_for_clean=s.poison, n_clean=cfg.n_clean, n_poison=cfg.n_poison, seed=cfg.seed)


@dataclass
class ModelStress:
    role: str  # purified, oracle reference (EP), backdoored reference, clean reference
    description: str
    ra: RAResult
    qra: QRAResult | None = None
    path: PathResult | None = None

    def row(self) -> dict[str, Any]:
        s = self.ra.summary()
        row = {"role": self.role, "clean_acc": s["o_clean_acc"], "o_asr": s["o_asr"], "p_asr_mean": s["p_asr_mean"],
               "p_asr_std": s["p_asr_std"], "ra_clean_acc_mean": s["clean_acc_mean"], "ra_clean_acc_std": s["clean_acc_std"]}
        if self.qra is not None:
            row["qra_asr_purified"] = self.qra.qra_asr_purified
            row["qra_asr_clean"] = self.qra.qra_asr_clean
        return row

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "model": self.description, "summary": self.row(), "ra": self.ra.to_dict(),
                "qra": self.qra.to_dict() if self.qra else None, "path": self.path.to_dict() if self.path else None}


@dataclass
class StressResult:
    models: dict[str, ModelStress]
    config: dict[str, Any]
    data: dict[str, Any]
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        return [{"model": name, **m.row()} for name, m in self.models.items()]

    def verdicts(self) -> dict[str, Verdict]:
        """Per purified model: not purified, superficial, deep or inconclusive (the rule: :mod:`antidoor.stress.verdict`)."""
        return judge({k: v.to_dict() for k, v in self.models.items()}, VerdictConfig(**self.config.get("verdict", {})))

    def to_dict(self) -> dict[str, Any]:
        return {"verdicts": {k: v.to_dict() for k, v in self.verdicts().items()}, "table": self.table(),
                "models": {k: v.to_dict() for k, v in self.models.items()}, "config": self.config,
                "data": self.data, "seconds": self.seconds, **self.meta}


def run_stress(purified: dict[str, Classifier] | Classifier, backdoored: Classifier, clean_ref: Classifier | None,
               scenario: Scenario, config: StressConfig | None = None, ep: Classifier | None = None,
               seed: int = 0) -> StressResult:
    """RA on every model (purified ones and references), QRA and the path for the purified ones and EP.

    ``purified``: one model or ``{name: model}``. ``ep``: an EP model; with ``config.ep`` and none
    given, EP is purified here from ``backdoored`` when the scenario records its poisoned samples.

    >>> result = run_stress({"sau": sau_model}, backdoored, clean_model, scenario)
    >>> write_report(result, "runs/stress")
    """
    cfg = config or StressConfig()
    t0 = time.perf_counter()
    models = {"purified": purified} if isinstance(purified, torch.nn.Module) else dict(purified)
    if not models:
        raise AntidoorError("run_stress needs at least one purified model")
    dev = scenario.device
    nc, ch = scenario.data.num_classes, scenario.data.image_shape[0]
    named = {**models, "backdoored": backdoored, **({"clean": clean_ref} if clean_ref is not None else {}),
             **({"ep": ep} if ep is not None else {})}
    for name, m in named.items():
        require_classifier(name, m)
        arch = getattr(m, "arch", None)
        if arch and (arch["num_classes"] != nc or arch["in_channels"] != ch):
            raise AntidoorError(f"model {name!r} is {_describe(m)}, but the data have {nc} classes and {ch} channels")
    for name, m in models.items():
        if name in ("backdoored", "clean", "ep"):
            raise AntidoorError(f"purified model name {name!r} is reserved for a reference; choose another")
        if cfg.path is not None:
            check_same_architecture(m, backdoored, (name, "backdoored"))
    named = {n: m.to(dev).eval() for n, m in named.items()}
    if cfg.inversion is not None:  # the trigger is unknown: stress under one recovered from the backdoored model
        scenario = copy.copy(scenario)
        scenario.attack, scenario._evaluator = inverted_attack(backdoored, scenario, cfg.inversion), None
    # the references measured once: for the checks here and as their RA's point before retuning
    measured = {n: scenario.evaluator.measure(named[n]) for n in ("backdoored", "clean") if n in named}
    clean_asr = measured["clean"][0]["asr"] if "clean" in measured else None
    checks = check_scenario(named, measured["backdoored"][0]["asr"], scenario, cfg.guards, clean_asr)
    if ep is None and cfg.ep and cfg.inversion is None:
        if scenario.oracle_available():
            info("purifying the backdoored model with EP (oracle reference: sees the poisoned samples with their true labels)")
            ep = purify(backdoored, scenario.defender_data(oracle=True), "ep", seed=seed, **cfg.ep_params)
        else:
            info("no EP reference: the scenario records no poisoned samples")
    ra_data = ra_data_for(scenario, cfg.ra)
    qra_data = qra_data_for(scenario, cfg.qra) if cfg.qra is not None else None
    runs: list[tuple[str, str, Classifier]] = [(n, "purified", m) for n, m in models.items()]
    if ep is not None:
        runs.append(("ep", "oracle reference (EP)", ep))
    runs.append(("backdoored", "backdoored reference", backdoored))
    if clean_ref is not None:
        runs.append(("clean", "clean reference", clean_ref))
    out = {name: stress_model(name, role, model, scenario, backdoored, clean_ref, cfg, ra_data, qra_data, measured.get(name))
           for name, role, model in runs}
    defender = scenario.defender_data()
    data = {"dataset": scenario.data.name, "attack": scenario.attack.spec(), "ra_set": ra_data.describe(),
            "qra_set": qra_data.describe() if qra_data is not None else None,
            "bn_images": len(defender.x) + len(defender.x_val), "evaluated_on": "test split (measurement only)"}
    return StressResult(out, cfg.model_dump(), data, round(time.perf_counter() - t0, 1),
                        {"device": str(dev), "seed": seed, "checks": [c.to_dict() for c in checks]})


def stress_model(name: str, role: str, model: Classifier, scenario: Scenario, backdoored: Classifier,
                 clean_ref: Classifier | None, config: ModelStressConfig, ra_data: RAData,
                 qra_data: QRAData | None = None,
                 before: tuple[dict[str, float], torch.Tensor | None] | None = None) -> ModelStress:
    """Stress one model: RA; for a purified model or EP (``role`` starting with ``purified`` or ``oracle``)
    also QRA (when ``qra_data`` is given) and the path to ``backdoored`` (when ``config.path`` is set).

    ``ra_data``/``qra_data`` come from :func:`ra_data_for`/:func:`qra_data_for`, built once and shared
    by every model compared. ``clean_ref`` is QRA's clean surrogate and the model ``qra_asr_clean`` is measured on.
    ``before``: ``scenario.evaluator.measure(model)`` when the caller has taken it already.
    """
    ev = scenario.evaluator
    model = model.to(scenario.device).eval()
    purified_like = role.startswith(("purified", "oracle"))
    ra = retuning_attack(model, ra_data, ev, config.ra, keep_models=purified_like and qra_data is not None,
                         description=f"RA on {name}", before=before)
    res = ModelStress(role, _describe(model), ra)
    if purified_like and qra_data is not None:
        roles = {"retuned": f"{name} after RA (seed {ra.runs[0].seed})", "purified": name,
                 "clean_surrogate": "clean reference" if clean_ref is not None else "none (CE term dropped)",
                 "clean_ref": "clean reference" if clean_ref is not None else "none"}
        res.qra = qra(model, qra_data, ev, retuned=ra.retuned[0], clean_surrogate=clean_ref, config=config.qra, roles=roles)
        ra.retuned.clear()
        info(f"QRA on {name}: asr {100 * res.qra.asr_purified:.1f}% -> {100 * res.qra.qra_asr_purified:.1f}% "
             f"(clean model: {_pct(res.qra.qra_asr_clean)})")
    if purified_like and config.path is not None:
        defender = scenario.defender_data()
        clean_images = torch.cat([defender.x, defender.x_val])  # BatchNorm re-estimation: the defender's clean images
        p = config.path
        res.path = backdoor_path(model, backdoored, clean_images, ev, p.points, p.bn, p.batch_size, p.test_images)
        info(f"path {name} -> backdoored ({p.bn} BN): asr " + " ".join(f"{100 * a:.0f}" for a in res.path.asr))
    return res


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(result: StressResult) -> str:
    """The summary tables: superficial safety (RA and QRA) and the path, rates in percent."""
    ra_cfg, d = result.config["ra"], result.data
    lines = ["# antidoor stress", "", *verdict_lines(result.verdicts(), result.config.get("verdict", {})),
             *check_lines(result.meta.get("checks", [])),
             f"Data: {d['dataset']}, attack {d['attack']['name']} (target {d['attack']['target']}). "
             f"RA set: {d['ra_set']['n_total']} images, {d['ra_set']['n_poison']} poisoned "
             f"({d['ra_set']['poisoned_from']}); SGD lr {ra_cfg['lr']}, {ra_cfg['epochs']} epochs, seeds {ra_cfg['seeds']}. "
             f"Metrics on the test split. Wall time {result.seconds:.0f} s on {result.meta.get('device')}.",
             "", "## Superficial safety", "",
             "| model | role | clean_acc | o_asr | p_asr (mean ± std) | clean_acc after RA | qra_asr_purified | qra_asr_clean |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result.table():
        lines.append(f"| {r['model']} | {r['role']} | {_pct(r['clean_acc'])} | {_pct(r['o_asr'])} | "
                     f"{100 * r['p_asr_mean']:.1f}% ± {100 * r['p_asr_std']:.1f} | "
                     f"{100 * r['ra_clean_acc_mean']:.1f}% ± {100 * r['ra_clean_acc_std']:.1f} | "
                     f"{_pct(r.get('qra_asr_purified'))} | {_pct(r.get('qra_asr_clean'))} |")
    lines += ["", "std: sample standard deviation over the RA seeds (0 for one seed).", ""]
    qras = {n: m.qra for n, m in result.models.items() if m.qra is not None}
    if qras:
        first = next(iter(qras.values()))
        lines += [f"QRA attacker models ({first.attacker_models['access']}): " + "; ".join(
            f"{n}: teacher {q.attacker_models['retuned']}, clean surrogate {q.attacker_models['clean_surrogate']}"
            for n, q in qras.items()) + f". eps {first.config['eps']:.4f}, {first.config['epochs']} epochs.", ""]
    paths = {n: m.path for n, m in result.models.items() if m.path is not None}
    if paths:
        names = list(paths)
        bn = next(iter(paths.values())).bn
        lines += ["## Backdoor-connected path", "", f"t = 0: the model itself, t = 1: the backdoored model; BatchNorm: {bn}. "
                  "Each cell: clean_acc / asr (%).", "",
                  "| t | " + " | ".join(names) + " |", "|---:|" + "---|" * len(names)]
        t_values = next(iter(paths.values())).t
        for i, t in enumerate(t_values):
            cells = [f"{100 * p.clean_acc[i]:.1f} / {100 * p.asr[i]:.1f}" for p in paths.values()]
            lines.append(f"| {t:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Plots: `ra_curve.png` (asr after each retuning epoch), `path.png` (clean_acc and asr along the path).", ""]
    return "\n".join(lines)


def verdict_lines(verdicts: dict[str, Verdict], config: dict[str, Any]) -> list[str]:
    """The verdict section (Markdown): one bullet per purified model, then the rule in one sentence."""
    if not verdicts:
        return []
    margin = 100 * VerdictConfig(**config).margin
    return ["## Verdict", "", *[f"- **{v.model}: {v.word}**. {v.details()}" for v in verdicts.values()], "",
            f"Rule: *not purified* when o_asr exceeds the clean reference's by more than {margin:.0f} points; "
            f"*superficial* when p_asr after RA exceeds the highest p_asr of the clean reference and EP by more than "
            f"{margin:.0f} points; *deep* otherwise. Intervals: bootstrap over test images and RA seeds; *uncertain* "
            "when the deciding interval crosses the margin.", ""]


def check_lines(checks: list[dict[str, Any]]) -> list[str]:
    """The guardrails that did not pass (warned, or overridden with guards.enforce=false)."""
    failed = [c for c in checks if not c["ok"]]
    return ["## Warnings", "", *[f"- {c['message']}" for c in failed], ""] if failed else []


def write_report(result: StressResult, out: str | Path) -> list[Path]:
    """Write stress.json, stress.md, ra_curve.png and (with a path) path.png, each atomically."""
    out = Path(out)
    written = [out / "stress.json", out / "stress.md", out / "ra_curve.png"]
    atomic_write_json(written[0], result.to_dict())
    atomic_write_text(written[1], markdown(result))
    atomic_write_bytes(written[2], ra_curve_png({n: m.ra for n, m in result.models.items()}))
    paths = {n: m.path for n, m in result.models.items() if m.path is not None}
    if paths:
        written.append(out / "path.png")
        atomic_write_bytes(written[3], path_png(paths))
    return written


__all__ = [
    "ModelStress",
    "ModelStressConfig",
    "StressConfig",
    "StressResult",
    "check_lines",
    "markdown",
    "qra_data_for",
    "ra_data_for",
    "run_stress",
    "stress_model",
    "verdict_lines",
    "write_report",
]
