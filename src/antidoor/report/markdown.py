"""The study report in Markdown: the same tables, the plots as PNG files in a folder beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from antidoor.report.tables import markdown_table
from antidoor.report.verdicts import VERDICT_COLUMNS, VERDICT_RULE

if TYPE_CHECKING:
    from antidoor.report.html import Report


def to_markdown(report: Report, files_dir: str) -> str:
    parts = [f"# {report.title}", ""]
    if report.verdicts:
        parts += ["## Verdict", "", markdown_table(report.verdicts, VERDICT_COLUMNS), f"_{VERDICT_RULE}_", ""]
    parts += [*[f"- {s}" for s in report.summary], ""]
    parts += [f"_{n}_\n" for n in report.notes]
    for title, columns, rows in report.tables:
        parts += [f"## {title}", "", markdown_table(rows, columns)]
    for title, stem, _ in report.figures:
        parts += [f"## {title}", "", f"![{title}]({files_dir}/{stem}.png)", ""]
    return "\n".join(parts)
