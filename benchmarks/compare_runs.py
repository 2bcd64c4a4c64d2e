"""Compare the example rows of two results folders: did a code change move any number?

Usage::

    python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR
    python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR --verdicts   # list every changed verdict

Rows are matched on what an example *is* (data set, model, ball, solver,
lambda, clamp, schedule, seed, example index), not on cell or shard ids,
which hash the whole configuration and change whenever the configuration
gains a field. Every column both stores wrote is compared (columns a newer
schema added, which the store fills in when it reads an older folder, are
not), except ids, timings and the schema version; floats must agree
exactly (NaN equals NaN).
Prints one line per differing column and exits 1 if any differ, 2 if the
rows do not match up.
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from harness.run.store import Table, read_table

KEY = ["dataset", "model", "threat_model", "kernel_size", "p", "solver", "lam", "clamp",
       "eps_initial", "eps_factor", "eps_every", "iterations", "seed", "example_index"]
IGNORED = {"schema_version", "cell_id", "shard_id", "attack_seconds", "verify_seconds"}


def _same(left: pd.Series, right: pd.Series) -> np.ndarray:
    if pd.api.types.is_float_dtype(left) and pd.api.types.is_float_dtype(right):
        a, b = left.to_numpy(dtype=float), right.to_numpy(dtype=float)
        return (a == b) | (np.isnan(a) & np.isnan(b))
    def comparable(series: pd.Series) -> list:
        return ["<null>" if value is None or (np.isscalar(value) and pd.isna(value))
                else tuple(value) if isinstance(value, (list, np.ndarray)) else value for value in series]

    return np.array([a == b for a, b in zip(comparable(left), comparable(right))], dtype=bool)


def _written_columns(results_dir: str) -> set[str]:
    """The columns the files of a store hold (not those the reader adds for older versions)."""
    first = next(path for path in sorted((Path(results_dir) / Table.EXAMPLES.value).rglob("*.parquet")) if not path.name.startswith("."))
    return set(pq.read_schema(first).names)


def compare(before_dir: str, after_dir: str, stream=sys.stdout) -> int:
    before = read_table(before_dir, Table.EXAMPLES)
    after = read_table(after_dir, Table.EXAMPLES)
    if before.empty or after.empty:
        stream.write(f"nothing to compare: {len(before)} rows before, {len(after)} after\n")
        return 2
    written = _written_columns(before_dir) & _written_columns(after_dir)
    shared = [c for c in before.columns if c in written and c not in IGNORED and c not in KEY]
    left = before.astype({"model": str, "dataset": str}).set_index(KEY).sort_index()
    right = after.astype({"model": str, "dataset": str}).set_index(KEY).sort_index()
    if not left.index.equals(right.index):
        stream.write(f"the rows do not match up: {len(left)} before, {len(right)} after, "
                     f"{len(left.index.difference(right.index))} only before, {len(right.index.difference(left.index))} only after\n")
        return 2
    differing = 0
    for column in shared:
        same = _same(left[column], right[column])
        if not same.all():
            differing += 1
            stream.write(f"{column}: {int((~same).sum())} of {len(same)} rows differ\n")
    stream.write(f"{len(left)} rows, {len(shared)} columns compared ({', '.join(shared)}): "
                 f"{'identical' if not differing else f'{differing} columns differ'}\n")
    return 1 if differing else 0


def verdict_changes(before_dir: str, after_dir: str, stream=sys.stdout) -> int:
    """A Markdown table of every example whose verification status changed, and a count of moved distances.

    Returns 0 when no status changed, 1 otherwise, 2 when the rows do not match up.
    """
    columns = ["verification_status", "verified_distance"]
    left = read_table(before_dir, Table.EXAMPLES).astype({"model": str, "dataset": str}).set_index(KEY)[columns]
    right = read_table(after_dir, Table.EXAMPLES).astype({"model": str, "dataset": str}).set_index(KEY)[columns]
    if not left.index.sort_values().equals(right.index.sort_values()):
        stream.write(f"the rows do not match up: {len(left)} before, {len(right)} after\n")
        return 2
    joined = left.join(right, suffixes=("_before", "_after"))
    status_changed = joined["verification_status_before"].astype(str) != joined["verification_status_after"].astype(str)
    moved = ~status_changed & ~_same(joined["verified_distance_before"], joined["verified_distance_after"])
    stream.write(f"{len(joined)} examples; status changed: {int(status_changed.sum())}; "
                 f"same status, verified distance moved: {int(moved.sum())}\n\n")
    if moved.any():
        finite = moved & np.isfinite(joined["verified_distance_before"]) & np.isfinite(joined["verified_distance_after"])
        ratio = (joined.loc[finite, "verified_distance_after"] / joined.loc[finite, "verified_distance_before"]).to_numpy()
        if ratio.size:
            stream.write(f"moved distances, after / before: min {ratio.min():.6g}, median {np.median(ratio):.6g}, max {ratio.max():.6g}\n\n")
    if status_changed.any():
        changed = joined[status_changed].reset_index()
        stream.write("| model | solver | ball | example | before | verified before | after | verified after |\n")
        stream.write("| :--- | :--- | :--- | ---: | :--- | ---: | :--- | ---: |\n")
        for row in changed.itertuples(index=False):
            ball = f"{row.kernel_size}x{row.kernel_size}, p = {row.p:g}"
            stream.write(f"| {row.model} | {row.solver} | {ball} | {row.example_index} | {row.verification_status_before} | "
                         f"{row.verified_distance_before:.6g} | {row.verification_status_after} | {row.verified_distance_after:.6g} |\n")
    return 1 if status_changed.any() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--verdicts", action="store_true", help="list every example whose verification status changed")
    arguments = parser.parse_args(argv)
    if arguments.verdicts:
        return verdict_changes(arguments.before, arguments.after)
    return compare(arguments.before, arguments.after)


if __name__ == "__main__":
    sys.exit(main())
