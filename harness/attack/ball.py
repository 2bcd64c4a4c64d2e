"""The threat model as one object: a ball that builds its iterate, verifies and describes itself.

A :class:`Ball` is a kind (:class:`~harness.vocabulary.BallKind`) and, for
the Wasserstein ball, the local transport geometry (window size and cost
exponent). Everything that depends on which ball an attack stays in lives
here: which solvers it takes, how the attack's iterate is built, how a claim
is checked exactly, and the words the store keeps so the report can show it
without knowing the kinds.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

import zoo
from solvers.geometry import LocalTransport
from solvers.iterate import BallIterate, Norm, NormBallIterate, StepRule

from ..vocabulary import BallKind
from .pgd import AttackResult, make_iterate
from .verify import ExactDistances, Tolerances, Verification, verify_norm, verify_wasserstein

__all__ = ["Ball"]

_NORMS = {BallKind.LINF: Norm.LINF, BallKind.L2: Norm.L2}
_NORM_SYMBOLS = {BallKind.LINF: "l_inf", BallKind.L2: "l_2"}


@dataclass(frozen=True)
class Ball:
    """A threat model: the set of images an attack may reach from a clean one.

    Attributes
    ----------
    kind : BallKind
    transport : LocalTransport or None
        The Wasserstein ball's window and cost exponent; None for l_p balls.

    Examples
    --------
    >>> Ball.wasserstein(5, 1.0).title
    'Wasserstein ball, 5x5 local transport, p = 1'
    >>> Ball.of("linf").key
    'linf'
    """

    kind: BallKind
    transport: LocalTransport | None = None

    def __post_init__(self):
        if not isinstance(self.kind, BallKind):
            raise ValueError(f"kind={self.kind!r} is invalid: allowed {[kind.value for kind in BallKind]}")
        geometric = self.has_geometry(self.kind)
        if geometric != (self.transport is not None):
            raise ValueError(
                f"the {self.kind.value} ball {'needs' if geometric else 'takes no'} local transport geometry "
                f"(got {self.transport!r})"
            )

    @classmethod
    def wasserstein(cls, kernel_size: int, p: float) -> "Ball":
        return cls(BallKind.WASSERSTEIN, LocalTransport(kernel_size, p))

    @classmethod
    def of(cls, kind: str, kernel_size: int | None = None, p: float | None = None) -> "Ball":
        """The ball a grid or a stored row names; ``kernel_size`` and ``p`` are ignored by l_p balls.

        Raises
        ------
        ValueError
            An unknown kind (the message lists the allowed ones) or an
            invalid geometry.
        """
        try:
            ball_kind = BallKind(kind)
        except ValueError:
            raise ValueError(f"threat_model={kind!r} is not allowed; allowed: {', '.join(repr(k.value) for k in BallKind)}") from None
        if not cls.has_geometry(ball_kind):
            return cls(ball_kind)
        if kernel_size is None or p is None:
            raise ValueError(f"the {ball_kind.value} ball needs kernel_size and p (set them, or a protocol)")
        return cls(ball_kind, LocalTransport(kernel_size, p))

    @staticmethod
    def has_geometry(kind: BallKind) -> bool:
        """Whether balls of ``kind`` need a kernel size and a cost exponent."""
        return kind is BallKind.WASSERSTEIN

    @property
    def takes_solver(self) -> bool:
        """Whether attacks in this ball need a registered solver (l_p balls have closed-form projections)."""
        return self.transport is not None

    def config(self) -> dict[str, Any]:
        """The ball as the store's columns: ``threat_model``, ``kernel_size``, ``p``."""
        return {
            "threat_model": self.kind.value,
            "kernel_size": self.transport.kernel_size if self.transport else None,
            "p": self.transport.p if self.transport else None,
        }

    @property
    def key(self) -> str:
        """A short stable name, e.g. ``wasserstein-k5-p1`` or ``linf``: the report groups by it."""
        if self.transport is None:
            return self.kind.value
        return f"{self.kind.value}-k{self.transport.kernel_size}-p{self.transport.p:g}".replace(".", "_")

    @property
    def title(self) -> str:
        if self.transport is None:
            return f"{_NORM_SYMBOLS[self.kind]} ball"
        k = self.transport.kernel_size
        return f"Wasserstein ball, {k}x{k} local transport, p = {self.transport.p:g}"

    @property
    def description(self) -> str:
        """What the ball is and how distances in it are checked, in one sentence."""
        if self.transport is None:
            return f"{_NORM_SYMBOLS[self.kind]} ball around the clean image, pixels in [0, 1]"
        k = self.transport.kernel_size
        return (
            f"Wasserstein distance with cost |i - j|_2^{self.transport.p:g} between pixel positions, transport limited "
            f"to {k}x{k} windows; distances verified by an exact LP"
        )

    def iterate(
        self,
        solver: zoo.SolverSpec | None,
        hyperparameters: Mapping[str, Any],
        step_rule: StepRule | None,
        step_size: float | None,
        clamp: bool = False,
    ) -> BallIterate:
        """The attack's driver in this ball.

        Parameters
        ----------
        solver : SolverSpec or None
            The registered solver (None for l_p balls).
        hyperparameters : mapping
            The solver's hyperparameters (checked by the spec).
        step_rule, step_size
            The attack's ascent step; None where the solver steps by its own rule.
        clamp : bool
            Clamp images to [0, 1] after each projection (the paper's code).
        """
        if self.transport is None:
            if solver is not None:
                raise ValueError(f"the {self.title} takes no solver (got {solver.name!r})")
            return NormBallIterate(_NORMS[self.kind], step_size)
        if solver is None:
            raise ValueError(f"the {self.title} needs a solver; registered: {', '.join(s.name for s in zoo.solver_specs())}")
        built = solver.create(self.transport.kernel_size, self.transport.p, **hyperparameters)
        if not solver.kind.attack_steps:
            return make_iterate(built)
        return make_iterate(built, step_rule, step_size, clamp=clamp)

    def box_handling(self, solver: zoo.SolverSpec | None, clamp: bool) -> str:
        """How an attack in this ball keeps pixels in [0, 1], in words for the report."""
        if self.transport is None:
            return "clipped to [0, 1] after each step"
        if clamp:
            return "clamped to [0, 1] after each step, which does not conserve mass"
        return solver.box.description

    def attack_summary(self, solver: zoo.SolverSpec | None, step_rule: StepRule | None) -> str:
        """What an attack in this ball does, in one line."""
        if self.transport is None:
            return f"PGD in the {_NORM_SYMBOLS[self.kind]} ball, step rule {step_rule.value}"
        return solver.summary

    def verify(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        result: AttackResult,
        targets: torch.Tensor | None = None,
        tolerances: Tolerances | None = None,
        distances: ExactDistances | None = None,
    ) -> Verification:
        """Check the attack's claims exactly (:mod:`harness.attack.verify`): the exact LP for
        the Wasserstein ball (in ``distances``' workers when given, see :meth:`exact_distances`),
        the norm of the perturbation for l_p balls."""
        return self.verify_claims(model, x, y, result.adversarial, result.success, result.eps_found, targets, tolerances, distances)

    def verify_claims(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        adversarial: torch.Tensor,
        success: torch.Tensor,
        eps_found: torch.Tensor,
        targets: torch.Tensor | None = None,
        tolerances: Tolerances | None = None,
        distances: ExactDistances | None = None,
    ) -> Verification:
        """:meth:`verify` for claims that come from no single attack run: images, whether each is
        claimed adversarial, and the radius each claims to lie within."""
        claims = (model, x, y, adversarial, success, eps_found)
        if self.transport is None:
            return verify_norm(*claims, _NORMS[self.kind], targets, tolerances)
        return verify_wasserstein(*claims, self.transport.kernel_size, self.transport.p, targets, tolerances, distances)

    def exact_distances(self, executor: Executor) -> ExactDistances | None:
        """Where this ball's exact checks can run in ``executor``'s workers; None for l_p balls (their check is a norm)."""
        if self.transport is None:
            return None
        return ExactDistances(executor, self.transport.kernel_size, self.transport.p)
