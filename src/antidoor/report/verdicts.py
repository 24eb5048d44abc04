"""The verdict section of a study report: per (dataset, model, attack, defense), not purified / superficial / deep /
inconclusive.

Each finished ``stress`` stage stored its full result (per-image RA outcomes included) as a JSON artifact.
For each (dataset, model, attack, seed) the purified models are judged against that seed's clean reference
and, when the study has the ``ep`` defense, EP (the rule and its bootstrap: :mod:`antidoor.stress.verdict`);
the section then says, per defense, the verdict of each seed.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from antidoor.experiment.store import Store
from antidoor.report.tables import label_name, latest_runs, registered_name
from antidoor.stress.verdict import Verdict, judge

EP = "ep"
VERDICT_COLUMNS = ["dataset", "model", "attack", "defense", "verdict", "seeds_agreeing", "summary"]
VERDICT_RULE = ("Rule: not purified when o_asr exceeds the clean reference's by more than 10 points; superficial when p_asr "
                "after the retuning attack exceeds the highest p_asr of the clean reference and EP by more than 10 points; "
                "inconclusive when that highest reference p_asr is itself above 90% (RA implants the trigger in a model "
                "without the backdoor, so p_asr cannot show depth); deep otherwise. Brackets: 95% bootstrap intervals "
                "over test images and RA seeds; uncertain when the deciding interval crosses the margin.")


def _defense_name(run: dict[str, Any]) -> str:
    """The registered name of a stress stage's defense (its row label may be the study entry's own ``label``)."""
    return registered_name(run, "defense") or label_name(run["defense"])


def seed_verdicts(store: Store) -> dict[tuple, list[tuple[int, Verdict]]]:
    """Each (dataset, model, attack, defense)'s verdict per seed, judged against that seed's references."""
    folder = store.path.parent
    groups: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    runs = {r["id"]: r for r in latest_runs(store, "stress") if r["status"] == "done"}
    for a in store.artifacts():
        run = runs.get(a["run_id"])
        path = folder / a["path"]
        if run is None or not path.is_file():
            continue
        doc = json.loads(path.read_text())
        name = str(run["defense"])
        if _defense_name(run) == EP:  # in a study EP is one of the defenses; here it is the oracle reference
            doc["role"] = "oracle reference (EP)"
        groups[(run["dataset"], run["model"], run["attack"], run["seed"])][name] = doc
    per_defense: dict[tuple, list[tuple[int, Verdict]]] = defaultdict(list)
    for (d, m, a, seed), models in groups.items():
        for name, v in judge(models).items():
            per_defense[(d, m, a, name)].append((seed, v))
    return {k: sorted(v, key=lambda sv: sv[0]) for k, v in per_defense.items()}


def study_verdicts(store: Store) -> list[dict[str, Any]]:
    """One row per (dataset, model, attack, defense): the seeds' majority ``verdict`` and each seed's in ``summary``."""
    per_defense = seed_verdicts(store)
    rows = []
    for (d, m, a, name), seeds in sorted(per_defense.items(), key=lambda kv: tuple(map(str, kv[0]))):
        counts = Counter(v.verdict for _, v in seeds)
        verdict, k = counts.most_common(1)[0]
        each = "; ".join(f"seed {s}: {v.word} (o_asr {100 * v.o_asr:.1f}%, p_asr {100 * v.p_asr:.1f}% "
                         f"[{100 * v.p_asr_ci[0]:.1f}, {100 * v.p_asr_ci[1]:.1f}] vs {v.p_ref_from} {100 * v.p_ref:.1f}%)"
                         for s, v in seeds)
        rows.append({"dataset": d, "model": m, "attack": a, "defense": name, "verdict": verdict,
                     "seeds_agreeing": f"{k}/{len(seeds)}", "summary": each})
    return rows


__all__ = ["VERDICT_COLUMNS", "VERDICT_RULE", "seed_verdicts", "study_verdicts"]
