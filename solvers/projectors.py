"""Projection solvers as objects: hyperparameters fixed and checked once.

Every image-space solver offers ``project(x, w, eps) -> (z, SolveInfo)``; this
module gives the built-in ones that shape. The registry in :mod:`zoo` hands
them out by name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from . import exact
from .checks import check_iterations, check_positive
from .geometry import LocalTransport, check_images, check_nonnegative_eps
from .info import SolveInfo, SolveStatus
from .sinkhorn import (
    DEFAULT_LAM,
    DEFAULT_MAX_ITER,
    DEFAULT_RELAXATION,
    DEFAULT_TOL,
    conjugate_sinkhorn,
    projected_sinkhorn,
)


@runtime_checkable
class Projector(Protocol):
    """What the attack loop needs from an image-space solver."""

    transport: LocalTransport

    def project(self, x: torch.Tensor, w: torch.Tensor, eps) -> tuple[torch.Tensor, SolveInfo]:
        """Project each ``w[b]`` onto the ball of radius ``eps[b]`` around ``x[b]``."""
        ...


class _SinkhornSettings:
    """Hyperparameters shared by the Sinkhorn-type solvers, checked once.

    Parameters
    ----------
    kernel_size, p
        Local transport window and cost exponent (see :class:`LocalTransport`).
    lam : float
        Entropic regularization; 1000 (MNIST) and 3000 (CIFAR-10) in the paper.
    tol : float
        Per-example stopping tolerance (marginal and cost constraint).
    max_iter : int
        Iteration budget per example.
    relaxation : float
        Over-relaxation of the potentials, in (0, 2); 1 is the paper's method.
    """

    def __init__(
        self,
        kernel_size: int = 5,
        p: float = 2.0,
        lam: float = DEFAULT_LAM,
        tol: float = DEFAULT_TOL,
        max_iter: int = DEFAULT_MAX_ITER,
        relaxation: float = DEFAULT_RELAXATION,
    ):
        self.transport = LocalTransport(kernel_size, p)
        self.lam = check_positive("lam", lam)
        self.tol = check_positive("tol", tol, upper=1.0, upper_open=True)
        self.max_iter = check_iterations("max_iter", max_iter)
        self.relaxation = check_positive("relaxation", relaxation, upper=2.0, upper_open=True)

    def _settings(self) -> dict:
        return dict(
            transport=self.transport, lam=self.lam, tol=self.tol, max_iter=self.max_iter, relaxation=self.relaxation
        )

    def __repr__(self) -> str:
        t = self.transport
        fields = f"kernel_size={t.kernel_size}, p={t.p}, lam={self.lam}, tol={self.tol}, "
        fields += f"max_iter={self.max_iter}, relaxation={self.relaxation}"
        return f"{type(self).__name__}({fields}{self._extra_repr()})"

    def _extra_repr(self) -> str:
        return ""


class ProjectedSinkhorn(_SinkhornSettings):
    """Entropic projection by projected Sinkhorn (Wong et al. 2019, Algorithm 2).

    Hyperparameters as in :class:`_SinkhornSettings`, and ``box``: keep
    ``z <= 1`` inside the projection (Hu et al. 2020).
    """

    def __init__(
        self,
        kernel_size: int = 5,
        p: float = 2.0,
        lam: float = DEFAULT_LAM,
        tol: float = DEFAULT_TOL,
        max_iter: int = DEFAULT_MAX_ITER,
        relaxation: float = DEFAULT_RELAXATION,
        box: bool = False,
    ):
        # The full signature is spelled out: the registry reads a solver's
        # hyperparameters and defaults from it.
        super().__init__(kernel_size, p, lam, tol, max_iter, relaxation)
        if not isinstance(box, bool):
            raise ValueError(f"box={box!r} is invalid: it must be True or False")
        self.box = box

    def project(self, x, w, eps):
        return projected_sinkhorn(x, w, eps, box=self.box, **self._settings())

    def _extra_repr(self) -> str:
        return f", box={self.box}"


class ConjugateSinkhorn(_SinkhornSettings):
    """Approximate ``argmax <z, g>`` over the ball (Wong et al. 2019, Appendix D).

    The steepest-ascent direction of the Wasserstein geometry; hyperparameters
    as in :class:`_SinkhornSettings`.
    """

    def maximize(self, x, g, eps):
        """Return ``(z, info)`` with ``z`` in the ball approximately maximizing ``<z, g>``."""
        return conjugate_sinkhorn(x, g, eps, **self._settings())


class ExactProjection:
    """Exact Euclidean projection by a convex QP (Clarabel), one example at a time.

    A reference for small images (up to a few thousand pixels): seconds per
    MNIST image, on the CPU, with Clarabel (a dependency of the package).
    """

    def __init__(self, kernel_size: int = 5, p: float = 2.0, box: bool = False):
        self.transport = LocalTransport(kernel_size, p)
        if not isinstance(box, bool):
            raise ValueError(f"box={box!r} is invalid: it must be True or False")
        self.box = box

    def project(self, x, w, eps):
        check_images(x, w)
        eps_tensor = check_nonnegative_eps(eps, x.shape[0], x)
        t = self.transport
        z = exact.exact_projection_batch(
            x.detach().cpu().numpy(), w.detach().cpu().numpy(), eps_tensor.cpu().numpy(), t.kernel_size, t.p, box=self.box
        )
        z = torch.as_tensor(np.asarray(z), dtype=x.dtype, device=x.device)
        distances = exact.local_ot_distance_batch(x.detach().cpu().numpy(), z.detach().cpu().numpy(), t.kernel_size, t.p)
        empty = x.flatten(1).sum(1) == 0
        status = torch.where(empty, int(SolveStatus.ZERO_MASS), int(SolveStatus.CONVERGED))
        info = SolveInfo.solved(x.shape[0], x.dtype, x.device, status)
        info.transport_cost = torch.tensor([d.cost for d in distances], dtype=x.dtype, device=x.device)
        return z, info
