"""The catalogue: registered solvers (and, later, models), looked up by name."""

from .solvers import (
    BUILTIN_SOLVERS,
    SolverKind,
    SolverRegistry,
    SolverSpec,
    register_solver,
    solver,
    solver_specs,
)

__all__ = [
    "BUILTIN_SOLVERS",
    "SolverKind",
    "SolverRegistry",
    "SolverSpec",
    "register_solver",
    "solver",
    "solver_specs",
]
