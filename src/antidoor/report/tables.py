"""Result rows from a study's store, their filters, their mean over seeds, and their text formats.

One row per model a study measured: for each (dataset, model, attack, seed) the clean reference
(``defense`` = ``clean``), the backdoored model (``none``) and each defense. A row takes the scalar
metrics of every stage run with its labels (purify, stress), so new metrics (``p_asr``,
``qra_asr_purified``, ...) become columns without changes here. Curves (metrics with a step)
are read by :func:`curve_rows`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from typing import Any

from antidoor.errors import AntidoorError
from antidoor.experiment.store import Store, config_key

KEYS = ["dataset", "model", "attack", "seed", "defense"]
# the standard four, a defense's cost in clean accuracy, the defender's validation accuracy, then the stress
# suite's (when the study has a stress section); the rest follow alphabetically
FIRST = ["clean_acc", "asr", "robust_acc", "der", "clean_acc_drop", "val_clean_acc", "p_asr", "p_asr_std", "p_clean_acc",
         "qra_asr_purified", "qra_asr_clean"]
FORMATS = ("table", "csv", "markdown", "json")
# the model a metric belongs to, by the metrics' stage column; other stages belong to the run's defense
ROLE = {"attack": "none", "reference": "clean", "clean": "clean"}


def _role(run: dict[str, Any], metric_stage: str) -> str:
    return ROLE.get(metric_stage) or run["defense"] or ROLE.get(run["stage"], run["stage"])


def latest_runs(store: Store, stage: str | None = None) -> list[dict[str, Any]]:
    """Each stage's latest attempt only: a stage that failed and was then run again under another key (a resumed
    study with changed settings) shows its latest outcome, not both. A run made from another model than its
    upstream stage's latest (a stress run of a purification since rerun under new settings, not yet stressed
    again) is left out, so no row mixes two models' numbers."""
    latest: dict[tuple, dict[str, Any]] = {}
    for run in store.runs():
        key = (run["stage"], *(run[k] for k in KEYS))
        old = latest.get(key)
        if old is None or (run["started"] or 0, run["id"]) >= (old["started"] or 0, old["id"]):
            latest[key] = run
    current = [r for r in latest.values() if not _stale(r, latest) and (stage is None or r["stage"] == stage)]
    return sorted(current, key=lambda r: r["id"])


def _stale(run: dict[str, Any], latest: dict[tuple, dict[str, Any]]) -> bool:
    """Whether ``run`` was made from an upstream model that is no longer its upstream stage's latest run."""
    config = json.loads(run["config"])
    upstream = config.get("upstream") if isinstance(config, dict) else None
    if run["stage"] not in ("purify", "stress") or not isinstance(upstream, dict):
        return False
    up_stage = "purify" if run["stage"] == "stress" and config.get("role") == "purified" else "attack"
    labels = {k: run[k] for k in KEYS}
    if up_stage == "attack":
        labels["defense"] = None
    up = latest.get((up_stage, *(labels[k] for k in KEYS)))
    if up is None or up["key"] != config_key(json.loads(up["config"])):
        return False  # no upstream run, or keys not made the grid's way (hashes of their configs): nothing to compare
    return up["key"] != config_key(upstream)


def result_rows(store: Store) -> list[dict[str, Any]]:
    """Every measured model as one row: labels, status, error, scalar metrics, seconds."""
    by_run: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for m in store.metrics():
        if m["step"] is None:
            by_run[m["run_id"]].append(m)
    rows: dict[tuple, dict[str, Any]] = {}
    for run in latest_runs(store):
        if run["stage"] == "clean" and run["status"] == "done":
            continue  # its numbers appear as the 'clean' row of every attack, measured under that trigger
        roles = {_role(run, m["stage"]) for m in by_run[run["id"]]} or {_role(run, run["stage"])}
        for role in sorted(roles, key=lambda r: (r != "clean", r != "none")):
            key = (run["dataset"], run["model"], run["attack"], run["seed"], role)
            row = rows.setdefault(key, {**dict(zip(KEYS, key, strict=True)), "status": "done", "error": None,
                                        "seconds": None, "_order": run["id"]})
            if run["status"] != "done" and row["status"] != "failed":
                row["status"] = run["status"]
                row["error"] = _first_line(run["error"])
            # a row's seconds: its own model's stage runs (the attack run's for 'none', purify and stress for a defense)
            if run["seconds"] is not None and ((role == "none" and run["stage"] == "attack") or role == run["defense"]):
                row["seconds"] = (row["seconds"] or 0.0) + run["seconds"]
            for m in by_run[run["id"]]:
                if _role(run, m["stage"]) == role:
                    row[m["name"]] = m["value"]
    out = sorted(rows.values(), key=lambda r: (str(r["dataset"]), str(r["model"]), str(r["attack"]), r["seed"] or 0,
                                               r["defense"] != "clean", r["defense"] != "none", r["_order"]))
    for r in out:
        del r["_order"]
        backdoored = rows.get((r["dataset"], r["model"], r["attack"], r["seed"], "none"))
        if r["defense"] not in ("clean", "none") and backdoored and None not in (backdoored.get("clean_acc"), r.get("clean_acc")):
            # the defense's cost, against the model it purified (same seed): the papers' "at <= 3 points of clean accuracy"
            r["clean_acc_drop"] = backdoored["clean_acc"] - r["clean_acc"]
    return out


def curve_rows(store: Store) -> list[dict[str, Any]]:
    """Every curve point: labels, the row's ``defense`` (as in :func:`result_rows`), family, metric, step, value.

    A metric named ``path.asr`` belongs to the family ``path`` and is the metric ``asr``.
    """
    runs = {r["id"]: r for r in latest_runs(store)}
    out = []
    for m in store.metrics():
        if m["step"] is None or m["run_id"] not in runs:
            continue
        run = runs[m["run_id"]]
        family, _, metric = m["name"].rpartition(".")
        out.append({**{k: run[k] for k in KEYS if k != "defense"}, "defense": _role(run, m["stage"]), "stage": m["stage"],
                    "family": family or m["stage"], "metric": metric, "step": m["step"], "value": m["value"]})
    return out


def settings_groups(specs: dict[int, dict[str, Any]]) -> dict[str, list[int]]:
    """One defense's seeds grouped by the parameters on which they differ (``{"lr: 0.0001": [0, 1], "lr: 0.0005":
    [2]}``), in seed order; empty when every seed ran the same ones."""
    keys = sorted({k for spec in specs.values() for k in spec if len({json.dumps(v.get(k)) for v in specs.values()}) > 1})
    groups: dict[str, list[int]] = defaultdict(list)
    if keys:
        for seed, spec in sorted(specs.items()):
            groups[", ".join(f"{k}: {spec.get(k, '(not a parameter then)')}" for k in keys)].append(seed)
    return dict(groups)


def seeds_label(seeds: list[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def groups_text(groups: dict[str, list[int]]) -> str:
    """:func:`settings_groups` as one line: ``"seeds 0, 1: lr: 0.0001; seed 2: lr: 0.0005"``."""
    return "; ".join(f"{seeds_label(seeds)}: {text}" for text, seeds in groups.items())


def differing_settings(specs: dict[int, dict[str, Any]]) -> str | None:
    """The parameters on which one defense's seeds differ, per group of seeds (``"seeds 0, 1: lr: 0.0001; seed 2:
    lr: 0.0005"``), or None when every seed ran the same ones: the sign of a resumed study whose defaults changed."""
    groups = settings_groups(specs)
    return groups_text(groups) if groups else None


def defense_specs(store: Store) -> dict[tuple, dict[str, Any]]:
    """Per (dataset, model, attack, defense row label, seed): the parameters its current purification ran with
    (``defense_run_spec``: a ``KEY_NEUTRAL`` parameter its key leaves out is put back at its neutral value)."""
    from antidoor.experiment.stages import defense_run_spec

    specs = {}
    for run in latest_runs(store, "purify"):
        defense = json.loads(run["config"]).get("defense")
        if not (isinstance(defense, dict) and "name" in defense):
            continue
        try:
            defense = defense_run_spec(defense)
        except AntidoorError:  # a defense this install does not register (a plugin not loaded): as stored
            pass
        specs[(run["dataset"], run["model"], run["attack"], run["defense"], run["seed"])] = defense
    return specs


def mixed_settings(store: Store) -> dict[tuple, str]:
    """Per (dataset, model, attack, defense) row label: the :func:`differing_settings` of its seeds' purifications,
    where they differ, so a mean over seeds can say it mixes settings."""
    per_group: dict[tuple, dict[int, dict[str, Any]]] = defaultdict(dict)
    for (*group, seed), spec in defense_specs(store).items():
        per_group[tuple(group)][seed] = spec
    return {group: text for group, per_seed in per_group.items() if (text := differing_settings(per_seed))}


def label_name(label: object) -> str:
    """A row label without the ``#i`` that tells two same-named entries apart or a subset's ``[...]``."""
    return str(label).split("#")[0].split("[")[0]


def _first_line(text: str | None) -> str | None:
    return text.strip().splitlines()[0] if text else None


def registered_name(run: dict[str, Any], field: str) -> str | None:
    """The registered ``attack`` or ``defense`` name in a stage run's config (its row label may be a study entry's
    own ``label``), or None where the config names none."""
    try:
        cfg = json.loads(run["config"])
    except (TypeError, ValueError):
        return None
    while isinstance(cfg, dict):  # a stage's config nests its upstream stages' configs
        spec = cfg.get(field)
        if isinstance(spec, dict):
            return str(spec["name"]) if "name" in spec else None
        cfg = cfg.get("upstream")
    return None


def registered_names(store: Store) -> dict[tuple[str, str], str]:
    """The registered name behind each attack and defense row label, ``(field, label) -> name``, from the runs' configs
    (a study entry's ``label`` names its rows, e.g. ``blended-digit`` for a ``blended`` entry)."""
    names: dict[tuple[str, str], str] = {}
    for run in store.runs():
        for field in ("attack", "defense"):
            name = registered_name(run, field) if run[field] is not None else None
            if name is not None:
                names.setdefault((field, str(run[field])), name)
    return names


def filter_rows(rows: list[dict[str, Any]], attack: list[str] | None = None, defense: list[str] | None = None,
                dataset: list[str] | None = None, model: list[str] | None = None,
                names: dict[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """Keep rows whose label is among the given ones. A label matches its name with or without ``#i``/``[...]``,
    and, given ``names`` (:func:`registered_names`), the registered attack or defense behind it."""
    names = names or {}

    def ok(field: str, value: Any, wanted: list[str] | None) -> bool:
        if not wanted:
            return True
        v = str(value)
        return any(v == w or v.split("#")[0] == w or v.split("[")[0] == w or names.get((field, v)) == w for w in wanted)

    return [r for r in rows if ok("attack", r["attack"], attack) and ok("defense", r["defense"], defense)
            and ok("dataset", r["dataset"], dataset) and ok("model", r["model"], model)]


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The metric columns present: those of ``FIRST`` in its order, then the rest alphabetically."""
    present = {k for r in rows for k in r if k not in (*KEYS, "status", "error", "seconds", "n")}
    rest = sorted(k for k in present if k not in FIRST and not k.endswith("_sd"))
    return [c for c in FIRST if c in present] + rest


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds of each (dataset, model, attack, defense), with ``<metric>_sd`` (sample sd) and ``n``.

    Only finished rows count; a group with a failed seed says so in ``status``.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"], r["attack"], r["defense"])].append(r)
    cols = metric_columns(rows)
    out = []
    for (d, m, a, p), members in groups.items():
        done = [r for r in members if r["status"] == "done"]
        row: dict[str, Any] = {"dataset": d, "model": m, "attack": a, "defense": p, "n": len(done),
                               "status": "done" if len(done) == len(members) else f"{len(members) - len(done)} not done"}
        for c in cols:
            vals = [r[c] for r in done if r.get(c) is not None]
            if vals:
                mean = sum(vals) / len(vals)
                row[c] = mean
                row[f"{c}_sd"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        out.append(row)
    return out


def is_setting(column: str) -> bool:
    """A defense's chosen setting (``chosen.rho``), shown as the number it is, unless it is an accuracy."""
    return column.startswith("chosen.") and not column.endswith(("_acc", "asr"))


def fmt_value(v: Any, column: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if column == "seconds":
            return f"{v:.1f}"
        if is_setting(column):
            return f"{v:g}" if v != int(v) else str(int(v))
        # rates (der included) in percent; a *_drop is a difference of two rates, in points, negative when the defense gained
        return f"{100 * v:.1f}%" if 0 <= v <= 1 or column.endswith("_drop") else f"{v:.3f}"
    return str(v)


def display_columns(rows: list[dict[str, Any]], aggregated: bool = False) -> list[str]:
    labels = ["dataset", "model", "attack", "defense"] + ([] if aggregated else ["seed"])
    tail = ["n", "status"] if aggregated else ["status", "seconds", "error"]
    return labels + metric_columns(rows) + tail


def cell(row: dict[str, Any], column: str) -> str:
    text = fmt_value(row.get(column), column)
    sd = row.get(f"{column}_sd")
    if sd is not None:
        text += f" ± {fmt_value(sd, column).rstrip('%')}"
    return text


def render(rows: list[dict[str, Any]], fmt: str, aggregated: bool = False) -> str:
    """``csv`` and ``json`` keep the raw numbers; ``markdown`` (and the CLI table) show percentages."""
    if fmt not in FORMATS:
        from antidoor.errors import AntidoorError

        raise AntidoorError(f"--format {fmt!r}: unknown; allowed: {', '.join(FORMATS)}")
    columns = display_columns(rows, aggregated)
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        extra = [f"{c}_sd" for c in metric_columns(rows)] if aggregated else []
        writer = csv.DictWriter(buf, fieldnames=columns + extra, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    return markdown_table(rows, columns)


def md_text(s: str) -> str:
    """Text as Markdown shows it, never as HTML: a study or dataset name may hold tags."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def esc(s: str) -> str:
        return md_text(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(esc(cell(r, c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
