"""The main job behind ``wasserstein-bench`` (``run_benchmark.py``): grid in, Parquet results out.

:func:`run_benchmark` takes the composed configuration as a plain mapping
(Hydra's, or one built in a test) and does, in order: check it
(:func:`~harness.run.preflight.preflight`: plugins, settings, grid, the
plan's weights and data, results folder, Ray cluster), download what the
plan lists (:func:`~harness.run.plan.fetch`), print the plan, train what it
trains, run the shards, print a summary. Nothing is downloaded or scheduled
before every check has passed; all problems are reported together. The
report is not this module's business: the entry point (:mod:`harness.cli`)
writes it after the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import defaultdict
from typing import Any, Mapping

import zoo

from ..attack.suite import summarize
from ..provenance import resolve_device
from ..vocabulary import DATASETS
from .cells import Cell
from .kinds import SuiteCell
from .grid_files import GridFiles
from .plan import Plan, fetch
from .preflight import cannot_start_message, data_problems, preflight
from .runner import RunContext
from .scheduler import Executor, RunReport, ray_session, run_cells, train_models
from .settings import RunSettings
from .store import Table, read_cell

__all__ = ["run_benchmark"]


def _summary(report: RunReport) -> str:
    lines = [f"{'model':<30} {'ball':<46} {'solver':<24} {'lambda':>6} {'n':>5} {'clean':>7} {'robust':>7} {'at eps':>7}"]
    for row in sorted(report.cells, key=lambda r: r["config_json"]):
        model = json.loads(row["config_json"])["model"]
        robust = row["robust_accuracy"]
        suite = f"{row['suite']} v{row['suite_version']}" if row.get("suite") else None
        certifier = f"{row['certifier']} {'box' if row['box'] else 'no box'}" if row.get("certifier") else None
        solver = str(row["solver"] or suite or certifier or "-") + (" +clamp" if row["clamp"] else "")
        lam = row["lam"]
        lines.append(
            f"{model:<30} {row['ball_title']:<46} {solver:<24} {'-' if lam is None else f'{lam:g}':>6} {row['n_examples']:>5} "
            f"{100 * row['clean_accuracy']:>6.2f}% {'-' if robust is None or math.isnan(robust) else f'{100 * robust:.1f}%':>7} "
            f"{row['final_eps']:>7.3g}"
        )
    return "\n".join(lines)


def _suite_summary(cells: list[Cell], results_dir: str) -> str:
    """Robust accuracy at the standard radii and the median minimal radius of every suite cell, from the store."""
    lines = []
    for cell in sorted((c for c in cells if isinstance(c, SuiteCell)), key=lambda c: (c.dataset, c.model, c.ball.key)):
        suite = cell.suite
        examples = read_cell(results_dir, Table.EXAMPLES, cell.dataset, cell.model, cell.cell_id).drop_duplicates("example_index")
        if examples.empty:
            continue
        if not lines:
            lines.append(f"{'evaluation':<12} {'model':<30} {'ball':<46} {'n':>5} {'robust at the standard radii':<40} {'median radius':>13}")
        summary = summarize(examples, suite.radii)
        robust = ", ".join(f"{radius:g}: {100 * value:.1f}%" for radius, value in summary["robust_accuracy"].items())
        lines.append(
            f"{suite.label:<12} {cell.model:<30} {cell.ball.title:<46} {summary['examples']:>5} {robust:<40} "
            f"{summary['median_radius']:>13.4g}"
        )
    return "".join(line + "\n" for line in lines)


def run_benchmark(config: Mapping[str, Any], stream=None, grid_files: GridFiles = GridFiles()) -> int:
    """Run the benchmark a configuration describes; returns the process exit code.

    Parameters
    ----------
    config : mapping
        The settings of :class:`~harness.run.settings.RunSettings` (a missing
        one takes its default), with the grid under ``grid``.
    stream : file-like, optional
        Where messages go (default: standard output).
    grid_files : GridFiles
        Where the grids that ``include`` names are looked up (default: the
        built-in grids; the entry point passes Hydra's search path).

    Returns
    -------
    int
        0 success, 1 some shards failed, 2 the run could not start (every
        problem printed), 130 interrupted (finished shards kept).
    """
    stream = stream or sys.stdout
    checked = preflight(config, grid_files)
    if checked.problems:
        stream.write(cannot_start_message(checked.problems))
        return 2
    settings, plan = checked.settings, checked.plan
    cells = plan.cells
    batch_size = settings.batch_size
    if batch_size == "auto":
        device_type = resolve_device(settings.device).type
        # One shard size for the whole run: the smallest of its data sets' (of all of them when it only trains).
        batch_size = min(DATASETS[name].batch_size(device_type) for name in {cell.dataset for cell in cells} or DATASETS)
    shards = sum(len(cell.shards(batch_size)) for cell in cells)
    examples = sum(cell.n_examples for cell in cells)
    per_model = defaultdict(int)
    for cell in cells:
        per_model[cell.model] += 1
    plugins = f"plugins {', '.join(checked.plugins)}; " if checked.plugins else ""
    stream.write(
        f"grid {config['grid'].get('name')}: {len(cells)} cells, {shards} shards, {examples} examples "
        f"({', '.join(f'{m}: {n}' for m, n in sorted(per_model.items()))}); executor {settings.executor.value}; "
        f"{plugins}batch size {batch_size}; results in {settings.results_dir}\n"
    )
    if plan.skipped_models:
        stream.write(f"skipped (no weights; the grid has skip_missing_weights): {', '.join(plan.skipped_models)}\n")
    for request in plan.training:
        details = "".join(
            f", {name} {value}" for name, value in (("epochs", request.epochs), ("train_examples", request.train_examples)) if value
        )
        stream.write(f"to train first: {request.model} (recipe {zoo.model_spec(request.model).recipe}{details})\n")
    if plan.weights_to_fetch or plan.data_to_fetch:
        stream.write(f"to download first: {', '.join([*plan.weights_to_fetch, *map(str, plan.data_to_fetch)])}\n")
    if settings.dry_run:
        return 0
    problems = fetch(plan, settings) + data_problems(plan, settings) if plan.weights_to_fetch or plan.data_to_fetch else []
    if problems:
        stream.write(cannot_start_message(problems))
        return 2
    # Training and attacks share one Ray: it starts once.
    shared_ray = settings.executor is Executor.RAY and plan.training and cells
    with ray_session(settings.ray) if shared_ray else contextlib.nullcontext():
        return _train_and_run(settings, plan, batch_size, stream)


def _train_and_run(settings: RunSettings, plan: Plan, batch_size: int, stream) -> int:
    if plan.training:
        from ..train import TrainingDiverged

        def report_training(model: str, record: dict) -> None:
            stream.write(
                f"trained {model}: {100 * record['clean_accuracy']:.2f}% clean after {record['epochs']} epochs, "
                f"{record['seconds']:.0f} s on {record['device']}; record "
                f"{zoo.trained_weights_path(model, settings.weights_dir).with_suffix('.json')}\n"
            )

        common = {
            "data_root": settings.data_root, "weights_dir": settings.weights_dir, "device": settings.device,
            "download": settings.download,
        }
        requests = [
            (request.model, {**common, "epochs": request.epochs, "train_examples": request.train_examples})
            for request in plan.training
        ]
        try:
            train_models(requests, settings.executor, settings.ray, settings.plugins, report_training)
        except TrainingDiverged as error:
            stream.write(f"training failed: {error}\n")
            return 1
    if not plan.cells:
        if plan.skipped_models or not plan.training:
            stream.write("nothing to attack: no model of the grid has weights (train them, or pass train_missing=true)\n")
        return 0
    context = RunContext(
        data_root=settings.data_root,
        results_dir=settings.results_dir,
        weights_dir=settings.weights_dir,
        device=settings.device,
        download=settings.download,
        gallery_examples=settings.gallery_examples,
        verify_workers=None if settings.verify_workers == "auto" else settings.verify_workers,
    )
    try:
        report = run_cells(plan.cells, context, batch_size, settings.executor, settings.ray, plugins=settings.plugins)
    except KeyboardInterrupt:
        stream.write("\ninterrupted: finished shards are on disk; run the same command again to resume\n")
        return 130
    stream.write(
        f"{report.shards_run} shards run, {report.shards_skipped} already done, {len(report.failures)} failed, "
        f"{report.retries} retried, {report.replaced_actors} workers replaced, "
        f"{report.seconds:.1f} s\n{_summary(report)}\n{_suite_summary(plan.cells, context.results_dir)}"
    )
    for what, error in report.failures.items():
        stream.write(f"{what} failed: {error}\n")
    return 1 if report.failures else 0
