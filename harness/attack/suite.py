"""The standard evaluation: a versioned attack suite that gives each example its minimal verified radius.

One attack finds an upper bound on an example's minimal adversarial radius,
and a loose one when its schedule starts high or grows past the radius that
matters. The suite runs several attacks in turn, in the manner of
AutoAttack: each member attacks only the examples it can still improve
(those not yet broken at its smallest radius, and it gives an example up
once its radius passes the best one already verified for it), and every
claim is verified exactly. Then a refinement shrinks every verified radius:

1. a line search on the segment from the clean image to the adversarial
   one: the point at fraction ``t`` lies in the ball of radius ``t`` times
   the adversarial image's distance (mix the plan with the identity plan),
   so the smallest misclassified ``t`` gives a closer example, verified
   exactly like every other claim;
2. a bisection over fixed-radius attacks between 0 and the current radius,
   each round at the example's own midpoint.

Per example the result is the minimal verified radius over all of it, the
member whose example the refinement started from (the one with the smallest
verified radius over the members), and the refinement step (if any) that
gave the final radius. The suite's definition (members, budgets, version) is
recorded with every result row, so numbers of different versions never mix.

:func:`evaluate` is the entry point; :data:`SUITES` holds the definitions.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from concurrent.futures import Executor
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from solvers.iterate import StepRule
from solvers.plan_space import identity_plan

from ..data import DATASET_SHAPES
from ..vocabulary import STANDARD_RADII, BallKind, VerificationStatus
from .ball import Ball
from .model_checks import check_model
from .evaluate import submitter
from .pgd import AttackResult, EpsSchedule, Loss
from .spec import AttackSpec
from .verify import ExactDistances, Verification, robust_accuracy

__all__ = [
    "AttackSuite", "MemberRole", "Refinement", "SUITES", "SuiteEvaluation", "SuiteMember", "attack_suite", "evaluate",
    "evaluate_batch", "summarize",
]

CLEAN = "clean"
"""``found_by`` of an example the model misclassifies without any attack (radius 0)."""


class MemberRole(enum.Enum):
    """How a suite member chooses its examples and radii."""

    SCHEDULE = "schedule"
    """One run of the member's growing schedule on every example not broken at its first radius."""
    TARGETED = "targeted"
    """Like ``schedule``, once per target: the top wrong classes by clean logit, best first."""
    FIXED_RADII = "fixed_radii"
    """At each standard radius in turn, a fixed-radius attack that spends its whole budget there,
    on the examples not broken at that radius; later restarts start at random points of the ball."""


class RefinementStep(enum.Enum):
    """Which step of the refinement gave an example's final radius; stored by value."""

    NONE = "none"
    SEGMENT = "segment"
    BISECTION = "bisection"


@dataclass(frozen=True)
class SuiteMember:
    """One attack of a suite.

    Attributes
    ----------
    name : str
        What ``found_by`` says for the examples it broke first.
    role : MemberRole
    attack : AttackSpec
        The attack. Its schedule gives the radii of a ``schedule`` or ``targeted`` member; for ``fixed_radii``,
        ``EpsSchedule.fixed(1.0, n)``: n steps at each radius. ``targets`` is how many wrong classes a ``targeted``
        member aims at, by clean logit; ``restarts`` the attempts per example (``fixed_radii``: the first from the
        clean image, later ones random).
    band : float, optional
        ``schedule`` and ``targeted`` members only. An example that an earlier member already broke, at radius
        ``r``, is attacked only in the band ``[band * r, r]``: the schedule's growth and steps, scaled to start at
        ``band * r``, and the example given up once it passes ``r``. The schedule's radii below the band are
        where this member can no longer help, and its steps there are the cost a later member saves. Examples
        not yet broken run the schedule as it is.
    warm_start : bool
        ``fixed_radii`` members of plan-space solvers only. An example already broken at radius ``r`` is attacked
        at the radius ``m < r`` from its best verified plan ``P`` mixed with the identity plan ``I``,
        ``(m / r) P + (1 - m / r) I``: the point of the segment to its best image that lies on the sphere of
        radius ``m``, rather than from the clean image. Later restarts still start at random points.
    """

    name: str
    role: MemberRole
    attack: AttackSpec
    band: float | None = None
    warm_start: bool = False

    def __post_init__(self):
        if self.band is not None and not 0 < self.band < 1:
            raise ValueError(f"band={self.band!r} is invalid: it must lie in (0, 1)")
        if self.band is not None and self.role is MemberRole.FIXED_RADII:
            raise ValueError(f"band is for schedule and targeted members, not {self.role.value} ({self.name})")
        if self.warm_start and self.role is not MemberRole.FIXED_RADII:
            raise ValueError(f"warm_start is for fixed_radii members, not {self.role.value} ({self.name})")

    @property
    def schedule(self) -> EpsSchedule:
        return self.attack.schedule

    def definition(self) -> dict[str, Any]:
        written = {"name": self.name, "role": self.role.value, **self.attack.to_dict()}
        # Written only when set: the definitions of suites without bands stay as they were.
        if self.band is not None:
            written["band"] = self.band
        if self.warm_start:
            written["warm_start"] = True
        return written


@dataclass(frozen=True)
class Refinement:
    """How the suite shrinks each verified radius.

    Attributes
    ----------
    segment_steps : int
        Bisection steps of the line search from the clean image to the adversarial one.
    member : SuiteMember
        The fixed-radius attack of the bisection (``EpsSchedule.fixed(1.0, n)``), run at each example's midpoint.
    rounds : int
        Bisection rounds; each halves the interval where the minimal radius was not yet found.
    lower_end : float
        The bisection's first interval is ``[lower_end * r, r]`` for an example's radius ``r`` after the segment
        search: a growing schedule overshoots by one growth at most, and an attack at a fixed radius far below it
        fails and only wastes a round.
    """

    segment_steps: int
    member: SuiteMember
    rounds: int
    lower_end: float

    def definition(self) -> dict[str, Any]:
        return {
            "segment_steps": self.segment_steps, "member": self.member.definition(), "rounds": self.rounds,
            "lower_end": self.lower_end,
        }


@dataclass(frozen=True)
class AttackSuite:
    """A versioned evaluation of one data set's Wasserstein ball: members, in order, then a refinement.

    The version changes whenever anything in :meth:`definition` does.
    """

    name: str
    version: int
    dataset: str
    radii: tuple[float, ...]
    members: tuple[SuiteMember, ...]
    refinement: Refinement

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    def definition(self) -> dict[str, Any]:
        """Everything that determines the suite's numbers, as plain JSON values."""
        return {
            "name": self.name, "version": self.version, "dataset": self.dataset, "radii": list(self.radii),
            "members": [member.definition() for member in self.members], "refinement": self.refinement.definition(),
        }

    def definition_json(self) -> str:
        return json.dumps(self.definition(), sort_keys=True)

    @property
    def final_eps(self) -> float:
        """The largest radius any member searches."""
        return max(max(m.schedule.final_eps for m in self.members if m.role is not MemberRole.FIXED_RADII), max(self.radii))


def _member(name: str, role: MemberRole, solver: str, schedule: EpsSchedule, *, band: float | None = None,
            warm_start: bool = False, **attack) -> SuiteMember:
    return SuiteMember(name, role, AttackSpec(solver, schedule, **attack), band=band, warm_start=warm_start)


def _standard_suite(version: int, dataset: str, members: tuple[SuiteMember, ...], refinement: Refinement) -> AttackSuite:
    return AttackSuite("standard", version, dataset, STANDARD_RADII[(dataset, BallKind.WASSERSTEIN.value)], members, refinement)


def _standard_v1(dataset: str, initial: float, plan_step: float, lam: float) -> AttackSuite:
    """Version 1 of the ``standard`` suite for a data set: the same members, scaled to its radii."""
    # From a twentieth of the smallest standard radius, x1.1 every 3 steps: past 25 times the smallest by step 200.
    growing = EpsSchedule(initial, 1.1, 3, 200)
    plan = (("step_size", plan_step),)
    return _standard_suite(
        1,
        dataset,
        members=(
            _member("plan_pgd_box", MemberRole.SCHEDULE, "plan_pgd_box", growing, hyperparameters=plan),
            _member("frank_wolfe_box", MemberRole.SCHEDULE, "frank_wolfe_box", growing),
            _member(
                "projected_sinkhorn_box", MemberRole.SCHEDULE, "projected_sinkhorn_box", growing,
                hyperparameters=(("lam", lam),), step_rule=StepRule.LINF_SIGN, step_size=0.1,
            ),
            _member(
                "plan_pgd_box_targeted", MemberRole.TARGETED, "plan_pgd_box", growing, hyperparameters=plan,
                loss=Loss.LOGIT_MARGIN, targets=3,
            ),
            _member(
                "plan_pgd_box_fixed_radius", MemberRole.FIXED_RADII, "plan_pgd_box", EpsSchedule.fixed(1.0, 200),
                hyperparameters=plan, restarts=2,
            ),
        ),
        refinement=Refinement(
            segment_steps=12,
            member=_member("bisection", MemberRole.FIXED_RADII, "plan_pgd_box", EpsSchedule.fixed(1.0, 50), hyperparameters=plan),
            rounds=4,
            lower_end=0.5,
        ),
    )


def _standard_banded(dataset: str, initial: float, plan_step: float, version: int, band: float) -> AttackSuite:
    """Versions 2 and 3 of the ``standard`` suite, built by each member's measured contribution (``docs/evaluate.md``).

    Projected Sinkhorn with the box, which found no example's minimal radius first, is gone. The cheap strong
    member (plan-space PGD) runs first on every example; the targeted attack and Frank-Wolfe follow, each only
    in the band ``[r / 4, r]`` below the radius ``r`` already found; the fixed-radius attack and the bisection
    start from the best verified plan, scaled to their radius.

    Version 3 keeps everything but the band, narrowed to ``[r / 2, r]``: half the banded members' steps
    (``benchmarks/speed.py`` measures it against version 1 on the same images).
    """
    growing = EpsSchedule(initial, 1.1, 3, 200)
    plan = (("step_size", plan_step),)
    return _standard_suite(
        version,
        dataset,
        members=(
            _member("plan_pgd_box", MemberRole.SCHEDULE, "plan_pgd_box", growing, hyperparameters=plan),
            _member(
                "plan_pgd_box_targeted", MemberRole.TARGETED, "plan_pgd_box", growing, hyperparameters=plan,
                loss=Loss.LOGIT_MARGIN, targets=3, band=band,
            ),
            _member("frank_wolfe_box", MemberRole.SCHEDULE, "frank_wolfe_box", growing, band=band),
            _member(
                "plan_pgd_box_fixed_radius", MemberRole.FIXED_RADII, "plan_pgd_box", EpsSchedule.fixed(1.0, 100),
                hyperparameters=plan, restarts=2, warm_start=True,
            ),
        ),
        refinement=Refinement(
            segment_steps=12,
            member=_member(
                "bisection", MemberRole.FIXED_RADII, "plan_pgd_box", EpsSchedule.fixed(1.0, 25), hyperparameters=plan,
                warm_start=True,
            ),
            rounds=4,
            lower_end=0.5,
        ),
    )


SUITES: dict[tuple[str, str, int], AttackSuite] = {
    (suite.name, suite.dataset, suite.version): suite
    for suite in (
        _standard_v1("mnist", initial=0.005, plan_step=0.1, lam=1000.0),
        _standard_v1("cifar10", initial=0.0005, plan_step=0.01, lam=3000.0),
        *(
            _standard_banded(dataset, initial, plan_step, version, band)
            for version, band in ((2, 0.25), (3, 0.5))
            for dataset, initial, plan_step in (("mnist", 0.005, 0.1), ("cifar10", 0.0005, 0.01))
        ),
    )
}
"""The suites by (name, data set, version)."""


def attack_suite(name: str, dataset: str, version: int | None = None) -> AttackSuite:
    """The suite ``name`` for ``dataset``: version ``version``, or its latest.

    Raises
    ------
    ValueError
        An unknown name, data set or version; the message lists the suites there are.
    """
    versions = {v: suite for (n, d, v), suite in SUITES.items() if (n, d) == (name, dataset)}
    suite = versions.get(max(versions) if version is None and versions else version)
    if suite is None:
        known = ", ".join(f"{n} v{v} ({d})" for n, d, v in sorted(SUITES))
        asked = f"suite={name!r} version={version!r}" if version is not None else f"suite={name!r}"
        raise ValueError(f"{asked} for dataset={dataset!r} does not exist; suites: {known}")
    return suite


def _dataset_of(images: torch.Tensor) -> str:
    shape = tuple(images.shape[1:])
    for name, expected in DATASET_SHAPES.items():
        if shape == expected:
            return name
    allowed = ", ".join(f"{name} {expected}" for name, expected in DATASET_SHAPES.items())
    raise ValueError(f"images of shape {shape} match no data set with a suite ({allowed}); pass dataset=NAME")


@dataclass
class SuiteEvaluation:
    """A batch's outcome: per-example columns, the final images, and where the time went."""

    columns: dict[str, np.ndarray]
    adversarial: torch.Tensor
    member_seconds: dict[str, float] = field(default_factory=dict)
    """Each member's and refinement step's wall time, its verification included."""
    verify_seconds: float = 0.0
    """The part of it spent in exact verification."""


_TALLIES = ("steps", "solver_iterations", "unconverged_steps", "failed_steps", "zero_gradient_steps")


class _Best:
    """The best verified example of every example of a batch so far."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, clean_prediction: torch.Tensor):
        batch = x.shape[0]
        self.radius = np.full(batch, np.inf)
        self.image = x.detach().clone()
        self.found_by = np.full(batch, "", dtype=object)
        self.refined_by = np.full(batch, RefinementStep.NONE.value, dtype=object)
        self.status = np.full(batch, int(VerificationStatus.NOT_FOUND))
        self.distance = np.full(batch, np.nan)
        self.mass_error = np.full(batch, np.nan)
        self.box_violation = np.full(batch, np.nan)
        self.unreachable_mass = np.full(batch, np.nan)
        self.prediction = clean_prediction.cpu().numpy().copy()
        self.tallies = {name: np.zeros(batch, dtype=np.int64) for name in _TALLIES}
        self.rejected_claims = np.zeros(batch, dtype=np.int64)
        self.plans: dict[int, np.ndarray] = {}
        """The exact window plan of each verified best image (Wasserstein balls), by example."""
        wrong = (clean_prediction != y).cpu().numpy()
        self.radius[wrong] = 0.0
        self.found_by[wrong] = CLEAN
        self.status[wrong] = int(VerificationStatus.CLEAN_MISCLASSIFIED)

    def absorb(self, indices: np.ndarray, verdict: Verification, found_by: str, refined_by: RefinementStep) -> np.ndarray:
        """Keep the verified claims that beat the best radius so far; returns which did (a mask over ``indices``).

        A member's improvement makes it the example's ``found_by``; a refinement's keeps the member and sets ``refined_by``.
        """
        claimed = ~np.isin(verdict.status, [int(VerificationStatus.NOT_FOUND), int(VerificationStatus.CLEAN_MISCLASSIFIED)])
        self.rejected_claims[indices] += claimed & (verdict.status != int(VerificationStatus.VERIFIED))
        better = (verdict.status == int(VerificationStatus.VERIFIED)) & (verdict.verified_distance < self.radius[indices])
        chosen = indices[better]
        self.radius[chosen] = verdict.verified_distance[better]
        self.image[torch.as_tensor(chosen, device=self.image.device)] = verdict.image[torch.as_tensor(better, device=verdict.image.device)]
        if refined_by is RefinementStep.NONE:
            self.found_by[chosen] = found_by
        self.refined_by[chosen] = refined_by.value
        self.status[chosen] = verdict.status[better]
        for position in np.flatnonzero(better):
            self.plans[int(indices[position])] = verdict.plans.get(int(position))
        for name in ("distance", "mass_error", "box_violation", "unreachable_mass", "prediction"):
            getattr(self, name)[chosen] = getattr(verdict, name)[better]
        return better

    def count(self, indices: np.ndarray, result: AttackResult) -> None:
        for name in _TALLIES:
            self.tallies[name][indices] += getattr(result, name).cpu().numpy()


def _segment_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adversarial: torch.Tensor, steps: int) -> torch.Tensor:
    """The misclassified point closest to ``x`` on each segment from ``x`` to ``adversarial``, to ``2 ** -steps``."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    low = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    high = torch.ones_like(low)
    with torch.no_grad():
        for _ in range(steps):
            middle = (low + high) / 2
            fooled = model(x + middle.view(shape) * (adversarial - x)).argmax(1) != y
            high = torch.where(fooled, middle, high)
            low = torch.where(fooled, low, middle)
    return x + high.view(shape) * (adversarial - x)


def _wrong_classes(logits: torch.Tensor, y: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count): the wrong classes with the highest clean logits, best first."""
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return masked.topk(min(count, logits.shape[1] - 1), dim=1).indices


def evaluate_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ball: Ball,
    suite: AttackSuite,
    seed: int = 0,
    on_stage: Callable[[int, int, str], None] | None = None,
    verify_executor: Executor | None = None,
) -> SuiteEvaluation:
    """Run ``suite`` on one batch; see :func:`evaluate` for the columns.

    ``on_stage(index, stages, name)`` is called as each member and each refinement step starts (for progress reports).
    With ``verify_executor`` (a process pool) the exact LPs of a stage run in its workers, each starting as soon as
    the attack makes its claim; the verdicts are the same either way.
    """
    was_training = model.training
    model.eval()
    try:
        return _SuiteRun(model, x, y, ball, seed, verify_executor).evaluate(suite, on_stage)
    finally:
        model.train(was_training)


class _SuiteRun:
    """One batch's evaluation: the attacks, their verification, and the best example held for each example."""

    def __init__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ball: Ball, seed: int,
        verify_executor: Executor | None = None,
    ):
        self.model, self.x, self.y, self.ball, self.seed = model, x, y, ball, seed
        self.verify_executor = verify_executor
        with torch.no_grad():
            self.clean_logits = model(x)
        self.best = _Best(x, y, self.clean_logits.argmax(1))
        self.seconds: dict[str, float] = {}
        self.verify_seconds = 0.0

    def evaluate(self, suite: AttackSuite, on_stage) -> SuiteEvaluation:
        stages = [member.name for member in suite.members] + [RefinementStep.SEGMENT.value, RefinementStep.BISECTION.value]

        def stage(name: str) -> None:
            if on_stage is not None:
                on_stage(stages.index(name), len(stages), name)

        best = self.best
        for member in suite.members:
            stage(member.name)
            self._member(member, suite.radii)
        schedule_radius = best.radius.copy()
        self._refine(suite.refinement, stage)
        columns = {
            "label": self.y.cpu().numpy(),
            "clean_prediction": self.clean_logits.argmax(1).cpu().numpy(),
            "adversarial_prediction": best.prediction,
            "success": np.isfinite(best.radius),
            "verification_status": best.status,
            "verified_distance": best.radius,
            "schedule_radius": schedule_radius,
            "found_by": best.found_by.astype(str),
            "refined_by": best.refined_by.astype(str),
            "distance": best.distance,
            "mass_error": best.mass_error,
            "box_violation": best.box_violation,
            "unreachable_mass": best.unreachable_mass,
            **best.tallies,
            "rejected_claims": best.rejected_claims,
        }
        return SuiteEvaluation(columns, best.image, self.seconds, self.verify_seconds)

    def _member(self, member: SuiteMember, radii: tuple[float, ...]) -> None:
        """Run one member on the examples it can still improve."""
        radius = self.best.radius
        if member.role is MemberRole.FIXED_RADII:
            for fixed in radii:
                pending = np.flatnonzero(radius > fixed)
                self._fixed(member, pending, np.full(pending.size, fixed), RefinementStep.NONE)
        elif member.role is MemberRole.TARGETED:
            ranked = _wrong_classes(self.clean_logits, self.y, member.attack.targets)
            for rank in range(ranked.shape[1]):
                self._scheduled(member, np.flatnonzero(radius > member.schedule.initial), ranked[:, rank])
        else:
            self._scheduled(member, np.flatnonzero(radius > member.schedule.initial), None)

    def _scheduled(self, member: SuiteMember, pending: np.ndarray, targets: torch.Tensor | None) -> None:
        """Run a growing schedule on ``pending`` up to each example's best radius; in its band where it has one."""
        radius = self.best.radius[pending]
        banded = np.isfinite(radius) & (member.band is not None)
        for chosen, in_band in ((pending[banded], True), (pending[~banded], False)):
            if chosen.size == 0:
                continue
            options = {"give_up_above": self._tensor(self.best.radius[chosen])}
            if in_band:
                options["radius_scale"] = self._tensor(member.band * self.best.radius[chosen] / member.schedule.initial)
            if targets is not None:
                options["targets"] = targets[torch.as_tensor(chosen, device=self.x.device)]
            self._attack(member, chosen, **options)

    def _refine(self, refinement: Refinement, stage) -> None:
        """Shrink every positive verified radius: segment line search, bisection over fixed-radius attacks, segment again."""
        radius = self.best.radius
        broken = np.flatnonzero(np.isfinite(radius) & (radius > 0))
        stage(RefinementStep.SEGMENT.value)
        self._segment(broken, refinement.segment_steps)
        low = refinement.lower_end * radius[broken]
        improved_any = np.zeros(broken.size, dtype=bool)
        stage(RefinementStep.BISECTION.value)
        for _ in range(refinement.rounds):
            middle = (low + radius[broken]) / 2
            improved = self._fixed(refinement.member, broken, middle, RefinementStep.BISECTION)
            low = np.where(improved, low, middle)
            improved_any |= improved
        self._segment(broken[improved_any], refinement.segment_steps)

    def _fixed(self, member: SuiteMember, indices: np.ndarray, radii: np.ndarray, refined_by: RefinementStep) -> np.ndarray:
        """Attack each example of ``indices`` at its own fixed radius; returns the improved mask."""
        best = self.best.radius[indices]
        warm = np.isfinite(best) & (best > 0) if member.warm_start else np.zeros(indices.size, dtype=bool)
        improved = np.zeros(indices.size, dtype=bool)
        for part in (warm, ~warm):
            chosen, fixed = indices[part], radii[part]
            options = {"radius_scale": self._tensor(fixed)}
            if part is warm and chosen.size:
                options["start_plans"] = self._plans_towards(chosen, fixed / best[part])
            improved[part] = self._attack(member, chosen, refined_by, **options)
        return improved

    def _plans_towards(self, indices: np.ndarray, fraction: np.ndarray) -> torch.Tensor:
        """``t P + (1 - t) I`` for the best plans ``P`` of ``indices``: the plans of cost ``t`` times theirs."""
        chosen = torch.as_tensor(indices, device=self.x.device)
        identity = identity_plan(self.x[chosen], self.ball.transport.kernel_size)
        best = torch.from_numpy(np.stack([self.best.plans[int(index)] for index in indices])).to(identity)
        t = self._tensor(fraction).view(-1, 1, 1, 1)
        return t * best + (1 - t) * identity

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=self.x.dtype, device=self.x.device)

    def _attack(self, member: SuiteMember, indices: np.ndarray, refined_by=RefinementStep.NONE, **options) -> np.ndarray:
        """Attack the examples ``indices`` with ``member`` and keep what improves; returns the improved mask."""
        if indices.size == 0:
            return np.zeros(0, dtype=bool)
        started = time.perf_counter()
        chosen = torch.as_tensor(indices, device=self.x.device)
        distances = self._distances()
        if distances is not None:
            options["on_success"] = submitter(distances, self.x[chosen])
        result = member.attack.attack(self.model, self.ball, self.seed).run(self.x[chosen], self.y[chosen], **options)
        self.best.count(indices, result)
        return self._keep(
            member.name, refined_by, indices, result.adversarial, result.success, result.eps_found, started, distances
        )

    def _distances(self) -> ExactDistances | None:
        return None if self.verify_executor is None else self.ball.exact_distances(self.verify_executor)

    def _segment(self, indices: np.ndarray, steps: int) -> None:
        if indices.size == 0:
            return
        started = time.perf_counter()
        chosen = torch.as_tensor(indices, device=self.x.device)
        closer = _segment_search(self.model, self.x[chosen], self.y[chosen], self.best.image[chosen], steps)
        # Within t times the current radius, so within it: that is the claim the exact check tests.
        claimed = self._tensor(self.best.radius[indices])
        success = torch.ones(indices.size, dtype=torch.bool, device=self.x.device)
        self._keep(
            RefinementStep.SEGMENT.value, RefinementStep.SEGMENT, indices, closer, success, claimed, started, self._distances()
        )

    def _keep(self, name, refined_by, indices, images, success, claimed, started: float, distances) -> np.ndarray:
        """Verify claims exactly, keep those that beat the best radius so far, and book the time under ``name``."""
        chosen = torch.as_tensor(indices, device=self.x.device)
        verifying = time.perf_counter()
        verdict = self.ball.verify_claims(
            self.model, self.x[chosen], self.y[chosen], images, success, claimed, distances=distances
        )
        self.verify_seconds += time.perf_counter() - verifying
        improved = self.best.absorb(indices, verdict, name, refined_by)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return improved


def summarize(frame: pd.DataFrame, radii: tuple[float, ...]) -> dict[str, Any]:
    """Verified robust accuracy at ``radii`` and the median minimal radius of an evaluation's rows."""
    distances = frame["verified_distance"].to_numpy(dtype=np.float64)
    return {
        "robust_accuracy": {radius: robust_accuracy(distances, radius) for radius in radii},
        "median_radius": float(np.median(distances)),
        "examples": int(distances.size),
    }


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    ball: Ball,
    suite: str = "standard",
    *,
    version: int | None = None,
    dataset: str | None = None,
    batch_size: int = 100,
    seed: int = 0,
    progress: bool = False,
    verify_executor: Executor | None = None,
) -> pd.DataFrame:
    """The standard evaluation of ``model``: each example's minimal verified radius.

    Parameters
    ----------
    model : nn.Module
        A classifier of images in [0, 1] (preprocessing inside the model); any
        module, registered in the zoo or not. Used in eval mode, never modified.
    images, labels : Tensor
        (N, C, H, W) in [0, 1] and (N,), on the model's device.
    ball : Ball
        A Wasserstein ball (``Ball.wasserstein(5, 1.0)``).
    suite : str, default "standard"
        A suite of :data:`SUITES`.
    version : int, optional
        Its version; by default the latest. Earlier versions stay runnable, and every row names its version.
    dataset : str, optional
        Whose suite and standard radii to use; by default the data set whose
        image shape ``images`` has.
    batch_size : int, default 100
    seed : int, default 0
        Seed of the random restarts.
    progress : bool, default False
        Print which member runs on which batch.
    verify_executor : concurrent.futures.Executor, optional
        A process pool (``ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))``) where the
        exact LPs run in parallel, each as soon as its claim is made; by default one after another in this process.
        The verdicts are the same either way.

    Returns
    -------
    pandas.DataFrame
        One row per example: ``example_index``, ``label``,
        ``clean_prediction``, ``adversarial_prediction``, ``success``,
        ``verification_status`` (name), ``verified_distance`` (the minimal
        verified radius: 0 for a clean misclassification, inf where no
        attack succeeded), ``schedule_radius`` (the radius before the
        refinement), ``found_by`` (the member that found the smallest radius before the refinement),
        ``refined_by`` (``none``, ``segment`` or ``bisection``), the
        verification record of the final image (``distance``,
        ``mass_error``, ``box_violation``, ``unreachable_mass``), the attack
        work (``steps``, ``solver_iterations``, ``unconverged_steps``,
        ``failed_steps``, ``zero_gradient_steps``), ``rejected_claims``
        (claims of any member or refinement step that failed the exact
        verification: a reliability count), ``seconds`` (the batch's
        time shared by its examples), and ``suite``, ``suite_version``,
        ``suite_json`` (the full definition). ``frame.attrs`` holds the
        summary of :func:`summarize` at the suite's standard radii, the
        seconds each member took, and ``model_checks``: ``{check: what was
        measured}`` for each :func:`~harness.attack.model_checks.check_model`
        check that failed on the clean images (with ``zero_gradient_steps``
        where the attacks met such steps); each failure is also warned about
        (:class:`~harness.attack.model_checks.ModelCheckWarning`).

    Raises
    ------
    ValueError
        A ball that is not Wasserstein, an unknown suite or data set, images
        outside [0, 1], mismatched labels, or a bad batch size.
    """
    if not isinstance(ball, Ball) or ball.kind is not BallKind.WASSERSTEIN:
        raise ValueError(f"ball={ball!r} is invalid: the suites attack Wasserstein balls; pass Ball.wasserstein(kernel_size, p)")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be an (N, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be a ({images.shape[0]},) tensor, got {getattr(labels, 'shape', type(labels).__name__)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: it must be an integer >= 1")
    definition = attack_suite(suite, dataset or _dataset_of(images), version)
    # Before the attacks; the checks change no state they read (random generators included).
    checks = check_model(model, images, labels, batch_size=batch_size)
    parts, seconds = [], {}
    for start in range(0, images.shape[0], batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        report = None if not progress else (
            lambda index, stages, name, start=start: print(f"examples {start}-{start + x.shape[0] - 1}: {name} ({index + 1}/{stages})", flush=True)
        )
        started = time.perf_counter()
        outcome = evaluate_batch(model, x, y, ball, definition, seed, report, verify_executor)
        columns = dict(outcome.columns)
        columns["seconds"] = np.full(x.shape[0], (time.perf_counter() - started) / x.shape[0])
        part = pd.DataFrame({"example_index": np.arange(start, start + x.shape[0]), **columns})
        parts.append(part)
        for name, value in outcome.member_seconds.items():
            seconds[name] = seconds.get(name, 0.0) + value
    frame = pd.concat(parts, ignore_index=True)
    frame["verification_status"] = [VerificationStatus(int(code)).name for code in frame["verification_status"]]
    frame["suite"] = definition.name
    frame["suite_version"] = definition.version
    frame["suite_json"] = definition.definition_json()
    frame.attrs.update(summarize(frame, definition.radii), suite=definition.label, member_seconds=seconds)
    checks = checks.with_zero_gradient_steps(int(frame["zero_gradient_steps"].sum()))
    frame.attrs["model_checks"] = checks.as_dict()
    checks.warn(stacklevel=2)
    return frame
