"""Print verified robust accuracy per model and attack at chosen radii, from a results folder.

Usage::

    python benchmarks/attack_table.py RESULTS_DIR [--radii 0.1 0.5 1.0] [--dataset mnist] [--claimed] [--schedule]
    python benchmarks/attack_table.py RESULTS_DIR --pair frank_wolfe_box frank_wolfe_box_oracle [--radii ...]
    python benchmarks/attack_table.py BEFORE_DIR --after AFTER_DIR [--solvers plan_pgd_box frank_wolfe_box] [--radii ...]

One row per (model, attack) cell: robust accuracy at each radius from the
verified distances (a dash where the attack did not search that far),
claimed successes that passed verification, and seconds per example
(attack + verification), as a Markdown table. ``--claimed`` adds, in
brackets, the robust accuracy the attack claimed (from the radius it was at
when it succeeded) and the rejected claims by reason; ``--schedule`` names
each cell's schedule.

A *paired* table compares two attacks on the same images: ``--pair LEFT
RIGHT`` two solvers of one folder, ``--after AFTER_DIR`` the same solvers in
two folders (before and after a code change). One row per model (and
solver): robust accuracy at each radius (left / right), the images where
the right one's verified radius is smaller or larger, the images whose
claimed radius is the same, median verified radius, seconds per example
and their ratio (right / left), and unconverged steps.

``generate`` writes the same tables as generated blocks of a results page
(``benchmarks/regenerate_results.py``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.report.leaderboard import VerificationCounts, cell_label, robust_accuracy_at, worst_case  # noqa: E402
from harness.run.store import Table, read_table  # noqa: E402
from harness.vocabulary import VerificationStatus  # noqa: E402
from results_page import markdown_table, number, percent, text_cell  # noqa: E402

BLOCK_KINDS = ("cells", "pairs")
_DASH = "–"


def read_examples(folders, dataset: str | None = None) -> pd.DataFrame:
    """The ``examples`` rows of one or more stores (one row per cell and example)."""
    filters = [("dataset", "==", dataset)] if dataset else None
    frames = [read_table(folder, Table.EXAMPLES, filters=filters) for folder in folders]
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame()
    examples = pd.concat(frames, ignore_index=True).drop_duplicates(["cell_id", "example_index"])
    return examples.astype({"model": str, "dataset": str})


def schedule_label(rows: pd.DataFrame) -> str:
    """A cell's radius schedule in a few words: ``fixed eps 0.5, 300 steps``, ``eps 0.3 x1.1 every 10 of 200 steps``."""
    first = rows.iloc[0]
    e0, factor, every, steps = first["eps_initial"], first["eps_factor"], first["eps_every"], first["iterations"]
    increment = first.get("eps_increment")
    if any(pd.isna(value) for value in (e0, factor, every, steps)):
        return _DASH
    if increment is not None and not pd.isna(increment) and increment:
        return f"eps {e0:g} +{increment:g} per step, {int(steps)} steps"
    if factor == 1:
        return f"fixed eps {e0:g}, {int(steps)} steps"
    return f"eps {e0:g} x{factor:g} every {int(every)} of {int(steps)} steps"


def claimed_robust_accuracy(rows: pd.DataFrame, radius: float) -> float:
    """Robust accuracy at ``radius`` by the radius the attack claims (what an unverified attack reports)."""
    claimed = rows["success"].fillna(False).astype(bool) & (rows["eps_found"] <= radius)
    clean = rows["verification_status"] == VerificationStatus.CLEAN_MISCLASSIFIED.name
    return float(1 - (claimed | clean).groupby(rows["example_index"]).max().mean())


def _rejections(rows: pd.DataFrame) -> str:
    rejected = rows.loc[rows["success"].fillna(False).astype(bool), "verification_status"]
    rejected = rejected[~rejected.isin([VerificationStatus.VERIFIED.name, VerificationStatus.CLEAN_MISCLASSIFIED.name])]
    counts = rejected.value_counts()
    return ", ".join(f"{count} {status.lower().replace('_', ' ')}" for status, count in counts.items()) or "0"


def _cells(examples: pd.DataFrame):
    """(model, cell rows) per cell, by model and then attack label."""
    cells = [(model, rows) for (model, _), rows in examples.groupby(["model", "cell_id"])]
    return sorted(cells, key=lambda item: (item[0], cell_label(item[1]), schedule_label(item[1])))


def cells_table(examples: pd.DataFrame, radii, claimed: bool = False, schedule: bool = False) -> list[str]:
    """One row per (model, attack) cell, as Markdown lines (see the module docstring)."""
    header = ["model", "attack", *(["schedule"] if schedule else []), *(f"eps {r:g}" for r in radii), "verified / claimed"]
    header += ["rejected claims"] if claimed else []
    header.append("s / example")
    rows = []
    for model, cell in _cells(examples):
        per_example = worst_case(cell)
        counts = VerificationCounts.of(cell)
        accuracies = []
        for radius in radii:
            shown = percent(robust_accuracy_at(per_example, radius))
            accuracies.append(f"{shown} ({percent(claimed_robust_accuracy(cell, radius))})" if claimed else shown)
        row = [text_cell(model), text_cell(cell_label(cell)), *([schedule_label(cell)] if schedule else []), *accuracies,
               f"{counts.verified}/{counts.claimed}"]
        row += [_rejections(cell)] if claimed else []
        row.append(number((cell["attack_seconds"] + cell["verify_seconds"]).mean()))
        rows.append(row)
    first_number = 3 if schedule else 2
    return markdown_table(header, rows, set(range(first_number, len(header))))


def _side(examples: pd.DataFrame) -> pd.DataFrame:
    """Per example: the worst case over the rows, the claimed radius, seconds and unconverged steps."""
    per_example = worst_case(examples)
    grouped = examples.groupby("example_index")
    per_example["eps_found"] = grouped["eps_found"].min()
    per_example["seconds"] = grouped["attack_seconds"].sum() + grouped["verify_seconds"].sum()
    per_example["unconverged_steps"] = grouped["unconverged_steps"].sum()
    return per_example


def _radius(value: float) -> str:
    return "none found" if math.isinf(value) else number(value)


def _same_claim(left: pd.Series, right: pd.Series) -> int:
    a, b = left.to_numpy(dtype=float), right.to_numpy(dtype=float)
    return int(((np.isnan(a) & np.isnan(b)) | np.isclose(a, b, rtol=1e-9, atol=0)).sum())


def pairs_table(pairs, radii, labels: tuple[str, str]) -> list[str]:
    """Two attacks on the same images: one row per ``(model, attack, left rows, right rows)`` of ``pairs``."""
    left_name, right_name = labels
    header = ["model", "attack", *(f"robust @ {r:g}: {left_name} / {right_name}" for r in radii),
              f"images where {right_name}'s verified radius is smaller / larger", "claimed radius the same",
              f"median radius {left_name} / {right_name}", f"s / example {left_name} / {right_name}",
              f"time {right_name} / {left_name}", f"unconverged steps {left_name} / {right_name}", "images"]
    rows = []
    for model, attack, left_rows, right_rows in pairs:
        left, right = _side(left_rows), _side(right_rows)
        shared = left.index.intersection(right.index)
        if shared.empty:
            continue
        left, right = left.loc[shared], right.loc[shared]
        smaller = int((right["verified_distance"] < left["verified_distance"]).sum())
        larger = int((right["verified_distance"] > left["verified_distance"]).sum())
        seconds = (float(left["seconds"].mean()), float(right["seconds"].mean()))
        rows.append([
            text_cell(model), text_cell(attack),
            *(f"{percent(robust_accuracy_at(left, r))} / {percent(robust_accuracy_at(right, r))}" for r in radii),
            f"{smaller} / {larger}", str(_same_claim(left["eps_found"], right["eps_found"])),
            f"{_radius(np.median(left['verified_distance']))} / {_radius(np.median(right['verified_distance']))}",
            f"{number(seconds[0])} / {number(seconds[1])}",
            f"{seconds[1] / seconds[0]:.1f}x" if seconds[0] > 0 else _DASH,
            f"{int(left['unconverged_steps'].sum())} / {int(right['unconverged_steps'].sum())}", str(len(shared)),
        ])
    return markdown_table(header, rows, set(range(2, len(header))))


def solver_pairs(examples: pd.DataFrame, left: str, right: str):
    """(model, "LEFT / RIGHT", rows of LEFT, rows of RIGHT) per model that ran both solvers."""
    for model, rows in sorted(examples.groupby("model")):
        left_rows, right_rows = rows[rows["solver"] == left], rows[rows["solver"] == right]
        if len(left_rows) and len(right_rows):
            yield model, f"{left} / {right}", left_rows, right_rows


def folder_pairs(before: pd.DataFrame, after: pd.DataFrame, solvers=None):
    """(model, solver, rows before, rows after) per model and solver in both stores (``solvers``: only these)."""
    keys = sorted(set(before.groupby(["model", "solver"]).groups) & set(after.groupby(["model", "solver"]).groups))
    for model, solver in keys:
        if solvers and solver not in solvers:
            continue
        yield (model, solver, before[(before["model"] == model) & (before["solver"] == solver)],
               after[(after["model"] == model) & (after["solver"] == solver)])


def generate(kind: str, folders, options: dict) -> str:
    """A generated block (``benchmarks/regenerate_results.py``).

    ``cells``: :func:`cells_table` over every folder (options ``radii``, ``dataset``, ``claimed``, ``schedule``,
    ``models``: only these). ``pairs``: :func:`pairs_table`; with one folder, options ``left`` and ``right`` name its
    two solvers; with two, the first is *before* and the second *after* (option ``solvers``: only these). Options
    ``labels`` (two words for the sides) and ``radii``.
    """
    radii = [float(r) for r in options.get("radii", [0.1, 0.5, 1.0])]
    dataset = options.get("dataset", "mnist")
    if kind == "cells":
        examples = read_examples([folder.path for folder in folders], dataset)
        if examples.empty:
            raise ValueError(f"no {dataset} results in {', '.join(folder.shown for folder in folders)}")
        if options.get("models"):
            examples = examples[examples["model"].isin(options["models"])]
        return "\n".join(cells_table(examples, radii, bool(options.get("claimed")), bool(options.get("schedule"))))
    if kind == "pairs":
        if len(folders) == 1:
            examples = read_examples([folders[0].path], dataset)
            pairs = list(solver_pairs(examples, options["left"], options["right"]))
            labels = options.get("labels", [options["left"], options["right"]])
        else:
            before, after = (read_examples([folder.path], dataset) for folder in folders)
            pairs = list(folder_pairs(before, after, options.get("solvers")))
            labels = options.get("labels", ["before", "after"])
        if not pairs:
            raise ValueError(f"no pair of attacks on the same model in {', '.join(folder.shown for folder in folders)}")
        return "\n".join(pairs_table(pairs, radii, tuple(labels)))
    raise ValueError(f"attack_table.py writes no block of kind {kind!r} (kinds: {', '.join(BLOCK_KINDS)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--claimed", action="store_true", help="also the claimed robust accuracy and the rejected claims")
    parser.add_argument("--schedule", action="store_true", help="a column naming each cell's schedule")
    parser.add_argument("--pair", nargs=2, metavar=("LEFT", "RIGHT"), help="compare two solvers of the folder, image by image")
    parser.add_argument("--after", metavar="AFTER_DIR", help="compare the folder (before) with this one (after), image by image")
    parser.add_argument("--solvers", nargs="+", help="with --after: only these solvers")
    arguments = parser.parse_args(argv)
    examples = read_examples([arguments.results_dir], arguments.dataset)
    if examples.empty:
        print(f"no {arguments.dataset} results in {arguments.results_dir}", file=sys.stderr)
        return 2
    if arguments.pair:
        lines = pairs_table(list(solver_pairs(examples, *arguments.pair)), arguments.radii, tuple(arguments.pair))
    elif arguments.after:
        after = read_examples([arguments.after], arguments.dataset)
        lines = pairs_table(list(folder_pairs(examples, after, arguments.solvers)), arguments.radii, ("before", "after"))
    else:
        lines = cells_table(examples, arguments.radii, arguments.claimed, arguments.schedule)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
