"""Wasserstein-ball solvers: pure torch (and numpy/scipy for exact references).

No I/O, no models, no schedulers: everything here takes tensors and returns
tensors with per-example diagnostics.
"""

from .geometry import LocalTransport
from .info import SolveInfo, SolveStatus
from .lambertw import lambertw_exp
from .projectors import ConjugateSinkhorn, ExactProjection, ProjectedSinkhorn, Projector
from .sinkhorn import conjugate_sinkhorn, projected_sinkhorn

__all__ = [
    "ConjugateSinkhorn",
    "ExactProjection",
    "LocalTransport",
    "ProjectedSinkhorn",
    "Projector",
    "SolveInfo",
    "SolveStatus",
    "conjugate_sinkhorn",
    "lambertw_exp",
    "projected_sinkhorn",
]
