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
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from solvers.exact import TransportResult, local_ot_distance
from solvers.iterate import Norm

from ..vocabulary import VerificationStatus

__all__ = [
    "ExactDistances", "Tolerances", "Verification", "VerificationStatus", "robust_accuracy", "verify_norm", "verify_wasserstein",
]


@dataclass(frozen=True)
class Tolerances:
    """Slack of the checks.

    Attributes
    ----------
    box : float
        Absolute slack of ``0 <= z <= 1``.
    mass : float
        Relative slack of the mass (and of the mass the exact plan cannot
        deliver), as a fraction of the clean image's mass.
    radius : float
        Relative slack of ``distance <= eps``.
    """

    box: float = 1e-6
    mass: float = 1e-4
    radius: float = 1e-4


@dataclass
class Verification:
    """Per-example verification results; every field is a ``(B,)`` numpy array.

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
        ``|m(z) - m(x)| / m(x)``.
    box_violation : float array
        Largest distance of a pixel outside [0, 1].
    unreachable_mass : float array
        Mass the exact plan cannot move within the windows, relative to
        ``m(x)`` (``nan`` where not computed, 0 for norm balls).
    prediction : int array
        The model's prediction on the stored image.
    """

    status: np.ndarray
    verified_distance: np.ndarray
    distance: np.ndarray
    mass_error: np.ndarray
    box_violation: np.ndarray
    unreachable_mass: np.ndarray
    prediction: np.ndarray

    def status_names(self) -> list[str]:
        return [VerificationStatus(int(code)).name for code in self.status]

    def counts(self) -> dict[str, int]:
        """How many examples ended in each status (zero counts left out)."""
        names, counts = np.unique(self.status_names(), return_counts=True)
        return dict(zip(names.tolist(), counts.tolist()))

    def to_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
        self._pending[int(index)] = (z, self.executor.submit(local_ot_distance, np.asarray(x, dtype=np.float64), z, self.kernel_size, self.p))

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


def _predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(chunk).argmax(1) for chunk in images.split(batch_size)]).cpu().numpy()
    finally:
        model.train(was_training)


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
    fooled = prediction == goal if goal is not None else prediction != labels
    clean_fooled = clean_prediction == goal if goal is not None else clean_prediction != labels
    xa = x.detach().cpu().double().numpy().reshape(batch, -1)
    za = adversarial.detach().cpu().double().numpy().reshape(batch, -1)
    box_violation = np.maximum(np.maximum(-za, za - 1.0).max(axis=1), 0.0)
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
    tolerances: Tolerances = Tolerances(),
    distances: ExactDistances | None = None,
) -> Verification:
    """Verify claimed Wasserstein adversarial examples exactly.

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
    tolerances : Tolerances
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
        exact = [local_ot_distance(xs[b], zs[b], kernel_size, p) for b in checked]
    else:
        if (distances.kernel_size, distances.p) != (kernel_size, p):
            raise ValueError(
                f"distances computes {distances.kernel_size}x{distances.kernel_size}, p = {distances.p} transport; "
                f"this ball is {kernel_size}x{kernel_size}, p = {p}"
            )
        exact = distances.results(checked, xs, zs)
    for b, result in zip(checked, exact):
        distance[b] = result.cost
        mass = max(result.mass_x, np.finfo(np.float64).tiny)
        unreachable[b] = max(result.undelivered_mass, result.unused_mass) / mass
        if mass_error[b] > tolerances.mass:
            status[b] = int(VerificationStatus.MASS_NOT_CONSERVED)
        elif unreachable[b] > tolerances.mass:
            status[b] = int(VerificationStatus.UNREACHABLE_MASS)
        elif result.cost > eps[b] * (1 + tolerances.radius):
            status[b] = int(VerificationStatus.RADIUS_EXCEEDED)
        else:
            status[b] = int(VerificationStatus.VERIFIED)
    return _finish(status, candidates, clean_fooled, eps, distance, mass_error, box_violation, unreachable, prediction)


def verify_norm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    adversarial: torch.Tensor,
    success: torch.Tensor,
    eps_found: torch.Tensor,
    norm: Norm,
    targets: torch.Tensor | None = None,
    tolerances: Tolerances = Tolerances(),
) -> Verification:
    """Verify claimed l_inf or l_2 adversarial examples (prediction, box, norm of the perturbation)."""
    if not isinstance(norm, Norm):
        raise ValueError(f"norm={norm!r} is invalid: allowed {[n.value for n in Norm]}")
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
    # float32 images resolve a perturbation only to about one float32 ulp of 1.
    within = norms <= eps * (1 + tolerances.radius) + tolerances.box
    status[check & within] = int(VerificationStatus.VERIFIED)
    status[check & ~within] = int(VerificationStatus.RADIUS_EXCEEDED)
    unreachable = np.where(check, 0.0, np.nan)
    return _finish(status, candidates, clean_fooled, eps, distance, mass_error, box_violation, unreachable, prediction)


def _finish(status, candidates, clean_fooled, eps, distance, mass_error, box_violation, unreachable, prediction):
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
    )
