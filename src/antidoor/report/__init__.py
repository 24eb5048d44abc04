"""Study reports: result tables (table, csv, markdown, json), plots, a self-contained HTML page, Markdown."""

from antidoor.report.document import build_report
from antidoor.report.html import write_report
from antidoor.report.tables import aggregate, curve_rows, filter_rows, render, result_rows

__all__ = ["aggregate", "build_report", "curve_rows", "filter_rows", "render", "result_rows", "write_report"]
