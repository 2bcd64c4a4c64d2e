"""One attack, described once: :class:`AttackSpec`, and the published settings that preset it.

A grid cell, a member of an evaluation suite and the inner attack of
adversarial training each hold an :class:`AttackSpec`; :meth:`AttackSpec.to_dict`
is the one way any of them is written down (a cell's id hashes it, a suite's
definition lists it, a training record stores it). A protocol
(:data:`PROTOCOLS`) is a named, sourced preset: an attack without a solver
(its schedule, step and entropic regularization) plus the ball's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from torch import nn

import zoo
from solvers.iterate import BallIterate, StepRule

from .ball import Ball
from .pgd import EpsSchedule, Loss, PGDAttack

__all__ = ["AttackProtocol", "AttackSpec", "PROTOCOLS"]


@dataclass(frozen=True)
class AttackSpec:
    """Everything that determines an attack's numbers in a given ball, on a given model and seed.

    Attributes
    ----------
    solver : str or None
        The registered solver (:func:`zoo.solver_spec`); None for an l_p ball, which projects by its norm, and for a
        protocol, which presets every solver.
    schedule : EpsSchedule
        The radii, step by step.
    hyperparameters : tuple of (name, value)
        The solver's hyperparameters, sorted by name (one it declares and this leaves out takes its default).
    step_rule, step_size
        The ascent step of an image-space solver; None where the solver steps by its own rule.
    clamp : bool
        Clamp images to [0, 1] after each projection (the paper's code).
    loss : Loss
    restarts : int
        Attempts per example.
    targets : int
        Wrong classes aimed at, by clean logit (0: untargeted).
    """

    solver: str | None
    schedule: EpsSchedule
    hyperparameters: tuple[tuple[str, Any], ...] = ()
    step_rule: StepRule | None = None
    step_size: float | None = None
    clamp: bool = False
    loss: Loss = Loss.CROSS_ENTROPY
    restarts: int = 1
    targets: int = 0

    def __post_init__(self):
        object.__setattr__(self, "hyperparameters", tuple(sorted(dict(self.hyperparameters).items())))

    @property
    def solver_spec(self) -> zoo.SolverSpec | None:
        return None if self.solver is None else zoo.solver_spec(self.solver)

    def iterate(self, ball: Ball) -> BallIterate:
        """The attack's driver in ``ball`` (built fresh: iterates keep per-run state)."""
        return ball.iterate(self.solver_spec, dict(self.hyperparameters), self.step_rule, self.step_size, self.clamp)

    def attack(self, model: nn.Module, ball: Ball, seed: int) -> PGDAttack:
        """A fresh PGD attack on ``model`` in ``ball``."""
        return PGDAttack(model, self.iterate(ball), self.schedule, loss=self.loss, restarts=self.restarts, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        """The attack as plain JSON values: enums by value, the schedule flattened.

        ``eps_increment`` and ``targets`` appear only when set, so attacks
        without them keep the cell ids they had before those settings existed.
        """
        schedule = self.schedule
        written = {
            "solver": self.solver,
            "hyperparameters": dict(self.hyperparameters),
            "eps_initial": schedule.initial,
            "eps_factor": schedule.factor,
            "eps_every": schedule.every,
            "iterations": schedule.iterations,
            "step_rule": None if self.step_rule is None else self.step_rule.value,
            "step_size": self.step_size,
            "clamp": self.clamp,
            "loss": self.loss.value,
            "restarts": self.restarts,
        }
        if schedule.increment:
            written["eps_increment"] = schedule.increment
        if self.targets:
            written["targets"] = self.targets
        return written

    @classmethod
    def from_dict(cls, written: Mapping[str, Any]) -> "AttackSpec":
        """The attack :meth:`to_dict` wrote."""
        schedule = EpsSchedule(
            written["eps_initial"], written["eps_factor"], written["eps_every"], written["iterations"],
            written.get("eps_increment", 0.0),
        )
        return cls(
            solver=written["solver"], schedule=schedule, hyperparameters=tuple(written["hyperparameters"].items()),
            step_rule=None if written["step_rule"] is None else StepRule(written["step_rule"]),
            step_size=written["step_size"], clamp=written["clamp"], loss=Loss(written["loss"]),
            restarts=written["restarts"], targets=written.get("targets", 0),
        )


@dataclass(frozen=True)
class AttackProtocol:
    """A published attack setting: an attack without a solver, and the ball's geometry.

    Attributes
    ----------
    name : str
    description : str
        Where the setting comes from.
    attack : AttackSpec
        Schedule, step, and the entropic regularization ``lam`` among the hyperparameters (used by the solvers that
        declare it). ``clamp`` says whether the source clamps images to [0, 1] after each projection; a grid cell
        clamps only where its block says so, since clamping changes what the attack searches.
    kernel_size, p : int, float
        Local transport window and cost exponent.
    """

    name: str
    description: str
    attack: AttackSpec
    kernel_size: int
    p: float

    @property
    def schedule(self) -> EpsSchedule:
        return self.attack.schedule

    @property
    def lam(self) -> float:
        return dict(self.attack.hyperparameters)["lam"]

    def for_solver(self, solver: zoo.SolverSpec) -> AttackSpec:
        """The protocol's attack with ``solver``: its declared hyperparameters preset, its own step rule kept."""
        declared = {h.name for h in solver.hyperparameters}
        hyperparameters = {name: value for name, value in self.attack.hyperparameters if name in declared}
        steps = solver.kind.attack_steps
        return replace(
            self.attack, solver=solver.name, hyperparameters=tuple(hyperparameters.items()),
            step_rule=self.attack.step_rule if steps else None, step_size=self.attack.step_size if steps else None,
            clamp=self.attack.clamp and steps,
        )


def _protocol(name, description, schedule, rule, step_size, kernel_size, p, lam, clamp) -> AttackProtocol:
    attack = AttackSpec(None, schedule, (("lam", lam),), rule, step_size, clamp)
    return AttackProtocol(name, description, attack, kernel_size, p)


_WU_2020_MNIST = _protocol(
    "wu2020_mnist", "Wu, Wang, Yu 2020, public scripts: fixed eps 0.5, 5x5 plans, p = 1, 300 steps, plan step 0.1",
    EpsSchedule.fixed(0.5, 300), StepRule.LINF_SIGN, 0.1, 5, 1.0, 1000.0, False,
)

PROTOCOLS: dict[str, AttackProtocol] = {
    protocol.name: protocol
    for protocol in (
        _protocol(
            "paper_mnist",
            "Wong et al. 2019, Section 5 (text): 5x5 plans, 2-norm cost, eps 0.3 x1.1 every 10 steps, 200 steps",
            EpsSchedule(0.3, 1.1, 10, 200), StepRule.LINF_SIGN, 0.1, 5, 1.0, 1000.0, True,
        ),
        _protocol(
            "paper_code_mnist",
            "Wong et al. 2019, public code attack_mnist.py: 7x7 plans, squared cost, eps 0.7 x1.1 every 10 steps, 200 steps",
            EpsSchedule(0.7, 1.1, 10, 200), StepRule.LINF_SIGN, 0.1, 7, 2.0, 1000.0, True,
        ),
        _protocol(
            "paper_cifar",
            "Wong et al. 2019, Section 5 (text): 5x5 plans, 2-norm cost, eps 0.001 x1.17 every 10 steps, 400 steps",
            EpsSchedule(0.001, 1.17, 10, 400), StepRule.LINF_SIGN, 0.1, 5, 1.0, 3000.0, True,
        ),
        _WU_2020_MNIST,
        _protocol(
            "wu2020_cifar", "Wu, Wang, Yu 2020, public scripts: fixed eps 0.005, 5x5 plans, p = 1, 300 steps, plan step 0.01",
            EpsSchedule.fixed(0.005, 300), StepRule.LINF_SIGN, 0.01, 5, 1.0, 3000.0, False,
        ),
        _protocol(
            "hu2020",
            "Hu, Swaminathan, Salman, Yang 2020: eps 0.01 growing by 0.01 per step, 200 steps, step = gradient / "
            "||gradient||_inf x 0.06 (x the image's mass), 5x5, p = 1, pixels kept in [0, 1] by the projection",
            EpsSchedule(0.01, 1.0, 1, 200, increment=0.01), StepRule.LINF_NORMALIZED_MASS, 0.06, 5, 1.0, 1000.0, False,
        ),
    )
}
"""The published attack settings by name."""
