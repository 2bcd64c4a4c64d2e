"""Run the standard evaluation on zoo models and print its figures beside single attacks.

Usage::

    python benchmarks/suite_benchmark.py OUT_DIR --models mnist/standard mnist/binarized \\
        [--n 100] [--p 1] [--kernel-size 5] [--data-root D] [--weights-dir W] [--compare RESULTS_DIR ...]

Each model's per-example frame (:func:`harness.evaluate`) is written to
``OUT_DIR/<model>-k<k>-p<p>-n<n>.parquet``; a model whose file exists is
read back, not run again. Printed as Markdown:

* per model: verified robust accuracy at the standard radii, the median
  minimal radius, the median shrink of the refinement (schedule radius over
  refined radius, on examples with a positive finite radius), how many
  broken radii the refinement shrank, whether any refined radius exceeds its
  schedule radius, which refinement step gave the final radius, how many
  minimal radii each member found, how many lie below the schedule's first
  radius, and seconds per example;
* the quartiles of the shrink per model;
* with ``--compare``: every single-attack cell of those results folders on
  the same examples, robust accuracy at the same radii, and whether the
  suite is at most as robust as each at every radius.

``generate`` writes the same tables, from the suite rows of a result store
(``python run_benchmark.py grid=evaluate ...``), as generated blocks of a
results page (``benchmarks/regenerate_results.py``), and two more: the
suite beside fixed-radius attacks at large radii, and beside the 2020
protocols.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attack_table import read_examples, schedule_label  # noqa: E402
from harness.report.leaderboard import cell_label, headline_examples, robust_accuracy_at, worst_case  # noqa: E402
from results_page import markdown_table, number, percent, text_cell  # noqa: E402

BLOCK_KINDS = ("suite", "shrink", "single-attacks", "large-radii", "protocols")


def _frame(out: Path, model: str, ball, n: int, data_root: str, weights_dir: str | None) -> pd.DataFrame:
    import harness
    import zoo
    from harness.data import test_subset

    path = out / f"{model.replace('/', '__')}-{ball.key}-n{n}.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    spec = zoo.model_spec(model)
    images, labels = test_subset(spec.dataset.value, data_root, n)
    frame = harness.evaluate(zoo.model(model, weights_dir=weights_dir), images, labels, ball, progress=True)
    frame.to_parquet(path)
    return frame


def standard_radii(dataset: str) -> tuple[float, ...]:
    from harness.attack.suite import attack_suite

    return attack_suite("standard", dataset).radii


def suite_frames(examples: pd.DataFrame, kernel_size: int, p: float) -> tuple[dict[str, pd.DataFrame], str]:
    """Per model, the rows of the latest standard suite on the ball, as :func:`harness.evaluate` frames, and its label.

    Columns: ``example_index``, ``verified_distance``, ``schedule_radius``, ``found_by``, ``refined_by``,
    ``seconds`` (attack and verification), ``reach`` (the largest radius searched) and ``first_radius`` (the
    schedule's first radius).
    """
    if examples.empty:
        return {}, ""
    mine = examples[(examples["kernel_size"] == kernel_size) & (examples["p"] == p)]
    suite, label = headline_examples(mine)
    if label is None:
        return {}, ""
    frames = {}
    for model, rows in sorted(suite.groupby("model")):
        frames[model] = pd.DataFrame({
            "example_index": rows["example_index"].to_numpy(), "verified_distance": rows["verified_distance"].to_numpy(),
            "schedule_radius": rows["schedule_radius"].to_numpy(), "found_by": rows["found_by"].fillna("").to_numpy(),
            "refined_by": rows["refined_by"].fillna("").to_numpy(),
            "seconds": (rows["attack_seconds"] + rows["verify_seconds"]).to_numpy(),
            "reach": rows["final_eps"].to_numpy(), "first_radius": rows["eps_initial"].to_numpy(),
        }).sort_values("example_index", kind="stable").reset_index(drop=True)
    return frames, f"suite {label}"


def _per_example(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as :func:`worst_case` rows (index ``example_index``; ``reach`` infinite when not recorded)."""
    reach = frame["reach"] if "reach" in frame else np.inf
    return pd.DataFrame({"verified_distance": frame["verified_distance"].to_numpy(), "reach": reach},
                        index=frame["example_index"].to_numpy())


def _robust(frame: pd.DataFrame, radius: float) -> float:
    return robust_accuracy_at(_per_example(frame), radius)


def _broken(frame: pd.DataFrame) -> pd.DataFrame:
    distance = frame["verified_distance"]
    return frame[np.isfinite(distance) & (distance > 0)]


def _shrink(frame: pd.DataFrame) -> pd.Series:
    broken = _broken(frame)
    return broken["schedule_radius"] / broken["verified_distance"]


def _counts(values: pd.Series) -> str:
    return ", ".join(f"{name} {count}" for name, count in values.replace("", "none").value_counts().items())


def _median_radius(frame: pd.DataFrame) -> str:
    return f"{float(np.median(frame['verified_distance'])):.4g}"


def suite_table(frames: dict[str, pd.DataFrame], radii) -> list[str]:
    """One row per model: the suite's figures (see the module docstring)."""
    header = ["model", *(f"eps {r:g}" for r in radii), "median radius", "median shrink", "shrunk / broken",
              "refined > schedule", "final radius by", "minimal radius found by", "below first radius", "s / example"]
    rows = []
    for model, frame in frames.items():
        broken = _broken(frame)
        shrink = _shrink(frame)
        first = frame["first_radius"] if "first_radius" in frame else None
        rows.append([
            text_cell(model), *(percent(_robust(frame, r)) for r in radii), _median_radius(frame),
            number(np.median(shrink) if len(shrink) else math.nan),
            f"{int((broken['schedule_radius'] > broken['verified_distance']).sum())}/{len(broken)}",
            str(int((frame["verified_distance"] > frame["schedule_radius"]).sum())),
            _counts(broken["refined_by"]) if "refined_by" in frame else "–", _counts(frame["found_by"]),
            str(int((broken["verified_distance"] < first[broken.index]).sum())) if first is not None else "–",
            number(frame["seconds"].mean(), ".2f"),
        ])
    return markdown_table(header, rows, set(range(1, len(radii) + 5)) | {len(header) - 2, len(header) - 1})


def shrink_table(frames: dict[str, pd.DataFrame]) -> list[str]:
    """Quartiles and maximum of the shrink (schedule radius / refined radius) per model, on the broken examples."""
    header = ["model", "broken examples", "25%", "50%", "75%", "max"]
    rows = []
    for model, frame in frames.items():
        shrink = _shrink(frame).to_numpy(dtype=float)
        quartiles = np.quantile(shrink, [0.25, 0.5, 0.75, 1.0]) if len(shrink) else [math.nan] * 4
        rows.append([text_cell(model), str(len(shrink)), *(number(q) for q in quartiles)])
    return markdown_table(header, rows, {1, 2, 3, 4, 5})


def _single_cells(examples: pd.DataFrame, frames: dict[str, pd.DataFrame], kernel_size: int, p: float):
    """(model, cell rows) of every single-attack cell on the ball, on a model the suite ran on."""
    if examples.empty:
        return []
    mine = examples[(examples["kernel_size"] == kernel_size) & (examples["p"] == p) & examples["suite"].isna()]
    mine = mine[mine["model"].isin(frames)]
    cells = [(model, rows) for (model, _), rows in mine.groupby(["model", "cell_id"])]
    return sorted(cells, key=lambda item: (item[0], cell_label(item[1]), schedule_label(item[1])))


def compare_table(frames: dict[str, pd.DataFrame], suite_label: str, cells, radii) -> list[str]:
    """Per model, the suite (in bold) and then every single attack, on the examples both ran on."""
    header = ["model", "attack", "schedule", *(f"eps {r:g}" for r in radii), "suite <= attack everywhere"]
    rows = []
    for model, frame in frames.items():
        rows.append([text_cell(model), f"**{suite_label}**", "–", *(f"**{percent(_robust(frame, r))}**" for r in radii), "–"])
        for _, cell in [(m, c) for m, c in cells if m == model]:
            attack = worst_case(cell)
            shared = frame[frame["example_index"].isin(attack.index)]
            single = [robust_accuracy_at(attack.loc[shared["example_index"]], r) for r in radii]
            suite = [_robust(shared, r) for r in radii]
            holds = all(math.isnan(a) or s <= a for s, a in zip(suite, single))
            rows.append([text_cell(model), text_cell(cell_label(cell)), schedule_label(cell), *map(percent, single),
                         "yes" if holds else "NO"])
    return markdown_table(header, rows, set(range(3, len(header))))


def large_radii_table(frames: dict[str, pd.DataFrame], suite_label: str, cells) -> list[str]:
    """Each fixed-radius cell beside the suite at its radius, on the examples both ran on."""
    header = ["model", "eps", "fixed-radius attack", "its robust accuracy", suite_label, "examples"]
    rows = []
    for model, cell in cells:
        first = cell.iloc[0]
        if first["eps_factor"] != 1 or (not pd.isna(first["eps_increment"]) and first["eps_increment"]):
            continue
        radius = float(first["eps_initial"])
        attack = worst_case(cell)
        shared = frames[model][frames[model]["example_index"].isin(attack.index)]
        rows.append([text_cell(model), f"{radius:g}", f"{cell_label(cell)}, {int(first['iterations'])} steps",
                     percent(robust_accuracy_at(attack.loc[shared["example_index"]], radius)), percent(_robust(shared, radius)),
                     str(len(shared))])
    rows.sort(key=lambda row: (row[0], float(row[1])))
    return markdown_table(header, rows, {1, 3, 4, 5})


def protocols_table(frames: dict[str, pd.DataFrame], suite_label: str, cells, radii) -> list[str]:
    """Every cell of a protocols run (its schedule named) and the suite, per model, with seconds per example."""
    header = ["model", "attack", "schedule", *(f"eps {r:g}" for r in radii), "s / example"]
    rows = []
    for model in frames:
        for _, cell in [(m, c) for m, c in cells if m == model]:
            attack = worst_case(cell)
            rows.append([text_cell(model), text_cell(cell_label(cell)), schedule_label(cell),
                         *(percent(robust_accuracy_at(attack, r)) for r in radii),
                         number((cell["attack_seconds"] + cell["verify_seconds"]).mean(), ".2f")])
        if any(m == model for m, _ in cells):
            frame = frames[model]
            rows.append([text_cell(model), suite_label, "–", *(percent(_robust(frame, r)) for r in radii),
                         number(frame["seconds"].mean(), ".2f")])
    return markdown_table(header, rows, set(range(3, len(header))))


def generate(kind: str, folders, options: dict) -> str:
    """A generated block (``benchmarks/regenerate_results.py``); the first folder holds the suite's rows.

    Kinds: ``suite``, ``shrink`` (the first folder only), ``single-attacks`` (every single-attack cell of the other
    folders), ``large-radii`` (the fixed-radius cells of the other folders), ``protocols`` (every cell of the other
    folders). Options: ``dataset`` (default mnist), ``kernel_size`` (5), ``p`` (1), ``radii`` (the suite's
    standard radii).
    """
    dataset = options.get("dataset", "mnist")
    kernel_size, p = int(options.get("kernel_size", 5)), float(options.get("p", 1.0))
    radii = [float(r) for r in options.get("radii", standard_radii(dataset))]
    frames, label = suite_frames(read_examples([folders[0].path], dataset), kernel_size, p)
    if not frames:
        raise ValueError(f"no {dataset} suite rows on the {kernel_size}x{kernel_size}, p = {p:g} ball in {folders[0].shown}")
    if kind == "suite":
        return "\n".join(suite_table(frames, radii))
    if kind == "shrink":
        return "\n".join(shrink_table(frames))
    others = read_examples([folder.path for folder in folders[1:]], dataset) if len(folders) > 1 else pd.DataFrame()
    cells = _single_cells(others, frames, kernel_size, p)
    if kind == "single-attacks":
        return "\n".join(compare_table(frames, label, cells, radii))
    if kind == "large-radii":
        return "\n".join(large_radii_table(frames, label, cells))
    if kind == "protocols":
        return "\n".join(protocols_table(frames, label, cells, radii))
    raise ValueError(f"suite_benchmark.py writes no block of kind {kind!r} (kinds: {', '.join(BLOCK_KINDS)})")


def main(argv: list[str] | None = None) -> int:
    import torch

    import zoo
    from harness.attack.ball import Ball

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
    radii = standard_radii(dataset)
    print("\n".join(suite_table(frames, radii)))
    print()
    print("\n".join(shrink_table(frames)))
    if arguments.compare:
        examples = read_examples(arguments.compare, dataset)
        examples = examples[examples["example_index"] < arguments.n] if len(examples) else examples
        print()
        label = next(iter(frames.values())).attrs.get("suite", "suite")
        print("\n".join(compare_table(frames, label, _single_cells(examples, frames, arguments.kernel_size, arguments.p), radii)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
