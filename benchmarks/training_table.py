"""Print the training records of the zoo's recipe models as a Markdown table (a script, not a test).

Usage::

    python benchmarks/training_table.py [--weights-dir PATH] [--results RESULTS_DIR] [--radii 0.05 0.1 0.5] [--models ...]

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
        accuracies = [robust_accuracy_at(per_example, radius) for radius in radii]
        table[model] = ["–" if accuracy != accuracy else f"{100 * accuracy:.1f}%" for accuracy in accuracies]
        table[model].append(str(len(per_example)))
    return table


def records_table(weights_dir, results_dir, radii, models=None) -> list[str]:
    """The table's Markdown lines: one row per recipe model with a record (``models``: only these), and with
    ``results_dir``, the published models attacked there beside them."""
    robust = _robust(results_dir, radii)
    header = ["model", "recipe", "epochs", "training images", "clean", "certified (l_inf)", "minutes", "device", "commit"]
    if robust:
        header += [f"robust @ {radius:g}" for radius in radii] + ["attacked"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for spec in zoo.models():
        if models and spec.name not in models:
            continue
        record = zoo.training_record(spec, weights_dir) if spec.recipe is not None else None
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
            row += robust.get(spec.name, ["–"] * (len(radii) + 1))
        lines.append("| " + " | ".join(row) + " |")
    return lines


BLOCK_KINDS = ("records",)


def generate(kind: str, folders, options: dict) -> str:
    """A generated block (``benchmarks/regenerate_results.py``): ``records``, the table of the weights folder (the
    first folder) beside the result store of the second, if given. Options ``radii``, ``models``."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"training_table.py writes no block of kind {kind!r} (kinds: {', '.join(BLOCK_KINDS)})")
    radii = [float(r) for r in options.get("radii", [0.05, 0.1, 0.5])]
    results = folders[1].path if len(folders) > 1 else None
    lines = records_table(folders[0].path, results, radii, options.get("models"))
    if len(lines) == 2:
        raise ValueError(f"no training record in {folders[0].shown}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--results", default=None, help="a result store with attacks on these models")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    parser.add_argument("--models", nargs="+", default=None, help="only these models")
    args = parser.parse_args(argv)
    print("\n".join(records_table(args.weights_dir, args.results, args.radii, args.models)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
