"""The solver catalogue: projection and plan-space solvers looked up by name.

A grid names a solver and its hyperparameters (``solver=projected_sinkhorn
lam=1000``); :func:`solver` turns that into a ready object. Third parties add
theirs with the :func:`register_solver` decorator, exactly like the built-ins.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from solvers.iterate import BallIterate
from solvers.plan_space import FrankWolfeIterate, PlanPGDIterate
from solvers.projectors import ExactProjection, Projector, ProjectedSinkhorn

from .registry import Registry


class SolverKind(enum.Enum):
    """Where a solver keeps its state between attack steps."""

    IMAGE_SPACE = "image_space"
    """Projects images: ``project(x, w, eps)``."""
    PLAN_SPACE = "plan_space"
    """Keeps a transport plan as its iterate (Wu, Wang, Yu 2020)."""


@dataclass(frozen=True)
class SolverSpec:
    """One catalogue entry.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"projected_sinkhorn"``.
    factory : callable
        Builds the solver from keyword hyperparameters.
    kind : SolverKind
    summary : str
        One line on what the solver computes.
    reference : str
        Where the method comes from.
    fixed : Mapping[str, Any]
        Hyperparameters the entry pins (e.g. ``box=True``); not overridable.
    """

    name: str
    factory: Callable[..., Projector | BallIterate]
    kind: SolverKind
    summary: str
    reference: str
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def defaults(self) -> dict[str, Any]:
        """Tunable hyperparameters and their default values."""
        signature = inspect.signature(self.factory)
        return {
            name: parameter.default
            for name, parameter in signature.parameters.items()
            if parameter.default is not inspect.Parameter.empty and name not in self.fixed
        }

    def create(self, **hyperparameters) -> Projector | BallIterate:
        unknown = sorted(set(hyperparameters) - set(self.defaults))
        if unknown:
            allowed = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise ValueError(
                f"solver {self.name!r} has no hyperparameter {', '.join(map(repr, unknown))}; allowed (with defaults): {allowed}"
            )
        return self.factory(**self.fixed, **hyperparameters)


class SolverRegistry(Registry[SolverSpec]):
    """A name -> :class:`SolverSpec` table."""

    noun = "solver"


BUILTIN_SOLVERS = (
    SolverSpec(
        name="projected_sinkhorn",
        factory=ProjectedSinkhorn,
        kind=SolverKind.IMAGE_SPACE,
        summary="entropic projection by projected Sinkhorn iterations, exactly feasible output",
        reference="Wong, Schmidt, Kolter, ICML 2019, Algorithm 2",
        fixed={"box": False},
    ),
    SolverSpec(
        name="projected_sinkhorn_box",
        factory=ProjectedSinkhorn,
        kind=SolverKind.IMAGE_SPACE,
        summary="projected Sinkhorn with the pixel box 0 <= z <= 1 inside the projection",
        reference="Hu, Wang, Yu et al. 2020 (box constraint); Wong et al. 2019",
        fixed={"box": True},
    ),
    SolverSpec(
        name="plan_pgd",
        factory=PlanPGDIterate,
        kind=SolverKind.PLAN_SPACE,
        summary="projected gradient on the local transport plan, exact projection onto the ball of plans",
        reference="Wu, Wang, Yu, Stronger and Faster Wasserstein Adversarial Attacks, ICML 2020",
        fixed={"box": False},
    ),
    SolverSpec(
        name="plan_pgd_box",
        factory=PlanPGDIterate,
        kind=SolverKind.PLAN_SPACE,
        summary="projected gradient on the transport plan with the pixel box z <= 1 inside the projection (Dykstra)",
        reference="Wu, Wang, Yu, ICML 2020; box by alternating projections",
        fixed={"box": True},
    ),
    SolverSpec(
        name="frank_wolfe",
        factory=FrankWolfeIterate,
        kind=SolverKind.PLAN_SPACE,
        summary="Frank-Wolfe on the transport plan with the exact dual linear maximization oracle, "
        "step 2/(s+2) restarted at each radius",
        reference="Wu, Wang, Yu, Stronger and Faster Wasserstein Adversarial Attacks, ICML 2020",
        fixed={"box": False},
    ),
    SolverSpec(
        name="frank_wolfe_box",
        factory=FrankWolfeIterate,
        kind=SolverKind.PLAN_SPACE,
        summary="Frank-Wolfe on the transport plan; the model sees the plan's projection onto the ball with the "
        "pixel box z <= 1",
        reference="Wu, Wang, Yu, ICML 2020 (their capacity-constrained post-processing, applied at every step)",
        fixed={"box": True},
    ),
    SolverSpec(
        name="exact_projection",
        factory=ExactProjection,
        kind=SolverKind.IMAGE_SPACE,
        summary="exact Euclidean projection by a convex QP (small images, CPU, reference only)",
        reference="interior-point QP (Clarabel) with active-set polishing",
    ),
)

_REGISTRY = SolverRegistry(BUILTIN_SOLVERS)


def register_solver(
    name: str,
    *,
    kind: SolverKind = SolverKind.IMAGE_SPACE,
    summary: str = "",
    reference: str = "",
    registry: SolverRegistry | None = None,
):
    """Class or function decorator adding a solver factory under ``name``.

    Example
    -------
    >>> @register_solver("my_solver", summary="clamp-free projection")   # doctest: +SKIP
    ... class MySolver:
    ...     def __init__(self, kernel_size=5, p=2.0): ...
    ...     def project(self, x, w, eps): ...
    """

    def decorate(factory):
        (registry or _REGISTRY).add(SolverSpec(name, factory, kind, summary or (factory.__doc__ or "").strip().split("\n")[0], reference))
        return factory

    return decorate


def solver(name: str, **hyperparameters) -> Projector | BallIterate:
    """Build the registered solver ``name`` with the given hyperparameters."""
    return _REGISTRY.spec(name).create(**hyperparameters)


def solver_spec(name: str) -> SolverSpec:
    """The entry registered as ``name``; an unknown name raises ValueError listing the registered ones."""
    return _REGISTRY.spec(name)


def solver_specs() -> list[SolverSpec]:
    """All registered solvers, sorted by name."""
    return _REGISTRY.specs()
