"""Run the standard evaluation on zoo models and print its figures beside single attacks.

Usage::

    python benchmarks/suite_benchmark.py OUT_DIR --models mnist/standard mnist/binarized \\
        [--n 100] [--p 1] [--kernel-size 5] [--data-root D] [--weights-dir W] [--compare RESULTS_DIR ...]

Each model's per-example frame (:func:`harness.evaluate`) is written to
``OUT_DIR/<model>-k<k>-p<p>-n<n>.parquet``; a model whose file exists is
read back, not run again. Printed as Markdown:

* per model: verified robust accuracy at the standard radii, the median
  minimal radius, the median shrink of the refinement (schedule radius over
  refined radius, on examples with a positive finite radius), whether any
  refined radius exceeds its schedule radius, how many minimal radii each
  member found, and seconds per example;
* with ``--compare``: every single-attack cell of those results folders on
  the same first examples, robust accuracy at the same radii, and whether
  the suite is at most as robust as each at every radius.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import harness
import zoo
from harness.attack.ball import Ball
from harness.attack.suite import attack_suite, summarize
from harness.data import test_subset
from harness.report.leaderboard import cell_label, robust_accuracy_at, worst_case
from harness.run.store import Table, read_table


def _frame(out: Path, model: str, ball: Ball, n: int, data_root: str, weights_dir: str | None) -> pd.DataFrame:
    path = out / f"{model.replace('/', '__')}-{ball.key}-n{n}.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    spec = zoo.model_spec(model)
    images, labels = test_subset(spec.dataset.value, data_root, n)
    frame = harness.evaluate(zoo.model(model, weights_dir=weights_dir), images, labels, ball, progress=True)
    frame.to_parquet(path)
    return frame


def _percent(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--kernel-size", type=int, default=5)
    parser.add_argument("--p", type=float, default=1.0)
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "data"))
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--compare", nargs="*", default=[], help="results folders of single-attack runs")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(arguments.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ball = Ball.wasserstein(arguments.kernel_size, arguments.p)
    frames = {model: _frame(out, model, ball, arguments.n, arguments.data_root, arguments.weights_dir) for model in arguments.models}
    dataset = zoo.model_spec(arguments.models[0]).dataset.value
    radii = attack_suite("standard", dataset).radii
    header = ["model", *(f"eps {r:g}" for r in radii), "median radius", "median shrink", "refined > schedule", "found by", "s / example"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for model, frame in frames.items():
        summary = summarize(frame, radii)
        broken = frame[np.isfinite(frame["verified_distance"]) & (frame["verified_distance"] > 0)]
        shrink = float(np.median(broken["schedule_radius"] / broken["verified_distance"])) if len(broken) else math.nan
        worse = int((frame["verified_distance"] > frame["schedule_radius"]).sum())
        found = ", ".join(f"{name} {count}" for name, count in frame["found_by"].replace("", "none").value_counts().items())
        cells = [
            model, *(_percent(summary["robust_accuracy"][r]) for r in radii), f"{summary['median_radius']:.4g}",
            f"{shrink:.3f}", str(worse), found, f"{frame['seconds'].mean():.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
    if arguments.compare:
        print()
        header = ["model", "attack", *(f"eps {r:g}" for r in radii), "suite <= attack everywhere"]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for folder in arguments.compare:
            examples = read_table(folder, Table.EXAMPLES, filters=[("dataset", "==", dataset)])
            examples = examples[(examples["kernel_size"] == ball.transport.kernel_size) & (examples["p"] == ball.transport.p)]
            for (model, _), rows in sorted(examples.groupby(["model", "cell_id"]), key=lambda item: (item[0][0], cell_label(item[1]))):
                if model not in frames:
                    continue
                rows = rows[rows["example_index"] < arguments.n]
                suite = frames[model]
                attack = worst_case(rows)
                suite_accuracy = summarize(suite[suite["example_index"].isin(rows["example_index"])], radii)["robust_accuracy"]
                single = [robust_accuracy_at(attack, r) for r in radii]
                holds = all(math.isnan(a) or suite_accuracy[r] <= a for r, a in zip(radii, single))
                print("| " + " | ".join([model, cell_label(rows), *map(_percent, single), "yes" if holds else "NO"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
