"""The study report: one self-contained HTML page (plots embedded as base64 PNG, no network; the
Markdown version is in :mod:`antidoor.report.markdown`)."""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antidoor.experiment.store import Store
from antidoor.report import plots
from antidoor.report.tables import aggregate, cell, curve_rows, display_columns, result_rows
from antidoor.utils import atomic_write_bytes, atomic_write_text

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td.label { text-align: left; }
tr.failed td { background: #fde2e2; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; }
"""
LABEL_COLUMNS = ("dataset", "model", "attack", "defense", "status", "error")


@dataclass
class Report:
    title: str
    summary: list[str]
    tables: list[tuple[str, list[str], list[dict[str, Any]]]]  # (title, columns, rows)
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)  # (title, file stem, png)
    notes: list[str] = field(default_factory=list)


def build_report(store: Store) -> Report:
    rows = result_rows(store)
    agg = aggregate(rows)
    study = store.get_meta("study") or {}
    runs = store.runs()
    failed = [r for r in rows if r["status"] != "done"]
    summary = [f"{len(runs)} stage runs: " + ", ".join(f"{sum(r['status'] == s for r in runs)} {s}"
                                                       for s in ("done", "failed", "running")),
               f"seeds: {study.get('seeds', '?')}; device: {study.get('device', '?')}",
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
    if failed:
        notes.append(f"{len(failed)} rows did not finish; their errors are in the table.")
    return Report(f"antidoor study: {study.get('name', store.path.parent.name)}", summary, tables, figures, notes)


def _html_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cls = ' class="failed"' if r.get("status") not in ("done", None) else ""
        tds = "".join(f'<td{" class=label" if c in LABEL_COLUMNS else ""}>{html.escape(cell(r, c))}</td>' for c in columns)
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def to_html(report: Report) -> str:
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(report.title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(report.title)}</h1>",
             "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in report.summary) + "</ul>"]
    parts += [f"<p class=note>{html.escape(n)}</p>" for n in report.notes]
    for title, columns, rows in report.tables:
        parts.append(f"<h2>{html.escape(title)}</h2>{_html_table(columns, rows)}")
    for title, stem, png in report.figures:
        data = base64.b64encode(png).decode()
        parts.append(f'<h2>{html.escape(title)}</h2>'
                     f'<img id="{stem}" alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(store_path: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write ``out/report.html`` (self-contained) and ``out/report.md`` (+ ``out/report_files/*.png``)."""
    from antidoor.report.markdown import to_markdown

    out = Path(out)
    with Store(store_path, readonly=True) as store:
        report = build_report(store)
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, to_html(report))
    for _, stem, png in report.figures:
        atomic_write_bytes(out / "report_files" / f"{stem}.png", png)
    atomic_write_text(md_path, to_markdown(report, "report_files"))
    return html_path, md_path
