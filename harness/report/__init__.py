"""The pictures: leaderboard numbers, figures, the page and the browser driver, computed
from the Parquet store alone."""

from .build import Report, ReportError, build_report, main, write_report

__all__ = ["Report", "ReportError", "build_report", "main", "write_report"]
