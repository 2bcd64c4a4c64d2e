"""The solver catalogue: projection and plan-space solvers looked up by name.

Every entry declares its hyperparameters as data (:class:`Hyperparameter`:
name, type, default, allowed range, one line of documentation), so a grid
can set any of them, an unknown name is refused with the allowed list, and a
benchmark cell records exactly the ones its solver uses. The geometry of the
ball (``kernel_size`` and ``p``) is not a hyperparameter: the threat model
passes it to every solver it builds.

Third parties add solvers with the :func:`register_solver` decorator, exactly
like the built-ins, pinned variants (``fixed={"box": True}``) included.
"""

from __future__ import annotations

import enum
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from solvers.iterate import BallIterate
from solvers.plan_space import FrankWolfeIterate, PlanPGDIterate
from solvers.projectors import ExactProjection, Projector, ProjectedSinkhorn
from solvers.sinkhorn import DEFAULT_LAM, DEFAULT_MAX_ITER, DEFAULT_RELAXATION, DEFAULT_TOL

from .registry import Registry

__all__ = [
    "BUILTIN_SOLVERS",
    "BoxHandling",
    "GEOMETRY",
    "Hyperparameter",
    "SolverKind",
    "SolverRegistry",
    "SolverSpec",
    "register_solver",
    "solver",
    "solver_spec",
    "solver_specs",
]

GEOMETRY = ("kernel_size", "p")
"""Arguments every solver factory takes from the ball rather than from its hyperparameters."""


class SolverKind(enum.Enum):
    """Where a solver keeps its state between attack steps."""

    IMAGE_SPACE = "image_space"
    """Projects images, ``project(x, w, eps)``; the attack takes the ascent step."""
    PLAN_SPACE = "plan_space"
    """Keeps a transport plan as its iterate and steps by its own rule (Wu, Wang, Yu 2020)."""

    @property
    def attack_steps(self) -> bool:
        """Whether the attack's step rule and step size move the iterate (else the solver's own do)."""
        return self is SolverKind.IMAGE_SPACE


class BoxHandling(enum.Enum):
    """How a solver treats the pixel box ``0 <= z <= 1``."""

    INSIDE = "inside"
    """The box is a constraint of the solver's problem: every output lies in it."""
    NONE = "none"
    """The solver ignores the box: outputs may leave it, and such claims fail verification."""

    @property
    def description(self) -> str:
        if self is BoxHandling.INSIDE:
            return "kept in [0, 1] by the solver"
        return "none: images may leave [0, 1], and such claims fail verification"


_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Hyperparameter:
    """One tunable setting of a solver, declared as data.

    Attributes
    ----------
    name : str
        The keyword the factory takes and a grid block sets.
    type : {float, int, bool, str}
    default : Any
        Used when a grid does not set it; must itself be allowed.
    doc : str
        One line: what it controls.
    low, high : float or None
        Bounds of a number (None: unbounded on that side).
    low_open, high_open : bool
        Whether the bound itself is excluded.
    choices : tuple
        The allowed values of a string setting (empty: any string).
    optional : bool
        Whether ``None`` is allowed (meaning the solver's own choice).
    """

    name: str
    type: type
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False

    def __post_init__(self):
        if not self.name.isidentifier() or self.name in GEOMETRY:
            raise ValueError(
                f"hyperparameter name {self.name!r} is invalid: it must be a Python identifier other than "
                f"{', '.join(GEOMETRY)} (the ball's geometry)"
            )
        if self.type not in _TYPE_NAMES:
            raise ValueError(f"hyperparameter {self.name!r}: type {self.type!r} is not allowed; allowed: float, int, bool, str")
        try:
            self.check(self.default)
        except ValueError as error:
            raise ValueError(f"the default of hyperparameter {self.name!r} is not allowed: {error}") from None

    @property
    def allowed(self) -> str:
        """The allowed values, in words."""
        if self.choices:
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            text = _TYPE_NAMES[self.type]
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {self.high:g}"
        return text + (", or null" if self.optional else "")

    def check(self, value):
        """``value`` in the declared type, or a ValueError naming it and what is allowed."""
        if value is None and self.optional:
            return None
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is str:
            ok = isinstance(value, str) and (not self.choices or value in self.choices)
        else:
            kind = numbers.Integral if self.type is int else numbers.Real
            ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
            if ok and self.low is not None:
                ok = value > self.low if self.low_open else value >= self.low
            if ok and self.high is not None:
                ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ValueError(f"{self.name}={value!r} is invalid: it must be {self.allowed}")
        return self.type(value)

    def describe(self) -> str:
        """``name (allowed, default d): doc``, for messages and docs."""
        return f"{self.name} ({self.allowed}; default {self.default!r}): {self.doc}"


def _accepted_arguments(factory: Callable) -> set[str] | None:
    """The keyword arguments ``factory`` takes (None: any, it has ``**kwargs``)."""
    parameters = inspect.signature(factory).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    return {parameter.name for parameter in parameters}


@dataclass(frozen=True)
class SolverSpec:
    """One catalogue entry.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"projected_sinkhorn"``.
    factory : callable
        Builds the solver: ``factory(kernel_size=..., p=..., **fixed, **hyperparameters)``.
    kind : SolverKind
    summary : str
        One line on what the solver computes.
    reference : str
        Where the method comes from.
    hyperparameters : tuple of Hyperparameter
        What a grid may set, with defaults and ranges.
    fixed : Mapping[str, Any]
        Arguments the entry pins (e.g. ``box=True``); not overridable.
    box : BoxHandling
        How the entry treats the pixel box.
    """

    name: str
    factory: Callable[..., Projector | BallIterate]
    kind: SolverKind
    summary: str
    reference: str
    hyperparameters: tuple[Hyperparameter, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    box: BoxHandling = BoxHandling.NONE

    def __post_init__(self):
        names = [h.name for h in self.hyperparameters]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        pinned_and_tunable = sorted(set(names) & set(self.fixed))
        accepted = _accepted_arguments(self.factory)
        unaccepted = [] if accepted is None else sorted((set(names) | set(self.fixed) | set(GEOMETRY)) - accepted)
        for problem, found in (
            ("declared twice", duplicated),
            ("both pinned and tunable", pinned_and_tunable),
            ("not arguments of the factory", unaccepted),
        ):
            if found:
                raise ValueError(f"solver {self.name!r}: {', '.join(map(repr, found))} {problem}")
        if not isinstance(self.kind, SolverKind) or not isinstance(self.box, BoxHandling):
            raise ValueError(f"solver {self.name!r}: kind must be a SolverKind and box a BoxHandling")

    @property
    def defaults(self) -> dict[str, Any]:
        """Every declared hyperparameter and its default value."""
        return {h.name: h.default for h in self.hyperparameters}

    def allowed(self) -> str:
        """The declared hyperparameters in words (for messages)."""
        return "; ".join(h.describe() for h in self.hyperparameters) or "none"

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The full, checked set: ``given`` over the defaults.

        Raises
        ------
        ValueError
            An undeclared name (the message lists the declared ones) or a
            value out of its declared range.
        """
        declared = {h.name: h for h in self.hyperparameters}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise ValueError(
                f"solver {self.name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                f"its hyperparameters: {self.allowed()}"
            )
        return {name: h.check(given.get(name, h.default)) for name, h in declared.items()}

    def create(self, kernel_size: int = 5, p: float = 2.0, **hyperparameters) -> Projector | BallIterate:
        """The solver for a ``kernel_size`` x ``kernel_size`` ball with cost exponent ``p``."""
        return self.factory(kernel_size=kernel_size, p=p, **self.fixed, **self.resolve(hyperparameters))


class SolverRegistry(Registry[SolverSpec]):
    """A name -> :class:`SolverSpec` table."""

    noun = "solver"


_SINKHORN_HYPERPARAMETERS = (
    Hyperparameter("lam", float, DEFAULT_LAM, "entropic regularization (1000 on MNIST, 3000 on CIFAR-10 in the paper)", low=0, low_open=True),
    Hyperparameter("tol", float, DEFAULT_TOL, "per-example stopping tolerance on the marginal and the cost constraint",
                   low=0, high=1, low_open=True, high_open=True),
    Hyperparameter("max_iter", int, DEFAULT_MAX_ITER, "Sinkhorn iteration budget per example and projection", low=1),
    Hyperparameter("relaxation", float, DEFAULT_RELAXATION, "over-relaxation of the potentials; 1 is the paper's method",
                   low=0, high=2, low_open=True, high_open=True),
)
_PLAN_TOLERANCES = (
    Hyperparameter("box_tol", float, 1e-6, "KKT tolerance of the box projection on pixel capacities (mass units)",
                   low=0, high=1, low_open=True, high_open=True),
    Hyperparameter("box_max_iter", int, 100, "Newton iterations of the box projection", low=1),
)
_PLAN_PGD_HYPERPARAMETERS = (
    Hyperparameter("step_size", float, 0.1, "plan step alpha in pixel mass (0.1 on MNIST, 0.01 on CIFAR-10 in Wu et al.)",
                   low=0, low_open=True),
    Hyperparameter("step_rule", str, "linf_normalized", "plan step direction: gradient over its largest entry, or its sign",
                   choices=PlanPGDIterate.STEP_RULES),
    Hyperparameter("tol", float, 1e-6, "tolerance of the exact projection's multiplier search",
                   low=0, high=1, low_open=True, high_open=True),
    Hyperparameter("max_iter", int, 100, "iteration budget of the multiplier search", low=1),
)
_FRANK_WOLFE_HYPERPARAMETERS = (
    Hyperparameter("tol", float, None, "duality-gap tolerance of the oracle's multiplier search (null: exact breakpoint)",
                   low=0, high=1, low_open=True, high_open=True, optional=True),
    Hyperparameter("max_iter", int, 100, "iteration budget of the oracle's multiplier search", low=1),
)

_WU_2020 = "Wu, Wang, Yu, Stronger and Faster Wasserstein Adversarial Attacks, ICML 2020"

BUILTIN_SOLVERS = (
    SolverSpec(
        name="projected_sinkhorn",
        factory=ProjectedSinkhorn,
        kind=SolverKind.IMAGE_SPACE,
        summary="entropic projection by projected Sinkhorn iterations, exactly feasible output",
        reference="Wong, Schmidt, Kolter, ICML 2019, Algorithm 2",
        hyperparameters=_SINKHORN_HYPERPARAMETERS,
        fixed={"box": False},
        box=BoxHandling.NONE,
    ),
    SolverSpec(
        name="projected_sinkhorn_box",
        factory=ProjectedSinkhorn,
        kind=SolverKind.IMAGE_SPACE,
        summary="projected Sinkhorn with the pixel box 0 <= z <= 1 inside the projection",
        reference="Hu, Wang, Yu et al. 2020 (box constraint); Wong et al. 2019",
        hyperparameters=_SINKHORN_HYPERPARAMETERS,
        fixed={"box": True},
        box=BoxHandling.INSIDE,
    ),
    SolverSpec(
        name="plan_pgd",
        factory=PlanPGDIterate,
        kind=SolverKind.PLAN_SPACE,
        summary="projected gradient on the local transport plan, exact projection onto the ball of plans",
        reference=_WU_2020,
        hyperparameters=_PLAN_PGD_HYPERPARAMETERS,
        fixed={"box": False},
        box=BoxHandling.NONE,
    ),
    SolverSpec(
        name="plan_pgd_box",
        factory=PlanPGDIterate,
        kind=SolverKind.PLAN_SPACE,
        summary="projected gradient on the transport plan with the pixel box z <= 1 inside the exact projection",
        reference=f"{_WU_2020}; box by a semismooth Newton method on the capacity multipliers",
        hyperparameters=_PLAN_PGD_HYPERPARAMETERS + _PLAN_TOLERANCES,
        fixed={"box": True},
        box=BoxHandling.INSIDE,
    ),
    SolverSpec(
        name="frank_wolfe",
        factory=FrankWolfeIterate,
        kind=SolverKind.PLAN_SPACE,
        summary="Frank-Wolfe on the transport plan with the exact dual linear maximization oracle, "
        "step 2/(s+2) restarted at each radius",
        reference=_WU_2020,
        hyperparameters=_FRANK_WOLFE_HYPERPARAMETERS,
        fixed={"box": False},
        box=BoxHandling.NONE,
    ),
    SolverSpec(
        name="frank_wolfe_box",
        factory=FrankWolfeIterate,
        kind=SolverKind.PLAN_SPACE,
        summary="Frank-Wolfe on the transport plan; the model sees the plan's projection onto the ball with the "
        "pixel box z <= 1",
        reference=f"{_WU_2020} (their capacity-constrained post-processing, applied at every step)",
        hyperparameters=_FRANK_WOLFE_HYPERPARAMETERS + _PLAN_TOLERANCES,
        fixed={"box": True, "box_oracle": False},
        box=BoxHandling.INSIDE,
    ),
    SolverSpec(
        name="frank_wolfe_box_oracle",
        factory=FrankWolfeIterate,
        kind=SolverKind.PLAN_SPACE,
        summary="Frank-Wolfe on the transport plan with the exact linear maximization over the ball with the pixel "
        "box z <= 1 (proximal steps on the boxed projection)",
        reference=f"{_WU_2020}; boxed oracle by the proximal point method",
        hyperparameters=_FRANK_WOLFE_HYPERPARAMETERS + _PLAN_TOLERANCES,
        fixed={"box": True, "box_oracle": True},
        box=BoxHandling.INSIDE,
    ),
    SolverSpec(
        name="exact_projection",
        factory=ExactProjection,
        kind=SolverKind.IMAGE_SPACE,
        summary="exact Euclidean projection by a convex QP (small images, CPU, reference only)",
        reference="interior-point QP (Clarabel) with active-set polishing",
        fixed={"box": False},
        box=BoxHandling.NONE,
    ),
    SolverSpec(
        name="exact_projection_box",
        factory=ExactProjection,
        kind=SolverKind.IMAGE_SPACE,
        summary="exact Euclidean projection with the pixel box by a convex QP (small images, CPU, reference only)",
        reference="interior-point QP (Clarabel) with active-set polishing",
        fixed={"box": True},
        box=BoxHandling.INSIDE,
    ),
)

_REGISTRY = SolverRegistry(BUILTIN_SOLVERS)


def register_solver(
    name: str,
    *,
    kind: SolverKind = SolverKind.IMAGE_SPACE,
    summary: str = "",
    reference: str = "",
    hyperparameters: tuple[Hyperparameter, ...] = (),
    fixed: Mapping[str, Any] | None = None,
    box: BoxHandling = BoxHandling.NONE,
    registry: SolverRegistry | None = None,
):
    """Class or function decorator adding a solver factory under ``name``.

    The factory takes ``kernel_size`` and ``p`` (the ball's geometry), the
    ``fixed`` arguments and the declared ``hyperparameters`` as keywords. To
    register pinned variants of one class, call the decorator once per
    variant; it returns the factory unchanged.

    Example
    -------
    >>> @register_solver("my_solver", summary="clamp-free projection",           # doctest: +SKIP
    ...                  hyperparameters=(Hyperparameter("rounds", int, 10, "inner rounds", low=1),))
    ... class MySolver:
    ...     def __init__(self, kernel_size=5, p=2.0, rounds=10): ...
    ...     def project(self, x, w, eps): ...
    """

    def decorate(factory):
        line = summary or (factory.__doc__ or "").strip().split("\n")[0]
        spec = SolverSpec(name, factory, kind, line, reference, tuple(hyperparameters), dict(fixed or {}), box)
        (registry or _REGISTRY).add(spec)
        return factory

    return decorate


def solver(name: str, *, kernel_size: int = 5, p: float = 2.0, **hyperparameters) -> Projector | BallIterate:
    """Build the registered solver ``name`` for a ball's geometry with the given hyperparameters."""
    return _REGISTRY.spec(name).create(kernel_size, p, **hyperparameters)


def solver_spec(name: str) -> SolverSpec:
    """The entry registered as ``name``; an unknown name raises ValueError listing the registered ones."""
    return _REGISTRY.spec(name)


def solver_specs() -> list[SolverSpec]:
    """All registered solvers, sorted by name."""
    return _REGISTRY.specs()
