"""Everything a benchmark checks before it starts: one call, every problem.

:func:`preflight` takes the composed configuration (the keys of
``conf/config.yaml``, the grid under ``grid``) and checks, in order: the
plugins (imported first, since they register the models and solvers a grid
names), the settings (executor, batch size, device, ``ray.*`` options), the
grid (its includes, blocks and cells), that the certifiers can read the
models of certify cells, the models' weights and the data sets
(each cell's ``n_examples`` against its test split), that the results folder
can be created and written, and, for the Ray executor with an address, that
a cluster answers there. Each check is cheap or bounded by a short timeout,
so a bad configuration is refused in seconds instead of failing after the
attacks have run.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import torch

import zoo

from ..data import DATASET_SHAPES, load_dataset
from .cells import Cell
from .grid import GridError, expand_blocks
from .scheduler import Executor, RayOptions

__all__ = ["GRID_DIR", "BenchmarkError", "Preflight", "TrainingRequest", "cannot_start_message", "grid_blocks", "preflight", "select_models"]

GRID_DIR = Path(__file__).resolve().parents[2] / "conf" / "grid"

CLUSTER_PROBE_SECONDS = 3.0
"""How long the probe of a Ray address waits for a TCP connection."""

_RAY_CLIENT_PORT = 10001  # Ray's default for ray://host without a port
_RAY_OPTIONS = tuple(field.name for field in dataclasses.fields(RayOptions))
_NO_CLUSTER_ADVICE = "start one with `ray start --head` (then ray.address=auto), or leave ray.address null for an embedded Ray"


def _grid_names(grid_dir: Path = GRID_DIR) -> str:
    return ", ".join(sorted(path.stem for path in grid_dir.glob("*.yaml")))


class BenchmarkError(ValueError):
    """The run cannot start; the message lists every problem."""


@dataclass(frozen=True)
class Preflight:
    """What :func:`preflight` found.

    Attributes
    ----------
    cells : list of Cell
        The grid's cells (empty when the grid itself has problems).
    plugins : list of str
        The plugins in effect, as :func:`zoo.import_plugins` names them.
    ray_options : RayOptions or None
        The ``ray.*`` settings (None when one of them is invalid).
    problems : list of str
        Every reason the run cannot start; empty when it can.
    """

    cells: list[Cell]
    plugins: list[str]
    ray_options: RayOptions | None
    problems: list[str]
    training: list["TrainingRequest"] = dataclasses.field(default_factory=list)
    """Models to train before the attacks: the grid's ``train`` list, and with ``train_missing`` its untrained models."""
    skipped_models: list[str] = dataclasses.field(default_factory=list)
    """Models a ``skip_missing_weights`` grid dropped for want of weights."""


@dataclass(frozen=True)
class TrainingRequest:
    """A model to train by its recipe before the run (see :func:`harness.train.train`)."""

    model: str
    epochs: int | None = None
    train_examples: int | None = None


def cannot_start_message(problems: Sequence[str]) -> str:
    """The text printed when a run is refused: a heading, then one problem a line."""
    return "The benchmark cannot start:\n  " + "\n  ".join(problems) + "\n"


def grid_blocks(grid: Mapping[str, Any], grid_dir: Path = GRID_DIR, _seen: tuple[str, ...] = ()) -> list[dict]:
    """The blocks of a grid, those of the grids it includes first (each grid once)."""
    unknown = sorted(set(grid) - set(_GRID_KEYS))
    if unknown:
        raise BenchmarkError(f"grid {grid.get('name')!r}: unknown key(s) {unknown}; allowed: {', '.join(_GRID_KEYS)}")
    blocks: list[dict] = []
    for name in grid.get("include") or []:
        if name in _seen:
            continue
        path = grid_dir / f"{name}.yaml"
        if not path.is_file():
            raise BenchmarkError(f"grid {grid.get('name')!r} includes {name!r}, which does not exist; grids: {_grid_names(grid_dir)}")
        from omegaconf import OmegaConf

        included = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        blocks += grid_blocks(included, grid_dir, _seen + (name,))
        _seen += (name,)
    blocks += [dict(block) for block in grid.get("blocks") or []]
    if not blocks and not grid.get("train"):
        raise BenchmarkError(f"grid {grid.get('name')!r} has no blocks, includes none and trains nothing")
    return blocks


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
    if not isinstance(models, (list, tuple)) or not models or not all(isinstance(name, str) for name in models):
        return blocks, [f"models={models!r} is invalid: give a list of registered model names, e.g. models=[mnist/standard]"]
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


_GRID_KEYS = ("name", "description", "blocks", "include", "train", "skip_missing_weights")


def _training_requests(grid: Mapping[str, Any]) -> tuple[list[TrainingRequest], list[str]]:
    """The grid's ``train`` list: model names, or mappings with ``model`` and optional ``epochs``, ``train_examples``."""
    requests, problems = [], []
    trainable = sorted(spec.name for spec in zoo.models() if spec.recipe is not None)
    for entry in grid.get("train") or []:
        settings = {"model": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, Mapping) else None
        if settings is None or set(settings) - {"model", "epochs", "train_examples"} or "model" not in settings:
            problems.append(
                f"train entry {entry!r} is invalid: give a model name, or model: NAME with optional epochs and train_examples"
            )
            continue
        if settings["model"] not in trainable:
            problems.append(f"train: model {settings['model']!r} has no recipe; models with recipes: {', '.join(trainable)}")
            continue
        for key in ("epochs", "train_examples"):
            if settings.get(key) is not None and not _is_integer(settings[key], 1):
                problems.append(f"train: {key}={settings[key]!r} of {settings['model']!r} is invalid: it must be an integer >= 1")
        requests.append(TrainingRequest(settings["model"], settings.get("epochs"), settings.get("train_examples")))
    return requests, problems


def _with_starting_models(requests: list[TrainingRequest], weights_dir: str | None, download: bool) -> list[TrainingRequest]:
    """``requests``, each preceded by the untrained recipe model its recipe fine-tunes (``init_from``), if any."""
    from ..train.recipes import recipe

    ordered: list[TrainingRequest] = []

    def add(request: TrainingRequest) -> None:
        if any(known.model == request.model for known in ordered):
            return
        start = recipe(zoo.model_spec(request.model).recipe).init_from
        if start is not None and zoo.model_spec(start).recipe is not None and not _has_weights(zoo.model_spec(start), weights_dir, download):
            add(next((known for known in requests if known.model == start), TrainingRequest(start)))
        ordered.append(request)

    for request in requests:
        add(request)
    return ordered


def _has_weights(spec: zoo.ModelSpec, weights_dir: str | None, download: bool) -> bool:
    if spec.recipe is not None:
        return zoo.trained_weights_path(spec, weights_dir).is_file() and zoo.training_record(spec, weights_dir) is not None
    if spec.weights is None:
        return False
    return zoo.weights_path(spec, weights_dir).is_file() or (download and spec.weights.url is not None)


def preflight(config: Mapping[str, Any]) -> Preflight:
    """Check a benchmark configuration; return its cells and every problem found.

    Parameters
    ----------
    config : mapping
        The keys of ``conf/config.yaml``, with the grid (``name``,
        ``blocks``, ``include``) under ``grid``.

    Returns
    -------
    Preflight
        The cells, the plugins in effect, the Ray options, and the problems:
        a run may start only when there are none. Nothing is attacked and no
        file is left behind (the results folder is created to probe it, then
        removed again if it was not there).
    """
    problems: list[str] = []
    plugins: list[str] = []
    try:
        plugins = zoo.import_plugins(config.get("plugins") or [])
    except zoo.PluginError as error:
        problems.append(str(error))
    ray_settings = config.get("ray")
    ray_options, ray_problems = _ray_options(ray_settings)
    problems += _settings_problems(config)
    problems += ray_problems
    address = ray_settings.get("address") if isinstance(ray_settings, Mapping) else None
    joins_cluster = config.get("executor") == Executor.RAY.value and isinstance(address, str) and bool(address)
    if not joins_cluster:
        # A cluster's GPUs are not this machine's: only shards run here need CUDA here.
        problems += _device_problems(config.get("device"))
    cells: list[Cell] = []
    grid = config.get("grid")
    if not isinstance(grid, Mapping):
        problems.append(f"no grid is given: choose one with grid=NAME; grids: {_grid_names()}")
    else:
        try:
            blocks, model_problems = select_models(grid_blocks(grid), config.get("models"))
            problems += model_problems
            if not model_problems:
                cells = expand_blocks(blocks, {"n_examples": config.get("n_examples"), "seed": config.get("seed")})
        except (BenchmarkError, GridError) as error:
            problems.append(str(error))
    for kind in {type(cell) for cell in cells}:
        problems += kind.problems_before_run([cell for cell in cells if type(cell) is kind])
    training: list[TrainingRequest] = []
    skipped: list[str] = []
    weights_dir, download = config.get("weights_dir"), bool(config.get("download"))
    if isinstance(grid, Mapping):
        training, training_problems = _training_requests(grid)
        problems += training_problems
        if cells and grid.get("skip_missing_weights"):
            train_missing = bool(config.get("train_missing"))
            keep = {
                name for name in {cell.model for cell in cells}
                if _has_weights(zoo.model_spec(name), weights_dir, download)
                or (train_missing and zoo.model_spec(name).recipe is not None)
            }
            skipped = sorted({cell.model for cell in cells} - keep)
            cells = [cell for cell in cells if cell.model in keep]
    if cells and config.get("train_missing"):
        requested = {request.model for request in training}
        for name in sorted({cell.model for cell in cells}):
            spec = zoo.model_spec(name)
            if spec.recipe is not None and name not in requested and not _has_weights(spec, weights_dir, download):
                training.append(TrainingRequest(name))
    training = _with_starting_models(training, weights_dir, download)
    if cells or training:
        problems += _weights_and_data_problems(
            cells, config.get("data_root"), weights_dir, download, {request.model for request in training}
        )
    if config.get("results_dir"):
        problems += _results_dir_problems(str(config["results_dir"]))
    if joins_cluster:
        problems += _cluster_problems(address)
    return Preflight(cells, plugins, ray_options, problems, training, skipped)


def _settings_problems(config: Mapping[str, Any]) -> list[str]:
    problems = []
    executors = [e.value for e in Executor]
    if config.get("executor") not in executors:
        problems.append(f"executor={config.get('executor')!r} is invalid; allowed: {', '.join(executors)}")
    batch = config.get("batch_size", "auto")
    if batch != "auto" and not _is_integer(batch, 1):
        problems.append(f"batch_size={batch!r} is invalid: it must be auto or an integer >= 1")
    workers = config.get("verify_workers", "auto")
    if workers != "auto" and not _is_integer(workers, 0):
        problems.append(f"verify_workers={workers!r} is invalid: it must be auto or an integer >= 0")
    gallery = config.get("gallery_examples", 8)
    if not _is_integer(gallery, 0):
        problems.append(f"gallery_examples={gallery!r} is invalid: it must be an integer >= 0")
    if not config.get("results_dir"):
        problems.append("results_dir is empty: give the folder the results go to")
    if not config.get("data_root"):
        problems.append("data_root is empty: give the folder that holds the data sets (or set DATA_ROOT)")
    return problems


def _is_integer(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= low


def _device_problems(device: Any) -> list[str]:
    name = str(device)
    if name in ("auto", "cpu"):
        return []
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        return [f"device={device!r} is invalid; allowed: auto, cpu, cuda, cuda:N"]
    if not torch.cuda.is_available():
        return [f"device={device!r} is not available: this machine has no CUDA device; allowed here: auto, cpu"]
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        return [
            f"device={device!r} does not exist: this machine has {count} CUDA device(s); "
            f"allowed: auto, cpu, cuda, cuda:N for N from 0 to {count - 1}"
        ]
    return []


def _ray_options(settings: Any) -> tuple[RayOptions | None, list[str]]:
    """The ``ray.*`` settings as :class:`RayOptions`, and the problems of each (all of them)."""
    if settings is None:
        return RayOptions(), []
    if not isinstance(settings, Mapping):
        return None, [f"ray={settings!r} is invalid: it must be a mapping of options ({', '.join(_RAY_OPTIONS)})"]
    problems = []
    unknown = sorted(set(settings) - set(_RAY_OPTIONS))
    if unknown:
        problems.append(
            f"unknown Ray option(s) {', '.join(f'ray.{name}' for name in unknown)}; "
            f"allowed: {', '.join(f'ray.{name}' for name in _RAY_OPTIONS)}"
        )
    default = RayOptions()
    address = settings.get("address", default.address)
    if address is not None and not (isinstance(address, str) and address):
        problems.append(f"ray.address={address!r} is invalid; allowed: null (an embedded Ray), auto, host:port, ray://host:port")
    gpus = settings.get("gpus_per_actor", default.gpus_per_actor)
    gpus_valid = not isinstance(gpus, bool) and isinstance(gpus, numbers.Real) and math.isfinite(gpus) and gpus > 0
    if not gpus_valid or (gpus > 1 and not float(gpus).is_integer()):
        # Ray takes a fraction of one GPU, or whole GPUs: 1.5 is refused when the actors start.
        problems.append(f"ray.gpus_per_actor={gpus!r} is invalid: it must be a number > 0 (a fraction up to 1, or a whole number)")
    cpus = settings.get("cpus_per_actor", default.cpus_per_actor)
    if not _is_integer(cpus, 1):
        problems.append(f"ray.cpus_per_actor={cpus!r} is invalid: it must be an integer >= 1")
    retries = settings.get("max_retries", default.max_retries)
    if not _is_integer(retries, 0):
        problems.append(f"ray.max_retries={retries!r} is invalid: it must be an integer >= 0")
    num_cpus = settings.get("num_cpus", default.num_cpus)
    if num_cpus is not None and not _is_integer(num_cpus, 1):
        problems.append(f"ray.num_cpus={num_cpus!r} is invalid: it must be null (all CPUs) or an integer >= 1")
    if problems:
        return None, problems
    return RayOptions(address=address, gpus_per_actor=gpus, cpus_per_actor=cpus, max_retries=retries, num_cpus=num_cpus), []


def _weights_and_data_problems(
    cells: list[Cell], data_root: str | None, weights_dir: str | None, download: bool, to_train: set[str] = frozenset()
) -> list[str]:
    """Problems that would stop the run midway: missing weights, missing data, too few test images.

    Models in ``to_train`` are trained before the attacks: they need the training split of their data set.
    """
    problems = []
    for name in sorted({cell.model for cell in cells} - set(to_train)):
        spec = zoo.model_spec(name)
        if spec.recipe is not None:
            if not _has_weights(spec, weights_dir, download):
                problems.append(
                    f"model {name!r} has no trained weights yet ({zoo.trained_weights_path(spec, weights_dir)}): pass "
                    f"train_missing=true to train it first (recipe {spec.recipe}), or run python -m harness.train {name}"
                )
            continue
        if spec.weights is None:
            problems.append(f"model {name!r} has no published weights in the zoo ({spec.training}); drop it from the grid")
            continue
        path = zoo.weights_path(spec, weights_dir)
        if path.is_file():
            continue
        if spec.weights.url is None:
            problems.append(
                f"model {name!r}: weights file {path} is missing and has no public URL; copy it into that folder, "
                "pass weights_dir=FOLDER, or set WASSERSTEIN_BENCH_WEIGHTS"
            )
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
    if not data_root:
        return problems
    for dataset in sorted({cell.dataset for cell in cells}):
        try:
            _, labels = load_dataset(dataset, data_root, download=download)
        except (FileNotFoundError, ValueError) as error:
            problems.append(f"data set {dataset!r}: {error}")
            continue
        size = len(labels)
        too_many = sorted({cell.n_examples for cell in cells if cell.dataset == dataset and cell.n_examples > size})
        if too_many:
            problems.append(
                f"data set {dataset!r}: its test split (in {data_root}) has {size} images, fewer than "
                f"n_examples={', '.join(map(str, too_many))}; allowed: n_examples from 1 to {size}"
            )
    for dataset in sorted({zoo.model_spec(name).dataset.value for name in to_train}):
        try:
            load_dataset(dataset, data_root, train=True, download=download)
        except (FileNotFoundError, ValueError) as error:
            problems.append(f"data set {dataset!r} (training split, to train {', '.join(sorted(to_train))}): {error}")
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
        return [f"ray.address={shown} is invalid; allowed: null (an embedded Ray), auto, host:port, ray://host:port"]
    host, port = host_port
    try:
        with socket.create_connection((host, port), timeout=CLUSTER_PROBE_SECONDS):
            return []
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else str(error)
        return [f"ray.address={shown}: nothing answers at {host}:{port} ({reason}); {_NO_CLUSTER_ADVICE}"]


def _current_cluster_address() -> str | None:
    """The address ``ray.init(address="auto")`` would join: ``RAY_ADDRESS``, else the last ``ray start``'s."""
    from_environment = os.environ.get("RAY_ADDRESS")
    if from_environment and from_environment != "auto":
        return from_environment
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None)


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
