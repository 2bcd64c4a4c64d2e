"""The pictures: leaderboard numbers, figures, the page and the browser driver, computed
from the Parquet store alone."""

from .build import Report, ReportError, Scores, build_report, main, score, write_report

__all__ = ["Report", "ReportError", "Scores", "build_report", "main", "score", "write_report"]
