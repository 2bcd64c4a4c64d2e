"""The attack's view of a solver: start from x, step from a gradient.

An attack loop needs three things from a threat model: a starting iterate, a
way to move it uphill given the loss gradient at its current image, and the
current image. :class:`BallIterate` is that interface. Image-space solvers
(anything with ``project(x, w, eps)``) are driven by
:class:`ProjectedGradientIterate`, which takes a steepest-ascent step
(:class:`StepRule`) and projects back onto the ball; a plan-space solver keeps
its transport plan in :attr:`IterateState.extra` and implements
:class:`BallIterate` itself, and the loop does not notice the difference.

Every tensor in an iterate's state has the batch as its first dimension, so
the loop can drop finished examples with :meth:`IterateState.select`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .info import SolveStatus
from .checks import check_positive
from .projectors import ConjugateSinkhorn, Projector


@dataclass
class IterateState:
    """Where the attack stands for a batch of examples.

    Attributes
    ----------
    center : Tensor (B, C, H, W)
        The clean images, centres of the balls.
    image : Tensor (B, C, H, W)
        The current iterate's image, the one the model sees.
    extra : dict of str to Tensor
        Solver-specific state (e.g. a transport plan), each with leading
        dimension B.
    """

    center: torch.Tensor
    image: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, keep: torch.Tensor) -> "IterateState":
        """The state of the examples ``keep`` (a boolean mask or index tensor)."""
        return IterateState(self.center[keep], self.image[keep], {k: v[keep] for k, v in self.extra.items()})


@dataclass
class StepReport:
    """Per-example diagnostics of one attack step; every field is a ``(B,)`` tensor.

    Attributes
    ----------
    converged : Tensor (bool)
        The solver met its tolerance (always True for closed-form balls).
    solver_iterations : Tensor (int64)
        Inner iterations the solver spent on the example.
    zero_gradient : Tensor (bool)
        The loss gradient was exactly zero, so the step could not move.
    failed : Tensor (bool)
        The solver reported a numerical failure and fell back to the centre.
    """

    converged: torch.Tensor
    solver_iterations: torch.Tensor
    zero_gradient: torch.Tensor
    failed: torch.Tensor

    @classmethod
    def closed_form(cls, zero_gradient: torch.Tensor) -> "StepReport":
        batch, device = zero_gradient.shape[0], zero_gradient.device
        return cls(
            converged=torch.ones(batch, dtype=torch.bool, device=device),
            solver_iterations=torch.zeros(batch, dtype=torch.int64, device=device),
            zero_gradient=zero_gradient,
            failed=torch.zeros(batch, dtype=torch.bool, device=device),
        )


@runtime_checkable
class BallIterate(Protocol):
    """What the attack loop needs from a threat model and its solver."""

    def start(self, x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> IterateState:
        """The first iterate for centres ``x``: ``x`` itself, or a random point of the ball."""
        ...

    def step(self, state: IterateState, grad: torch.Tensor, eps: float, iteration: int) -> tuple[IterateState, StepReport]:
        """Move uphill along ``grad`` (the loss gradient at ``state.image``), staying in the ball of radius ``eps``."""
        ...


class StepRule(enum.Enum):
    """How an image-space attack turns a gradient ``g`` into a target ``w``.

    ``alpha`` is the step size; ``z`` the current image; ``m`` the mass of
    the clean image.
    """

    LINF_SIGN = "linf_sign"
    """``w = z + alpha * sign(g)``: the paper's code (alpha = 0.1)."""
    L2_NORMALIZED = "l2_normalized"
    """``w = z + alpha * g / ||g||_2``."""
    LINF_NORMALIZED_MASS = "linf_normalized_mass"
    """``w = z + alpha * m * g / ||g||_inf`` (Hu et al. 2020; alpha = 0.06 there)."""
    WASSERSTEIN = "wasserstein"
    """``w = argmax <w, g>`` over the Wasserstein ball of radius ``alpha`` around ``z``, by conjugate Sinkhorn."""


def _per_example_norm(g: torch.Tensor, ord: float) -> torch.Tensor:
    return torch.linalg.vector_norm(g.flatten(1), ord=ord, dim=1).view(-1, *([1] * (g.dim() - 1)))


def is_zero_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Per example, whether its gradient is exactly zero everywhere (no step can follow it): bool ``(B,)``."""
    return ~grad.flatten(1).ne(0).any(dim=1)


def ascent_direction(rule: StepRule, grad: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """The unit-size step of a closed-form rule (zero where the gradient is zero).

    Not defined for :attr:`StepRule.WASSERSTEIN`, which needs a solver.
    """
    if rule is StepRule.LINF_SIGN:
        return grad.sign()
    if rule is StepRule.L2_NORMALIZED:
        norm = _per_example_norm(grad, 2.0)
        return grad / norm.clamp_min(torch.finfo(grad.dtype).tiny)
    if rule is StepRule.LINF_NORMALIZED_MASS:
        norm = _per_example_norm(grad, float("inf"))
        mass = center.flatten(1).sum(1).view_as(norm)
        return grad * (mass / norm.clamp_min(torch.finfo(grad.dtype).tiny))
    raise ValueError(f"step rule {rule.value!r} has no closed form; allowed here: linf_sign, l2_normalized, linf_normalized_mass")


class ProjectedGradientIterate:
    """Projected steepest ascent with an image-space solver (paper Eq. 2).

    Each step moves the image to ``w`` by ``rule`` with size ``step_size``,
    then projects ``w`` onto the ball around the clean image with
    ``projector``.

    Parameters
    ----------
    projector : Projector
        Any object with ``project(x, w, eps) -> (z, SolveInfo)``.
    rule : StepRule
    step_size : float
        ``alpha`` of the rule, > 0.
    clamp : bool, default False
        Clamp the projected image to [0, 1] as the paper's code does. This
        changes the mass and can leave the ball: exact verification then
        rejects the example; it exists to reproduce the published protocol.
    conjugate : ConjugateSinkhorn, optional
        The steepest-ascent solver for :attr:`StepRule.WASSERSTEIN`; by
        default one with the projector's transport and ``lam``.
    """

    def __init__(
        self,
        projector: Projector,
        rule: StepRule = StepRule.LINF_SIGN,
        step_size: float = 0.1,
        clamp: bool = False,
        conjugate: ConjugateSinkhorn | None = None,
    ):
        if not isinstance(projector, Projector):
            raise ValueError(f"projector={projector!r} has no project(x, w, eps) method: it is not an image-space solver")
        if not isinstance(rule, StepRule):
            raise ValueError(f"rule={rule!r} is invalid: allowed {[r.value for r in StepRule]}")
        self.projector = projector
        self.rule = rule
        self.step_size = check_positive("step_size", step_size)
        self.clamp = bool(clamp)
        if rule is StepRule.WASSERSTEIN and conjugate is None:
            t = projector.transport
            conjugate = ConjugateSinkhorn(t.kernel_size, t.p, lam=getattr(projector, "lam", 1000.0))
        self.conjugate = conjugate

    def start(self, x, eps, generator=None):
        if generator is None:
            return IterateState(x, x.clone())
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        z, _ = self.projector.project(x, x + self.step_size * (2 * noise - 1), eps)
        return IterateState(x, self._clamped(z))

    def _clamped(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(0.0, 1.0) if self.clamp else z

    def step(self, state, grad, eps, iteration):
        zero_gradient = is_zero_gradient(grad)
        if self.rule is StepRule.WASSERSTEIN:
            w, ascent_info = self.conjugate.maximize(state.image, grad, self.step_size)
            ascent_converged = ascent_info.converged
        else:
            w = state.image + self.step_size * ascent_direction(self.rule, grad, state.center)
            ascent_converged = torch.ones_like(zero_gradient)
        z, info = self.projector.project(state.center, w, eps)
        report = StepReport(
            converged=info.converged & ascent_converged,
            solver_iterations=info.iterations,
            zero_gradient=zero_gradient,
            failed=info.status == int(SolveStatus.NUMERICAL_FAILURE),
        )
        return IterateState(state.center, self._clamped(z), state.extra), report


class Norm(enum.Enum):
    """The baseline l_p balls."""

    LINF = "linf"
    L2 = "l2"


class NormBallIterate:
    """Projected steepest ascent in an l_inf or l_2 ball intersected with [0, 1].

    The baseline threat models, in the same loop as the Wasserstein ones.
    l_inf uses sign steps and an exact projection (clipping); l_2 uses
    normalized steps, projection onto the ball, then clipping to the box.

    Parameters
    ----------
    norm : Norm
    step_size : float
        Step length, in the ball's own norm, > 0.
    """

    def __init__(self, norm: Norm, step_size: float):
        if not isinstance(norm, Norm):
            raise ValueError(f"norm={norm!r} is invalid: allowed {[n.value for n in Norm]}")
        self.norm = norm
        self.step_size = check_positive("step_size", step_size)

    def start(self, x, eps, generator=None):
        if generator is None:
            return IterateState(x, x.clone())
        noise = 2 * torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device) - 1
        return IterateState(x, self._project(x, x + eps * noise, eps))

    def _project(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        delta = w - x
        if self.norm is Norm.LINF:
            delta = delta.clamp(-eps, eps)
        else:
            norm = _per_example_norm(delta, 2.0)
            delta = delta * (eps / norm.clamp_min(torch.finfo(delta.dtype).tiny)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    def step(self, state, grad, eps, iteration):
        rule = StepRule.LINF_SIGN if self.norm is Norm.LINF else StepRule.L2_NORMALIZED
        w = state.image + self.step_size * ascent_direction(rule, grad, state.center)
        report = StepReport.closed_form(is_zero_gradient(grad))
        return IterateState(state.center, self._project(state.center, w, eps), state.extra), report
