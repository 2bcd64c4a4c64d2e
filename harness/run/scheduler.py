"""Running the shards of a grid: in process, or on a pool of Ray actors.

One loop schedules the shards, retries what raised, re-queues what lost its
worker and finishes each cell once; it drives a :class:`ShardExecutor`:
:class:`LocalExecutor` (in this process) or :class:`RayExecutor`. Both run
the same :class:`~harness.run.runner.ShardRunner` code. The Ray executor keeps one long-lived actor per GPU (or per ``cpus_per_actor``
CPUs when the cluster has no GPU, with torch's thread count set to match);
an actor gets shards once Ray has placed it and it has started, so an actor
no node has room for (a replacement after a node was lost) waits without
holding a shard; each actor caches the models it loads; each data set's test images go into
the object store once and every actor reads them from there. Execution is at
least once with idempotent outputs: a shard whose actor dies is run again on
a fresh actor, a shard that raises is retried up to ``max_retries`` times,
and a shard already on disk is skipped, so no result is lost or duplicated.
Ctrl-C stops the actors and leaves every finished shard on disk; a rerun
resumes from there.

Plugins (:func:`zoo.import_plugins`) are imported in this process and, for
Ray, by every actor before its first shard, so a model or solver a plugin
registers (a kind of cell too) can be run anywhere. Ray workers get the
driver's code (a checkout's, or an installed package's) and the driver's
working directory on their ``PYTHONPATH``, so a plugin module
importable where the user runs is importable on the workers too.

Ray is imported only by the Ray executor, so the rest of the harness works
where Ray is not installed.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

import zoo
from zoo.plugins import with_absolute_paths

from ..data import load_dataset
from .cells import Cell, Shard
from .progress import RunProgress
from .runner import RunContext, ShardOutcome, ShardProgress, ShardRunner
from .settings import Executor, RayOptions

__all__ = [
    "Executor", "LocalExecutor", "RayExecutor", "RayOptions", "RunReport", "ShardEvent", "ShardExecutor", "run_cells",
]

_MAX_REPLACEMENTS_PER_ACTOR = 3


@dataclass
class RunReport:
    """What a run did: shards run and skipped, cells finished, and what failed for good.

    ``failures`` maps ``"shard <id>"`` or ``"cell <id>"`` to the last error.
    """

    shards_run: int = 0
    shards_by_node: dict[str, int] = field(default_factory=dict)
    """Shards run (not skipped) on each Ray node, by node id; empty in process."""
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


@dataclass(frozen=True)
class ShardEvent:
    """A shard that came back from an executor: its outcome, or the error it raised, or the loss of its worker."""

    shard: Shard
    outcome: ShardOutcome | None = None
    error: str | None = None
    """``"<type>: <message>"`` of what the shard raised."""
    worker_lost: bool = False
    """The worker died under it (killed, out of memory, node lost): the shard runs again elsewhere."""
    node: str | None = None
    """The Ray node id of the worker that ran it (None in process)."""


class ShardExecutor(ABC):
    """Where the shards of a run compute; :func:`run_cells`' one loop does the bookkeeping around it."""

    max_retries: int = 0
    """Times a shard that raised is run again before the run gives up on it."""

    @abstractmethod
    def idle(self) -> bool:
        """Whether a worker waits for a shard."""

    @abstractmethod
    def submit(self, shard: Shard) -> None:
        """Start ``shard`` on an idle worker."""

    @abstractmethod
    def collect(self) -> list[ShardEvent]:
        """The shards that came back since the last call (waiting a little for one)."""

    @abstractmethod
    def finish_cell(self, cell: Cell, started_at: datetime.datetime) -> None:
        """Have a worker write ``cell``'s row (its shards are all back)."""

    @abstractmethod
    def finished_cells(self) -> tuple[list[dict], dict[str, str]]:
        """The rows of the cells :meth:`finish_cell` wrote, and ``"cell <id>"`` -> the error of each that failed."""

    def close(self) -> None:
        """Release the workers."""


def _schedule(executor: ShardExecutor, cells: list[Cell], shards: list[Shard], per_cell: dict[str, int], meter) -> RunReport:
    """Run ``shards`` on ``executor``: retry what raised, re-queue what lost its worker, finish each cell once."""
    report = RunReport()
    queue = deque(shards)
    remaining = dict(per_cell)
    attempts = defaultdict(int)
    started = {}
    by_id = {cell.cell_id: cell for cell in cells}
    in_flight = 0
    while queue or in_flight:
        while queue and executor.idle():
            shard = queue.popleft()
            started.setdefault(shard.cell.cell_id, datetime.datetime.now(datetime.timezone.utc))
            executor.submit(shard)
            in_flight += 1
        for event in executor.collect():
            in_flight -= 1
            shard = event.shard
            if event.worker_lost:
                report.replaced_actors += 1
                queue.appendleft(shard)
                continue
            if event.error is not None:
                attempts[shard.shard_id] += 1
                if attempts[shard.shard_id] <= executor.max_retries:
                    report.retries += 1
                    queue.append(shard)
                    continue
                report.failures[f"shard {shard.shard_id}"] = event.error
            else:
                report.shards_skipped += event.outcome.skipped
                report.shards_run += not event.outcome.skipped
                if event.node is not None and not event.outcome.skipped:
                    report.shards_by_node[event.node] = report.shards_by_node.get(event.node, 0) + 1
                if meter is not None:
                    meter.shard_done(shard.cell.cell_id, event.outcome)
            cell_id = shard.cell.cell_id
            remaining[cell_id] -= 1
            if remaining[cell_id] == 0:
                executor.finish_cell(by_id[cell_id], started[cell_id])
    report.cells, failures = executor.finished_cells()
    report.failures.update(failures)
    return report


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
        the models, solvers and kinds of cells of ``cells``; imported here
        and, with file paths made absolute, by every Ray actor before its
        first shard.

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
            pool = LocalExecutor(context, meter)
        else:
            pool = RayExecutor(cells, context, ray_options, plugins, meter)
        try:
            report = _schedule(pool, cells, shards, per_cell, meter)
        finally:
            pool.close()
    finally:
        if meter is not None:
            meter.close()
    report.seconds = time.perf_counter() - started
    return report


class LocalExecutor(ShardExecutor):
    """One worker in this process: each shard runs when submitted; a shard that raised is reported, not retried."""

    def __init__(self, context: RunContext, meter: RunProgress | None):
        self.runner = ShardRunner(context)
        self.meter = meter
        self.done: list[ShardEvent] = []
        self.rows: list[dict] = []
        self.failures: dict[str, str] = {}

    def idle(self) -> bool:
        return not self.done

    def submit(self, shard: Shard) -> None:
        on_progress = None if self.meter is None else _throttled(self.meter.shard_progress)
        try:
            self.done.append(ShardEvent(shard, outcome=self.runner.run_shard(shard, on_progress)))
        except Exception as error:  # a bad shard must not stop the others; it is reported
            self.done.append(ShardEvent(shard, error=f"{type(error).__name__}: {error}"))

    def collect(self) -> list[ShardEvent]:
        done, self.done = self.done, []
        return done

    def finish_cell(self, cell: Cell, started_at: datetime.datetime) -> None:
        try:
            self.rows.append(self.runner.finish_cell(cell, started_at))
        except Exception as error:  # the shards are on disk; a rerun writes the cell row
            self.failures[f"cell {cell.cell_id}"] = f"{type(error).__name__}: {error}"

    def finished_cells(self) -> tuple[list[dict], dict[str, str]]:
        return self.rows, self.failures

    def close(self) -> None:
        self.runner.close()


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

        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    return ray.remote(ShardActor)


def _start_ray(ray, options: RayOptions) -> bool:
    """Start (or join) Ray unless it runs already; whether this call started it."""
    if ray.is_initialized():
        return False
    import harness

    # "local": an embedded Ray of its own, never a cluster another process started on this machine.
    init = {"address": options.address} if options.address else {"address": "local", "num_cpus": options.num_cpus}
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


class RayExecutor(ShardExecutor):
    """A pool of Ray actors: one per GPU, or per ``cpus_per_actor`` CPUs without GPUs; a dead actor is replaced."""

    def __init__(self, cells: list[Cell], context: RunContext, options: RayOptions, plugins: list[str], meter: RunProgress | None):
        import ray

        self.ray = ray
        self.context = context
        self.max_retries = options.max_retries
        self.meter = meter
        if meter is not None:
            meter.status("starting Ray" if not ray.is_initialized() else "starting workers")
        self.started_here = _start_ray(ray, options)
        self.actors = []
        self.replaced = 0
        self.shards_back = 0
        try:
            self._start_actors(cells, context, options, plugins, meter)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, cells, context, options, plugins, meter) -> None:
        ray = self.ray
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus:
            self.count = max(1, int(gpus / options.gpus_per_actor))
            actor_options, threads, run_context = {"num_gpus": options.gpus_per_actor, "num_cpus": 1}, None, context
        else:
            if context.device.startswith("cuda"):
                # The driver's preflight cannot know a cluster's GPUs; falling back to the CPU would be a silent change.
                raise ValueError(
                    f"device={context.device!r} asks for CUDA, but the Ray cluster declares no GPU "
                    f"({int(resources.get('CPU', 0))} CPUs); allowed there: auto, cpu (or join nodes started with "
                    "ray start --num-gpus N)"
                )
            self.count = max(1, int(resources.get("CPU", 1)) // options.cpus_per_actor)
            actor_options, threads = {"num_cpus": options.cpus_per_actor}, options.cpus_per_actor
            run_context = replace(context, device="cpu")
        actor_class = _actor_class(ray)
        self.test_sets = {}
        self.free = deque()
        self.starting = {}
        self.node_of = {}
        self.in_flight = {}
        self.finishing = {}
        self.new_actor = lambda: self._started(actor_class.options(**actor_options).remote(run_context, threads, plugins))
        # The actors start (a process each, importing torch) while the driver reads the test sets.
        self.actors = [self.new_actor() for _ in range(self.count)]
        if meter is not None:
            meter.workers = self.count
            meter.status(f"starting {self.count} workers")
        self.board = _board_class(ray).remote() if meter is not None else None
        largest = defaultdict(int)
        for cell in cells:
            largest[cell.dataset] = max(largest[cell.dataset], cell.n_examples)
        for dataset, n in largest.items():
            images, labels = load_dataset(dataset, context.data_root, download=context.download)
            self.test_sets[dataset] = ray.put((images[:n].clone(), labels[:n].clone()))
            for actor in self.actors:
                actor.provide_test_set.remote(dataset, self.test_sets[dataset])

    def _started(self, actor):
        """``actor`` given the test sets read so far; it joins the free actors when its node id comes back."""
        for dataset, ref in self.test_sets.items():
            actor.provide_test_set.remote(dataset, ref)
        self.starting[actor.node_id.remote()] = actor
        return actor

    def idle(self) -> bool:
        return bool(self.free)

    def submit(self, shard: Shard) -> None:
        actor = self.free.popleft()
        self.in_flight[actor.run_shard.remote(shard, self.board)] = (shard, actor)

    def _replace(self, actor, error: Exception):
        """A fresh actor for ``actor``, which died; unless workers keep dying before finishing anything (they cannot start at all)."""
        self.replaced += 1
        if self.replaced > _MAX_REPLACEMENTS_PER_ACTOR * self.count + self.shards_back:
            raise RuntimeError(f"Ray workers keep dying ({self.replaced} replaced); the last error: {error}") from error
        self.actors.remove(actor)
        replacement = self.new_actor()
        self.actors.append(replacement)
        return replacement

    def collect(self) -> list[ShardEvent]:
        from ray.exceptions import RayActorError

        ray = self.ray
        waiting = [*self.in_flight, *self.starting]
        done, _ = ray.wait(waiting, num_returns=1, timeout=None if self.meter is None else 1.0)
        shards_done = [ref for ref in done if ref in self.in_flight]
        for ref in [ref for ref in done if ref in self.starting]:
            actor = self.starting.pop(ref)
            try:
                self.node_of[actor] = ray.get(ref)
                self.free.append(actor)
            except RayActorError as error:
                self._replace(actor, error)
        if self.meter is not None:
            for update in ray.get(self.board.collect.remote()):
                if any(s.shard_id == update.shard_id for s, _ in self.in_flight.values()):
                    self.meter.shard_progress(update)
        events = []
        for ref in shards_done:
            shard, actor = self.in_flight.pop(ref)
            try:
                events.append(ShardEvent(shard, outcome=ray.get(ref), node=self.node_of[actor]))
                self.shards_back += 1
                self.free.append(actor)
            except RayActorError as error:
                self._replace(actor, error)
                events.append(ShardEvent(shard, worker_lost=True))
            except Exception as error:  # the shard itself raised
                events.append(ShardEvent(shard, error=f"{type(error).__name__}: {error}"))
                self.free.append(actor)
        return events

    def finish_cell(self, cell: Cell, started_at: datetime.datetime) -> None:
        # A started actor: one still waiting for room on a node would hold the row back.
        started = [actor for actor in self.actors if actor in self.node_of]
        actor = started[len(self.finishing) % len(started)]
        self.finishing[cell.cell_id] = (cell, started_at, actor.finish_cell.remote(cell, started_at))

    def finished_cells(self) -> tuple[list[dict], dict[str, str]]:
        from ray.exceptions import RayActorError

        rows, failures = [], {}
        for cell_id, (cell, started_at, ref) in self.finishing.items():
            try:
                rows.append(self.ray.get(ref))
            except RayActorError:
                rows.append(ShardRunner(self.context).finish_cell(cell, started_at))
            except Exception as error:  # the shards are on disk; a rerun writes the cell row
                failures[f"cell {cell_id}"] = f"{type(error).__name__}: {error}"
        return rows, failures

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started_here:
            self.ray.shutdown()
