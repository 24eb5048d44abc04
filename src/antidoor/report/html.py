"""The study report: one self-contained HTML page (plots embedded as base64 PNG, no network; the
Markdown version is in :mod:`antidoor.report.markdown`)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from antidoor.experiment.store import Store
from antidoor.report.document import Report, build_report
from antidoor.report.markdown import to_markdown
from antidoor.report.tables import cell
from antidoor.report.verdicts import VERDICT_COLUMNS, VERDICT_RULE
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
             *([f"<h2>Verdict</h2>{_html_table(VERDICT_COLUMNS, report.verdicts)}<p class=note>{html.escape(VERDICT_RULE)}</p>"]
               if report.verdicts else []),
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
    out = Path(out)
    with Store(store_path, readonly=True) as store:
        report = build_report(store)
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, to_html(report))
    for _, stem, png in report.figures:
        atomic_write_bytes(out / "report_files" / f"{stem}.png", png)
    atomic_write_text(md_path, to_markdown(report, "report_files"))
    return html_path, md_path
