"""The main job behind ``run_benchmark.py``: grid in, Parquet results out.

:func:`run_benchmark` takes the composed configuration as a plain mapping
(Hydra's, or one built in a test) and does, in order: check it
(:func:`~harness.run.preflight.preflight`: plugins, settings, grid, weights,
data, results folder, Ray cluster), print the plan, run the shards, print a
summary. Nothing is scheduled before every check has passed; all problems
are reported together. The report is not this module's business: the entry
point (``run_benchmark.py``) writes it after the run.
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
from .cells import Cell
from .kinds import SuiteCell
from .preflight import cannot_start_message, preflight
from ..provenance import resolve_device
from .runner import RunContext, default_batch_size
from .scheduler import Executor, RunReport, ray_session, run_cells, train_models
from .store import Table, read_table

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
        examples = read_table(results_dir, Table.EXAMPLES, filters=[("cell_id", "==", cell.cell_id)]).drop_duplicates("example_index")
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


def run_benchmark(config: Mapping[str, Any], stream=None) -> int:
    """Run the benchmark a configuration describes; returns the process exit code.

    ``config`` holds the keys of ``conf/config.yaml`` with the grid under
    ``grid``. Exit codes: 0 success, 1 some shards failed, 2 the run could not
    start (every problem printed), 130 interrupted (finished shards kept).
    Messages go to ``stream`` (default: standard output).
    """
    stream = stream or sys.stdout
    checked = preflight(config)
    if checked.problems:
        stream.write(cannot_start_message(checked.problems))
        return 2
    cells = checked.cells
    batch_size = config.get("batch_size", "auto")
    if batch_size == "auto":
        batch_size = default_batch_size(resolve_device(str(config["device"])))
    shards = sum(len(cell.shards(batch_size)) for cell in cells)
    examples = sum(cell.n_examples for cell in cells)
    per_model = defaultdict(int)
    for cell in cells:
        per_model[cell.model] += 1
    plugins = f"plugins {', '.join(checked.plugins)}; " if checked.plugins else ""
    stream.write(
        f"grid {config['grid'].get('name')}: {len(cells)} cells, {shards} shards, {examples} examples "
        f"({', '.join(f'{m}: {n}' for m, n in sorted(per_model.items()))}); executor {config['executor']}; "
        f"{plugins}batch size {batch_size}; results in {config['results_dir']}\n"
    )
    if checked.skipped_models:
        stream.write(f"skipped (no weights; the grid has skip_missing_weights): {', '.join(checked.skipped_models)}\n")
    for request in checked.training:
        settings = "".join(
            f", {name} {value}" for name, value in (("epochs", request.epochs), ("train_examples", request.train_examples)) if value
        )
        stream.write(f"to train first: {request.model} (recipe {zoo.model_spec(request.model).recipe}{settings})\n")
    if config.get("dry_run"):
        return 0
    executor = Executor(config["executor"])
    # Training and attacks share one Ray: it starts once.
    session = ray_session(checked.ray_options) if executor is Executor.RAY and checked.training and cells else contextlib.nullcontext()
    with session:
        return _train_and_run(config, checked, cells, batch_size, executor, stream)


def _train_and_run(config, checked, cells, batch_size: int, executor: Executor, stream) -> int:
    if checked.training:
        from ..train import TrainingDiverged

        def report_training(model: str, record: dict) -> None:
            stream.write(
                f"trained {model}: {100 * record['clean_accuracy']:.2f}% clean after {record['epochs']} epochs, "
                f"{record['seconds']:.0f} s on {record['device']}; record "
                f"{zoo.trained_weights_path(model, config.get('weights_dir')).with_suffix('.json')}\n"
            )

        common = {
            "data_root": str(config["data_root"]), "weights_dir": config.get("weights_dir"), "device": str(config["device"]),
            "download": bool(config.get("download")),
        }
        requests = [
            (request.model, {**common, "epochs": request.epochs, "train_examples": request.train_examples})
            for request in checked.training
        ]
        try:
            train_models(requests, executor, checked.ray_options, config.get("plugins") or [], report_training)
        except TrainingDiverged as error:
            stream.write(f"training failed: {error}\n")
            return 1
    if not cells:
        if checked.skipped_models or not checked.training:
            stream.write("nothing to attack: no model of the grid has weights (train them, or pass train_missing=true)\n")
        return 0
    context = RunContext(
        data_root=str(config["data_root"]),
        results_dir=str(config["results_dir"]),
        weights_dir=config.get("weights_dir"),
        device=str(config["device"]),
        download=bool(config.get("download")),
        gallery_examples=config.get("gallery_examples", 8),
        verify_workers=None if config.get("verify_workers", "auto") == "auto" else config["verify_workers"],
    )
    try:
        report = run_cells(
            cells, context, batch_size, executor, checked.ray_options,
            plugins=config.get("plugins") or [],
        )
    except KeyboardInterrupt:
        stream.write("\ninterrupted: finished shards are on disk; run the same command again to resume\n")
        return 130
    stream.write(
        f"{report.shards_run} shards run, {report.shards_skipped} already done, {len(report.failures)} failed, "
        f"{report.retries} retried, {report.replaced_actors} workers replaced, "
        f"{report.seconds:.1f} s\n{_summary(report)}\n{_suite_summary(cells, context.results_dir)}"
    )
    for what, error in report.failures.items():
        stream.write(f"{what} failed: {error}\n")
    return 1 if report.failures else 0
