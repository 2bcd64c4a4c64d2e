"""Benchmark grids: blocks of axes expanded into cells, cells split into shards.

A grid file (``conf/grid/<name>.yaml``) holds ``blocks``; each block maps
setting names to a value or to a list of values (an axis). A block expands
into the product of its axes; a grid is the union of its blocks and of the
blocks of the grids it ``include``s. A ``protocol`` (see
:data:`harness.attack.PROTOCOLS`) supplies the schedule, step and geometry
that a block does not set itself.

Everything is validated before any work is scheduled: every problem in the
grid is collected and reported in one :class:`GridError` that lists the
allowed values.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import zoo
from solvers.iterate import StepRule

from ..attack.pgd import PROTOCOLS, EpsSchedule, Loss

__all__ = ["BLOCK_SETTINGS", "Cell", "GridError", "Shard", "ThreatModel", "expand_blocks"]


class ThreatModel(enum.Enum):
    """The ball an attack stays in."""

    WASSERSTEIN = "wasserstein"
    LINF = "linf"
    L2 = "l2"


class GridError(ValueError):
    """A grid that cannot run; the message lists every problem found."""


BLOCK_SETTINGS = (
    "dataset", "model", "threat_model", "solver", "protocol", "kernel_size", "p", "lam",
    "eps_initial", "eps_factor", "eps_every", "iterations", "step_rule", "step_size", "clamp",
    "loss", "restarts", "seed", "n_examples",
)
"""The names a block may set (each to a value or a list of values)."""

_DEFAULTS = {"threat_model": "wasserstein", "clamp": False, "loss": "cross_entropy", "restarts": 1, "seed": 0}


@dataclass(frozen=True)
class Cell:
    """One point of a grid: everything that determines its numbers.

    Norm-ball cells have no solver, kernel size, p or lambda (None); cells of
    a solver without regularization have no lambda, and plan-space solvers,
    which step by their own rule, no step rule.
    """

    dataset: str
    model: str
    threat_model: ThreatModel
    solver: str | None
    kernel_size: int | None
    p: float | None
    lam: float | None
    schedule: EpsSchedule
    step_rule: StepRule | None
    step_size: float
    clamp: bool
    loss: Loss
    restarts: int
    seed: int
    n_examples: int

    def config(self) -> dict[str, Any]:
        """The cell as plain JSON values (enums by value, the schedule flattened)."""
        return {
            "dataset": self.dataset,
            "model": self.model,
            "threat_model": self.threat_model.value,
            "solver": self.solver,
            "kernel_size": self.kernel_size,
            "p": self.p,
            "lam": self.lam,
            "eps_initial": self.schedule.initial,
            "eps_factor": self.schedule.factor,
            "eps_every": self.schedule.every,
            "iterations": self.schedule.iterations,
            "step_rule": self.step_rule.value if self.step_rule is not None else None,
            "step_size": self.step_size,
            "clamp": self.clamp,
            "loss": self.loss.value,
            "restarts": self.restarts,
            "seed": self.seed,
            "n_examples": self.n_examples,
        }

    @property
    def cell_id(self) -> str:
        """A hash of :meth:`config`: equal configurations, equal ids, on any machine."""
        return _digest(self.config())

    def shards(self, shard_size: int) -> list["Shard"]:
        """The cell's examples ``0 .. n_examples - 1`` in consecutive slices of ``shard_size``."""
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size={shard_size!r} is invalid: it must be an integer >= 1")
        return [Shard(self, start, min(start + shard_size, self.n_examples)) for start in range(0, self.n_examples, shard_size)]


@dataclass(frozen=True)
class Shard:
    """Examples ``start .. stop - 1`` of a cell's test subset."""

    cell: Cell
    start: int
    stop: int

    @property
    def shard_id(self) -> str:
        return _digest({"cell": self.cell.config(), "start": self.start, "stop": self.stop})


def _digest(value: Mapping[str, Any]) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _as_axis(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _enum_value(enum_type, name: str, value, problems: list[str], where: str):
    try:
        return enum_type(value)
    except ValueError:
        problems.append(f"{where}: {name}={value!r} is not allowed; allowed: {', '.join(repr(e.value) for e in enum_type)}")
        return None


def _number(name, value, problems, where, *, integer=False, low=None, low_open=False, odd=False):
    if value is None:
        problems.append(f"{where}: {name} is not set (set it, or a protocol: {', '.join(sorted(PROTOCOLS))})")
        return None
    kind = numbers.Integral if integer else numbers.Real
    ok = not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and odd:
        ok = value % 2 == 1
    if not ok:
        what = "an integer" if integer else "a number"
        bound = "" if low is None else f" {'>' if low_open else '>='} {low}"
        problems.append(f"{where}: {name}={value!r} is invalid: it must be {'an odd integer' if odd else what}{bound}")
        return None
    return int(value) if integer else float(value)


def _cell(point: Mapping[str, Any], problems: list[str], where: str) -> Cell | None:
    """Turn one expanded point into a :class:`Cell`, appending every problem found."""
    before = len(problems)
    settings = {**_DEFAULTS, **{k: v for k, v in point.items() if v is not None}}
    for required in ("dataset", "model", "n_examples"):
        if required not in settings:
            problems.append(f"{where}: {required} is not set")
    threat = _enum_value(ThreatModel, "threat_model", settings["threat_model"], problems, where)
    protocol = None
    if "protocol" in settings:
        protocol = PROTOCOLS.get(settings["protocol"])
        if protocol is None:
            problems.append(f"{where}: protocol={settings['protocol']!r} is unknown; allowed: {', '.join(sorted(PROTOCOLS))}")
    if protocol is not None:
        preset = {
            "eps_initial": protocol.schedule.initial, "eps_factor": protocol.schedule.factor,
            "eps_every": protocol.schedule.every, "iterations": protocol.schedule.iterations,
            "step_rule": protocol.rule.value, "step_size": protocol.step_size,
            "kernel_size": protocol.kernel_size, "p": protocol.p, "lam": protocol.lam,
        }
        settings = {**preset, **settings}
    model_names = [spec.name for spec in zoo.models()]
    model_spec = zoo.model_spec(settings["model"]) if settings.get("model") in model_names else None
    if "model" in settings and model_spec is None:
        problems.append(f"{where}: model={settings['model']!r} is not registered; registered: {', '.join(model_names)}")
    if model_spec is not None and "dataset" in settings and model_spec.dataset.value != settings["dataset"]:
        problems.append(
            f"{where}: model {model_spec.name!r} classifies {model_spec.dataset.value}, not dataset={settings['dataset']!r}"
        )
    for name in ("eps_initial", "step_size"):
        if name not in settings:
            problems.append(f"{where}: {name} is not set (set it, or a protocol: {', '.join(sorted(PROTOCOLS))})")
    solver = kernel_size = p = lam = None
    plan_space = False
    if threat is ThreatModel.WASSERSTEIN:
        solver_names = [spec.name for spec in zoo.solver_specs()]
        solver = settings.get("solver")
        if solver is None:
            problems.append(f"{where}: a Wasserstein cell needs a solver; registered: {', '.join(solver_names)}")
        elif solver not in solver_names:
            problems.append(f"{where}: solver={solver!r} is not registered; registered: {', '.join(solver_names)}")
        kernel_size = _number("kernel_size", settings.get("kernel_size"), problems, where, integer=True, low=3, odd=True)
        p = _number("p", settings.get("p"), problems, where, low=0, low_open=True)
        lam = _number("lam", settings.get("lam", 1000.0), problems, where, low=0, low_open=True)
        if solver in solver_names and "lam" not in zoo.solver_spec(solver).defaults:
            lam = None  # the solver has no regularization: record none rather than an unused value
        plan_space = solver in solver_names and zoo.solver_spec(solver).kind is zoo.SolverKind.PLAN_SPACE
        if plan_space and settings["clamp"] is True:
            problems.append(f"{where}: clamp=true is not allowed with the plan-space solver {solver!r}: its iterates are feasible")
    elif threat is not None and settings.get("solver") is not None:
        problems.append(f"{where}: the {threat.value} ball takes no solver (got solver={settings['solver']!r})")
    step_rule = _enum_value(StepRule, "step_rule", settings.get("step_rule", "linf_sign"), problems, where)
    if threat is ThreatModel.WASSERSTEIN and plan_space:
        step_rule = None  # a plan-space solver steps by its own rule
    loss = _enum_value(Loss, "loss", settings["loss"], problems, where)
    step_size = _number("step_size", settings.get("step_size", 1.0), problems, where, low=0, low_open=True)
    restarts = _number("restarts", settings["restarts"], problems, where, integer=True, low=1)
    seed = _number("seed", settings["seed"], problems, where, integer=True, low=0)
    n_examples = _number("n_examples", settings.get("n_examples", 1), problems, where, integer=True, low=1)
    if not isinstance(settings["clamp"], bool):
        problems.append(f"{where}: clamp={settings['clamp']!r} is invalid: it must be true or false")
    schedule = None
    try:
        schedule = EpsSchedule(
            settings.get("eps_initial", 1.0), settings.get("eps_factor", 1.0),
            settings.get("eps_every", 1), settings.get("iterations", 1),
        )
    except ValueError as error:
        problems.append(f"{where}: {error}")
    if len(problems) > before:
        return None
    return Cell(
        dataset=settings["dataset"], model=settings["model"], threat_model=threat, solver=solver,
        kernel_size=kernel_size, p=p, lam=lam, schedule=schedule, step_rule=step_rule, step_size=step_size,
        clamp=settings["clamp"], loss=loss, restarts=restarts, seed=seed, n_examples=n_examples,
    )


def expand_blocks(blocks: Iterable[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None) -> list[Cell]:
    """Expand blocks into their cells, in order, without duplicates.

    Parameters
    ----------
    blocks : iterable of mappings
        Setting name to a value or a list of values (see :data:`BLOCK_SETTINGS`).
    overrides : mapping, optional
        Settings that replace the blocks' own everywhere (e.g. ``n_examples``
        or ``seed`` typed on the command line); None values are ignored.

    Raises
    ------
    GridError
        Listing every problem of every block: unknown settings, empty axes,
        unknown model, solver or protocol names, impossible values.
    """
    problems: list[str] = []
    cells: dict[str, Cell] = {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for number, block in enumerate(blocks, start=1):
        where = f"block {number}"
        unknown = sorted(set(block) - set(BLOCK_SETTINGS))
        if unknown:
            problems.append(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(BLOCK_SETTINGS)}")
            continue
        axes = {name: _as_axis(value) for name, value in {**block, **overrides}.items()}
        empty = [name for name, values in axes.items() if not values]
        if empty:
            problems.append(f"{where}: empty axis {', '.join(map(repr, empty))}: give at least one value")
            continue
        names = list(axes)
        for values in itertools.product(*(axes[name] for name in names)):
            point = dict(zip(names, values))
            cell = _cell(point, problems, where)
            if cell is not None:
                cells.setdefault(cell.cell_id, cell)
    if problems:
        unique = list(dict.fromkeys(problems))
        raise GridError(f"the grid cannot run; {len(unique)} problem(s):\n  " + "\n  ".join(unique))
    return list(cells.values())
