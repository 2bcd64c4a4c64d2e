"""PGD over a ball with a growing radius: the benchmark's attack.

The loop follows the paper (Eq. 2 and its evaluation protocol): a steepest
ascent step, a projection back onto the ball around the clean image, and a
radius that grows by a factor every few iterations. Each example stops at the
first iterate the model misclassifies, and leaves the active batch, so the
cost of an iteration falls as the attack succeeds; its *radius found* is the
radius of the ball that iterate was projected onto. One run therefore gives
the whole accuracy-against-radius curve (after verification, see
:mod:`harness.verify`).

The loop knows its solver only through :class:`solvers.iterate.BallIterate`
(start, step, current image); :func:`make_iterate` wraps an image-space
projector, and a plan-space solver that implements the protocol itself is
used as is.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from solvers.iterate import BallIterate, IterateState, ProjectedGradientIterate, StepRule
from solvers.checks import check_iterations, check_positive
from solvers.projectors import Projector

__all__ = [
    "AttackResult",
    "EpsSchedule",
    "Loss",
    "PGDAttack",
    "AttackProgress",
    "attack_objective",
    "make_iterate",
]


class Loss(enum.Enum):
    """The objective the attack ascends."""

    CROSS_ENTROPY = "cross_entropy"
    """Cross-entropy of the true label (targeted: minus that of the target)."""
    LOGIT_MARGIN = "logit_margin"
    """Best other logit minus the true label's (targeted: target's logit minus the best other)."""


@dataclass(frozen=True)
class EpsSchedule:
    """Radius ``initial * factor ** k + increment * k`` at step ``t``, ``k = t // every``, for ``iterations`` steps.

    A multiplicative schedule (the paper's) sets ``factor > 1``, an additive
    one (Hu et al. 2020's) ``increment > 0``; ``factor = 1, increment = 0``
    is the fixed-radius attack (:meth:`fixed`).
    """

    initial: float
    factor: float = 1.0
    every: int = 10
    iterations: int = 200
    increment: float = 0.0

    def __post_init__(self):
        check_positive("initial", self.initial)
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not math.isfinite(self.factor) or self.factor < 1:
            raise ValueError(f"factor={self.factor!r} is invalid: it must be a finite number >= 1 (1 keeps the radius fixed)")
        if (
            isinstance(self.increment, bool) or not isinstance(self.increment, (int, float))
            or not math.isfinite(self.increment) or self.increment < 0
        ):
            raise ValueError(f"increment={self.increment!r} is invalid: it must be a finite number >= 0 (0: no additive growth)")
        check_iterations("every", self.every)
        check_iterations("iterations", self.iterations)

    @classmethod
    def fixed(cls, eps: float, iterations: int) -> "EpsSchedule":
        return cls(initial=eps, factor=1.0, every=1, iterations=iterations)

    def eps_at(self, step: int) -> float:
        growths = step // self.every
        return self.initial * self.factor**growths + self.increment * growths

    @property
    def final_eps(self) -> float:
        """The largest radius the schedule reaches."""
        return self.eps_at(self.iterations - 1)


def make_iterate(solver, rule: StepRule = StepRule.LINF_SIGN, step_size: float = 0.1, clamp: bool = False) -> BallIterate:
    """The attack-side driver of ``solver``.

    An image-space solver (``project(x, w, eps)``) is wrapped in
    :class:`~solvers.iterate.ProjectedGradientIterate` with the given step;
    a solver that already implements :class:`~solvers.iterate.BallIterate`
    (plan-space solvers, norm balls) is returned as is, and ``rule``,
    ``step_size`` and ``clamp`` are its own business.
    """
    if isinstance(solver, BallIterate):
        return solver
    if isinstance(solver, Projector):
        return ProjectedGradientIterate(solver, rule, step_size, clamp)
    raise ValueError(
        f"solver {solver!r} is neither an image-space projector (project(x, w, eps)) "
        "nor a ball iterate (start(x, eps), step(state, grad, eps, iteration))"
    )


@dataclass
class AttackResult:
    """What the attack claims, per example; every field has the batch first.

    Nothing here is verified: :func:`harness.verify.verify_wasserstein`
    checks the claims with an exact solver.

    Attributes
    ----------
    adversarial : Tensor (B, C, H, W)
        The first misclassified iterate, or the last iterate if none was.
    success : Tensor (bool)
        The model misclassified ``adversarial`` during the attack (for the
        clean image itself, when it is already misclassified).
    clean_prediction, adversarial_prediction : Tensor (int64)
        Predicted classes of the clean image and of ``adversarial``.
    eps_found : Tensor
        Radius of the ball ``adversarial`` was projected onto; 0 for a clean
        image already misclassified; ``inf`` without success.
    steps : Tensor (int64)
        Attack steps spent on the example (over all restarts).
    restart : Tensor (int64)
        The restart that succeeded (-1 without success).
    solver_iterations : Tensor (int64)
        Inner solver iterations summed over the example's steps.
    unconverged_steps : Tensor (int64)
        Steps whose solver did not meet its tolerance (output feasible but
        not optimal).
    failed_steps : Tensor (int64)
        Steps whose solver reported a numerical failure.
    zero_gradient_steps : Tensor (int64)
        Steps with an exactly zero loss gradient.
    seconds : float
        Wall time of the whole attack.
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    clean_prediction: torch.Tensor
    adversarial_prediction: torch.Tensor
    eps_found: torch.Tensor
    steps: torch.Tensor
    restart: torch.Tensor
    solver_iterations: torch.Tensor
    unconverged_steps: torch.Tensor
    failed_steps: torch.Tensor
    zero_gradient_steps: torch.Tensor
    seconds: float = 0.0

    def per_example(self) -> dict[str, torch.Tensor]:
        """The ``(B,)`` fields by name (everything but the images and the time)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("adversarial", "seconds")}


def _per_example(name: str, value: torch.Tensor | None, batch: int, like: torch.Tensor, positive: bool) -> torch.Tensor | None:
    """A per-example radius argument checked and moved to ``like``'s device and dtype."""
    if value is None:
        return None
    value = torch.as_tensor(value).to(like.device, like.dtype)
    if value.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(value.shape)}: it must be one value per example, ({batch},)")
    bad = torch.isnan(value) | (value <= 0 if positive else value < 0) | (torch.isinf(value) if positive else False)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        allowed = "finite and > 0" if positive else ">= 0 (inf: never give up)"
        raise ValueError(f"{name}={float(value[index])} (example {index}) is invalid: it must be {allowed}")
    return value


def _radii(eps: float, scale: torch.Tensor | None, indices: torch.Tensor) -> float | torch.Tensor:
    """The radius of the examples ``indices`` where the schedule is at ``eps``."""
    return eps if scale is None else eps * scale[indices]


def attack_objective(logits: torch.Tensor, labels: torch.Tensor, loss: Loss, targeted: bool) -> torch.Tensor:
    """Per-example quantity the attack *increases*: the loss of ``labels`` (targeted: of the target, negated)."""
    if loss is Loss.CROSS_ENTROPY:
        ce = nn.functional.cross_entropy(logits, labels, reduction="none")
        return -ce if targeted else ce
    label_logit = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return label_logit - others if targeted else others - label_logit


@dataclass(frozen=True)
class AttackProgress:
    """Where a running attack is: examples decided (fooled, or out of steps at the end), step, radius."""

    decided: int
    examples: int
    step: int
    steps: int
    eps: float


@dataclass
class _Tally:
    """Per-example counters over the full batch."""

    steps: torch.Tensor
    solver_iterations: torch.Tensor
    unconverged_steps: torch.Tensor
    failed_steps: torch.Tensor
    zero_gradient_steps: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, device) -> "_Tally":
        return cls(*(torch.zeros(batch, dtype=torch.int64, device=device) for _ in fields(cls)))


class PGDAttack:
    """Projected gradient ascent with a growing radius, fooled examples leave the batch.

    Parameters
    ----------
    model : nn.Module
        Classifier taking images in [0, 1] (preprocessing inside); used in
        eval mode, never modified.
    iterate : BallIterate
        The threat model and its solver (see :func:`make_iterate`).
    schedule : EpsSchedule
    loss : Loss, default cross-entropy
    restarts : int, default 1
        Attempts per example; the first starts at the clean image, later ones
        at a random point of the initial ball. Only examples not yet fooled
        are attacked again, with the schedule restarted.
    seed : int, default 0
        Seed of the random starts.

    Examples
    --------
    >>> attack = PGDAttack(model, make_iterate(zoo.solver("projected_sinkhorn_box")),
    ...                    PROTOCOLS["paper_mnist"].schedule)            # doctest: +SKIP
    >>> result = attack.run(images, labels)                              # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        iterate: BallIterate,
        schedule: EpsSchedule,
        loss: Loss = Loss.CROSS_ENTROPY,
        restarts: int = 1,
        seed: int = 0,
    ):
        if not isinstance(iterate, BallIterate):
            raise ValueError(f"iterate={iterate!r} does not implement start/step; build it with make_iterate(solver)")
        if not isinstance(schedule, EpsSchedule):
            raise ValueError(f"schedule={schedule!r} is invalid: pass an EpsSchedule (or a protocol's .schedule)")
        if not isinstance(loss, Loss):
            raise ValueError(f"loss={loss!r} is invalid: allowed {[item.value for item in Loss]}")
        self.model = model
        self.iterate = iterate
        self.schedule = schedule
        self.loss = loss
        self.restarts = check_iterations("restarts", restarts)
        self.seed = int(seed)

    def _fooled(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        prediction = logits.argmax(1)
        return prediction == targets if targets is not None else prediction != labels

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
        on_step: Callable[[AttackProgress], None] | None = None,
        on_success: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
        radius_scale: torch.Tensor | None = None,
        give_up_above: torch.Tensor | None = None,
        start_plans: torch.Tensor | None = None,
    ) -> AttackResult:
        """Attack the batch ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,).

        ``targets`` (B,) makes the attack targeted: success means predicting
        the target; a target equal to the label is an error.
        ``radius_scale`` (B,) gives each example its own radii: example ``i``
        is attacked at ``radius_scale[i] * schedule.eps_at(t)`` (with
        ``EpsSchedule.fixed(1.0, n)``, at the fixed radius
        ``radius_scale[i]``). ``give_up_above`` (B,) drops an example,
        unfooled, once its radius would exceed that value: an evaluation
        that already holds a smaller adversarial example for it has nothing
        to gain there. ``on_step`` is
        called after every step with an :class:`AttackProgress` (for
        progress bars; it must be cheap). ``on_success(indices, images,
        eps_found)`` is called at each step where examples are fooled, with
        their indices in the batch, their final adversarial images and
        radii (to start verifying them while the attack goes on).
        ``start_plans`` (B, C, H W, k^2), for plan-space solvers only: the
        first attempt starts at these transport plans, each inside its
        example's first ball, instead of the clean image.
        """
        started = time.perf_counter()
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1]:
            raise ValueError(f"y must be a ({x.shape[0]},) tensor of labels, got {getattr(y, 'shape', type(y).__name__)}")
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            raise ValueError(
                f"x has entries outside [0, 1] (min {float(x.min()):.3g}, max {float(x.max()):.3g}, NaN/inf: "
                f"{not bool(torch.isfinite(x).all())}): models take [0, 1] images, normalization lives inside them"
            )
        if targets is not None:
            if targets.shape != y.shape:
                raise ValueError(f"targets has shape {tuple(targets.shape)}, labels {tuple(y.shape)}: they must match")
            if bool((targets == y).any()):
                raise ValueError(f"targets equal the true label for examples {torch.nonzero(targets == y).flatten().tolist()}")
        batch, device = x.shape[0], x.device
        if start_plans is not None:
            if not hasattr(self.iterate, "start_at"):
                raise ValueError(f"start_plans is for plan-space solvers; {self.iterate!r} does not start from plans")
            if start_plans.shape[0] != batch:
                raise ValueError(f"start_plans has {start_plans.shape[0]} plans for {batch} examples")
        scale = _per_example("radius_scale", radius_scale, batch, x, positive=True)
        ceiling = _per_example("give_up_above", give_up_above, batch, x, positive=False)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                clean_logits = self.model(x)
            classes = clean_logits.shape[1]
            for name, labels in (("y", y), ("targets", targets)):
                if labels is not None and (int(labels.min()) < 0 or int(labels.max()) >= classes):
                    raise ValueError(f"{name} has classes {sorted(set(labels.tolist()))}; the model has classes 0..{classes - 1}")
            clean_prediction = clean_logits.argmax(1)
            tally = _Tally.zeros(batch, device)
            adversarial = x.detach().clone()
            success = torch.zeros(batch, dtype=torch.bool, device=device)
            eps_found = torch.full((batch,), math.inf, dtype=x.dtype, device=device)
            restart_found = torch.full((batch,), -1, dtype=torch.int64, device=device)
            generator = torch.Generator().manual_seed(self.seed)
            for restart in range(self.restarts):
                pending = torch.nonzero(~success).flatten()
                if pending.numel() == 0:
                    break
                self._attack_pending(
                    x, y, targets, pending, restart, generator if restart > 0 else None, scale, ceiling,
                    adversarial, success, eps_found, restart_found, tally, on_step, on_success,
                    start_plans if restart == 0 else None,
                )
            with torch.no_grad():
                adversarial_prediction = self.model(adversarial).argmax(1)
        finally:
            self.model.train(was_training)
        return AttackResult(
            adversarial=adversarial,
            success=success,
            clean_prediction=clean_prediction,
            adversarial_prediction=adversarial_prediction,
            eps_found=eps_found,
            steps=tally.steps,
            restart=restart_found,
            solver_iterations=tally.solver_iterations,
            unconverged_steps=tally.unconverged_steps,
            failed_steps=tally.failed_steps,
            zero_gradient_steps=tally.zero_gradient_steps,
            seconds=time.perf_counter() - started,
        )

    def _attack_pending(
        self, x, y, targets, pending, restart, generator, scale, ceiling, adversarial, success, eps_found, restart_found,
        tally, on_step, on_success, start_plans,
    ):
        """One restart over the examples ``pending``; writes results in place."""
        schedule = self.schedule
        if start_plans is not None:
            state: IterateState = self.iterate.start_at(x[pending], start_plans[pending])
        else:
            state = self.iterate.start(x[pending], _radii(schedule.initial, scale, pending), generator)
        active = pending  # indices into the full batch, in the order of ``state``
        # Radius of the ball the current image was projected onto (0: clean start), before the per-example scale.
        image_eps = 0.0 if generator is None and start_plans is None else schedule.initial
        for step in range(schedule.iterations + 1):
            image = state.image.detach().requires_grad_(True)
            logits = self.model(image)
            fooled = self._fooled(logits.detach(), y[active], None if targets is None else targets[active])
            if bool(fooled.any()):
                done = active[fooled]
                adversarial[done] = state.image[fooled].detach()
                success[done] = True
                eps_found[done] = _radii(image_eps, scale, done)
                restart_found[done] = restart
                if on_success is not None:
                    on_success(done, adversarial[done], eps_found[done])
            if on_step is not None:
                on_step(AttackProgress(x.shape[0] - active.numel() + int(fooled.sum()), x.shape[0], step, schedule.iterations, image_eps))
            if step == schedule.iterations or bool(fooled.all()):
                break
            keep = ~fooled
            if ceiling is not None:
                keep &= _radii(schedule.eps_at(step), scale, active) <= ceiling[active]
                if not bool(keep.any()):
                    break
            aim = y if targets is None else targets
            objective = attack_objective(logits[keep], aim[active][keep], self.loss, targets is not None)
            (grad,) = torch.autograd.grad(objective.sum(), image)
            if not bool(keep.all()):
                state, grad, active = state.select(keep), grad[keep], active[keep]
            eps = schedule.eps_at(step)
            with torch.no_grad():
                state, report = self.iterate.step(state, grad.detach(), _radii(eps, scale, active), step)
            image_eps = eps
            tally.steps[active] += 1
            tally.solver_iterations[active] += report.solver_iterations.to(torch.int64)
            tally.unconverged_steps[active] += (~report.converged).to(torch.int64)
            tally.failed_steps[active] += report.failed.to(torch.int64)
            tally.zero_gradient_steps[active] += report.zero_gradient.to(torch.int64)
        # An example never fooled keeps its last iterate (for galleries and debugging); success stays False.
        unbroken = ~fooled
        adversarial[active[unbroken]] = state.image[unbroken].detach()
