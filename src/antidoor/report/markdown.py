"""The study report in Markdown: the same tables, the plots as PNG files in a folder beside it."""

from __future__ import annotations

from antidoor.report.document import Report
from antidoor.report.tables import markdown_table, md_text
from antidoor.report.verdicts import VERDICT_COLUMNS, VERDICT_RULE


def to_markdown(report: Report, files_dir: str) -> str:
    parts = [f"# {md_text(report.title)}", ""]
    if report.verdicts:
        parts += ["## Verdict", "", markdown_table(report.verdicts, VERDICT_COLUMNS), f"_{VERDICT_RULE}_", ""]
    parts += [*[f"- {md_text(s)}" for s in report.summary], ""]
    parts += [f"_{md_text(n)}_\n" for n in report.notes]
    for title, columns, rows in report.tables:
        parts += [f"## {md_text(title)}", "", markdown_table(rows, columns)]
    for title, stem, _ in report.figures:
        parts += [f"## {md_text(title)}", "", f"![{md_text(title)}]({files_dir}/{stem}.png)", ""]
    return "\n".join(parts)
