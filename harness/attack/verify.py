"""Exact verification of every adversarial example the attack claims.

A claimed success counts only after checks that share no code with the
attack: the model's prediction on the stored image, the [0, 1] box, mass
conservation, and the exact local optimal-transport distance from the clean
image (the HiGHS linear program of :func:`solvers.exact.local_ot_distance`),
which must deliver all the mass within the transport windows at a cost no
larger than the radius the attack claims. The exact distance is the example's
*verified radius*; robustness curves are computed from it.

A claim that fails a check counts as a failure of the attack, with the first
failed check as its reason.

The exact LPs run on the CPU. :class:`ExactDistances` runs them in worker
processes instead, and takes each claim as soon as the attack makes it, so
that beside a GPU attack the verification of a batch is mostly done when its
attack ends.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from solvers.exact import HIGHS_TOLERANCE, TransportResult, local_ot_distance
from solvers.iterate import Norm
from solvers.rounding import summation_bound

from ..vocabulary import VerificationStatus

__all__ = [
    "ExactDistances", "Tolerances", "Verification", "VerificationStatus", "robust_accuracy", "verify_norm",
    "verify_wasserstein", "window_plan",
]


@dataclass(frozen=True)
class Tolerances:
    r"""Slack of the checks: float rounding, nothing more.

    Attributes
    ----------
    box : float
        Absolute slack of ``0 <= z <= 1``.
    mass : float
        Relative slack, as a fraction of the clean image's mass
        :math:`m(x)`, of the mass error :math:`|m(z) - m(x)|` and of the
        repair :math:`\|z^\star - z\|_1` that turns the stored image into
        an exact member of the ball (see :func:`verify_wasserstein`).
    radius : float
        Relative slack of ``distance <= eps``.
    repair_cost : float
        Absolute slack of ``distance <= eps`` (normalized units): the cost of
        moving the mass slack across a window. Both radius slacks decide only
        whether a claim is accepted: a counted example's radius is its exact
        distance.

    Use :meth:`for_images` for the slack that a problem's dtype and size allow.
    """

    box: float
    mass: float
    radius: float
    repair_cost: float = 0.0

    @classmethod
    def for_images(cls, images: torch.Tensor, kernel_size: int = 1, p: float = 1.0) -> Tolerances:
        r"""The rounding slack of images like ``images`` (their dtype and pixel count ``n``).

        * **mass**: an attack that keeps its image in the ball renormalizes
          or sums it over all ``n`` pixels in the image's dtype, so its mass
          is right to :math:`\gamma_{\lceil\log_2 n\rceil + 2}\, m(x)`
          (:func:`solvers.rounding.summation_bound`). The exact LP adds at
          most its feasibility tolerance on each of its ``2n`` scaled row and
          column constraints. Float32, 28x28: ``8.7e-7``; 3x32x32: ``1.4e-6``.
        * **box**: a pixel carries the relative error of the mass it is a
          share of, so a pixel of at most 1 is off by at most the
          renormalization's bound.
        * **radius**: the attack's transport cost is a sum over at most
          :math:`n k^2` plan entries, :math:`\gamma_{\lceil\log_2 n k^2\rceil + 2}`
          relative; and the mass slack, wherever it sits, moves within a
          window at most :math:`c_{\max} = (2 \lfloor k/2 \rfloor^2)^{p/2}`
          per unit: ``repair_cost`` :math:`= c_{\max}` times the mass slack.

        A mass change of ``1e-5 m(x)``, about a tenth of one 8-bit grey
        level on an MNIST digit, is far outside all of them.
        """
        pixels = math.prod(images.shape[1:])
        renormalization = summation_bound(images.dtype, pixels)
        mass = renormalization + 2 * pixels * HIGHS_TOLERANCE
        longest_move = (2 * (kernel_size // 2) ** 2) ** (p / 2)
        return cls(
            box=renormalization,
            mass=mass,
            radius=summation_bound(images.dtype, pixels * kernel_size**2),
            repair_cost=longest_move * mass,
        )


@dataclass
class Verification:
    """Per-example verification results; every field but ``image`` is a ``(B,)`` numpy array.

    Attributes
    ----------
    status : int array of :class:`VerificationStatus` codes
    verified_distance : float array
        Exact distance (Wasserstein: normalized transport cost; norms: the
        norm of the perturbation) of a verified example, 0 for a clean
        misclassification, ``inf`` otherwise.
    distance : float array
        The exact distance of the stored image whatever the verdict (``nan``
        where it was not computed: no claim, or a clean misclassification).
    mass_error : float array
        ``|m(z) - m(x)| / m(x)`` of the attack's image.
    box_violation : float array
        Largest distance of a pixel of the stored image outside [0, 1].
    unreachable_mass : float array
        The repair the Wasserstein check made, ``||z* - z||_1 / m(x)``: mass
        no in-window plan delivers, counted where it is missing and where it
        is left over (``nan`` where not computed, 0 for norm balls).
    prediction : int array
        The model's prediction on the stored image.
    image : Tensor
        The stored images (B, C, H, W): where the Wasserstein check repaired a
        claim, the repaired image in the attack's dtype; elsewhere the attack's.
    plans : dict of int to ndarray
        Wasserstein checks only: for each verified example ``b``, the exact
        plan that reaches its stored image, in the window layout of the
        plan-space solvers (``(C, H W, k^2)``, float64; :func:`window_plan`).
        It starts an attack from the example (the suite's bisection).
    """

    status: np.ndarray
    verified_distance: np.ndarray
    distance: np.ndarray
    mass_error: np.ndarray
    box_violation: np.ndarray
    unreachable_mass: np.ndarray
    prediction: np.ndarray
    image: torch.Tensor
    plans: dict[int, np.ndarray] = field(default_factory=dict)

    def status_names(self) -> list[str]:
        return [VerificationStatus(int(code)).name for code in self.status]

    def counts(self) -> dict[str, int]:
        """How many examples ended in each status (zero counts left out)."""
        names, counts = np.unique(self.status_names(), return_counts=True)
        return dict(zip(names.tolist(), counts.tolist()))

    def to_dict(self) -> dict[str, np.ndarray]:
        """The per-example columns (everything but ``image`` and ``plans``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image", "plans")}


class ExactDistances:
    """Exact local OT distances of claims, computed in the worker processes of an executor.

    :meth:`submit` starts the LP of a claim as soon as it is made; the
    verification then asks :meth:`result` for every claim it checks. A
    result is reused only for the very image it was computed on (a claim
    whose stored image changed after submission is computed again), so
    taking claims early changes no verdict.

    Parameters
    ----------
    executor : concurrent.futures.Executor
        Typically a ``ProcessPoolExecutor``; the LPs release nothing to the
        GIL, so threads would not run them in parallel.
    kernel_size, p : int, float
        The ball's transport window and cost exponent.
    """

    def __init__(self, executor: Executor, kernel_size: int, p: float):
        self.executor = executor
        self.kernel_size = kernel_size
        self.p = p
        self._pending: dict[int, tuple[np.ndarray, Future]] = {}

    def submit(self, index: int, x: np.ndarray, z: np.ndarray) -> None:
        """Start the LP from clean image ``x`` to claimed image ``z`` (float64 arrays) of example ``index``."""
        z = np.array(z, dtype=np.float64)
        self._pending[int(index)] = (z, self.executor.submit(_transport, np.asarray(x, dtype=np.float64), z, self.kernel_size, self.p))

    def results(self, indices, xs: np.ndarray, zs: np.ndarray) -> list[TransportResult]:
        """The distances of examples ``indices`` from ``xs[b]`` to ``zs[b]``; missing or stale ones are submitted now."""
        for b in indices:
            known = self._pending.get(int(b))
            if known is None or not np.array_equal(known[0], zs[b]):
                self.submit(int(b), xs[b], zs[b])
        return [self._pending.pop(int(b))[1].result() for b in indices]


def robust_accuracy(verified_distance, eps) -> float:
    """Fraction of examples with no verified adversarial example within radius ``eps``."""
    distances = np.asarray(verified_distance, dtype=np.float64)
    if distances.size == 0:
        raise ValueError("robust_accuracy needs at least one example")
    return float(np.mean(distances > eps))


def _transport(x: np.ndarray, z: np.ndarray, kernel_size: int, p: float) -> TransportResult:
    return local_ot_distance(x, z, kernel_size, p, return_plan=True)


def _ball_member(x: np.ndarray, result: TransportResult) -> np.ndarray:
    """The image the exact plan reaches when the mass it leaves unshipped stays where it is: in the ball, exactly."""
    plan = result.plan
    left = x.ravel() - np.asarray(plan.sum(axis=1)).ravel()
    return (np.asarray(plan.sum(axis=0)).ravel() + np.maximum(left, 0.0)).reshape(x.shape)


def window_plan(x: np.ndarray, result: TransportResult, kernel_size: int) -> np.ndarray:
    r"""The exact plan of ``result`` in the window layout of :mod:`solvers.plan_space`, with what it leaves unshipped.

    Entry ``[c, i, o]`` is the mass moved from pixel ``i`` of channel ``c`` by
    the window offset ``o = (dr + h) k + (ds + h)``, ``h = k // 2``; the mass
    of ``x`` the plan leaves unshipped stays on offset ``(0, 0)``. Its image
    is the verified member :math:`z^\star` of :func:`verify_wasserstein`,
    its cost the verified distance times :math:`m(x)`.

    Parameters
    ----------
    x : ndarray (C, H, W)
        The clean image.
    result : TransportResult
        Of :func:`solvers.exact.local_ot_distance` with ``return_plan=True``.
    kernel_size : int

    Returns
    -------
    ndarray (C, H W, k^2), float64
    """
    channels, height, width = x.shape
    half = kernel_size // 2
    coo = result.plan.tocoo()
    source_pixel, destination_pixel = coo.row % (height * width), coo.col % (height * width)
    dr = destination_pixel // width - source_pixel // width
    ds = destination_pixel % width - source_pixel % width
    plan = np.zeros((channels, height * width, kernel_size * kernel_size))
    np.add.at(plan, (coo.row // (height * width), source_pixel, (dr + half) * kernel_size + ds + half), coo.data)
    left = x.reshape(channels, -1) - plan.sum(axis=2)
    plan[:, :, (kernel_size * kernel_size) // 2] += np.maximum(left, 0.0)
    return plan


def _predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    if images.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(chunk).argmax(1) for chunk in images.split(batch_size)]).cpu().numpy()
    finally:
        model.train(was_training)


def _box_violation(images: np.ndarray) -> np.ndarray:
    if images.shape[0] == 0:
        return np.zeros(0)
    flat = images.reshape(images.shape[0], -1)
    return np.maximum(np.maximum(-flat, flat - 1.0).max(axis=1), 0.0)


def _fooled(prediction: np.ndarray, labels: np.ndarray, goal: np.ndarray | None) -> np.ndarray:
    return prediction == goal if goal is not None else prediction != labels


def _common_checks(model, x, y, adversarial, success, targets, tolerances):
    if x.shape != adversarial.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but adversarial has {tuple(adversarial.shape)}")
    batch = x.shape[0]
    for name, tensor in (("y", y), ("success", success)):
        if tuple(tensor.shape) != (batch,):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected ({batch},)")
    prediction = _predictions(model, adversarial)
    clean_prediction = _predictions(model, x)
    labels = y.cpu().numpy()
    goal = targets.cpu().numpy() if targets is not None else None
    fooled = _fooled(prediction, labels, goal)
    clean_fooled = _fooled(clean_prediction, labels, goal)
    xa = x.detach().cpu().double().numpy().reshape(batch, -1)
    za = adversarial.detach().cpu().double().numpy().reshape(batch, -1)
    box_violation = _box_violation(za)
    mass_x = xa.sum(1)
    mass_error = np.abs(za.sum(1) - mass_x) / np.maximum(mass_x, np.finfo(np.float64).tiny)
    status = np.full(batch, int(VerificationStatus.NOT_FOUND))
    claimed = success.cpu().numpy().astype(bool)
    status[claimed & ~fooled] = int(VerificationStatus.PREDICTION_UNCHANGED)
    status[claimed & fooled & (box_violation > tolerances.box)] = int(VerificationStatus.OUTSIDE_BOX)
    return status, claimed & fooled & (box_violation <= tolerances.box), clean_fooled, prediction, mass_error, box_violation


def verify_wasserstein(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    adversarial: torch.Tensor,
    success: torch.Tensor,
    eps_found: torch.Tensor,
    kernel_size: int,
    p: float,
    targets: torch.Tensor | None = None,
    tolerances: Tolerances | None = None,
    distances: ExactDistances | None = None,
) -> Verification:
    r"""Verify claimed Wasserstein adversarial examples exactly.

    A claim ``z`` counts only as the rounding of an image :math:`z^\star`
    that lies in the ball exactly. The exact plan :math:`P` of
    :func:`solvers.exact.local_ot_distance` delivers as much of ``z`` as
    in-window transport can, at least cost; :math:`z^\star` is what it
    reaches when the mass of ``x`` it leaves unshipped stays in place:
    :math:`z^\star = P^\top \mathbf 1 + (x - P \mathbf 1)`, computed in
    float64. Its distance from ``x`` is at most :math:`\langle c, P\rangle
    / m(x)`, the verified distance, which thus never understates. The
    repair :math:`\|z^\star - z\|_1` (every unit of mass created,
    destroyed or moved out of its window counts) must be within float
    rounding of ``m(x)`` (:meth:`Tolerances.for_images`); ``z*`` rounded to
    the attack's dtype is then the stored image (:attr:`Verification.image`),
    and the box and the model's prediction are checked again on exactly it.

    Parameters
    ----------
    model : nn.Module
        The attacked classifier (re-run on the stored images).
    x, y : Tensor
        Clean images (B, C, H, W) and labels (B,).
    adversarial, success, eps_found : Tensor
        The attack's claims (see :class:`harness.attack.AttackResult`).
    kernel_size, p : int, float
        The ball's transport window and cost exponent.
    targets : Tensor, optional
        Target classes of a targeted attack.
    tolerances : Tolerances, optional
        Default: :meth:`Tolerances.for_images` of ``adversarial``.
    distances : ExactDistances, optional
        Run the exact LPs there (in parallel, with the claims the attack
        already submitted); default: one after another in this process.

    Returns
    -------
    Verification
        One verdict per example; checks run in the order of
        :class:`VerificationStatus` and the first failure is reported. The
        exact distance is computed for every claim past the box check.
    """
    tolerances = tolerances or Tolerances.for_images(adversarial, kernel_size, p)
    status, candidates, clean_fooled, prediction, mass_error, box_violation = _common_checks(
        model, x, y, adversarial, success, targets, tolerances
    )
    batch = x.shape[0]
    distance = np.full(batch, np.nan)
    unreachable = np.full(batch, np.nan)
    eps = eps_found.detach().cpu().double().numpy()
    xs = x.detach().cpu().double().numpy()
    zs = adversarial.detach().cpu().double().numpy()
    checked = np.flatnonzero(candidates & (eps > 0))
    if distances is None:
        exact = [_transport(xs[b], zs[b], kernel_size, p) for b in checked]
    else:
        if (distances.kernel_size, distances.p) != (kernel_size, p):
            raise ValueError(
                f"distances computes {distances.kernel_size}x{distances.kernel_size}, p = {distances.p} transport; "
                f"this ball is {kernel_size}x{kernel_size}, p = {p}"
            )
        exact = distances.results(checked, xs, zs)
    stored = adversarial.detach().clone()
    repaired, exact_of = [], dict(zip(checked.tolist(), exact))
    for b, result in zip(checked, exact):
        distance[b] = result.cost
        member = _ball_member(xs[b], result)
        unreachable[b] = np.abs(member - zs[b]).sum() / max(result.mass_x, np.finfo(np.float64).tiny)
        if mass_error[b] > tolerances.mass:
            status[b] = int(VerificationStatus.MASS_NOT_CONSERVED)
        elif unreachable[b] > tolerances.mass:
            status[b] = int(VerificationStatus.UNREACHABLE_MASS)
        else:
            stored[b] = torch.from_numpy(member).to(stored)
            repaired.append(b)
    repaired = np.asarray(repaired, dtype=np.int64)
    index = torch.as_tensor(repaired, device=stored.device)
    box_violation[repaired] = _box_violation(stored[index].detach().cpu().double().numpy())
    prediction[repaired] = _predictions(model, stored[index])
    goal = None if targets is None else targets.cpu().numpy()[repaired]
    fooled = _fooled(prediction[repaired], y.cpu().numpy()[repaired], goal)
    for b, still_fooled in zip(repaired, fooled):
        if not still_fooled:
            status[b] = int(VerificationStatus.PREDICTION_UNCHANGED)
        elif box_violation[b] > tolerances.box:
            status[b] = int(VerificationStatus.OUTSIDE_BOX)
        elif distance[b] > eps[b] * (1 + tolerances.radius) + tolerances.repair_cost:
            status[b] = int(VerificationStatus.RADIUS_EXCEEDED)
        else:
            status[b] = int(VerificationStatus.VERIFIED)
    verification = _finish(status, candidates, clean_fooled, eps, distance, mass_error, box_violation, unreachable, prediction, stored)
    verified = np.flatnonzero(status == int(VerificationStatus.VERIFIED))
    verification.plans = {int(b): window_plan(xs[b], exact_of[int(b)], kernel_size) for b in verified}
    return verification


def verify_norm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    adversarial: torch.Tensor,
    success: torch.Tensor,
    eps_found: torch.Tensor,
    norm: Norm,
    targets: torch.Tensor | None = None,
    tolerances: Tolerances | None = None,
) -> Verification:
    """Verify claimed l_inf or l_2 adversarial examples (prediction, box, norm of the perturbation)."""
    if not isinstance(norm, Norm):
        raise ValueError(f"norm={norm!r} is invalid: allowed {[n.value for n in Norm]}")
    tolerances = tolerances or Tolerances.for_images(adversarial)
    status, candidates, clean_fooled, prediction, mass_error, box_violation = _common_checks(
        model, x, y, adversarial, success, targets, tolerances
    )
    batch = x.shape[0]
    delta = (adversarial.detach().cpu().double() - x.detach().cpu().double()).reshape(batch, -1)
    order = math.inf if norm is Norm.LINF else 2.0
    norms = torch.linalg.vector_norm(delta, ord=order, dim=1).numpy()
    eps = eps_found.detach().cpu().double().numpy()
    check = candidates & (eps > 0)
    distance = np.where(check, norms, np.nan)
    # A pixel of the perturbation is known only to the rounding of the pixel it is added to.
    within = norms <= eps * (1 + tolerances.radius) + tolerances.box
    status[check & within] = int(VerificationStatus.VERIFIED)
    status[check & ~within] = int(VerificationStatus.RADIUS_EXCEEDED)
    unreachable = np.where(check, 0.0, np.nan)
    return _finish(
        status, candidates, clean_fooled, eps, distance, mass_error, box_violation, unreachable, prediction, adversarial.detach()
    )


def _finish(status, candidates, clean_fooled, eps, distance, mass_error, box_violation, unreachable, prediction, image):
    clean = candidates & (eps == 0) & clean_fooled
    status[clean] = int(VerificationStatus.CLEAN_MISCLASSIFIED)
    # A claim at radius 0 on a correctly classified clean image cannot be right.
    status[candidates & (eps == 0) & ~clean_fooled] = int(VerificationStatus.PREDICTION_UNCHANGED)
    verified_distance = np.full(status.shape, np.inf)
    verified_distance[status == int(VerificationStatus.VERIFIED)] = distance[status == int(VerificationStatus.VERIFIED)]
    verified_distance[clean] = 0.0
    return Verification(
        status=status,
        verified_distance=verified_distance,
        distance=distance,
        mass_error=mass_error,
        box_violation=box_violation,
        unreachable_mass=unreachable,
        prediction=prediction,
        image=image,
    )
