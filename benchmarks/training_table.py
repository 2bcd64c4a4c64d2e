"""Print the training records of the zoo's recipe models as a Markdown table (a script, not a test).

Usage::

    python benchmarks/training_table.py [--weights-dir PATH] [--results RESULTS_DIR] [--radii 0.05 0.1 0.5]

One row per recipe model with a record in the weights folder: recipe,
epochs, training images, clean test accuracy, certified accuracy (certified
training), wall time, device and commit. With ``--results``, the verified
robust accuracy at each radius from that result store (worst case over its
attacks on the model), beside the published models of the same data set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:  # run as a script from a checkout that is not pip-installed
    import zoo  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402


def _robust(results_dir: str | None, radii) -> dict[str, list[str]]:
    if results_dir is None:
        return {}
    from harness.report.leaderboard import robust_accuracy_at, worst_case
    from harness.run.store import Table, read_table

    examples = read_table(results_dir, Table.EXAMPLES)
    table = {}
    for model, rows in examples.groupby(examples["model"].astype(str)):
        per_example = worst_case(rows)
        table[model] = [f"{100 * robust_accuracy_at(per_example, radius):.1f}%" for radius in radii]
        table[model].append(str(len(per_example)))
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--results", default=None, help="a result store with attacks on these models")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    args = parser.parse_args(argv)
    robust = _robust(args.results, args.radii)
    header = ["model", "recipe", "epochs", "training images", "clean", "certified (l_inf)", "minutes", "device", "commit"]
    if robust:
        header += [f"robust @ {radius:g}" for radius in args.radii] + ["attacked"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for spec in zoo.models():
        record = zoo.training_record(spec, args.weights_dir) if spec.recipe is not None else None
        if record is None and not (robust and spec.name in robust and spec.weights is not None):
            continue
        if record is None:
            row = [spec.name, "published", "–", "–", f"{spec.clean_accuracy:.2f}%", "–", "–", "–", "–"]
        else:
            certified = (
                f"{100 * record['certified_accuracy']:.2f}% at {record['certified_linf_eps']:g}" if "certified_accuracy" in record else "–"
            )
            row = [
                spec.name, record["recipe"]["name"], str(record["epochs"]), str(record["train_examples"]),
                f"{100 * record['clean_accuracy']:.2f}%", certified, f"{record['seconds'] / 60:.1f}", record["device"],
                record["git_commit"][:10],
            ]
        if robust:
            row += robust.get(spec.name, ["–"] * (len(args.radii) + 1))
        lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
