"""Print verified robust accuracy per model and attack at chosen radii, from a results folder.

Usage::

    python benchmarks/attack_table.py RESULTS_DIR [--radii 0.1 0.5 1.0] [--dataset mnist]

One row per (model, attack) cell: robust accuracy at each radius from the
verified distances (a dash where the attack did not search that far),
claimed successes that passed verification, and seconds per example
(attack + verification), as a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys

from harness.report.leaderboard import VerificationCounts, cell_label, robust_accuracy_at, worst_case
from harness.run.store import Table, read_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    parser.add_argument("--dataset", default="mnist")
    arguments = parser.parse_args(argv)
    examples = read_table(arguments.results_dir, Table.EXAMPLES, filters=[("dataset", "==", arguments.dataset)])
    if examples.empty:
        print(f"no {arguments.dataset} results in {arguments.results_dir}", file=sys.stderr)
        return 2
    header = ["model", "attack", *(f"eps {r:g}" for r in arguments.radii), "verified / claimed", "s / example"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (model, cell_id), rows in sorted(examples.groupby(["model", "cell_id"]), key=lambda item: (item[0][0], cell_label(item[1]))):
        per_example = worst_case(rows)
        accuracies = [robust_accuracy_at(per_example, radius) for radius in arguments.radii]
        counts = VerificationCounts.of(rows)
        seconds = float((rows["attack_seconds"] + rows["verify_seconds"]).mean())
        cells = [model, cell_label(rows), *("–" if math.isnan(a) else f"{100 * a:.1f}%" for a in accuracies),
                 f"{counts.verified}/{counts.claimed}", f"{seconds:.3f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
