"""The study report as a document: title, summary, tables, figures and notes, built from a store.

The layers point down only: :mod:`antidoor.report.html` (which also writes the files) renders it and
calls :mod:`antidoor.report.markdown`, which renders it too; this module knows neither."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from antidoor.experiment.store import Store
from antidoor.report import plots
from antidoor.report.tables import aggregate, curve_rows, display_columns, latest_runs, mixed_settings, result_rows
from antidoor.report.verdicts import study_verdicts


@dataclass
class Report:
    title: str
    summary: list[str]
    tables: list[tuple[str, list[str], list[dict[str, Any]]]]  # (title, columns, rows)
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)  # (title, file stem, png)
    notes: list[str] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # first on the page (antidoor.report.verdicts)


def _seeds_line(runs: list[dict[str, Any]], planned: object) -> str:
    """The seeds the store holds runs for; the last run's planned seeds too where they differ (a study resumed
    with ``--set seeds=[2]`` records that subset as its config, while the store holds every seed run before)."""
    measured = sorted({r["seed"] for r in runs if r["seed"] is not None})
    line = f"seeds: {', '.join(map(str, measured)) or 'none'}"
    if isinstance(planned, list) and sorted(planned) != measured:
        line += f" (the last grid run planned {', '.join(map(str, planned))})"
    return line


def build_report(store: Store) -> Report:
    rows = result_rows(store)
    agg = aggregate(rows)
    study = store.get_meta("study") or {}
    runs = latest_runs(store)  # a stage rerun under another key counts once, by its latest attempt
    failed = [r for r in rows if r["status"] != "done"]
    summary = [f"{len(runs)} stage runs: " + ", ".join(f"{sum(r['status'] == s for r in runs)} {s}"
                                                       for s in ("done", "failed", "running")),
               f"{_seeds_line(runs, study.get('seeds'))}; device: {study.get('device', '?')}",
               f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    commits = sorted({r["git_commit"] for r in runs if r["git_commit"]})
    if commits:
        summary.append(f"antidoor commit: {', '.join(c[:12] for c in commits)}")
    tables = [("Mean over seeds", display_columns(agg, aggregated=True), agg),
              ("Every run", display_columns(rows), rows)]
    figures, notes = [], []
    for title, stem, png in (("Defenses compared", "defenses", plots.defenses_compared(agg)),
                             ("asr after retuning", "retuning", plots.asr_after_retuning(agg))):
        if png is not None:
            figures.append((title, stem, png))
        elif stem == "retuning":
            notes.append("No retuning-attack results (p_asr) in this store: the study ran without the stress suite.")
    for family, png in plots.curves(curve_rows(store)).items():
        figures.append((f"Curves: {plots.FAMILY_TITLES.get(family, family)}", f"curves_{family}", png))
    for (dataset, model, attack, defense), text in mixed_settings(store).items():
        notes.append(f"The mean over seeds of {defense} on {attack} ({model}, {dataset}) mixes settings: {text}.")
    if failed:
        running = sum(r["status"] == "running" for r in failed)
        notes.append(f"{len(failed)} rows did not finish"
                     + (f" ({running} still running or interrupted)" if running else "")
                     + (": their errors are in the table." if running < len(failed) else "."))
    return Report(f"antidoor study: {study.get('name', store.path.parent.name)}", summary, tables, figures, notes,
                  study_verdicts(store))
