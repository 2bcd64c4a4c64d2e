"""The command line: ``wasserstein-bench grid=NAME key=value ...`` (also ``python -m harness`` and ``python run_benchmark.py``).

Hydra composes the settings' defaults (:class:`~harness.run.settings.RunSettings`,
registered as the ``run_settings`` node) with the grid (``grid=NAME``, one
of the package's ``harness/conf/grid/*.yaml`` or of a folder of the user's
added by ``--config-dir DIR``) and the command line's overrides
(``n_examples=200 results_dir=out ray.address=auto``). The grid runs
(:func:`harness.run.benchmark.run_benchmark`), then the report is written
over everything in the results folder. Rerunning the same command resumes
an interrupted run.

A grid name that has no file is refused here, with the names there are,
before Hydra composes (Hydra's own error only points at its traceback
option) and before torch is imported.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping, Sequence

from .run.grid_files import CONFIG_PACKAGE, GridFiles

__all__ = ["main", "run_and_report", "unknown_choices"]

_GRID_CHOICE = re.compile(r"\+{0,2}grid=(.*)")
# Options that add configuration folders, whose grids are Hydra's to find.
_SEARCH_PATH_OPTIONS = ("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")


def unknown_choices(arguments: Sequence[str], grid_files: GridFiles = GridFiles()) -> list[str]:
    """Problems of the ``grid=NAME`` / ``+grid=NAME`` arguments naming no grid file.

    Parameters
    ----------
    arguments : sequence of str
        The command line after the program's name.
    grid_files : GridFiles
        The grids there are (default: the built-in ones).

    Returns
    -------
    list of str
        One problem per unknown name, listing the names available; empty
        when every choice exists or the command line adds configuration
        folders of its own.
    """
    if any(argument.lstrip("+").startswith(_SEARCH_PATH_OPTIONS) for argument in arguments):
        return []
    available = grid_files.names()
    problems = []
    for argument in arguments:
        match = _GRID_CHOICE.fullmatch(argument)
        if match is None:
            continue
        # A comma-separated value is a multirun sweep over several grids.
        for name in match.group(1).split(","):
            if name not in available:
                problems.append(
                    f"grid={name!r} does not exist; grid choices: {', '.join(available)} "
                    "(a grid of your own: DIR/grid/NAME.yaml, run with --config-dir DIR)"
                )
    return problems


def run_and_report(config: Mapping[str, Any], stream=None, grid_files: GridFiles = GridFiles()) -> int:
    """The main job: run the grid (:func:`harness.run.benchmark.run_benchmark`), then write
    ``leaderboard.html`` and the figures over everything in the results folder
    (:func:`harness.report.write_report`) unless ``report`` is false; returns the exit code."""
    # Imported here, not at the top, so that a mistyped grid is refused without waiting for torch.
    from .report import ReportError, write_report
    from .run.benchmark import run_benchmark
    from .run.settings import check_settings

    stream = stream or sys.stdout
    # Plugin modules live where the user runs, which is not on the path of an installed script.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    code = run_benchmark(config, stream, grid_files)
    settings, _ = check_settings(config)  # good settings, since the run started
    if code in (0, 1) and not settings.dry_run and settings.report:
        try:
            page = write_report(settings.results_dir)
            stream.write(f"leaderboard: {page}\nfigures: {page.parent / 'figures'}\n")
        except ReportError as error:
            stream.write(f"no report: {error}\n")
    return code


def _grid_files_on_hydras_search_path() -> GridFiles:
    """The configuration folders Hydra composed from, in its order, as :class:`GridFiles`."""
    import importlib.resources
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    folders = []
    for source in HydraConfig.get().runtime.config_sources:
        if source.schema == "file":
            folders.append(Path(source.path))
        elif source.schema == "pkg":
            folders.append(importlib.resources.files(source.path.replace("/", ".")))
    return GridFiles(tuple(folders))


def main() -> None:
    """The console script: refuse unknown grid names, register the settings' defaults, hand the command line to Hydra."""
    problems = unknown_choices(sys.argv[1:])
    if problems:
        # The heading of every refused run (harness.run.preflight), written without importing torch.
        sys.stdout.write("The benchmark cannot start:\n  " + "\n  ".join(problems) + "\n")
        sys.exit(2)
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    from .run.settings import hydra_defaults

    ConfigStore.instance().store(name="run_settings", node=hydra_defaults())

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")
    def run(config: DictConfig) -> None:
        code = run_and_report(OmegaConf.to_container(config, resolve=True), grid_files=_grid_files_on_hydras_search_path())
        if code:
            sys.exit(code)

    run()
