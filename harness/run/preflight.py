"""Everything a benchmark checks before it starts: one call, every problem.

:func:`preflight` takes the composed configuration (the settings of
:class:`~harness.run.settings.RunSettings`, the grid under ``grid``) and
checks, in order: the plugins (imported first, since they register the
models and solvers a grid names), the settings (their types and declared
ranges, then whether this machine has the device), the grid (its includes,
blocks and cells), that the certifiers can read the models of certify cells,
the run's plan (:func:`~harness.run.plan.plan_run`: the weights and data it
needs are there or will be downloaded, each cell's ``n_examples`` fits its
test split), that the results folder can be created and written, and, for
the Ray executor with an address, that a cluster answers there. Each check
is cheap or bounded by a short timeout, so a bad configuration is refused in
seconds instead of failing after the attacks have run. Nothing here decides
what the run does (the plan does) or downloads anything
(:func:`~harness.run.plan.fetch` does, once every check has passed).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import torch

import zoo

from ..data import load_dataset
from .cells import Cell
from .grid import GridError, expand_blocks
from .grid_files import GridFileError, GridFiles, grid_blocks
from .plan import Plan, has_weights, plan_run, training_requests
from .scheduler import Executor
from .settings import RAY_ADDRESSES, RunSettings, check_settings

__all__ = ["Preflight", "cannot_start_message", "data_problems", "preflight", "select_models"]

CLUSTER_PROBE_SECONDS = 3.0
"""How long the probe of a Ray address waits for a TCP connection."""

_RAY_CLIENT_PORT = 10001  # Ray's default for ray://host without a port
_NO_CLUSTER_ADVICE = "start one with `ray start --head` (then ray.address=auto), or leave ray.address null for an embedded Ray"
_GRID_INPUTS = {"n_examples", "seed", "models"}
"""Settings the grid's cells are made with: while one is bad, the grid is not expanded."""
_PLAN_INPUTS = {"weights_dir", "download", "train_missing", "data_root"}
"""Settings the plan is made with: while one is bad, the plan is neither made nor checked."""


@dataclass(frozen=True)
class Preflight:
    """What :func:`preflight` found.

    Attributes
    ----------
    settings : RunSettings
        The settings (a bad one replaced by its default: use them only when
        there are no problems).
    plan : Plan or None
        What the run trains, skips, downloads and attacks (None when the
        grid or the settings it depends on have problems).
    plugins : list of str
        The plugins in effect, as :func:`zoo.import_plugins` names them.
    problems : list of str
        Every reason the run cannot start; empty when it can.
    """

    settings: RunSettings
    plan: Plan | None
    plugins: list[str]
    problems: list[str]


def cannot_start_message(problems: Sequence[str]) -> str:
    """The text printed when a run is refused: a heading, then one problem a line."""
    return "The benchmark cannot start:\n  " + "\n  ".join(problems) + "\n"


def select_models(blocks: list[dict], models: Any) -> tuple[list[dict], list[str]]:
    """The blocks with their models replaced by ``models`` (the ``models=[...]`` setting), and the problems.

    Each block takes the models of ``models`` that classify its data set; a
    block left with none is dropped. ``models`` None keeps the grid's own.
    """
    if models is None:
        return blocks, []
    if isinstance(models, str):
        models = [models]
    registered = {spec.name: spec for spec in zoo.models()}
    unknown = [name for name in models if name not in registered]
    if unknown:
        return blocks, [f"models: {', '.join(map(repr, unknown))} not registered; registered: {', '.join(sorted(registered))}"]
    selected, used = [], set()
    for block in blocks:
        chosen = [name for name in models if registered[name].dataset.value in _as_list(block.get("dataset"))]
        if chosen:
            selected.append({**block, "model": chosen})
            used.update(chosen)
    unused = [name for name in models if name not in used]
    if unused:
        datasets = sorted({value for block in blocks for value in _as_list(block.get("dataset"))})
        return blocks, [
            f"models: {', '.join(map(repr, unused))} classify no data set of this grid ({', '.join(datasets)})"
        ]
    return selected, []


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def preflight(config: Mapping[str, Any], grid_files: GridFiles = GridFiles()) -> Preflight:
    """Check a benchmark configuration; return its settings, its plan and every problem found.

    Parameters
    ----------
    config : mapping
        The settings of :class:`~harness.run.settings.RunSettings` (a missing
        one takes its default), with the grid (``name``, ``blocks``,
        ``include``, ...) under ``grid``.
    grid_files : GridFiles
        Where the grids that ``include`` names are looked up (default: the
        built-in grids).

    Returns
    -------
    Preflight
        The settings, the plan, the plugins in effect, and the problems: a
        run may start only when there are none. Nothing is attacked,
        downloaded or left behind (the results folder is created to probe
        it, then removed again if it was not there).
    """
    problems: list[str] = []
    plugins: list[str] = []
    try:
        plugins = zoo.import_plugins(config.get("plugins") or [])
    except zoo.PluginError as error:
        problems.append(str(error))
    settings, setting_problems = check_settings(config)
    problems += setting_problems.values()
    joins_cluster = settings.executor is Executor.RAY and settings.ray.address is not None
    if not joins_cluster and "device" not in setting_problems:
        # A cluster's GPUs are not this machine's: only shards run here need CUDA here.
        problems += _device_problems(settings.device)
    grid = config.get("grid")
    cells: list[Cell] | None = None
    if not isinstance(grid, Mapping):
        problems.append(f"no grid is given: choose one with grid=NAME; grids: {', '.join(grid_files.names())}")
    elif not _GRID_INPUTS & setting_problems.keys():
        try:
            blocks, model_problems = select_models(grid_blocks(grid, grid_files), settings.models)
            problems += model_problems
            if not model_problems:
                cells = expand_blocks(blocks, {"n_examples": settings.n_examples, "seed": settings.seed})
        except (GridFileError, GridError) as error:
            problems.append(str(error))
        problems += training_requests(grid)[1]
    plan = None
    if cells is not None:
        for kind in {type(cell) for cell in cells}:
            problems += kind.problems_before_run([cell for cell in cells if type(cell) is kind])
        if not _PLAN_INPUTS & setting_problems.keys():
            plan = plan_run(grid, cells, settings)
            problems += _weights_problems(plan, settings) + data_problems(plan, settings)
    if "results_dir" not in setting_problems:
        problems += _results_dir_problems(settings.results_dir)
    if joins_cluster:
        problems += _cluster_problems(settings.ray.address)
    return Preflight(settings, plan, plugins, problems)


def _device_problems(device: str) -> list[str]:
    """Problems of a well-formed device on this machine: CUDA asked for where there is none, or not that many."""
    if not device.startswith("cuda"):
        return []
    if not torch.cuda.is_available():
        return [f"device={device!r} is not available: this machine has no CUDA device; allowed here: auto, cpu"]
    count = torch.cuda.device_count()
    _, _, index = device.partition(":")
    if index and int(index) >= count:
        return [
            f"device={device!r} does not exist: this machine has {count} CUDA device(s); "
            f"allowed: auto, cpu, cuda, cuda:N for N from 0 to {count - 1}"
        ]
    return []


def _weights_problems(plan: Plan, settings: RunSettings) -> list[str]:
    """Models the plan attacks whose weights will not be there: untrained, unpublished, or missing and not to be downloaded."""
    problems = []
    for name in sorted({cell.model for cell in plan.cells} - plan.models_to_train):
        spec = zoo.model_spec(name)
        if spec.recipe is not None:
            if not has_weights(spec, settings.weights_dir, settings.download):
                problems.append(
                    f"model {name!r} has no trained weights yet ({zoo.trained_weights_path(spec, settings.weights_dir)}): pass "
                    f"train_missing=true to train it first (recipe {spec.recipe}), or run python -m harness.train {name}"
                )
            continue
        if spec.weights is None:
            problems.append(f"model {name!r} has no published weights in the zoo ({spec.training}); drop it from the grid")
            continue
        path = zoo.weights_path(spec, settings.weights_dir)
        if path.is_file() or name in plan.weights_to_fetch:
            continue
        if spec.weights.url is None:
            problems.append(
                f"model {name!r}: weights file {path} is missing and has no public URL; copy it into that folder, "
                "pass weights_dir=FOLDER, or set WASSERSTEIN_BENCH_WEIGHTS"
            )
        else:
            problems.append(
                f"model {name!r}: weights file {path} is missing (public URL {spec.weights.url}); "
                "pass weights_dir=FOLDER, set WASSERSTEIN_BENCH_WEIGHTS, or download=true"
            )
    return problems


def data_problems(plan: Plan, settings: RunSettings) -> list[str]:
    """Problems of the data the plan reads: a split missing and not to be downloaded, or fewer test images than a cell asks.

    A split the plan downloads is checked once it is there: run this again after :func:`~harness.run.plan.fetch`.
    """
    problems = []
    for split in plan.data_needed:
        try:
            _, labels = load_dataset(split.dataset, settings.data_root, train=split.train)
        except FileNotFoundError as error:
            if split not in plan.data_to_fetch:
                training = f" (training split, to train {', '.join(sorted(plan.models_to_train))})" if split.train else ""
                problems.append(f"data set {split.dataset!r}{training}: {error}")
            continue
        except ValueError as error:
            problems.append(f"data set {split}: {error}")
            continue
        if split.train:
            continue
        size = len(labels)
        too_many = sorted({cell.n_examples for cell in plan.cells if cell.dataset == split.dataset and cell.n_examples > size})
        if too_many:
            problems.append(
                f"data set {split.dataset!r}: its test split (in {settings.data_root}) has {size} images, fewer than "
                f"n_examples={', '.join(map(str, too_many))}; allowed: n_examples from 1 to {size}"
            )
    return problems


def _results_dir_problems(results_dir: str) -> list[str]:
    """Create the results folder and write a hidden file in it, so that a run cannot fail at its first write."""
    folder = Path(results_dir)
    created = []  # deepest first
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        created.append(candidate)
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return [f"results_dir={results_dir!r} cannot be created and written: {error}; give a folder you can write to"]
    finally:
        # A refused run leaves nothing behind; the run itself creates the folder at its first write.
        for folder_made_here in created:
            try:
                folder_made_here.rmdir()
            except OSError:
                break
    return []


def _cluster_problems(address: str) -> list[str]:
    """Problems of a Ray address: malformed, or nothing answers there within :data:`CLUSTER_PROBE_SECONDS`.

    ``ray.init`` against an address where nothing listens retries for
    minutes, printing connection warnings; a TCP connect tells in seconds.
    """
    target = address
    if address == "auto":
        target = _current_cluster_address()
        if target is None:
            return [
                "ray.address='auto' found no running cluster: RAY_ADDRESS is not set and no cluster was "
                f"started on this machine; {_NO_CLUSTER_ADVICE}"
            ]
    shown = repr(address) if target == address else f"'auto' (resolved to {target!r})"
    host_port = _host_and_port(target)
    if host_port is None:
        return [f"ray.address={shown} is invalid: it must be {RAY_ADDRESSES}"]
    host, port = host_port
    try:
        with socket.create_connection((host, port), timeout=CLUSTER_PROBE_SECONDS):
            return []
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else str(error)
        return [f"ray.address={shown}: nothing answers at {host}:{port} ({reason}); {_NO_CLUSTER_ADVICE}"]


def _current_cluster_address() -> str | None:
    """The address ``ray.init(address="auto")`` would join: ``RAY_ADDRESS``, else the last ``ray start``'s.

    ``ray.init`` documents where the last ``ray start`` records its address:
    ``ray_current_cluster`` in Ray's temporary folder (``$RAY_TMPDIR/ray``,
    else ``$TMPDIR/ray``, else ``/tmp/ray``).
    """
    from_environment = os.environ.get("RAY_ADDRESS")
    if from_environment and from_environment != "auto":
        return from_environment
    temporary = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        return (Path(temporary) / "ray" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def _host_and_port(address: str) -> tuple[str, int] | None:
    """``host:port`` or ``ray://host[:port]`` split into its host and port (None when malformed)."""
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "ray"):
        return None
    try:
        parts = urlsplit(f"//{rest}")
        port = parts.port
    except ValueError:
        return None
    if parts.hostname is None or parts.path or parts.query or parts.fragment:
        return None
    if port is None:
        if scheme != "ray":
            return None
        port = _RAY_CLIENT_PORT
    return parts.hostname, port
