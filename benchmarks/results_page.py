"""Write a Markdown results page from a results folder, with the numbers of the leaderboard.

Usage::

    python benchmarks/results_page.py RESULTS_DIR --command "python run_benchmark.py grid=plan_space" \\
        [--output docs/results/plan_space.md]

The page starts with a stamp: the command that produced the results (as
given), the git commit(s) and package versions recorded in the ``cells``
table, the finish time of the newest cell, the store schema version(s) of
the files and the device(s). Then, for each leaderboard table (one data set
and one ball), a table with one row per model: rank, clean accuracy,
verified robust accuracy at the standard radii, median verified radius,
examples, verified/claimed successes, the best attack, seconds per example
and reliability flags; and a table with one row per attack on each model.

Every number comes from :mod:`harness.report.leaderboard`, so the page and
``leaderboard.html`` agree. Without ``--output`` the page goes to stdout.
The page is two generated blocks (:mod:`generated_blocks`): ``provenance``
(the command) and ``leaderboard`` (the rest). ``generate`` writes the
leaderboard block of a page in ``docs/results/pages.toml``
(``benchmarks/regenerate_results.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.report import ReportError, score  # noqa: E402
from harness.report.leaderboard import radius_label  # noqa: E402

__all__ = ["BLOCK_KINDS", "generate", "main", "markdown_table", "number", "percent", "render_page", "render_sections", "text_cell"]

_DASH = "–"


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _DASH
    return f"{100 * float(value):.1f}%"


def _number(value, digits: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _DASH
    return format(float(value), digits)


def _text(value) -> str:
    """A table cell: no pipes or line breaks."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _DASH
    return str(value).replace("|", "\\|").replace("\n", " ")


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _markdown_table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    rule = ["---:" if index in right else ":---" for index in range(len(header))]
    return [_row(header), _row(rule), *(_row(row) for row in rows)]


# The cell formats of every generated table (the other generators import them from here).
percent, number, text_cell, markdown_table = _percent, _number, _text, _markdown_table


def _distinct(values) -> list[str]:
    return sorted({str(value) for value in values if value is not None and not (isinstance(value, float) and math.isnan(value))})


def _package_versions(cells: pd.DataFrame) -> str:
    versions: dict[str, set[str]] = {}
    for text in cells["package_versions_json"].dropna():
        try:
            recorded = json.loads(text)
        except (TypeError, ValueError):
            continue
        for package, version in recorded.items():
            versions.setdefault(str(package), set()).add(str(version))
    return ", ".join(f"{package} {' / '.join(sorted(versions[package]))}" for package in sorted(versions)) or "not recorded"


def _newest(cells: pd.DataFrame) -> str:
    for column in ("finished_at", "started_at"):
        if column in cells.columns:
            times = pd.to_datetime(cells[column], utc=True, errors="coerce").dropna()
            if len(times):
                return times.max().strftime("%Y-%m-%d %H:%M UTC")
    return "not recorded"


def _schema_versions(examples: pd.DataFrame, cells: pd.DataFrame) -> str:
    versions = sorted({int(v) for frame in (examples, cells) for v in frame["schema_version"].dropna()})
    return ", ".join(f"v{v}" for v in versions) or "unknown"


def _stamp(command: str, examples: pd.DataFrame, cells: pd.DataFrame) -> list[str]:
    commits = _distinct(cells["git_commit"])
    devices = _distinct(cells["device"])
    return [
        f"- Command: `{command}`",
        f"- Git commit: {', '.join(f'`{c}`' for c in commits) or 'not recorded'}",
        f"- Packages: {_package_versions(cells)}",
        f"- Newest cell finished: {_newest(cells)}",
        f"- Store schema: {_schema_versions(examples, cells)}",
        f"- Device: {', '.join(devices) or 'not recorded'}",
        f"- Cells: {examples['cell_id'].nunique()}, examples attacked: {len(examples)}",
    ]


def _leaderboard_lines(table, heading_level: int = 2) -> list[str]:
    lines = [f"{'#' * heading_level} {table.group.title}", ""]
    description = table.group.ball_description
    if description:
        lines += [f"Ball: {description.rstrip('.')}.", ""]
    attacks = []
    for family, lambdas in table.attacks.items():
        attacks.append(family + (f" (λ {', '.join(f'{lam:g}' for lam in lambdas)})" if lambdas else ""))
    lines.append(f"Attacks: {'; '.join(attacks)}.")
    lines.append("")
    lines.append(f"Schedules: {'; '.join(table.schedules)}.")
    lines.append("")
    ranked = (
        f"median verified radius, then robust accuracy at eps {radius_label(table.reference_radius)}"
        if table.reference_radius is not None else "median verified radius"
    )
    lines.append(f"Ranked by {ranked}. Robust accuracy is the worst case over the attacks, from verified distances.")
    for note in table.notes:
        lines.append(f"Note: {note}.")
    lines.append("")
    header = ["rank", "model", "clean", *(f"eps {radius_label(r)}" for r in table.radii), "median radius",
              "examples", "verified / claimed", "best attack", "s / example", "flags"]
    rows = []
    for row in table.rows.to_dict("records"):
        median = row["median_radius"]
        rows.append([
            str(row["rank"]),
            _text(row["model"]),
            _percent(row["clean_accuracy"]),
            *(_percent(row[r]) for r in table.radii),
            f"> {table.largest_radius:.3g}" if math.isinf(median) else _number(median),
            str(row["examples"]),
            f"{row['verified']}/{row['claimed']}",
            _text(row["best_attack"]),
            _number(row["seconds_per_example"]),
            _text(", ".join(name for name, _ in row["flags"]) or "ok"),
        ])
    right = {0, 2, *range(3, 3 + len(table.radii) + 3), 3 + len(table.radii) + 4}
    lines += _markdown_table(header, rows, right)
    lines.append("")
    return lines


def _attack_lines(table, solvers: pd.DataFrame, heading_level: int = 3) -> list[str]:
    mine = solvers[solvers["threat"] == table.group.title] if len(solvers) else solvers
    if mine.empty:
        return []
    at = f"eps {radius_label(table.reference_radius)}" if table.reference_radius is not None else "reference radius"
    lines = [f"{'#' * heading_level} Each attack alone ({table.group.title})", ""]
    header = ["model", "attack", f"robust @ {at}", "median radius", "verified / claimed", "s / example",
              "iterations / step", "unconverged steps", "examples"]
    rows = []
    for row in mine.sort_values(["model", "attack"], kind="stable").to_dict("records"):
        median = row["median_radius"]
        rows.append([
            _text(row["model"]),
            _text(row["attack"]),
            _percent(row["robust_accuracy"]),
            "none found" if math.isinf(median) else _number(median),
            f"{row['verified']}/{row['claimed']}",
            _number(row["seconds_per_example"]),
            _number(row["iterations_per_step"], ".1f"),
            str(row["unconverged_steps"]),
            str(row["examples"]),
        ])
    lines += _markdown_table(header, rows, {2, 3, 4, 5, 6, 7, 8})
    lines.append("")
    return lines


def render_sections(results_dir: str | os.PathLike, command: str, heading_level: int = 2) -> str:
    """The stamp and one section per leaderboard table of the store under ``results_dir`` (no page title).

    ``heading_level`` is the level of each leaderboard table's heading (2: ``##``); its attack table is one deeper.
    """
    scores = score(results_dir)
    examples, cells, tables, solvers = scores.examples, scores.cells, scores.tables, scores.solvers
    lines = ["Generated by `benchmarks/results_page.py` from the result store of the command below.", ""]
    lines += _stamp(command, examples, cells)
    lines.append("")
    lines.append(
        "A success counts only when exact verification passes (pixels in [0, 1], mass conserved, exact distance "
        f"within the radius). {_DASH}: not every unbroken example was searched up to that radius. "
        "A median radius \"> r\": more than half of the examples survived the whole search, up to r."
    )
    lines.append("")
    for table in tables:
        lines += _leaderboard_lines(table, heading_level)
        lines += _attack_lines(table, solvers, heading_level + 1)
    return "\n".join(lines).rstrip() + "\n"


def render_page(results_dir: str | os.PathLike, command: str, title: str | None = None) -> str:
    """The Markdown page for the store under ``results_dir``, produced by ``command``: its title, a provenance block
    (the command) and a leaderboard block (:mod:`generated_blocks`), as ``benchmarks/regenerate_results.py`` writes
    a page of the manifest."""
    from generated_blocks import Block, code_stamp, render_block

    stamp = code_stamp()
    folder = str(results_dir)
    provenance = (
        f"Results folder `{folder}`, filled by: `{command}`\n\n"
        f"Written by `python benchmarks/results_page.py {folder} --command ...`; list the page in "
        "`docs/results/pages.toml` to regenerate it with the others."
    )
    blocks = [
        Block("provenance", "benchmarks/results_page.py", provenance, kind="provenance", stamp=stamp),
        Block("leaderboard", "benchmarks/results_page.py", render_sections(results_dir, command), kind="leaderboard",
              sources=(folder,), stamp=stamp),
    ]
    return f"# {title or 'Results: ' + command}\n\n" + "\n\n".join(render_block(block) for block in blocks) + "\n"


BLOCK_KINDS = ("leaderboard",)


def generate(kind: str, folders, options: dict) -> str:
    """A generated block (``benchmarks/regenerate_results.py``): ``leaderboard``, the stamp and leaderboard sections
    of the one folder (option ``heading_level``, default 2)."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"results_page.py writes no block of kind {kind!r} (kinds: {', '.join(BLOCK_KINDS)})")
    (folder,) = folders
    return render_sections(folder.path, folder.command, int(options.get("heading_level", 2)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", help="the results folder of a benchmark run")
    parser.add_argument("--command", required=True, help="the command that produced the results, quoted")
    parser.add_argument("--output", help="where the page goes (default: stdout)")
    parser.add_argument("--title", help="the page's heading (default: 'Results: COMMAND')")
    arguments = parser.parse_args(argv)
    try:
        page = render_page(arguments.results_dir, arguments.command, arguments.title)
    except ReportError as error:
        print(error, file=sys.stderr)
        return 2
    if arguments.output:
        output = Path(arguments.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(page, encoding="utf-8")
        print(f"wrote {output}")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
