"""Figures and ``leaderboard.html`` from a results folder, and nothing else.

Usage::

    python -m harness.report RESULTS_DIR [--output DIR] [--screenshot PNG [--width W --height H]]

writes ``DIR/leaderboard.html`` and ``DIR/figures/*.png`` (``DIR`` defaults
to ``RESULTS_DIR``). ``run_benchmark.py`` calls :func:`write_report` after
every run, so the page always shows everything on disk, earlier runs
included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import figures as plots
from .leaderboard import (
    LeaderboardTable, attack_label, certificate_table, certificate_violations, leaderboard, solver_table, threat_groups,
)
from .page import AttackNote, FigureEntry, figure_png, render_page
from ..run.store import SCHEMA_VERSION, Table, read_table

__all__ = ["Report", "ReportError", "Scores", "build_report", "main", "score", "write_report"]


_GALLERY_MODELS = 8
"""Galleries show at most this many models (the best ranked), to stay readable."""

_GROUP = ["dataset", "model", "threat_model", "kernel_size", "p", "ball_title"]
_ATTACK = ["solver", "clamp", "lam", "step_rule", "suite", "suite_version"]
_EXAMPLES_COLUMNS = [
    *_GROUP, *_ATTACK, "schema_version", "cell_id", "example_index", "label", "adversarial_prediction", "success",
    "eps_found", "verification_status", "verified_distance", "found_by", "rejected_claims", "eps_initial", "eps_factor",
    "eps_increment", "eps_every", "iterations", "final_eps", "steps", "solver_iterations", "unconverged_steps",
    "failed_steps", "zero_gradient_steps", "failed_model_checks", "gradient_mode", "attack_seconds", "verify_seconds",
]
"""The columns of ``examples`` that the tables, figures and pages show or compute from (the JSON of a cell's
hyperparameters and suite, repeated on every row, is the bulk of the others)."""
_CELLS_COLUMNS = [
    *_GROUP, *_ATTACK, "schema_version", "certifier", "status", "started_at", "finished_at", "clean_accuracy",
    "trained_for", "model_training", "model_paper", "attack_summary", "box_handling", "ball_description",
    "package_versions_json", "git_commit", "device",
]
"""The columns of ``cells`` that the pages show: model metadata, attack notes, status and provenance."""
_CERTIFICATES_COLUMNS = [
    *_GROUP, "cell_id", "certifier", "box", "example_index", "eps", "status", "margin_lower", "seconds", "certified_radius",
]
"""The columns of ``certificates`` that the certified bounds and their checks need."""
_IMAGES_COLUMNS = ["cell_id", "example_index", "channels", "height", "width", "original", "adversarial"]
"""The columns of ``images`` that the galleries draw."""


class ReportError(ValueError):
    """The results folder holds nothing to report on."""


@dataclass
class Report:
    """Everything the page shows."""

    tables: list[LeaderboardTable]
    solvers: pd.DataFrame
    figures: list[FigureEntry]
    attack_notes: dict[str, AttackNote]
    provenance: dict[str, str]
    certificate_table: pd.DataFrame
    """:func:`~harness.report.leaderboard.certificate_table` (empty without certificates)."""
    violations: pd.DataFrame
    """:func:`~harness.report.leaderboard.certificate_violations`: the page warns when it is not empty."""

    def html(self) -> str:
        return render_page(
            self.tables, self.solvers, self.figures, self.attack_notes, self.provenance, self.certificate_table, self.violations
        )


def _attack_notes(cells: pd.DataFrame) -> dict[str, AttackNote]:
    def text(value):
        return value if isinstance(value, str) else None

    return {
        attack_label(row["solver"], row["clamp"], None, row["step_rule"], row.get("suite"), row.get("suite_version")): AttackNote(
            text(row.get("attack_summary")), text(row.get("box_handling"))
        )
        for row in cells[cells["certifier"].isna()].to_dict("records")
    }


def _provenance(results_dir: Path, examples: pd.DataFrame, cells: pd.DataFrame, certificates: pd.DataFrame) -> dict[str, str]:
    commits = sorted({str(c)[:10] for c in cells["git_commit"].dropna()})
    torch_versions = sorted({json.loads(v).get("torch", "?") for v in set(cells["package_versions_json"].dropna())})
    devices = sorted(set(cells["device"].dropna()))
    certified = int((~certificates.duplicated(["cell_id", "example_index"])).sum())
    certified = {"examples certified": str(certified)} if certified else {}
    return {
        "results": results_dir.name or str(results_dir),
        "cells": str(examples["cell_id"].nunique() + certificates["cell_id"].nunique()),
        "examples attacked": str(len(examples)),
        **certified,
        "commits": ", ".join(commits) or "unknown",
        "torch": ", ".join(torch_versions) or "unknown",
        "devices": ", ".join(devices) or "unknown",
        "store schema": f"v{SCHEMA_VERSION}",
    }


def _figures(examples, images, tables, solvers, certificates, palette) -> list[FigureEntry]:
    main_groups = plots.main_groups(tables)
    main_threats = {group.title for group in main_groups}
    wanted = [
        ("robust_accuracy", "Robust accuracy against radius from verified distances (paper Figures 4 and 5); "
         "colour: model, line style: solver (worst case over its lambdas); shaded, for a model with certificates: "
         "between its certified and its attacked robust accuracy, on the examples both ran on.",
         lambda: plots.accuracy_against_radius(examples, main_groups, palette, certificates)),
        ("solvers", "Cost against strength: seconds per example and the robust accuracy each attack reached alone.",
         lambda: plots.solver_cost(solvers[solvers["threat"].isin(main_threats)], palette)),
        ("kernel_sizes", "Robust accuracy against radius for each kernel size (paper Figure 7).",
         lambda: plots.kernel_sizes(examples, palette)),
        ("lambda_p", "Median verified radius of the successes for each lambda and p, verified success rate below "
         "(paper Figure 8).", lambda: plots.lambda_p(examples, palette)),
        ("lambda_p_gallery", "One adversarial example for each lambda and p, the same test image throughout (paper Figure 8).",
         lambda: plots.lambda_p_gallery(images, examples)),
    ]
    for table in tables:
        if table.group not in main_groups:
            continue
        wanted.append((
            f"gallery_{table.group.slug}",
            f"{table.group.title}: original, signed perturbation (symmetric scale) and adversarial image with its exact "
            f"distance and the labels before and after (paper Figures 2, 3 and 6); up to {_GALLERY_MODELS} models "
            "with stored images, in rank order.",
            lambda table=table: plots.gallery(images, examples, table.group, palette, list(table.rows["model"]), max_models=_GALLERY_MODELS),
        ))
    entries = []
    for name, caption, draw in wanted:
        figure = draw()
        if figure is not None:
            entries.append(FigureEntry(name, caption, figure_png(figure)))
    return entries


@dataclass
class Scores:
    """The store's examples, cells and certificates, and the leaderboard, solver and certificate tables computed from them.

    The frames hold the columns the report shows or computes from, not every column of the store.
    """

    examples: pd.DataFrame
    cells: pd.DataFrame
    tables: list[LeaderboardTable]
    solvers: pd.DataFrame
    certificates: pd.DataFrame
    """The store's ``certificates`` table."""
    certificate_table: pd.DataFrame
    """:func:`~harness.report.leaderboard.certificate_table`."""


def _unique(frame: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """The first row of each ``key``, copying the frame only where some key repeats (rarely: a shard written twice)."""
    repeated = frame.duplicated(key)
    return frame[~repeated] if repeated.any() else frame


def score(results_dir: str | os.PathLike) -> Scores:
    """Read the store under ``results_dir`` and compute every leaderboard table.

    Raises
    ------
    ReportError
        The folder holds no examples.
    """
    results_dir = Path(results_dir)
    examples = read_table(results_dir, Table.EXAMPLES, columns=_EXAMPLES_COLUMNS)
    if examples.empty:
        raise ReportError(f"{results_dir} holds no results (no {Table.EXAMPLES.value}/ table): run the benchmark first")
    examples = _unique(examples, ["cell_id", "example_index"])
    cells = read_table(results_dir, Table.CELLS, columns=_CELLS_COLUMNS)
    certificates = _unique(read_table(results_dir, Table.CERTIFICATES, columns=_CERTIFICATES_COLUMNS), ["cell_id", "example_index", "eps"])
    tables = [leaderboard(examples, cells, group, certificates) for group in threat_groups(examples, cells)]
    return Scores(examples, cells, tables, solver_table(examples, tables), certificates, certificate_table(examples, certificates))


def build_report(results_dir: str | os.PathLike) -> Report:
    """Read the store under ``results_dir`` and compute every table and figure."""
    results_dir = Path(results_dir)
    scores = score(results_dir)
    examples, cells, tables, solvers = scores.examples, scores.cells, scores.tables, scores.solvers
    images = read_table(results_dir, Table.IMAGES, columns=_IMAGES_COLUMNS)
    palette = plots.model_palette(examples["model"])
    return Report(
        tables=tables,
        solvers=solvers,
        figures=_figures(examples, images, tables, solvers, scores.certificates, palette),
        attack_notes=_attack_notes(cells),
        provenance=_provenance(results_dir, examples, cells, scores.certificates),
        certificate_table=scores.certificate_table,
        violations=certificate_violations(examples, scores.certificates),
    )


def write_report(results_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """Write ``leaderboard.html`` and ``figures/*.png``; returns the page's path."""
    report = build_report(results_dir)
    output = Path(output_dir if output_dir is not None else results_dir)
    figure_dir = output / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    for entry in report.figures:
        (figure_dir / f"{entry.name}.png").write_bytes(entry.png)
    page = output / "leaderboard.html"
    temporary = page.with_name(f".{page.name}.tmp")
    temporary.write_text(report.html(), encoding="utf-8")
    os.replace(temporary, page)
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", help="the results folder of a benchmark run")
    parser.add_argument("--output", help="where leaderboard.html and figures/ go (default: RESULTS_DIR)")
    parser.add_argument("--screenshot", help="also save a PNG of the top of the page, taken in headless Chromium")
    parser.add_argument("--width", type=int, default=1400, help="screenshot width in pixels (default 1400)")
    parser.add_argument("--height", type=int, default=1000, help="screenshot height in pixels (default 1000)")
    arguments = parser.parse_args(argv)
    try:
        page = write_report(arguments.results_dir, arguments.output)
    except ReportError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"wrote {page} and {page.parent / 'figures'}")
    if arguments.screenshot:
        from .browser import BrowserUnavailable, screenshot

        try:
            print(f"wrote {screenshot(page, arguments.screenshot, arguments.width, arguments.height)}")
        except BrowserUnavailable as error:
            print(error, file=sys.stderr)
            return 2
    return 0

