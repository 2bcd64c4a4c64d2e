"""Run a benchmark grid: ``python run_benchmark.py grid=full``.

Hydra composes ``conf/config.yaml`` with the grid (``grid=NAME``, one of
``conf/grid/*.yaml``) and the executor (``executor=ray|local``); any setting
can be overridden on the command line (``n_examples=200 results_dir=out
ray.address=auto``). Results land in ``results_dir`` as Parquet (see
``harness.run.store``); rerunning the same command resumes an interrupted run.

A grid or executor name that has no file is refused here, with the names
there are, before Hydra composes (Hydra's own error only points at its
traceback option).
"""

import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "conf"

_GROUP_CHOICE = re.compile(r"\+{0,2}(grid|executor)=(.*)")
# Options that add configuration folders, whose grids and executors are Hydra's to find.
_SEARCH_PATH_OPTIONS = ("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")


def unknown_choices(arguments: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Problems of the ``grid=NAME`` / ``+grid=NAME`` / ``executor=NAME`` arguments naming no file.

    Parameters
    ----------
    arguments : sequence of str
        The command line after the script name.
    config_dir : pathlib.Path
        The folder holding the ``grid/`` and ``executor/`` config groups.

    Returns
    -------
    list of str
        One problem per unknown name, listing the names available; empty
        when every choice exists or the command line adds configuration
        folders of its own.
    """
    if any(argument.lstrip("+").startswith(_SEARCH_PATH_OPTIONS) for argument in arguments):
        return []
    problems = []
    for argument in arguments:
        match = _GROUP_CHOICE.fullmatch(argument)
        if match is None:
            continue
        group, value = match.groups()
        available = sorted(path.stem for path in (config_dir / group).glob("*.yaml"))
        # A comma-separated value is a multirun sweep over several names.
        for name in value.split(","):
            if name not in available:
                problems.append(f"{group}={name!r} does not exist; {group} choices (conf/{group}/*.yaml): {', '.join(available)}")
    return problems


def run_and_report(config: Mapping[str, Any], stream=None) -> int:
    """The main job: run the grid (:func:`harness.run.benchmark.run_benchmark`), then write
    ``leaderboard.html`` and the figures over everything in the results folder
    (:func:`harness.report.write_report`) unless ``report`` is false; returns the exit code."""
    # Imported here, not at the top, so that a mistyped grid or executor is refused without waiting for torch.
    from harness.report import ReportError, write_report
    from harness.run.benchmark import run_benchmark

    stream = stream or sys.stdout
    # Python puts this script's folder on the path, not the one the user runs from, where plugin modules live.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    code = run_benchmark(config, stream)
    ran = code in (0, 1) and not config.get("dry_run")
    if ran and config.get("report", True):
        try:
            page = write_report(config["results_dir"])
            stream.write(f"leaderboard: {page}\nfigures: {page.parent / 'figures'}\n")
        except ReportError as error:
            stream.write(f"no report: {error}\n")
    return code


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(config: DictConfig) -> None:
    code = run_and_report(OmegaConf.to_container(config, resolve=True))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    problems = unknown_choices(sys.argv[1:])
    if problems:
        # The heading of every refused run (harness.run.preflight), written without importing the harness.
        sys.stdout.write("The benchmark cannot start:\n  " + "\n  ".join(problems) + "\n")
        sys.exit(2)
    main()
