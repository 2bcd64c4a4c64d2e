"""Certified against attacked robust accuracy, per model and radius, from a store that ran ``grid=certify``.

Usage::

    python benchmarks/certify_table.py RESULTS_DIR

Prints one Markdown table per certify cell (certifier and box): for each model
and radius the certified share, the attack's verified robust accuracy on the
same examples, the gap between them, the mean seconds per example evaluated
at that radius, and the share of examples whose minimal adversarial radius
is known exactly (certified radius within 10% of the verified one). Exits
with status 1, listing them, if any certificate is contradicted by a
verified attack.
"""

from __future__ import annotations

import sys

import pandas as pd

from harness.report.leaderboard import (
    KNOWN_EXACTLY_TOLERANCE, certificate_violations, certified_radii, known_exactly, robust_accuracy_at, worst_case,
)
from harness.run.store import Table, read_table


def cell_table(certificates: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """One certify cell's rows against the worst case of the attacks on its examples."""
    rows = []
    for model, frame in certificates.groupby("model", observed=True):
        attacks = worst_case(examples[examples["model"] == model])
        shared = sorted(set(frame["example_index"]) & set(attacks.index))
        radii = certified_radii(frame).loc[shared]
        exact = known_exactly(radii, attacks)
        for radius in sorted(frame["eps"].unique()):
            evaluated = frame[(frame["eps"] == radius) & frame["margin_lower"].notna()]
            certified = float((radii >= radius).mean())
            attacked = robust_accuracy_at(attacks.loc[shared], radius)
            rows.append({
                "model": model, "eps": radius, "examples": len(shared),
                "certified %": 100 * certified, "attacked %": 100 * attacked, "gap": 100 * (attacked - certified),
                "s / example": evaluated["seconds"].mean() if len(evaluated) else float("nan"),
                "timeouts": int((frame.loc[frame["eps"] == radius, "status"] == "timeout").sum()),
                "known exactly %": 100 * exact,
            })
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    def shown(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(shown(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


# Generated blocks of a results page (benchmarks/regenerate_results.py): kinds "cells" (the tables main prints),
# "time" (seconds per example per model and certify cell) and "median-radius" (certified against attacked radii).
BLOCK_KINDS = ("cells", "time", "median-radius")


def _cell_name(cell: pd.DataFrame) -> str:
    first = cell.iloc[0]
    rounds = "" if pd.isna(first["radius_rounds"]) else f", {int(first['radius_rounds'])} bisection rounds"
    limit = "" if pd.isna(first["time_limit"]) else f", {first['time_limit']:g} s limit"
    return f"{first['certifier']}, {'box' if first['box'] else 'no box'}{rounds}{limit}"


def generate(kind: str, folders, options: dict) -> str:
    if kind not in BLOCK_KINDS:
        raise ValueError(f"certify_table.py writes no block of kind {kind!r} (kinds: {', '.join(BLOCK_KINDS)})")
    (folder,) = folders
    certificates = read_table(folder.path, Table.CERTIFICATES).drop_duplicates(["cell_id", "example_index", "eps"])
    examples = read_table(folder.path, Table.EXAMPLES)
    if certificates.empty:
        raise ValueError(f"no certificates in {folder.shown}")
    cells = sorted(certificates.groupby("cell_id"), key=lambda item: _cell_name(item[1]))
    if kind == "cells":
        parts = []
        for (certifier, box), cell in certificates.groupby(["certifier", "box"], observed=True):
            parts.append(f"### {certifier}, {'with' if box else 'without'} the box "
                         f"(known exactly: certified radius >= verified radius / {1 + KNOWN_EXACTLY_TOLERANCE:g})")
            parts.append(markdown_table(cell_table(cell, examples)))
        violations = certificate_violations(examples, certificates)
        parts.append(f"{len(violations)} certificates are contradicted by a verified attack in the store." if len(violations)
                     else "No certificate is contradicted by any verified attack in the store.")
        return "\n\n".join(parts)
    rows = []
    for model in sorted(certificates["model"].astype(str).unique()):
        row = {"model": model}
        attacks = worst_case(examples[examples["model"].astype(str) == model])
        for _, cell in cells:
            mine = cell[cell["model"].astype(str) == model]
            if mine.empty:
                continue
            per_example = mine.drop_duplicates("example_index")
            if kind == "time":
                seconds = (mine["seconds"].sum() + per_example["radius_search_seconds"].sum()) / len(per_example)
                row[_cell_name(cell)] = f"{seconds:.1f} s"
                row.setdefault("_seconds", 0.0)
                row["_seconds"] += seconds
            else:
                radii = certified_radii(mine)
                shared = radii.index.intersection(attacks.index)
                row[f"median certified radius: {_cell_name(cell)}"] = f"{radii.median():.2g}"
                row[f"largest: {_cell_name(cell)}"] = f"{radii.max():.2g}"
                row["median verified attack radius, same examples"] = (
                    f"{attacks.loc[shared, 'verified_distance'].median():.2g}" if len(shared) else "–")
        rows.append(row)
    frame = pd.DataFrame(rows)
    lines = markdown_table(frame.drop(columns=["_seconds"], errors="ignore").fillna("–"))
    if kind == "time" and options.get("estimate_n"):
        n = int(options["estimate_n"])
        hours = n * frame["_seconds"].sum() / 3600
        lines += f"\n\nAt these rates, {n} images per model and certify cell take {hours:.1f} core-hours in all."
    return lines


def main(results_dir: str) -> int:
    certificates = read_table(results_dir, Table.CERTIFICATES)
    examples = read_table(results_dir, Table.EXAMPLES)
    for (certifier, box), cell in certificates.groupby(["certifier", "box"], observed=True):
        print(f"\n### {certifier}, {'with' if box else 'without'} the box "
              f"(known exactly: certified radius >= verified radius / {1 + KNOWN_EXACTLY_TOLERANCE:g})\n")
        print(markdown_table(cell_table(cell, examples)))
    violations = certificate_violations(examples, certificates)
    if len(violations):
        print(f"\n{len(violations)} certificates contradicted by a verified attack:\n{violations.to_string()}")
        return 1
    print("\nNo certificate is contradicted by any verified attack in the store.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
