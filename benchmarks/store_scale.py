"""How the result store's reads scale: finishing every cell and writing the report, against the number of shard files.

For each size, a synthetic store is written with the store's own
:func:`~harness.run.store.write_shard`: attack, suite and certify cells of
the paper's four MNIST models (real :class:`~harness.run.cells.Cell` objects,
so ids, configuration columns and file layout are those of a run), each
``--shards-per-cell`` shards of ``--rows`` examples, with gallery images
for the first shard of each attack and suite cell, seeds added until the
store holds the size's shard files (``examples`` and ``certificates``). Then two things
are timed, on that store:

- finishing every cell: :meth:`~harness.run.runner.ShardRunner.finish_cell`,
  the code a run calls after a cell's last shard (clean accuracy stubbed:
  the model's test set is not the store's business);
- writing the report: :func:`~harness.report.write_report`.

Printed as one line per size: files on disk (every table), example rows,
cells, both times and both per file. Usage::

    python benchmarks/store_scale.py [--sizes 1000 5000 20000] [--rows 100] [--shards-per-cell 50]
                                     [--output DIR] [--keep] [--quick]

The stores go under ``--output`` (default: a temporary folder), each
removed once measured unless ``--keep``; ``--quick`` runs two small sizes,
for a test.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:  # run as a script from a checkout that is not pip-installed
    import harness  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo  # noqa: E402
from harness.report import write_report  # noqa: E402
from harness.run.cells import Cell, Shard  # noqa: E402
from harness.run.grid import expand_blocks  # noqa: E402
from harness.run.kinds import CertifyCell, SuiteCell  # noqa: E402
from harness.run.runner import RunContext, ShardRunner  # noqa: E402
from harness.run.store import EXAMPLES_SCHEMA, Table, write_shard  # noqa: E402
from harness.vocabulary import CertificateStatus, VerificationStatus  # noqa: E402

PAPER_MODELS = ["mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial"]
GALLERY_EXAMPLES = 8
HEADER = f"{'files':>7} {'example rows':>12} {'cells':>6} {'finish s':>9} {'report s':>9} {'finish ms/file':>14} {'report ms/file':>14}"


def grid_blocks(seed: int, n_examples: int) -> list[dict]:
    """The cells of one seed: two solvers and a lambda x p axis (the paper's Figure 8), the standard suite and the
    linear bounds, on the paper's MNIST models."""
    common = {"dataset": "mnist", "seed": seed, "n_examples": n_examples}
    return [
        {**common, "model": PAPER_MODELS, "solver": ["projected_sinkhorn_box", "projected_sinkhorn"], "protocol": "paper_code_mnist"},
        {**common, "model": "mnist/standard", "solver": "projected_sinkhorn_box", "protocol": "paper_mnist", "lam": [100, 1000],
         "p": [1, 2]},
        {**common, "model": PAPER_MODELS, "suite": "standard", "kernel_size": 5, "p": 1},
        {**common, "model": PAPER_MODELS, "certifier": "linear_bounds", "kernel_size": 5, "p": 1, "box": True,
         "radii": [0.001, 0.01, 0.05, 0.1], "radius_rounds": 2},
    ]


def cells_for(files: int, shards_per_cell: int, rows: int) -> list[Cell]:
    """Enough cells (seed after seed) for ``files`` shard files of ``shards_per_cell`` shards each."""
    wanted = math.ceil(files / shards_per_cell)
    cells: list[Cell] = []
    seed = 0
    while len(cells) < wanted:
        cells += expand_blocks(grid_blocks(seed, shards_per_cell * rows))
        seed += 1
    return cells[:wanted]


def _attack_shard(shard: Shard, rng: np.random.Generator) -> dict:
    """An attack or suite shard's examples columns: broken at random radii up to the cell's, a few misclassified."""
    cell, start, stop = shard.cell, shard.start, shard.stop
    n = stop - start
    distance = rng.exponential(cell.final_eps / 2, n)
    distance[distance > cell.final_eps] = math.inf
    distance[rng.random(n) < 0.02] = 0.0
    status = np.where(distance == 0.0, VerificationStatus.CLEAN_MISCLASSIFIED.name,
                      np.where(np.isinf(distance), VerificationStatus.NOT_FOUND.name, VerificationStatus.VERIFIED.name))
    label = rng.integers(0, 10, n)
    suite = isinstance(cell, SuiteCell)
    columns = {name: [value] * n for name, value in cell.columns().items() if name in EXAMPLES_SCHEMA.names}
    columns.update(
        cell_id=[cell.cell_id] * n, gradient_mode=[zoo.model_spec(cell.model).gradient_mode.value] * n,
        shard_id=[shard.shard_id] * n, example_index=np.arange(start, stop), label=label,
        clean_prediction=np.where(distance == 0.0, (label + 1) % 10, label), adversarial_prediction=(label + 1) % 10,
        success=np.isfinite(distance), eps_found=np.where(np.isfinite(distance), distance * 1.2, np.nan),
        verification_status=status, verified_distance=distance, distance=distance,
        schedule_radius=np.where(np.isfinite(distance), distance * 1.2, np.nan) if suite else [None] * n,
        found_by=[("plan_pgd_box" if np.isfinite(d) and d > 0 else "") if suite else None for d in distance],
        refined_by=["segment" if suite else None] * n, rejected_claims=[0 if suite else None] * n,
        mass_error=rng.random(n) * 1e-6, box_violation=np.zeros(n), unreachable_mass=np.zeros(n),
        steps=rng.integers(1, 201, n), restart=np.zeros(n, dtype=int),
        solver_iterations=rng.integers(100, 5000, n), unconverged_steps=rng.integers(0, 2, n), failed_steps=np.zeros(n, dtype=int),
        zero_gradient_steps=np.zeros(n, dtype=int), failed_model_checks=[[]] * n,
        attack_seconds=rng.random(n), verify_seconds=rng.random(n) * 0.1,
    )
    return columns


def _certificates_shard(shard: Shard, rng: np.random.Generator) -> dict:
    """A certify shard's certificates columns: each example certified up to a random rung of the ladder."""
    cell, start, stop = shard.cell, shard.start, shard.stop
    radii = np.asarray(cell.settings.radii, dtype=np.float64)
    n, per = stop - start, len(radii)
    reached = rng.integers(0, per + 1, n)  # rungs certified
    per_example = np.repeat(np.arange(n), per)
    rung = np.tile(np.arange(per), n)
    certified = rung < reached[per_example]
    evaluated = rung <= reached[per_example]
    certified_radius = np.where(reached > 0, radii[np.maximum(reached - 1, 0)], 0.0)
    label = rng.integers(0, 10, n)
    certificate_columns = ("threat_model", "ball_title", "kernel_size", "p", "certifier", "box", "time_limit", "radius_rounds")
    settings = {name: value for name, value in cell.columns().items() if name in certificate_columns}
    columns = {name: [value] * n * per for name, value in settings.items()}
    columns.update(
        cell_id=[cell.cell_id] * n * per, shard_id=[shard.shard_id] * n * per, example_index=start + per_example,
        label=label[per_example], clean_prediction=label[per_example], eps=np.tile(radii, n),
        status=np.where(certified, CertificateStatus.CERTIFIED.value, CertificateStatus.UNKNOWN.value),
        margin_lower=np.where(evaluated, np.where(certified, 0.5, -0.5), np.nan), safety_margin=np.where(evaluated, 1e-6, np.nan),
        seconds=np.where(evaluated, rng.random(n * per), 0.0), certified_radius=certified_radius[per_example],
        radius_search_seconds=np.full(n * per, 0.01),
    )
    return columns


def _images(shard: Shard, rng: np.random.Generator) -> dict:
    """The gallery images of a cell's first shard."""
    cell, start = shard.cell, shard.start
    originals = rng.random((GALLERY_EXAMPLES, 28 * 28), dtype=np.float32)
    adversarial = np.clip(originals + 0.1 * rng.standard_normal(originals.shape, dtype=np.float32), 0.0, 1.0)
    return {
        "cell_id": [cell.cell_id] * GALLERY_EXAMPLES, "shard_id": [shard.shard_id] * GALLERY_EXAMPLES,
        "example_index": np.arange(start, start + GALLERY_EXAMPLES), "channels": [1] * GALLERY_EXAMPLES,
        "height": [28] * GALLERY_EXAMPLES, "width": [28] * GALLERY_EXAMPLES,
        "original": list(originals), "adversarial": list(adversarial),
    }


def write_store(results_dir: Path, cells: list[Cell], rows: int) -> int:
    """Every shard of ``cells`` (``rows`` examples each); returns the example rows written."""
    examples = 0
    for number, cell in enumerate(cells):
        rng = np.random.default_rng(number)
        for shard in cell.shards(rows):
            if isinstance(cell, CertifyCell):
                table, columns = Table.CERTIFICATES, _certificates_shard(shard, rng)
            else:
                table, columns = Table.EXAMPLES, _attack_shard(shard, rng)
                examples += shard.stop - shard.start
                if shard.start == 0:
                    write_shard(results_dir, Table.IMAGES, cell.dataset, cell.model, shard.shard_id, _images(shard, rng))
            write_shard(results_dir, table, cell.dataset, cell.model, shard.shard_id, columns)
    return examples


class StubbedAccuracyRunner(ShardRunner):
    """A runner whose models' clean accuracy is a constant: computing it reads a test set, not the store."""

    def clean_accuracy(self, cell: Cell) -> float:
        return 0.99


def measure(results_dir: Path, files: int, rows: int, shards_per_cell: int) -> dict:
    """Write a store of about ``files`` shard files, finish its cells, write its report; the timings and sizes."""
    cells = cells_for(files, shards_per_cell, rows)
    examples = write_store(results_dir, cells, rows)
    runner = StubbedAccuracyRunner(RunContext(data_root="", results_dir=str(results_dir)))
    started_at = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    for cell in cells:
        runner.finish_cell(cell, started_at)
    finish = time.perf_counter() - clock
    clock = time.perf_counter()
    write_report(results_dir, results_dir / "report")
    report = time.perf_counter() - clock
    on_disk = sum(1 for _ in results_dir.rglob("*.parquet"))
    return {"files": on_disk, "example_rows": examples, "cells": len(cells), "finish": finish, "report": report}


def line(result: dict) -> str:
    files = result["files"]
    return (
        f"{files:>7} {result['example_rows']:>12} {result['cells']:>6} {result['finish']:>9.2f} {result['report']:>9.2f} "
        f"{1000 * result['finish'] / files:>14.2f} {1000 * result['report'] / files:>14.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="shard files of each store")
    parser.add_argument("--rows", type=int, default=100, help="examples per shard (default 100)")
    parser.add_argument("--shards-per-cell", type=int, default=50, help="shards of each cell (default 50)")
    parser.add_argument("--output", help="keep the stores here, one folder per size (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the stores after measuring them")
    parser.add_argument("--quick", action="store_true", help="two small stores (40 and 80 shards of 10 rows): a test")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.sizes, arguments.rows, arguments.shards_per_cell = [40, 80], 10, 4
    output = Path(arguments.output) if arguments.output else Path(tempfile.mkdtemp(prefix="store-scale-"))
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{arguments.rows} rows per shard, {arguments.shards_per_cell} shards per cell", flush=True)
    print(HEADER, flush=True)
    for size in arguments.sizes:
        results_dir = output / f"files-{size}"
        if results_dir.exists():
            shutil.rmtree(results_dir)
        try:
            print(line(measure(results_dir, size, arguments.rows, arguments.shards_per_cell)), flush=True)
        finally:
            if not arguments.keep:
                shutil.rmtree(results_dir, ignore_errors=True)
    if arguments.keep:
        print(f"stores kept under {output}")
    elif not arguments.output:
        shutil.rmtree(output, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
