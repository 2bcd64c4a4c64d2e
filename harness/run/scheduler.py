"""Running the shards of a grid: in process, or on a pool of Ray actors.

Both executors run the same :class:`~harness.runner.ShardRunner` code. The
Ray executor keeps one long-lived actor per GPU (or per ``cpus_per_actor``
CPUs when the cluster has no GPU, with torch's thread count set to match);
each actor caches the models it loads; each data set's test images go into
the object store once and every actor reads them from there. Execution is at
least once with idempotent outputs: a shard whose actor dies is run again on
a fresh actor, a shard that raises is retried up to ``max_retries`` times,
and a shard already on disk is skipped, so no result is lost or duplicated.
Ctrl-C stops the actors and leaves every finished shard on disk; a rerun
resumes from there.

Plugins (:func:`zoo.import_plugins`) are imported in this process and, for
Ray, by every actor before its first shard, so a model or solver a plugin
registers can be run anywhere. Ray workers get this checkout's code and the
driver's working directory on their ``PYTHONPATH``, so a plugin module
importable where the user runs is importable on the workers too.

Ray is imported only by the Ray executor, so the rest of the harness works
where Ray is not installed.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import math
import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

import zoo
from zoo.plugins import with_absolute_paths

from ..data import load_dataset
from .grid import Cell, Shard
from .progress import RunProgress
from .runner import RunContext, ShardOutcome, ShardProgress, ShardRunner

__all__ = ["Executor", "RayOptions", "RunReport", "run_cells"]

_MAX_REPLACEMENTS_PER_ACTOR = 3


class Executor(enum.Enum):
    """Where shards run."""

    LOCAL = "local"
    """In this process, one shard after another (debugging, tests, small runs)."""
    RAY = "ray"
    """On a pool of Ray actors: an embedded local Ray, or an existing cluster."""


@dataclass(frozen=True)
class RayOptions:
    """How the Ray executor finds its cluster and sizes its actors.

    Attributes
    ----------
    address : str or None
        None starts an embedded Ray on this machine; ``"auto"`` or
        ``"ray://host:port"`` / ``"host:port"`` joins an existing cluster.
    gpus_per_actor : float
        GPU share of an actor when the cluster has GPUs (1: one actor per GPU).
    cpus_per_actor : int
        CPUs of an actor (and its torch threads) when the cluster has no GPU.
    max_retries : int
        Times a shard that raised is run again before the run gives up on it.
    num_cpus : int or None
        CPUs of an embedded Ray (None: all of this machine's).
    """

    address: str | None = None
    gpus_per_actor: float = 1.0
    cpus_per_actor: int = 1
    max_retries: int = 2
    num_cpus: int | None = None


@dataclass
class RunReport:
    """What a run did: shards run and skipped, cells finished, and what failed for good.

    ``failures`` maps ``"shard <id>"`` or ``"cell <id>"`` to the last error.
    """

    shards_run: int = 0
    shards_skipped: int = 0
    retries: int = 0
    replaced_actors: int = 0
    cells: list[dict] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _plan(cells: list[Cell], shard_size: int) -> tuple[list[Shard], dict[str, int]]:
    shards = [shard for cell in cells for shard in cell.shards(shard_size)]
    per_cell = defaultdict(int)
    for shard in shards:
        per_cell[shard.cell.cell_id] += 1
    return shards, dict(per_cell)


def run_cells(
    cells: list[Cell],
    context: RunContext,
    shard_size: int,
    executor: Executor = Executor.LOCAL,
    ray_options: RayOptions = RayOptions(),
    progress: bool = True,
    plugins: Sequence[str] = (),
) -> RunReport:
    """Run every shard of ``cells`` and write each finished cell's row.

    Parameters
    ----------
    cells : list of Cell
    context : RunContext
    shard_size : int
        Examples per shard.
    executor : Executor
    ray_options : RayOptions
        Used by the Ray executor only.
    progress : bool
        Print a status line on standard error.
    plugins : sequence of str
        Plugin modules or files (see :func:`zoo.import_plugins`) that register
        the models and solvers of ``cells``; imported here and, with file
        paths made absolute, by every Ray actor before its first shard.

    Returns
    -------
    RunReport
        Raises nothing for a failed shard: it is listed in ``failures`` (with
        the last error) and its cell is written as incomplete.
    """
    if not isinstance(executor, Executor):
        raise ValueError(f"executor={executor!r} is invalid: allowed {[e.value for e in Executor]}")
    plugins = with_absolute_paths(plugins)
    zoo.import_plugins(plugins)
    shards, per_cell = _plan(cells, shard_size)
    started = time.perf_counter()
    meter = RunProgress(cells, shards) if progress else None
    try:
        if executor is Executor.LOCAL:
            report = _run_local(cells, shards, per_cell, context, meter)
        else:
            report = _run_ray(cells, shards, per_cell, context, ray_options, plugins, meter)
    finally:
        if meter is not None:
            meter.close()
    report.seconds = time.perf_counter() - started
    return report


def _run_local(cells, shards, per_cell, context, meter) -> RunReport:
    runner = ShardRunner(context)
    try:
        return _run_shards_locally(runner, cells, shards, per_cell, meter)
    finally:
        runner.close()


def _run_shards_locally(runner: ShardRunner, cells, shards, per_cell, meter) -> RunReport:
    report = RunReport()
    remaining = dict(per_cell)
    cell_started = {}
    by_id = {cell.cell_id: cell for cell in cells}
    for shard in shards:
        cell_id = shard.cell.cell_id
        cell_started.setdefault(cell_id, datetime.datetime.now(datetime.timezone.utc))
        try:
            outcome = runner.run_shard(shard, None if meter is None else _throttled(meter.shard_progress))
        except Exception as error:  # a bad shard must not stop the others; it is reported
            report.failures[f"shard {shard.shard_id}"] = f"{type(error).__name__}: {error}"
            outcome = None
        if outcome is not None:
            report.shards_skipped += outcome.skipped
            report.shards_run += not outcome.skipped
            if meter is not None:
                meter.shard_done(cell_id, outcome)
        remaining[cell_id] -= 1
        if remaining[cell_id] == 0:
            try:
                report.cells.append(runner.finish_cell(by_id[cell_id], cell_started[cell_id]))
            except Exception as error:  # the shards are on disk; a rerun writes the cell row
                report.failures[f"cell {cell_id}"] = f"{type(error).__name__}: {error}"
    return report


def _throttled(report: Callable[[ShardProgress], None], interval: float = 0.5) -> Callable[[ShardProgress], None]:
    """``report``, called at most every ``interval`` seconds (the first call always goes through)."""
    last = [-math.inf]

    def throttled(progress: ShardProgress) -> None:
        now = time.perf_counter()
        if now - last[0] >= interval:
            last[0] = now
            report(progress)

    return throttled


def _board_class(ray):
    """A Ray actor holding the latest progress of every running shard; the driver polls it."""

    class ProgressBoard:
        def __init__(self):
            self.latest: dict[str, ShardProgress] = {}

        def report(self, progress: ShardProgress) -> None:
            self.latest[progress.shard_id] = progress

        def collect(self) -> list[ShardProgress]:
            latest, self.latest = list(self.latest.values()), {}
            return latest

    return ray.remote(num_cpus=0)(ProgressBoard)


def _actor_class(ray):
    """The Ray actor wrapping a :class:`ShardRunner` (built when Ray is first used)."""

    class ShardActor:
        def __init__(self, context: RunContext, threads: int | None, plugins: Sequence[str]):
            if threads:
                torch.set_num_threads(threads)
            zoo.import_plugins(plugins)
            self.runner = ShardRunner(context)

        def provide_test_set(self, dataset, data):
            self.runner.provide_test_set(dataset, *data)

        def run_shard(self, shard: Shard, board=None) -> ShardOutcome:
            report = None if board is None else _throttled(lambda progress: board.report.remote(progress))
            return self.runner.run_shard(shard, report)

        def finish_cell(self, cell: Cell, started_at) -> dict:
            return self.runner.finish_cell(cell, started_at)

        def pid(self) -> int:
            import os

            return os.getpid()

    return ray.remote(ShardActor)


def _start_ray(ray, options: RayOptions) -> bool:
    """Start (or join) Ray unless it runs already; whether this call started it."""
    if ray.is_initialized():
        return False
    init = {"address": options.address} if options.address else {"num_cpus": options.num_cpus}
    import harness

    # Workers import the driver's code (a checkout's, or an installed package's), whatever is
    # installed on their node, and the plugin modules the driver can import from its working directory.
    code_root = str(Path(harness.__file__).resolve().parent.parent)
    search_path = [code_root, os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(filter(None, search_path)))}}
    ray.init(**init, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


@contextlib.contextmanager
def ray_session(options: RayOptions | None):
    """One Ray for everything inside (training, then the attacks), shut down at the end if started here."""
    import ray

    started_here = _start_ray(ray, options or RayOptions())
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def _train_in_worker(model: str, settings: dict, plugins: Sequence[str]) -> dict:
    from ..train import train

    zoo.import_plugins(plugins)
    return train(model, progress=False, **settings)


def train_models(
    requests: Sequence[tuple[str, dict]], executor: Executor, options: RayOptions | None = None, plugins: Sequence[str] = (),
    on_trained: Callable[[str, dict], None] | None = None,
) -> list[dict]:
    """Train ``(model, settings)`` pairs in order (settings: the keyword arguments of :func:`harness.train.train`).

    With the Ray executor each runs in a Ray task, on a GPU when the cluster
    has one; in order, since a recipe may start from a model trained before
    it. Returns the training records.
    """
    if executor is Executor.LOCAL:
        from ..train import train

        return _train_each(requests, lambda model, settings: train(model, **settings), on_trained)
    import ray

    plugins = with_absolute_paths(list(plugins))
    with ray_session(options):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(_train_in_worker)
        return _train_each(requests, lambda model, settings: ray.get(task.remote(model, settings, plugins)), on_trained)


def _train_each(requests, run_one, on_trained) -> list[dict]:
    records = []
    for model, settings in requests:
        records.append(run_one(model, settings))
        if on_trained is not None:
            on_trained(model, records[-1])
    return records


def _run_ray(cells, shards, per_cell, context, options: RayOptions, plugins: list[str], meter: RunProgress | None):
    import ray
    from ray.exceptions import RayActorError

    if meter is not None:
        meter.status("starting Ray" if not ray.is_initialized() else "starting workers")
    started_here = _start_ray(ray, options)
    report = RunReport()
    actors = []
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus:
            count = max(1, int(gpus / options.gpus_per_actor))
            actor_options = {"num_gpus": options.gpus_per_actor, "num_cpus": 1}
            threads = None
            run_context = context
        else:
            count = max(1, int(resources.get("CPU", 1)) // options.cpus_per_actor)
            actor_options = {"num_cpus": options.cpus_per_actor}
            threads = options.cpus_per_actor
            run_context = replace(context, device="cpu")
        actor_class = _actor_class(ray)
        test_sets = {}

        def new_actor():
            actor = actor_class.options(**actor_options).remote(run_context, threads, plugins)
            for dataset, ref in test_sets.items():
                actor.provide_test_set.remote(dataset, ref)
            return actor

        # The actors start (a process each, importing torch) while the driver reads the test sets.
        actors = [new_actor() for _ in range(count)]
        if meter is not None:
            meter.workers = count
            meter.status(f"starting {count} workers")
        board = _board_class(ray).remote() if meter is not None else None
        largest = defaultdict(int)
        for cell in cells:
            largest[cell.dataset] = max(largest[cell.dataset], cell.n_examples)
        for dataset, n in largest.items():
            images, labels = load_dataset(dataset, context.data_root, download=context.download)
            test_sets[dataset] = ray.put((images[:n].clone(), labels[:n].clone()))
            for actor in actors:
                actor.provide_test_set.remote(dataset, test_sets[dataset])
        idle = deque(actors)
        queue = deque(shards)
        attempts = defaultdict(int)
        in_flight = {}
        remaining = dict(per_cell)
        cell_started = {}
        by_id = {cell.cell_id: cell for cell in cells}
        finishing = {}
        while queue or in_flight:
            while queue and idle:
                shard = queue.popleft()
                actor = idle.popleft()
                cell_started.setdefault(shard.cell.cell_id, datetime.datetime.now(datetime.timezone.utc))
                in_flight[actor.run_shard.remote(shard, board)] = (shard, actor)
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=None if meter is None else 1.0)
            if meter is not None:
                for update in ray.get(board.collect.remote()):
                    if any(s.shard_id == update.shard_id for s, _ in in_flight.values()):
                        meter.shard_progress(update)
            if not done:
                continue
            shard, actor = in_flight.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except RayActorError as error:
                # The worker died (killed, out of memory, node lost): replace it and run the shard again,
                # unless workers keep dying before finishing anything (they cannot start at all).
                report.replaced_actors += 1
                if report.replaced_actors > _MAX_REPLACEMENTS_PER_ACTOR * count + report.shards_run + report.shards_skipped:
                    raise RuntimeError(f"Ray workers keep dying ({report.replaced_actors} replaced); the last error: {error}") from error
                actors.remove(actor)
                replacement = new_actor()
                actors.append(replacement)
                idle.append(replacement)
                queue.appendleft(shard)
                continue
            except Exception as error:  # the shard itself raised: retry a few times, then report it
                idle.append(actor)
                attempts[shard.shard_id] += 1
                if attempts[shard.shard_id] <= options.max_retries:
                    report.retries += 1
                    queue.append(shard)
                    continue
                report.failures[f"shard {shard.shard_id}"] = f"{type(error).__name__}: {error}"
                outcome = None
            else:
                idle.append(actor)
            if outcome is not None:
                report.shards_skipped += outcome.skipped
                report.shards_run += not outcome.skipped
                if meter is not None:
                    meter.shard_done(shard.cell.cell_id, outcome)
            cell_id = shard.cell.cell_id
            remaining[cell_id] -= 1
            if remaining[cell_id] == 0:
                finishing[cell_id] = actor.finish_cell.remote(by_id[cell_id], cell_started[cell_id])
        for cell_id, ref in finishing.items():
            try:
                report.cells.append(ray.get(ref))
            except RayActorError:
                report.cells.append(ShardRunner(context).finish_cell(by_id[cell_id], cell_started[cell_id]))
            except Exception as error:  # the shards are on disk; a rerun writes the cell row
                report.failures[f"cell {cell_id}"] = f"{type(error).__name__}: {error}"
        return report
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
