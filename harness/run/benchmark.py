"""The main job behind ``run_benchmark.py``: grid in, Parquet results out.

:func:`run_benchmark` takes the composed configuration as a plain mapping
(Hydra's, or one built in a test) and does, in order: resolve the grid's
blocks (with its ``include`` s), expand and validate them, check that every
model's weights and every data set are there, print the plan, run the
shards, print a summary, write the figures and ``leaderboard.html``
(:mod:`harness.report`) over everything in the results folder. Nothing is
scheduled before every check has passed; all problems are reported together.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import zoo

from ..attack.pgd import EpsSchedule
from ..data import load_dataset
from .grid import Cell, GridError, expand_blocks
from .runner import RunContext
from .scheduler import Executor, RayOptions, RunReport, run_cells

__all__ = ["BenchmarkError", "grid_blocks", "preflight", "run_benchmark"]

GRID_DIR = Path(__file__).resolve().parents[2] / "conf" / "grid"


class BenchmarkError(ValueError):
    """The run cannot start; the message lists every problem."""


def grid_blocks(grid: Mapping[str, Any], grid_dir: Path = GRID_DIR, _seen: tuple[str, ...] = ()) -> list[dict]:
    """The blocks of a grid, those of the grids it includes first (each grid once)."""
    unknown = sorted(set(grid) - {"name", "description", "blocks", "include"})
    if unknown:
        raise BenchmarkError(f"grid {grid.get('name')!r}: unknown key(s) {unknown}; allowed: name, description, blocks, include")
    blocks: list[dict] = []
    for name in grid.get("include") or []:
        if name in _seen:
            continue
        path = grid_dir / f"{name}.yaml"
        if not path.is_file():
            available = sorted(p.stem for p in grid_dir.glob("*.yaml"))
            raise BenchmarkError(f"grid {grid.get('name')!r} includes {name!r}, which does not exist; grids: {', '.join(available)}")
        from omegaconf import OmegaConf

        included = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        blocks += grid_blocks(included, grid_dir, _seen + (name,))
        _seen += (name,)
    blocks += [dict(block) for block in grid.get("blocks") or []]
    if not blocks:
        raise BenchmarkError(f"grid {grid.get('name')!r} has no blocks and includes none")
    return blocks


def preflight(cells: list[Cell], data_root: str, weights_dir: str | None, download: bool) -> list[str]:
    """Problems that would stop the run midway: missing weights files, missing data."""
    problems = []
    for name in sorted({cell.model for cell in cells}):
        spec = zoo.model_spec(name)
        if spec.weights is None:
            problems.append(f"model {name!r} has no published weights in the zoo ({spec.training}); drop it from the grid")
            continue
        path = zoo.weights_path(spec, weights_dir)
        if path.is_file():
            continue
        if not download:
            problems.append(
                f"model {name!r}: weights file {path} is missing (public URL {spec.weights.url}); "
                "pass weights_dir=FOLDER, set WASSERSTEIN_BENCH_WEIGHTS, or download=true"
            )
            continue
        try:  # fetched (and hash-checked) once here, not by every worker at once
            zoo.model(name, weights_dir=weights_dir, download=True)
        except (OSError, ValueError) as error:
            problems.append(f"model {name!r}: {error}")
    for dataset in sorted({cell.dataset for cell in cells}):
        try:
            load_dataset(dataset, data_root, download=download)
        except (FileNotFoundError, ValueError) as error:
            problems.append(f"data set {dataset!r}: {error}")
    return problems


def _check_settings(config: Mapping[str, Any]) -> list[str]:
    problems = []
    executors = [e.value for e in Executor]
    if config.get("executor") not in executors:
        problems.append(f"executor={config.get('executor')!r} is invalid; allowed: {', '.join(executors)}")
    batch = config.get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        problems.append(f"batch_size={batch!r} is invalid: it must be an integer >= 1")
    device = str(config.get("device"))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        problems.append(f"device={device!r} is invalid; allowed: auto, cpu, cuda, cuda:N")
    gallery = config.get("gallery_examples", 8)
    if isinstance(gallery, bool) or not isinstance(gallery, int) or gallery < 0:
        problems.append(f"gallery_examples={gallery!r} is invalid: it must be an integer >= 0")
    if not config.get("results_dir"):
        problems.append("results_dir is empty: give the folder the results go to")
    if not config.get("data_root"):
        problems.append("data_root is empty: give the folder that holds the data sets (or set DATA_ROOT)")
    return problems


def _summary(report: RunReport) -> str:
    lines = [f"{'model':<30} {'threat':<12} {'solver':<24} {'k':>2} {'p':>3} {'lambda':>6} {'n':>5} {'clean':>7} {'robust':>7} {'at eps':>7}"]
    for row in sorted(report.cells, key=lambda r: r["config_json"]):
        settings = json.loads(row["config_json"])
        schedule = EpsSchedule(settings["eps_initial"], settings["eps_factor"], settings["eps_every"], settings["iterations"])
        robust = row["robust_accuracy"]
        solver = str(settings["solver"] or "-") + (" +clamp" if settings["clamp"] else "")
        lines.append(
            f"{settings['model']:<30} {settings['threat_model']:<12} {solver:<24} "
            f"{settings['kernel_size'] or '-':>2} {settings['p'] or '-':>3} {settings['lam'] or '-':>6} {row['n_examples']:>5} "
            f"{100 * row['clean_accuracy']:>6.2f}% {'-' if robust is None or math.isnan(robust) else f'{100 * robust:.1f}%':>7} {schedule.final_eps:>7.3g}"
        )
    return "\n".join(lines)


def run_benchmark(config: Mapping[str, Any], stream=None) -> int:
    """Run the benchmark a configuration describes; returns the process exit code.

    ``config`` holds the keys of ``conf/config.yaml`` with the grid under
    ``grid``. Exit codes: 0 success, 1 some shards failed, 2 the run could not
    start (every problem printed), 130 interrupted (finished shards kept).
    Messages go to ``stream`` (default: standard output).
    """
    stream = stream or sys.stdout
    problems = _check_settings(config)
    cells: list[Cell] = []
    try:
        blocks = grid_blocks(config["grid"])
        cells = expand_blocks(blocks, {"n_examples": config.get("n_examples"), "seed": config.get("seed")})
    except (BenchmarkError, GridError) as error:
        problems.append(str(error))
    if cells:
        problems += preflight(cells, config["data_root"], config.get("weights_dir"), bool(config.get("download")))
    if problems:
        stream.write("The benchmark cannot start:\n  " + "\n  ".join(problems) + "\n")
        return 2
    shards = sum(len(cell.shards(config["batch_size"])) for cell in cells)
    examples = sum(cell.n_examples for cell in cells)
    per_model = defaultdict(int)
    for cell in cells:
        per_model[cell.model] += 1
    stream.write(
        f"grid {config['grid'].get('name')}: {len(cells)} cells, {shards} shards, {examples} examples "
        f"({', '.join(f'{m}: {n}' for m, n in sorted(per_model.items()))}); executor {config['executor']}; "
        f"results in {config['results_dir']}\n"
    )
    if config.get("dry_run"):
        return 0
    context = RunContext(
        data_root=str(config["data_root"]),
        results_dir=str(config["results_dir"]),
        weights_dir=config.get("weights_dir"),
        device=str(config["device"]),
        download=bool(config.get("download")),
        gallery_examples=config.get("gallery_examples", 8),
    )
    ray_settings = dict(config.get("ray") or {})
    options = RayOptions(**{k: v for k, v in ray_settings.items() if v is not None})
    try:
        report = run_cells(cells, context, config["batch_size"], Executor(config["executor"]), options)
    except KeyboardInterrupt:
        stream.write("\ninterrupted: finished shards are on disk; run the same command again to resume\n")
        return 130
    stream.write(
        f"{report.shards_run} shards run, {report.shards_skipped} already done, {len(report.failures)} failed, "
        f"{report.retries} retried, {report.replaced_actors} workers replaced, "
        f"{report.seconds:.1f} s\n{_summary(report)}\n"
    )
    for what, error in report.failures.items():
        stream.write(f"{what} failed: {error}\n")
    if config.get("report", True):
        from ..report import ReportError, write_report

        try:
            page = write_report(context.results_dir)
            stream.write(f"leaderboard: {page}\nfigures: {page.parent / 'figures'}\n")
        except ReportError as error:
            stream.write(f"no report: {error}\n")
    return 1 if report.failures else 0
