"""Per-example diagnostics that every solver returns beside its images."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

import torch


class SolveStatus(enum.IntEnum):
    """Outcome of a solve for one example.

    A solver never returns NaN: an example that fails gets a status, and its
    returned image is the (always feasible) centre ``x``.
    """

    CONVERGED = 0
    """The stopping test passed; the output is feasible."""
    MAX_ITERATIONS = 1
    """The iteration budget ran out; the output is feasible but not optimal."""
    INSIDE_BALL = 2
    """The target was certified to lie in the ball and is returned unchanged."""
    ZERO_MASS = 3
    """The centre has no mass (or eps is 0): the ball is the single point x."""
    NUMERICAL_FAILURE = 4
    """Non-finite values appeared; the centre x is returned instead."""


@dataclass
class SolveInfo:
    """Diagnostics of one batched solve; every field is a ``(B,)`` tensor.

    Attributes
    ----------
    iterations : Tensor (int64)
        Iterations spent on the example (converged examples stop early).
    converged : Tensor (bool)
        Whether the example met the tolerance (or was solved exactly).
    transport_cost : Tensor
        Cost of the solver's own transport plan from x to the output, in
        normalized units (fraction of x's mass times pixel distance^p). It
        bounds the exact Wasserstein distance from above.
    status : Tensor (int64)
        A :class:`SolveStatus` code.
    marginal_error : Tensor
        L1 violation of the plan's source marginal at the last iteration,
        relative to the mass (0 for exactly solved examples).
    repair : Tensor
        Fraction ``1 - theta`` of the step back towards x that restored exact
        feasibility (``z = x + theta (z_solver - x)``); 0 when no repair was
        needed, small when the solver converged.
    log_domain : Tensor (bool)
        Whether the example needed the slower log-domain path because the
        exponential scalings would have left float range.
    """

    iterations: torch.Tensor
    converged: torch.Tensor
    transport_cost: torch.Tensor
    status: torch.Tensor
    marginal_error: torch.Tensor
    repair: torch.Tensor
    log_domain: torch.Tensor

    @classmethod
    def solved(cls, batch: int, dtype: torch.dtype, device, status: torch.Tensor | None = None) -> "SolveInfo":
        """Info for examples settled without iterating: converged, zero cost and error.

        ``status`` is a ``(B,)`` tensor of codes (default: all CONVERGED).
        """
        zeros = torch.zeros(batch, dtype=dtype, device=device)
        if status is None:
            status = torch.full((batch,), int(SolveStatus.CONVERGED), dtype=torch.int64, device=device)
        return cls(
            iterations=torch.zeros(batch, dtype=torch.int64, device=device),
            converged=torch.ones(batch, dtype=torch.bool, device=device),
            transport_cost=zeros,
            status=status.to(device=device, dtype=torch.int64),
            marginal_error=zeros.clone(),
            repair=zeros.clone(),
            log_domain=torch.zeros(batch, dtype=torch.bool, device=device),
        )

    def status_names(self) -> list[str]:
        """The status of each example as a readable name."""
        return [SolveStatus(int(code)).name for code in self.status.tolist()]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Field name to tensor, for logging or tables."""
        return {field.name: getattr(self, field.name) for field in fields(self)}
