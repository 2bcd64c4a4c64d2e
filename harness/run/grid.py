"""Benchmark grids: blocks of axes expanded into cells, cells split into shards.

A grid file (``conf/grid/<name>.yaml``) holds ``blocks``; each block maps
setting names to a value or to a list of values (an axis). A block expands
into the product of its axes; a grid is the union of its blocks and of the
blocks of the grids it ``include``s. A ``protocol`` (see
:data:`harness.attack.pgd.PROTOCOLS`) supplies the schedule, step and
geometry that a block does not set itself.

A block that sets ``suite`` (see :data:`harness.attack.suite.SUITES`) runs
that evaluation suite instead of one attack: it names data set, models,
ball, examples and seed, and the suite supplies every attack setting.

A block that sets ``certifier`` (a :class:`~harness.vocabulary.Certifier`
value, or a list of them: an axis) computes certified lower bounds on robust
accuracy instead of attacking (:mod:`harness.certify`): it names data set,
models, the Wasserstein ball, the ``radii`` reported (one list, not an
axis), ``box``, ``time_limit`` (the complete certifier's), ``radius_rounds``,
examples and seed; an attack setting beside it is refused.

A block may set the general settings of :data:`BLOCK_SETTINGS` and every
hyperparameter its solvers declare (``lam``, ``tol``, ``max_iter``, ...; see
:class:`zoo.Hyperparameter`). A name that no cell of the block uses (a
hyperparameter none of its solvers declares, a kernel size for an l_p ball)
is refused with the allowed list rather than dropped.

Everything is validated before any work is scheduled: every problem in the
grid is collected and reported in one :class:`GridError` that lists the
allowed values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import zoo
from solvers.iterate import BallIterate, StepRule

from ..attack.ball import Ball
from ..attack.pgd import PROTOCOLS, EpsSchedule, Loss
from ..attack.suite import AttackSuite, attack_suite
from ..vocabulary import BallKind, Certifier

if TYPE_CHECKING:
    from ..certify.run import CertifySettings

__all__ = ["BLOCK_SETTINGS", "CERTIFY_RADII", "Cell", "GridError", "Shard", "certify_config", "expand_blocks"]


class GridError(ValueError):
    """A grid that cannot run; the message lists every problem found."""


BLOCK_SETTINGS = (
    "dataset", "model", "threat_model", "solver", "protocol", "kernel_size", "p",
    "eps_initial", "eps_factor", "eps_every", "eps_increment", "iterations", "step_rule", "step_size", "clamp",
    "loss", "restarts", "seed", "n_examples", "suite", "certifier", "radii", "box", "time_limit", "radius_rounds",
)
"""The general names a block may set (each to a value or a list of values, except ``radii``: one list);
solver hyperparameters come on top."""

CERTIFY_RADII = {"mnist": (0.001, 0.01, 0.05, 0.1), "cifar10": (0.0001, 0.001, 0.005, 0.01)}
"""The radii a certify block reports when it sets none: small, since certificates of the networks here
stop far below the attacks' radii (each data set's ladder ends at its smallest standard radius)."""

_DEFAULTS = {
    "threat_model": BallKind.WASSERSTEIN.value, "clamp": False, "loss": Loss.CROSS_ENTROPY.value, "restarts": 1, "seed": 0,
}
_PROTOCOL_HYPERPARAMETERS = ("lam", "step_size")
"""Protocol values that also preset a solver's hyperparameters of the same name."""


@dataclass(frozen=True)
class Cell:
    """One point of a grid: everything that determines its numbers.

    Attributes
    ----------
    ball : Ball
        The threat model.
    solver : str or None
        The registered solver (None for l_p balls).
    hyperparameters : tuple of (name, value)
        Every hyperparameter the solver declares, sorted by name: exactly
        what it runs with, so exactly what the cell records and hashes.
    step_rule, step_size
        The attack's ascent step; None when the solver steps by its own rule.
    suite : str or None
        An evaluation suite run instead of one attack (then ``solver`` is
        None and ``schedule`` is the suite's first member's).
    certify : CertifySettings or None
        Certificates computed instead of an attack (then ``solver`` and
        ``schedule`` are None, and ``clamp``, ``loss`` and ``restarts``
        keep their defaults, unused).
    """

    dataset: str
    model: str
    ball: Ball
    solver: str | None
    hyperparameters: tuple[tuple[str, Any], ...]
    schedule: EpsSchedule | None
    step_rule: StepRule | None
    step_size: float | None
    clamp: bool
    loss: Loss
    restarts: int
    seed: int
    n_examples: int
    suite: str | None = None
    certify: "CertifySettings | None" = None

    @property
    def solver_spec(self) -> zoo.SolverSpec | None:
        return zoo.solver_spec(self.solver) if self.solver is not None else None

    @property
    def attack_suite(self) -> AttackSuite | None:
        return attack_suite(self.suite, self.dataset) if self.suite is not None else None

    @property
    def final_eps(self) -> float:
        """The largest radius the cell searches (a certify cell: the largest radius it reports)."""
        if self.certify is not None:
            return self.certify.radii[-1]
        suite = self.attack_suite
        return suite.final_eps if suite is not None else self.schedule.final_eps

    @property
    def label(self) -> str:
        """What attacks (or certifies) the cell's model, in a few words: the suite, the solver, the certifier or the ball."""
        if self.certify is not None:
            certifier = self.certify.certifier.value.replace("_", " ")
            return f"certified ({certifier}, {'box' if self.certify.box else 'no box'})"
        suite = self.attack_suite
        return suite.label if suite is not None else self.solver or self.ball.kind.value

    def iterate(self) -> BallIterate:
        """The attack's driver for this cell (built fresh: iterates keep per-run state)."""
        return self.ball.iterate(self.solver_spec, dict(self.hyperparameters), self.step_rule, self.step_size, self.clamp)

    def config(self) -> dict[str, Any]:
        """The cell as plain JSON values (enums by value, the schedule flattened).

        ``eps_increment`` and ``suite`` appear only when set, so cells without
        them keep the ids they had before these settings existed. A certify
        cell has none of the attack's keys and its settings under
        ``certify`` (``time_limit`` only for the complete certifier, the
        one that uses it).
        """
        if self.certify is not None:
            return {
                "dataset": self.dataset,
                "model": self.model,
                **self.ball.config(),
                "certify": certify_config(self.certify),
                "seed": self.seed,
                "n_examples": self.n_examples,
            }
        suite = self.attack_suite
        optional = {
            "eps_increment": self.schedule.increment or None, "suite": self.suite,
            "suite_version": None if suite is None else suite.version,
        }
        return {
            **{name: value for name, value in optional.items() if value is not None},
            "dataset": self.dataset,
            "model": self.model,
            **self.ball.config(),
            "solver": self.solver,
            "hyperparameters": dict(self.hyperparameters),
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


def certify_config(settings: "CertifySettings") -> dict[str, Any]:
    """Certify settings as plain JSON values; ``time_limit`` only where the certifier has one to keep."""
    config = {
        "certifier": settings.certifier.value, "radii": list(settings.radii), "box": settings.box,
        "radius_rounds": settings.radius_rounds,
    }
    if settings.certifier is Certifier.MILP:
        config["time_limit"] = settings.time_limit
    return config


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


def _protocol_presets(settings: Mapping[str, Any], problems: list[str], where: str) -> dict[str, Any]:
    if "protocol" not in settings:
        return {}
    protocol = PROTOCOLS.get(settings["protocol"])
    if protocol is None:
        problems.append(f"{where}: protocol={settings['protocol']!r} is unknown; allowed: {', '.join(sorted(PROTOCOLS))}")
        return {}
    return {
        "eps_initial": protocol.schedule.initial, "eps_factor": protocol.schedule.factor,
        "eps_every": protocol.schedule.every, "eps_increment": protocol.schedule.increment,
        "iterations": protocol.schedule.iterations,
        "step_rule": protocol.rule.value, "step_size": protocol.step_size,
        "kernel_size": protocol.kernel_size, "p": protocol.p, "lam": protocol.lam,
    }


def _ball(settings, presets, problems, where) -> Ball | None:
    kind = _enum_value(BallKind, "threat_model", settings["threat_model"], problems, where)
    if kind is None:
        return None
    if not Ball.has_geometry(kind):
        return Ball(kind)
    geometry = {**presets, **settings}
    kernel_size = _number("kernel_size", geometry.get("kernel_size"), problems, where, integer=True, low=3, odd=True)
    p = _number("p", geometry.get("p"), problems, where, low=0, low_open=True)
    if kernel_size is None or p is None:
        return None
    return Ball.of(kind.value, kernel_size, p)


def _solver(ball: Ball, settings, problems, where) -> zoo.SolverSpec | None:
    name = settings.get("solver")
    if not ball.takes_solver:
        if name is not None:
            problems.append(f"{where}: the {ball.kind.value} ball takes no solver (got solver={name!r})")
        return None
    registered = [spec.name for spec in zoo.solver_specs()]
    if name is None:
        problems.append(f"{where}: a {ball.kind.value} cell needs a solver; registered: {', '.join(registered)}")
        return None
    if name not in registered:
        problems.append(f"{where}: solver={name!r} is not registered; registered: {', '.join(registered)}")
        return None
    return zoo.solver_spec(name)


def _cell(point: Mapping[str, Any], problems: list[str], where: str) -> tuple[Cell | None, set[str]]:
    """Turn one expanded point into a :class:`Cell`, appending every problem found.

    Returns the cell (None if it has a problem) and the names of ``point``
    it used beyond the general settings.
    """
    before = len(problems)
    settings = {**_DEFAULTS, **{k: v for k, v in point.items() if v is not None}}
    used: set[str] = set()
    _check_model(settings, problems, where)
    if "certifier" in settings:
        return _certify_cell(settings, problems, where, before)
    certify_only = sorted(_CERTIFY_ONLY & set(settings))
    if certify_only:
        problems.append(
            f"{where}: {', '.join(map(repr, certify_only))} are certify settings, in a block without certifier: set "
            f"certifier ({', '.join(repr(c.value) for c in Certifier)}), or leave them out of an attack block"
        )
    if "suite" in settings:
        return _suite_cell(settings, problems, where, before)
    presets = _protocol_presets(settings, problems, where)
    ball = _ball(settings, presets, problems, where)
    spec = None
    if ball is not None:
        spec = _solver(ball, settings, problems, where)
        if ball.takes_solver:
            used |= {"kernel_size", "p"}
    hyperparameters: dict[str, Any] = {}
    if spec is not None:
        preset = {name: presets[name] for name in _PROTOCOL_HYPERPARAMETERS if name in presets}
        for declared in spec.hyperparameters:
            if declared.name in point:
                used.add(declared.name)
            try:
                hyperparameters[declared.name] = declared.check(settings.get(declared.name, preset.get(declared.name, declared.default)))
            except ValueError as error:
                problems.append(f"{where}: {error}")
    attack_steps = spec is None or spec.kind.attack_steps
    step_rule = step_size = None
    if attack_steps:
        used |= {"step_rule", "step_size"}
        step_rule = _enum_value(StepRule, "step_rule", settings.get("step_rule", presets.get("step_rule", StepRule.LINF_SIGN.value)), problems, where)
        step_size = _number("step_size", settings.get("step_size", presets.get("step_size")), problems, where, low=0, low_open=True)
    clamp = settings["clamp"]
    if not isinstance(clamp, bool):
        problems.append(f"{where}: clamp={clamp!r} is invalid: it must be true or false")
    elif clamp and not (spec is not None and attack_steps):
        what = f"the plan-space solver {spec.name!r}: its iterates are feasible" if spec is not None else "an l_p ball: it clips already"
        problems.append(f"{where}: clamp=true is not allowed with {what}")
    loss = _enum_value(Loss, "loss", settings["loss"], problems, where)
    restarts = _number("restarts", settings["restarts"], problems, where, integer=True, low=1)
    seed = _number("seed", settings["seed"], problems, where, integer=True, low=0)
    n_examples = _number("n_examples", settings.get("n_examples", 1), problems, where, integer=True, low=1)
    schedule_settings = {**presets, **settings}
    if "eps_initial" not in schedule_settings:
        problems.append(f"{where}: eps_initial is not set (set it, or a protocol: {', '.join(sorted(PROTOCOLS))})")
    schedule = None
    try:
        schedule = EpsSchedule(
            schedule_settings.get("eps_initial", 1.0), schedule_settings.get("eps_factor", 1.0),
            schedule_settings.get("eps_every", 1), schedule_settings.get("iterations", 1),
            schedule_settings.get("eps_increment", 0.0),
        )
    except ValueError as error:
        problems.append(f"{where}: {error}")
    if len(problems) > before:
        return None, used
    cell = Cell(
        dataset=settings["dataset"], model=settings["model"], ball=ball, solver=spec.name if spec else None,
        hyperparameters=tuple(sorted(hyperparameters.items())), schedule=schedule, step_rule=step_rule,
        step_size=step_size, clamp=clamp, loss=loss, restarts=restarts, seed=seed, n_examples=n_examples,
    )
    return cell, used


_SUITE_SETTINGS = {"dataset", "model", "threat_model", "kernel_size", "p", "seed", "n_examples", "suite"}
"""What a suite block may set; the suite supplies everything else."""


def _check_model(settings: Mapping[str, Any], problems: list[str], where: str) -> None:
    """Problems of the settings every cell needs: data set, model (registered, of that data set), examples."""
    for required in ("dataset", "model", "n_examples"):
        if required not in settings:
            problems.append(f"{where}: {required} is not set")
    model_names = [spec.name for spec in zoo.models()]
    model_spec = zoo.model_spec(settings["model"]) if settings.get("model") in model_names else None
    if "model" in settings and model_spec is None:
        problems.append(f"{where}: model={settings['model']!r} is not registered; registered: {', '.join(model_names)}")
    if model_spec is not None and "dataset" in settings and model_spec.dataset.value != settings["dataset"]:
        problems.append(
            f"{where}: model {model_spec.name!r} classifies {model_spec.dataset.value}, not dataset={settings['dataset']!r}"
        )


def _suite_cell(settings: Mapping[str, Any], problems: list[str], where: str, before: int) -> tuple[Cell | None, set[str]]:
    """The cell of a block that runs an evaluation suite; ``problems[before:]`` are the point's problems found so far."""
    attack_settings = sorted(set(settings) - _SUITE_SETTINGS - set(_DEFAULTS))
    attack_settings += sorted(name for name in ("clamp", "loss", "restarts") if settings[name] != _DEFAULTS[name])
    if attack_settings:
        problems.append(
            f"{where}: {', '.join(map(repr, attack_settings))} cannot be set with suite={settings['suite']!r}: the suite "
            f"brings its own attacks; a suite block sets {', '.join(sorted(_SUITE_SETTINGS))}"
        )
    suite = None
    if "dataset" in settings:
        try:
            suite = attack_suite(settings["suite"], settings["dataset"])
        except ValueError as error:
            problems.append(f"{where}: {error}")
    ball = _ball(settings, {}, problems, where)
    if ball is not None and ball.kind is not BallKind.WASSERSTEIN:
        problems.append(f"{where}: suites attack Wasserstein balls, not threat_model={ball.kind.value!r}")
    seed = _number("seed", settings["seed"], problems, where, integer=True, low=0)
    n_examples = _number("n_examples", settings.get("n_examples", 1), problems, where, integer=True, low=1)
    if len(problems) > before:
        return None, {"kernel_size", "p"}
    cell = Cell(
        dataset=settings["dataset"], model=settings["model"], ball=ball, solver=None, hyperparameters=(),
        schedule=suite.members[0].schedule, step_rule=None, step_size=None, clamp=False, loss=Loss(settings["loss"]),
        restarts=1, seed=seed, n_examples=n_examples, suite=suite.name,
    )
    return cell, {"kernel_size", "p"}


_CERTIFY_SETTINGS = {
    "dataset", "model", "threat_model", "protocol", "kernel_size", "p", "certifier", "radii", "box", "time_limit",
    "radius_rounds", "seed", "n_examples",
}
"""What a certify block may set; a protocol supplies only the ball's kernel size and p."""
_CERTIFY_ONLY = {"radii", "box", "time_limit", "radius_rounds"}
"""Settings that mean nothing without a certifier."""


def _certify_cell(settings: Mapping[str, Any], problems: list[str], where: str, before: int) -> tuple[Cell | None, set[str]]:
    """The cell of a block that certifies; ``problems[before:]`` are the point's problems found so far."""
    attack_settings = sorted(set(settings) - _CERTIFY_SETTINGS - set(_DEFAULTS))
    attack_settings += sorted(name for name in ("clamp", "loss", "restarts") if settings[name] != _DEFAULTS[name])
    if attack_settings:
        problems.append(
            f"{where}: {', '.join(map(repr, attack_settings))} cannot be set beside certifier: they are attack settings; "
            f"a certify block sets {', '.join(sorted(_CERTIFY_SETTINGS))}"
        )
    certifier = _enum_value(Certifier, "certifier", settings["certifier"], problems, where)
    presets = _protocol_presets(settings, problems, where)
    ball = _ball(settings, {name: presets[name] for name in ("kernel_size", "p") if name in presets}, problems, where)
    if ball is not None and ball.kind is not BallKind.WASSERSTEIN:
        problems.append(f"{where}: certificates are for the Wasserstein ball, not threat_model={ball.kind.value!r}")
    radii = _radii(settings.get("radii", CERTIFY_RADII.get(settings.get("dataset"))), problems, where)
    box = settings.get("box", True)
    if not isinstance(box, bool):
        problems.append(f"{where}: box={box!r} is invalid: it must be true or false")
    # Unset, they keep CertifySettings' defaults.
    optional = {}
    if "time_limit" in settings:
        optional["time_limit"] = _number("time_limit", settings["time_limit"], problems, where, low=0, low_open=True)
    if "radius_rounds" in settings:
        optional["radius_rounds"] = _number("radius_rounds", settings["radius_rounds"], problems, where, integer=True, low=0)
    seed = _number("seed", settings["seed"], problems, where, integer=True, low=0)
    n_examples = _number("n_examples", settings.get("n_examples", 1), problems, where, integer=True, low=1)
    used = {"kernel_size", "p"} | ({"time_limit"} if certifier is Certifier.MILP else set())
    if len(problems) > before:
        return None, used
    from ..certify.run import CertifySettings  # only grids that certify load the certifiers

    settings_of_cell = CertifySettings(certifier, radii, box, **optional)
    cell = Cell(
        dataset=settings["dataset"], model=settings["model"], ball=ball, solver=None, hyperparameters=(), schedule=None,
        step_rule=None, step_size=None, clamp=False, loss=Loss(settings["loss"]), restarts=1, seed=seed,
        n_examples=n_examples, certify=settings_of_cell,
    )
    return cell, used


def _radii(value, problems: list[str], where: str) -> tuple[float, ...] | None:
    """A certify block's ``radii``: one number or a list of them, positive, finite, distinct and increasing."""
    if value is None:
        problems.append(f"{where}: radii is not set (no default ladder for this data set): give a list, e.g. [0.001, 0.01, 0.1]")
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    numeric = all(not isinstance(r, bool) and isinstance(r, numbers.Real) and math.isfinite(float(r)) and r > 0 for r in values)
    if not values or not numeric or values != sorted(set(values)):
        problems.append(
            f"{where}: radii={value!r} is invalid: give one list of positive, finite, distinct radii in increasing order "
            f"(e.g. {list(CERTIFY_RADII['mnist'])}); it is not an axis"
        )
        return None
    return tuple(float(r) for r in values)


def _hyperparameter_names() -> set[str]:
    return {h.name for spec in zoo.solver_specs() for h in spec.hyperparameters}


def _allowed_in(block: Mapping[str, Any]) -> str:
    if "certifier" in block:
        return f"{', '.join(sorted(_CERTIFY_SETTINGS))} (time_limit with certifier milp only)"
    registered = {spec.name for spec in zoo.solver_specs()}
    solvers = [name for name in _as_axis(block.get("solver")) if isinstance(name, str) and name in registered]
    text = ", ".join(BLOCK_SETTINGS)
    for name in solvers:
        declared = [h.name for h in zoo.solver_spec(name).hyperparameters]
        text += f"; hyperparameters of {name}: {', '.join(declared) or 'none'}"
    return text


def expand_blocks(blocks: Iterable[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None) -> list[Cell]:
    """Expand blocks into their cells, in order, without duplicates.

    Parameters
    ----------
    blocks : iterable of mappings
        Setting name to a value or a list of values (see :data:`BLOCK_SETTINGS`
        and the hyperparameters the block's solvers declare).
    overrides : mapping, optional
        Settings that replace the blocks' own everywhere (e.g. ``n_examples``
        or ``seed`` typed on the command line); None values are ignored.

    Raises
    ------
    GridError
        Listing every problem of every block: unknown settings (or settings
        no cell of the block uses), empty axes, unknown model, solver or
        protocol names, impossible values.
    """
    problems: list[str] = []
    cells: dict[str, Cell] = {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    known = set(BLOCK_SETTINGS) | _hyperparameter_names()
    for number, block in enumerate(blocks, start=1):
        where = f"block {number}"
        unknown = sorted(set(block) - known)
        if unknown:
            problems.append(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}; allowed: {_allowed_in(block)}")
            continue
        # The radii of a certify block are one list reported together, not an axis of cells.
        axes = {name: [value] if name == "radii" else _as_axis(value) for name, value in {**block, **overrides}.items()}
        empty = [name for name, values in axes.items() if not values]
        if empty:
            problems.append(f"{where}: empty axis {', '.join(map(repr, empty))}: give at least one value")
            continue
        names = list(axes)
        used: set[str] = set()
        problems_before = len(problems)
        for values in itertools.product(*(axes[name] for name in names)):
            point = dict(zip(names, values))
            cell, used_here = _cell(point, problems, where)
            used |= used_here
            if cell is not None:
                cells.setdefault(cell.cell_id, cell)
        conditional = (set(block) - set(BLOCK_SETTINGS)) | ({"kernel_size", "p", "step_rule", "step_size", "time_limit"} & set(block))
        unused = sorted(conditional - used)
        if unused and len(problems) == problems_before:
            problems.append(
                f"{where}: {', '.join(map(repr, unused))} is used by none of the block's cells; allowed: {_allowed_in(block)}"
            )
    if problems:
        unique = list(dict.fromkeys(problems))
        raise GridError(f"the grid cannot run; {len(unique)} problem(s):\n  " + "\n  ".join(unique))
    return list(cells.values())
