"""Deploy reports: one self-contained HTML page (and the Markdown beside it) per deploy, and a comparison page.

`html` renders (plots from `figures`, inline PNG), `build` writes files and rebuilds from a finished run.
matplotlib is imported only when a page is rendered.
"""

from pipeline.report.build import (
    ReportFiles,
    compare_targets,
    load_summary,
    rebuild_report,
    write_comparison,
    write_report,
)
from pipeline.report.html import render_comparison, render_html

__all__ = [
    "ReportFiles",
    "compare_targets",
    "load_summary",
    "rebuild_report",
    "render_comparison",
    "render_html",
    "write_comparison",
    "write_report",
]
