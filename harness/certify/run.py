"""Certify a batch at a ladder of radii, then bisect each example's certified radius.

The radii are taken in increasing order and an example moves on to the next
radius only while it stays certified: a certificate at a radius proves every
smaller ball (they are subsets), and a counterexample at a radius lies in
every larger ball, so both verdicts carry over and nothing is claimed that
was not proven. An example's *certified radius* is the largest radius
proven; after the ladder, ``radius_rounds`` bisection steps (geometric,
between the last certified and the first failed radius) refine it.

A verdict is ``certified`` only where the proven margin bound exceeds its
safety margin (:mod:`.safety`, and for the MILP
:func:`~harness.certify.milp.highs_error_bound`): both are kept, per
example and radius, so that the verdicts the margin changed (a bound in
``(0, safety]``) can be counted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from solvers.geometry import LocalTransport

from ..vocabulary import CertificateStatus, Certifier
from .bounds import linear_bounds
from .network import PiecewiseLinearNetwork

__all__ = ["CertifySettings", "CertifiedBatch", "certify_batch"]


@dataclass(frozen=True)
class CertifySettings:
    """What a certify cell runs.

    Attributes
    ----------
    certifier : Certifier
    radii : tuple of float
        Increasing radii (normalized units) at which every example is reported.
    box : bool
        Whether the ball keeps pixels at most 1.
    time_limit : float
        The complete certifier's seconds per example and radius.
    radius_rounds : int
        Bisection steps of the certified radius after the ladder.
    """

    certifier: Certifier
    radii: tuple[float, ...]
    box: bool
    time_limit: float = 30.0
    radius_rounds: int = 4

    def __post_init__(self):
        if not isinstance(self.certifier, Certifier):
            raise ValueError(f"certifier={self.certifier!r} is invalid: allowed {[c.value for c in Certifier]}")
        radii = tuple(self.radii)
        if not radii or any(not math.isfinite(r) or r <= 0 for r in radii) or list(radii) != sorted(set(radii)):
            raise ValueError(f"radii={list(radii)} are invalid: they must be positive, finite, distinct and increasing")
        if not isinstance(self.box, bool):
            raise ValueError(f"box={self.box!r} is invalid: it must be true or false")
        if not math.isfinite(self.time_limit) or self.time_limit <= 0:
            raise ValueError(f"time_limit={self.time_limit!r} is invalid: it must be a positive number of seconds")
        if isinstance(self.radius_rounds, bool) or not isinstance(self.radius_rounds, int) or self.radius_rounds < 0:
            raise ValueError(f"radius_rounds={self.radius_rounds!r} is invalid: it must be an integer >= 0")


@dataclass
class CertifiedBatch:
    """Verdicts of a batch: ``status``/``margin``/``safety_margin``/``seconds`` are (B, radii); ``certified_radius`` is (B,).

    ``margin`` is the proven lower bound on the smallest logit margin at that
    radius, as computed (raw; NaN where the radius was not evaluated);
    ``safety_margin`` the margin it had to exceed to certify (NaN likewise):
    ``certified`` exactly where ``margin > safety_margin``, so
    ``0 < margin <= safety_margin`` marks the verdicts the safety margin
    changed. ``certified_radius`` is 0 for an example certified at no radius
    tried.
    """

    status: list[list[CertificateStatus]]
    margin: np.ndarray
    safety_margin: np.ndarray
    seconds: np.ndarray
    certified_radius: np.ndarray
    prediction: np.ndarray
    counterexamples: dict[int, torch.Tensor]


class _Verdicts:
    """One certifier's verdicts on a subset of the batch at one radius per example."""

    def __init__(self, network, x, labels, transport, settings: CertifySettings, model_dtype: torch.dtype):
        self.network, self.x, self.labels, self.transport, self.settings = network, x, labels, transport, settings
        self.model_dtype = model_dtype

    def __call__(self, index: torch.Tensor, eps: torch.Tensor):
        """Status, raw margin bound, safety margin and seconds per example of ``index`` at radii ``eps``; counterexample
        images."""
        x, labels = self.x[index], self.labels[index]
        started = time.perf_counter()
        bounds = linear_bounds(self.network, x, labels, eps, self.transport, box=False)
        if self.settings.box and not bool(bounds.certified.all()):
            # The boxed ball is a subset of the unboxed one: what the cheaper unboxed bounds certify stays
            # certified, and only the rest pays for the box's capacity prices. Both bounds hold on the boxed
            # ball, so each class keeps the larger, and the larger of their safety margins.
            rest = torch.from_numpy(np.flatnonzero(~bounds.certified.numpy()))
            boxed = linear_bounds(self.network, x[rest], labels[rest], eps[rest], self.transport, box=True)
            bounds.margin = bounds.margin.index_copy(0, rest, torch.maximum(bounds.margin[rest], boxed.margin))
            bounds.safety = bounds.safety.index_copy(0, rest, torch.maximum(bounds.safety[rest], boxed.safety))
            bounds.pre_activation = [
                (lower.index_copy(0, rest, boxed_lower), upper.index_copy(0, rest, boxed_upper))
                for (lower, upper), (boxed_lower, boxed_upper) in zip(bounds.pre_activation, boxed.pre_activation)
            ]
        margin, safety = bounds.worst_margin.numpy().copy(), bounds.safety_margin.numpy().copy()
        seconds = np.full(len(index), (time.perf_counter() - started) / max(len(index), 1))
        status = [CertificateStatus.CERTIFIED if certified else CertificateStatus.UNKNOWN for certified in bounds.certified.tolist()]
        counterexamples = {}
        undecided = [i for i, s in enumerate(status) if s is CertificateStatus.UNKNOWN]
        if self.settings.certifier is Certifier.MILP and undecided:
            from .milp import milp_certify  # scipy's MILP is loaded only for complete certification

            chosen = torch.tensor(undecided)
            outcome = milp_certify(
                self.network, x[chosen].to(self.model_dtype), labels[chosen], eps[chosen], self.transport, box=self.settings.box,
                time_limit=self.settings.time_limit,
                pre_activation_bounds=[(lower[chosen], upper[chosen]) for lower, upper in bounds.pre_activation],
                margin_bounds=bounds.margin[chosen], margin_safety=bounds.safety_margin[chosen],
            )
            for position, i in enumerate(undecided):
                status[i] = outcome.status[position]
                # The MILP's bound starts from the linear bounds' per class, and its safety margin from theirs.
                margin[i] = max(margin[i], outcome.margin_lower[position])
                safety[i] = max(safety[i], outcome.safety_margin[position])
                seconds[i] += outcome.seconds[position]
                if status[i] is CertificateStatus.COUNTEREXAMPLE:
                    counterexamples[i] = outcome.counterexample[position]
        return status, margin, safety, seconds, counterexamples


@torch.no_grad()
def certify_batch(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, transport: LocalTransport, settings: CertifySettings,
) -> CertifiedBatch:
    """Certify every example of a batch at each of ``settings.radii`` and bisect its certified radius.

    Parameters
    ----------
    model : nn.Module
        A classifier of [0, 1] images made of the layers
        :class:`~harness.certify.network.PiecewiseLinearNetwork` reads.
    x, labels : Tensor
        Clean images (B, C, H, W) in [0, 1] and labels (B,).
    transport : LocalTransport
        The ball's window and cost exponent.
    settings : CertifySettings

    Returns
    -------
    CertifiedBatch
    """
    network = PiecewiseLinearNetwork.of(model, x.shape[1:])
    model_dtype = network.dtype
    prediction = network.forward(x.to(model_dtype)).argmax(1).cpu().numpy()
    x, labels = x.double().cpu(), labels.cpu()
    verdicts = _Verdicts(network, x, labels, transport, settings, model_dtype)
    batch, radii = x.shape[0], settings.radii
    correct = prediction == labels.numpy()
    status = [[CertificateStatus.CLEAN_MISCLASSIFIED if not correct[i] else CertificateStatus.UNKNOWN] * len(radii) for i in range(batch)]
    margin = np.full((batch, len(radii)), np.nan)
    safety = np.full((batch, len(radii)), np.nan)
    seconds = np.zeros((batch, len(radii)))
    certified_radius = np.zeros(batch)
    failed_at = np.full(batch, np.inf)
    counterexamples: dict[int, torch.Tensor] = {}
    active = np.flatnonzero(correct)
    for column, eps in enumerate(radii):
        if active.size == 0:
            break
        found, bound, floor, spent, examples = verdicts(torch.from_numpy(active), torch.full((active.size,), eps, dtype=torch.float64))
        still = []
        for position, i in enumerate(active):
            verdict = found[position]
            margin[i, column], safety[i, column], seconds[i, column] = bound[position], floor[position], spent[position]
            status[i][column] = verdict
            if verdict is CertificateStatus.CERTIFIED:
                certified_radius[i] = eps
                still.append(i)
                continue
            failed_at[i] = eps
            if verdict is CertificateStatus.COUNTEREXAMPLE:
                counterexamples[i] = examples[position]
                # A counterexample lies in every larger ball; otherwise the larger radii stay undecided.
                for later in range(column + 1, len(radii)):
                    status[i][later] = verdict
        active = np.array(still, dtype=int)
    _bisect(verdicts, correct, certified_radius, failed_at, radii[-1], settings.radius_rounds)
    return CertifiedBatch(status, margin, safety, seconds, certified_radius, prediction, counterexamples)


def _bisect(verdicts, correct, certified_radius, failed_at, largest, rounds) -> None:
    """Refine ``certified_radius`` in place between it and ``failed_at`` (geometric steps; a quarter of the
    bracket's top when nothing is certified yet; doubling past the largest radius when nothing failed)."""
    for _ in range(rounds):
        index = np.flatnonzero(correct)
        if index.size == 0:
            return
        low, high = certified_radius[index], failed_at[index]
        trial = np.where(np.isinf(high), 2 * np.maximum(low, largest), np.where(low > 0, np.sqrt(low * np.where(np.isinf(high), 1, high)), high / 4))
        found, _, _, _, _ = verdicts(torch.from_numpy(index), torch.from_numpy(trial))
        for position, i in enumerate(index):
            if found[position] is CertificateStatus.CERTIFIED:
                certified_radius[i] = trial[position]
            else:
                failed_at[i] = trial[position]
