r"""Complete verification: the Wasserstein ball and a ReLU network as one mixed-integer linear program.

The ball as a polytope
----------------------
For one image :math:`x \in \mathbb R_{\ge 0}^{C \times H \times W}` with
mass :math:`m(x) = \sum_j x_j`, the variables are the entries
:math:`P_{io} \ge 0` of a local plan (:mod:`solvers.plan_space`) on the rows
with mass, :math:`x_i > 0` (the others are zero in every plan), and the
pixels :math:`x'_j` of the image it transports to:

.. math::

    \sum_o P_{io} = x_i, \qquad
    \sum_{i, o} c_o P_{io} \le \varepsilon\, m(x), \qquad
    x'_j = \sum_{(i, o):\, i + \mathrm{offset}(o) = j} P_{io}, \qquad
    x'_j \le 1 \ \text{(with the box)}.

Every move off the window's centre costs :math:`c_o \ge 1` (the offsets are
integer), so at most :math:`\varepsilon m(x)` of mass enters or leaves a
pixel, and a pixel holds at most the mass of the window around it. The
pixels therefore get the bounds

.. math::

    \max(0, x_j - \varepsilon m(x)) \;\le\; x'_j \;\le\;
    \min\Big(\sum_{i \in \text{window}(j)} x_i,\; x_j + \varepsilon m(x),\; 1 \text{ (box)}\Big),

which the polytope implies, so adding them changes no optimum; they are the
input box of the interval bounds. Both come from the ball's perturbation
object (:meth:`.perturbation.WassersteinBall.encode` and
:attr:`~.perturbation.WassersteinBall.pixel_bounds`).

The network
-----------
The preprocessing is an affine map (per-channel normalization) or a
binarization :math:`\beta_j = [x'_j \ge t]`: a pixel whose bounds straddle
the threshold, :math:`l_j < t \le u_j`, gets a binary :math:`\beta_j` with

.. math:: x'_j \ge t \beta_j, \qquad x'_j \le t + (u_j - t)\, \beta_j,

a sound relaxation (a pixel at exactly :math:`t` may take either value);
the other pixels binarize to constants. Each layer is added by its rule's
encoding in :mod:`.layers`: affine layers are equality rows
:math:`z = W h + b` (a convolution as the sparse matrix of its action on the
pixel basis), and each ReLU with pre-activation bounds :math:`l \le z \le u`
is exact (Tjeng, Xiao, Tedrake 2019): nothing for :math:`u \le 0` (the
output is 0), the identity for :math:`l \ge 0`, and otherwise a binary
:math:`a` with

.. math:: y \ge 0, \quad y \ge z, \quad y \le z - l (1 - a), \quad y \le u a.

Verification
------------
For label :math:`y` and each wrong class :math:`k` the program minimizes
the logit margin :math:`f_y(x') - f_k(x')` with HiGHS. The classes are
solved in the order of their margin at the clean image (or of given margin
bounds), smallest first; a class whose interval bound (or given bound) is
already positive needs no program. The example
is certified when every wrong class's proven minimum (the dual bound of the
branch and bound) is positive; the first class whose incumbent has a
negative margin yields a candidate image, which is moved exactly into the
ball and must pass :func:`harness.attack.verify.verify_wasserstein` to count
as a counterexample (without the box, its [0, 1] check is waived: that ball
holds brighter pixels).

A binarized network's candidate must binarize as its binaries say: an LP
looks for an image of the ball with that pattern whose 0-pixels stay
strictly below the threshold; when the pattern exists only on the
relaxation's boundary, the class is solved again with those pixels kept
:data:`BINARIZATION_GAP` below it.

Floating point: the safety margin
---------------------------------
The weights are read in float64. HiGHS meets its rows only to its
feasibility tolerances (set explicitly: :data:`PRIMAL_FEASIBILITY_TOLERANCE`,
:data:`DUAL_FEASIBILITY_TOLERANCE`, :data:`MIP_FEASIBILITY_TOLERANCE`), and
the model computes in its own dtype, so a margin bound near 0 proves
nothing. An example is certified only when every wrong class's bound
exceeds its *safety margin*: the model's and the bounds' rounding
(:func:`harness.certify.safety.float_error_bound`, and the given linear
bounds' own margin where larger) plus, once a program was built,
:func:`highs_error_bound`. The branch and bound's dual bound is used with
that margin whether the solve finished or hit its time limit; the relative
gap :data:`MIP_RELATIVE_GAP` at which a solve stops changes how close the
dual bound gets to the optimum, not whether it is one. The verification of
counterexamples is exact up to the tolerances of
:class:`harness.attack.verify.Tolerances`.

A binarization is encoded with the threshold the model compares its own
pixels with (:func:`harness.certify.network.binarization_threshold`), and
the float64 copy of the network that evaluates points found binarizes with
it too.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from solvers.checks import check_positive
from solvers.geometry import LocalTransport, check_images, check_nonnegative_eps
from zoo.architectures import Binarize

from ..attack.verify import Tolerances, verify_wasserstein
from ..vocabulary import CertificateStatus, VerificationStatus
from .layers import AffineEncoding, interval_bounds, rule_for
from .network import PiecewiseLinearNetwork
from .perturbation import BallEncoding, WassersteinBall
from .program import (
    DUAL_FEASIBILITY_TOLERANCE, MIP_FEASIBILITY_TOLERANCE, MIP_RELATIVE_GAP, PRIMAL_FEASIBILITY_TOLERANCE, Program,
)
from .safety import float_error_bound

__all__ = [
    "BINARIZATION_GAP", "DUAL_FEASIBILITY_TOLERANCE", "MIP_FEASIBILITY_TOLERANCE", "MIP_RELATIVE_GAP", "MilpCertificates",
    "PRIMAL_FEASIBILITY_TOLERANCE", "highs_error_bound", "milp_certify",
]


BINARIZATION_GAP = 1e-5
"""How far below the threshold the search for a counterexample of a binarized network keeps the pixels that read 0.

The certification program lets a pixel at exactly the threshold read 0 (a
relaxation); a minimizer that uses this sits on the boundary, where no image
binarizes that way, and the search is repeated with this gap."""





_REALIZATION_SECONDS = 1.0
"""Least time given to the LP that realizes a binarized candidate's pattern (part of verifying it)."""



@dataclass
class MilpCertificates:
    r"""Per-example outcome of :func:`milp_certify`.

    Attributes
    ----------
    status : list of CertificateStatus
        One per example.
    margin_lower : ndarray (B,) float64
        A proven lower bound on :math:`\min_{x' \in \mathcal B_\varepsilon(x)}
        \min_{k \ne y} f_y(x') - f_k(x')`: per wrong class the branch and
        bound's dual bound where the class was solved, its interval bound
        (or the given margin bound, if larger) otherwise: a class such a
        bound already certifies, or one skipped after a counterexample or
        when the time ran out. Positive exactly for the certified examples.
    margin_found : ndarray (B,) float64
        The smallest margin :math:`\min_{k \ne y} f_y - f_k`, computed by the
        network in float64, of a point of the ball found: the clean image
        and each class's incumbent after its repair into the ball. It is
        never below ``margin_lower``, and close to it where every class was
        solved to optimality.
    counterexample : Tensor (B, C, H, W)
        The verified counterexample (dtype and device of ``x``); NaN where
        the status is not ``COUNTEREXAMPLE``.
    seconds : ndarray (B,) float64
        Wall time spent on each example: its program, the solves and the
        verification.
    safety_margin : ndarray (B,) float64
        The margin every wrong class's bound had to exceed to certify (module
        docstring): the floating-point part, plus :func:`highs_error_bound`
        where a program was built. ``CERTIFIED`` exactly where
        ``margin_lower > safety_margin`` (clean misclassifications and
        counterexamples aside).
    """

    status: list[CertificateStatus]
    margin_lower: np.ndarray
    margin_found: np.ndarray
    counterexample: torch.Tensor
    seconds: np.ndarray
    safety_margin: np.ndarray


# --------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------


class _Network:
    """A :class:`PiecewiseLinearNetwork` in float64, with each layer's MILP encoding (:mod:`.layers`): the affine
    layers as sparse matrices.

    A binarization compares with the threshold the model compares its own pixels with, so that this copy
    binarizes every image the model can see as the model does.
    """

    def __init__(self, network: PiecewiseLinearNetwork):
        if network.binarized:
            self.preprocess = Binarize(network.threshold)
        else:
            self.preprocess = copy.deepcopy(network.preprocess).double().cpu()
        self.layers = [copy.deepcopy(layer).double().cpu() for layer in network.layers]
        shapes, values = [], torch.zeros(1, *network.input_shape, dtype=torch.float64)
        with torch.no_grad():
            values = self.preprocess(values)
            for layer in self.layers:
                shapes.append(tuple(values.shape[1:]))
                try:
                    values = layer(values)
                except RuntimeError as error:
                    raise ValueError(f"the network does not take images of shape {network.input_shape}: {error}") from None
        if values.dim() != 2:
            raise ValueError(f"the network's logits have shape {tuple(values.shape[1:])} per image: they must be a vector")
        self.classes = values.shape[1]
        self.binarized = network.binarized
        self.relu_shapes = [shape for shape, layer in zip(shapes, self.layers) if isinstance(layer, nn.ReLU)]
        self.preprocess_encoding = rule_for(self.preprocess).encoding(self.preprocess, network.input_shape)
        self.encodings = [rule_for(layer).encoding(layer, shape) for layer, shape in zip(self.layers, shapes)]
        self.affine: dict[int, AffineEncoding] = {
            index: encoding for index, encoding in enumerate(self.encodings) if isinstance(encoding, AffineEncoding)
        }
        # Which ReLU (by number) reads each affine layer's output, past any Flatten: its dead neurons need no variable.
        self.feeds_relu: dict[int, int] = {}
        relus_before = np.cumsum([isinstance(layer, nn.ReLU) for layer in self.layers]) - 1
        for index in self.affine:
            following = index + 1
            while following < len(self.layers) and isinstance(self.layers[following], nn.Flatten):
                following += 1
            if following < len(self.layers) and isinstance(self.layers[following], nn.ReLU):
                self.feeds_relu[index] = int(relus_before[following])
        self.relu_gains, self.input_gains = self._gains()

    def _gains(self) -> tuple[list[np.ndarray], np.ndarray]:
        """How much each ReLU's output (per ReLU, ``(neurons, classes)``) and each preprocessed input value
        (``(inputs, classes)``) can move each logit per unit: unit logits pulled back through ``|W|`` (a ReLU's slope
        is at most 1)."""
        gains = np.eye(self.classes)
        relu_gains: list[np.ndarray] = [np.zeros((0, self.classes))] * len(self.relu_shapes)
        relu = len(self.relu_shapes)
        for index in range(len(self.layers) - 1, -1, -1):
            if isinstance(self.layers[index], nn.ReLU):
                relu -= 1
                relu_gains[relu] = gains
            elif index in self.affine:
                gains = np.asarray(abs(self.affine[index].matrix).T @ gains)
        return relu_gains, gains

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        values = self.preprocess(images.double().cpu())
        for layer in self.layers:
            values = layer(values)
        return values

    def margins(self, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        r""":math:`f_y - f_k` for every class ``k`` (0 at ``k = y``), shape ``(B, classes)``."""
        logits = self.logits(images)
        return (logits.gather(1, labels[:, None]) - logits).numpy()

    @torch.no_grad()
    def interval_bounds(self, lower: torch.Tensor, upper: torch.Tensor, given):
        """Bounds at each ReLU's input (``given``, or interval arithmetic from the pixel box) and at the logit layer's input."""
        lower, upper = interval_bounds(self.preprocess, lower, upper)
        relu_bounds = []
        for layer in self.layers[:-1]:
            if isinstance(layer, nn.ReLU) and given is not None:
                lower, upper = given[len(relu_bounds)]
            if isinstance(layer, nn.ReLU):
                relu_bounds.append((lower, upper))
            lower, upper = interval_bounds(layer, lower, upper)
        return relu_bounds, (lower, upper)

    def interval_margins(self, lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        r"""Lower bounds on :math:`f_y - f_k` per class from a box ``[lower, upper]`` on the logit layer's input.

        :math:`\min_{l \le h \le u} (w_y - w_k)^\top h + b_y - b_k
        = \sum_j \min(d_j l_j, d_j u_j) + b_y - b_k` with :math:`d = w_y - w_k`.
        """
        logits = self.affine[len(self.layers) - 1]
        weight, bias = logits.matrix.toarray(), logits.bias
        bounds = np.empty((labels.shape[0], self.classes))
        for b, label in enumerate(labels.tolist()):
            difference = weight[label] - weight
            low, high = lower[b].reshape(-1).numpy(), upper[b].reshape(-1).numpy()
            bounds[b] = np.minimum(difference * low, difference * high).sum(1) + bias[label] - bias
        return bounds


@dataclass
class _Encoding:
    """The network added to a program: ``logits = matrix v + constant``, and the binarized pixels' binaries."""

    matrix: sp.csr_matrix
    constant: np.ndarray
    binarized_pixels: np.ndarray
    binarized_variables: np.ndarray


def _encode_network(
    program: Program, network: _Network, ball: BallEncoding, relu_bounds: list, strict_gap: float = 0.0
) -> _Encoding:
    """Add the network on the ball's image to ``program``; ``relu_bounds`` holds flat float64 ``(lower, upper)`` per ReLU.

    Each layer is added by its rule's encoding: a ReLU bounded by its ``relu_bounds``, an affine layer's outputs by the
    bounds of the ReLU that reads them, or else by the program's variable bounds. ``strict_gap`` is a binarization's
    (:class:`~.layers.BinarizeEncoding`).
    """
    preprocess = network.preprocess_encoding
    if strict_gap:
        preprocess = dataclasses.replace(preprocess, strict_gap=strict_gap)
    values = preprocess.add(program, ball.image, (ball.lower, ball.upper))
    none = np.zeros(0, dtype=np.int64)
    binarized_pixels = np.flatnonzero(values.variable >= 0) if network.binarized else none
    binarized_variables = values.variable[binarized_pixels]
    relu = 0
    for index, (layer, encoding) in enumerate(zip(network.layers[:-1], network.encodings[:-1])):
        bounds = None
        if isinstance(layer, nn.ReLU):
            bounds = relu_bounds[relu]
            relu += 1
        elif index in network.feeds_relu:
            bounds = relu_bounds[network.feeds_relu[index]]
        values = encoding.add(program, values, bounds)
    rows, columns, coefficients, constant = network.affine[len(network.layers) - 1].expression(values)
    matrix = sp.csr_matrix((coefficients, (rows, columns)), shape=(constant.size, program.size))
    return _Encoding(matrix, constant, binarized_pixels, binarized_variables)


def highs_error_bound(program: Program, encoding: _Encoding, network: _Network, relu_bounds: list, label: int) -> float:
    r"""The part of the safety margin that covers HiGHS's tolerances, for one example's program (all wrong classes).

    HiGHS meets its tolerances on its own scaled and presolved problem, so no
    a-priori bound on its error is a theorem; this one charges each tolerance
    against the magnitudes it can move, in the program as built:

    .. math::

        \tau_d \sum_j (u_j - l_j) \;+\; (\tau_p + \tau_{\text{int}}) \Big(\max_{k \ne y}
        \big(\textstyle\sum_j |c^k_j| \max(|l_j|, |u_j|) + |c^k_0|\big)
        + \sum_{\text{unstable } i} G_i (|l_i| + u_i) + \sum_{\text{binarized } j} G_j\Big).

    * Dual feasibility :math:`\tau_d` (:data:`DUAL_FEASIBILITY_TOLERANCE`): a
      node's LP bound is the objective at a basis whose reduced costs may
      have the wrong sign by :math:`\tau_d`; by weak duality the node's true
      minimum is below it by at most :math:`\tau_d` times each column's
      range, summed over every column (plan entries, pixels, neurons,
      binaries, all with finite bounds).
    * Primal feasibility :math:`\tau_p` (:data:`PRIMAL_FEASIBILITY_TOLERANCE`)
      and MIP feasibility :math:`\tau_{\text{int}}` (:data:`MIP_FEASIBILITY_TOLERANCE`,
      which the branch and bound applies to rows and integrality alike): a
      row met to :math:`\tau_p + \tau_{\text{int}}`, or a binary within
      :math:`\tau_{\text{int}}` of 0 or 1, lets the objective's terms
      :math:`c^k_j v_j` (the margin :math:`f_y - f_k` on the last hidden
      layer, with its constant :math:`c^k_0`) and each big-M constant move by
      that fraction of their magnitude; a big-M constant (:math:`|l_i| + u_i`
      of an unstable ReLU, or a binarized pixel's bit) moves the margin by its
      neuron's gain :math:`G_i`, the unit logits :math:`e_y` and the worst
      :math:`e_k` pulled back through :math:`|W|`.

    The MIP gap plays no part: the certificate uses the dual bound, which the gap
    only keeps from getting closer to the optimum.
    """
    lower, upper = program.variable_bounds()
    ranges = float(np.sum(upper - lower))
    magnitude = np.maximum(np.abs(lower), np.abs(upper))
    wrong = np.flatnonzero(np.arange(network.classes) != label)
    objective = abs(encoding.matrix[np.full(wrong.size, label)] - encoding.matrix[wrong])
    terms = np.asarray(objective @ magnitude[: objective.shape[1]]).ravel() + np.abs(encoding.constant[label] - encoding.constant[wrong])
    big_m = 0.0
    for gains, (low, high) in zip(network.relu_gains, relu_bounds):
        gain = gains[:, label] + gains[:, wrong].max(1)
        unstable = (low < 0) & (high > 0)
        big_m += float(gain[unstable] @ (np.abs(low[unstable]) + high[unstable]))
    if encoding.binarized_pixels.size:
        gains = network.input_gains[encoding.binarized_pixels]
        big_m += float((gains[:, label] + gains[:, wrong].max(1)).sum())
    return DUAL_FEASIBILITY_TOLERANCE * ranges + (PRIMAL_FEASIBILITY_TOLERANCE + MIP_FEASIBILITY_TOLERANCE) * (float(terms.max()) + big_m)


# --------------------------------------------------------------------------
# Solving one example
# --------------------------------------------------------------------------


@dataclass
class _ClassOutcome:
    """One wrong class's solve: the proven lower bound on its margin, and the incumbent (margin and program values)."""

    bound: float
    margin: float
    solution: np.ndarray | None
    timed_out: bool


def _solve_class(program: Program, encoding: _Encoding, label: int, wrong: int, time_limit: float) -> _ClassOutcome:
    r"""Minimize :math:`f_y - f_k` over the program within ``time_limit`` seconds."""
    constant = float(encoding.constant[label] - encoding.constant[wrong])
    if program.size == 0:
        # An image without mass: the ball is {0} and the margin a constant.
        return _ClassOutcome(constant, constant, np.zeros(0), False)
    objective = (encoding.matrix[label] - encoding.matrix[wrong]).toarray().ravel()
    result = program.minimize(objective, time_limit, constant)
    if result.status not in (0, 1):
        # HiGHS failed (the ball is never empty): the class stays undecided.
        return _ClassOutcome(-np.inf, np.inf, None, False)
    if program.has_integers:
        dual = result.mip_dual_bound
        bound = float(dual) if dual is not None and np.isfinite(dual) else -np.inf
    else:
        # A linear program's optimum is its own bound; stopped early, it proves nothing.
        bound = float(result.fun) if result.status == 0 else -np.inf
    timed_out = result.status == 1
    if result.x is None:
        return _ClassOutcome(bound, np.inf, None, timed_out)
    return _ClassOutcome(bound, float(result.fun), result.x, timed_out)


def _realize_pattern(
    ball: WassersteinBall, index: int, threshold: float, pixels: np.ndarray, ones: np.ndarray, time_limit: float
) -> np.ndarray | None:
    r"""A point of the ball of example ``index`` whose binarization is the pattern exactly, or None.

    The relaxation lets a pixel at exactly :math:`t` binarize to 0. This LP
    maximizes the gap :math:`s` by which the flat ``pixels`` meant to be 0
    stay below the threshold, the others (``ones``) at or above it; a
    pattern with :math:`s^\star = 0` is reached only on the relaxation's
    boundary, by no image the network binarizes that way, and one with
    :math:`s^\star` below half :data:`BINARIZATION_GAP` counts as such.
    """
    program = Program()
    encoding = ball.encode(program, index)
    gap = program.add_variables(0.0, threshold)
    pixel = encoding.image.variable[pixels]
    above, below = pixel[ones], pixel[~ones]
    program.add_sums([(above, 1.0)], threshold, np.inf)
    program.add_sums([(below, 1.0), (np.repeat(gap, below.size), 1.0)], -np.inf, threshold)
    objective = np.zeros(program.size)
    objective[gap] = -1.0
    result = program.minimize(objective, time_limit)
    # A gap within rounding of 0 would not survive the image's float32 rounding or the repair.
    if result.status != 0 or result.x is None or result.x[gap[0]] < BINARIZATION_GAP / 2:
        return None
    return encoding.point(result.x)


def _check_bounds(pre_activation_bounds, network: _Network, batch: int) -> list | None:
    if pre_activation_bounds is None:
        return None
    if len(pre_activation_bounds) != len(network.relu_shapes):
        raise ValueError(
            f"pre_activation_bounds has {len(pre_activation_bounds)} pairs; the network has {len(network.relu_shapes)} ReLUs"
        )
    checked = []
    for index, (pair, shape) in enumerate(zip(pre_activation_bounds, network.relu_shapes)):
        if len(pair) != 2:
            raise ValueError(f"pre_activation_bounds[{index}] must be a (lower, upper) pair")
        lower, upper = (torch.as_tensor(bound).detach().double().cpu() for bound in pair)
        for name, bound in (("lower", lower), ("upper", upper)):
            if tuple(bound.shape) != (batch, *shape):
                raise ValueError(
                    f"pre_activation_bounds[{index}] {name} has shape {tuple(bound.shape)}; ReLU {index} needs {(batch, *shape)}"
                )
            if torch.isnan(bound).any():
                raise ValueError(f"pre_activation_bounds[{index}] {name} has NaN entries")
        if (lower > upper).any():
            raise ValueError(f"pre_activation_bounds[{index}] has lower > upper: the bounds are empty")
        checked.append((lower, upper))
    return checked


def _check_labels(labels, batch: int, classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of shape ({batch},), got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected ({batch},)")
    labels = labels.detach().cpu().long()
    if ((labels < 0) | (labels >= classes)).any():
        raise ValueError(f"labels={labels.tolist()} is invalid: classes are 0..{classes - 1}")
    return labels


def milp_certify(
    network,
    x: torch.Tensor,
    labels: torch.Tensor,
    eps,
    transport: LocalTransport,
    *,
    box: bool,
    time_limit: float,
    pre_activation_bounds=None,
    margin_bounds=None,
    margin_safety=None,
) -> MilpCertificates:
    r"""Decide for each example whether some image of its Wasserstein ball changes the prediction.

    Each example is one mixed-integer program (see the module docstring),
    minimized once per wrong class, most promising class first, within a
    shared time budget.

    Parameters
    ----------
    network : PiecewiseLinearNetwork or nn.Module
        The classifier (a module is read with :meth:`PiecewiseLinearNetwork.of`).
    x : Tensor (B, C, H, W)
        Clean images (mass, ``>= 0``; with the box also ``<= 1``), float32
        or float64, in the model's dtype.
    labels : Tensor (B,)
        True classes.
    eps : float or Tensor (B,)
        Radii, ``>= 0``, in normalized units.
    transport : LocalTransport
        Window size and cost exponent of the ball.
    box : bool
        Intersect the ball with :math:`x' \le 1`.
    time_limit : float
        Seconds per example (``> 0``), shared by its classes' solves. It is
        checked between steps: building the program and verifying a
        candidate are not interrupted.
    pre_activation_bounds : list of (Tensor, Tensor), optional
        One ``(lower, upper)`` pair per ``nn.ReLU`` of ``network.layers``,
        each of shape ``(B, *shape of that ReLU's input)``: bounds valid over
        the ball, trusted as given. They decide which ReLUs are stable and
        are the big-M of the others. Default: interval arithmetic from the
        pixel bounds of the module docstring.
    margin_bounds : Tensor (B, classes), optional
        Lower bounds on :math:`f_y - f_k` valid over the ball (entry ``y``
        ignored), such as the incomplete certifier's: a class whose bound
        exceeds the safety margin is not solved, and the others are solved
        from the smallest bound up instead of from the smallest clean margin.
    margin_safety : Tensor (B,), optional
        The safety margin of ``margin_bounds`` (their
        :attr:`~harness.certify.bounds.LinearBounds.safety_margin`): the
        floor of each example's safety margin where it exceeds the one
        computed here.

    Returns
    -------
    MilpCertificates
        ``CLEAN_MISCLASSIFIED`` (the model is wrong at ``x``; nothing is
        solved), ``CERTIFIED`` (every wrong class's proven minimum exceeds the
        safety margin, also when a solve ran out of time with such a dual bound),
        ``COUNTEREXAMPLE`` (verified), ``UNKNOWN`` (a candidate failed the
        exact verification, or HiGHS failed) or ``TIMEOUT``.

    Raises
    ------
    ValueError
        A bad argument (named), or an unsupported layer
        (:class:`~harness.certify.network.UnsupportedNetwork`).
    """
    if not isinstance(network, PiecewiseLinearNetwork):
        if not isinstance(network, nn.Module):
            raise ValueError(f"network must be a PiecewiseLinearNetwork or an nn.Module, got {type(network).__name__}")
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        network = PiecewiseLinearNetwork.of(network, x.shape[1:])
    check_images(x, x)
    if tuple(x.shape[1:]) != network.input_shape:
        raise ValueError(f"x has shape {tuple(x.shape)}: the network takes images of shape {network.input_shape}")
    if not isinstance(transport, LocalTransport):
        raise ValueError(f"transport={transport!r} is invalid: it must be a LocalTransport")
    if not isinstance(box, bool):
        raise ValueError(f"box={box!r} is invalid: it must be True or False")
    time_limit = check_positive("time_limit", time_limit)
    batch = x.shape[0]
    radii = check_nonnegative_eps(eps, batch, torch.empty(0, dtype=torch.float64))
    images = x.detach().cpu().double()
    ball = WassersteinBall(images, radii, transport, box)
    verifier = _Verifier(network, ball, time_limit)
    classes = verifier.exact.classes
    labels = _check_labels(labels, batch, classes)
    given = _check_bounds(pre_activation_bounds, verifier.exact, batch)
    if margin_bounds is not None:
        margin_bounds = torch.as_tensor(margin_bounds).detach().double().cpu().numpy()
        if margin_bounds.shape != (batch, classes) or np.isnan(margin_bounds).any():
            raise ValueError(f"margin_bounds has shape {margin_bounds.shape}: it must be ({batch}, {classes}), without NaN")
    if margin_safety is not None:
        margin_safety = torch.as_tensor(margin_safety).detach().double().cpu().numpy()
        if margin_safety.shape != (batch,) or not (margin_safety >= 0).all():
            raise ValueError(f"margin_safety has shape {margin_safety.shape}: it must be ({batch},), >= 0")

    with torch.no_grad():
        clean_prediction = network.forward(x).argmax(1).cpu()
    clean_margins = verifier.exact.margins(images, labels)
    pixel_lower, pixel_upper = ball.pixel_bounds
    relu_bounds, logit_inputs = verifier.exact.interval_bounds(pixel_lower, pixel_upper, given)
    known_bounds = verifier.exact.interval_margins(*logit_inputs, labels)
    if margin_bounds is not None:
        known_bounds = np.maximum(known_bounds, margin_bounds)
    priority = clean_margins if margin_bounds is None else known_bounds
    if network.binarized:
        pixel_upper = (pixel_upper >= network.threshold).double()  # the bits that can be 1
    floor = verifier.safety_floor(pixel_upper, relu_bounds, labels)
    if margin_safety is not None:
        floor = np.maximum(floor, margin_safety)

    status, counterexample = [], torch.full_like(x, float("nan"))
    margin_lower, margin_found, seconds, safety = np.empty(batch), np.empty(batch), np.empty(batch), floor.copy()
    for b in range(batch):
        started = time.perf_counter()
        example = _Example(
            b, x[b : b + 1], labels[b : b + 1], float(radii[b]), started, known_bounds[b].copy(), clean_margins[b], priority[b],
            float(floor[b]),
        )
        if int(clean_prediction[b]) != int(labels[b]):
            example.status = CertificateStatus.CLEAN_MISCLASSIFIED
        else:
            verifier.certify(example, [(lower[b].reshape(-1).numpy(), upper[b].reshape(-1).numpy()) for lower, upper in relu_bounds])
        status.append(example.status)
        if example.counterexample is not None:
            counterexample[b] = example.counterexample
        margin_lower[b] = example.bounds[example.wrong].min()
        margin_found[b] = example.found
        safety[b] = example.safety
        seconds[b] = time.perf_counter() - started
    return MilpCertificates(status, margin_lower, margin_found, counterexample, seconds, safety)


@dataclass
class _Example:
    """One example as the verifier works on it: per-class margin bounds and the smallest margin found improve as it goes;
    the wrong classes are solved in increasing order of ``priority``."""

    index: int
    """The example's position in the batch (and in the verifier's ball)."""
    x: torch.Tensor
    label: torch.Tensor
    eps: float
    started: float
    bounds: np.ndarray
    clean_margins: np.ndarray
    priority: np.ndarray
    safety: float
    """The margin every wrong class's bound must exceed; raised by :func:`highs_error_bound` once a program is built."""
    status: CertificateStatus = CertificateStatus.UNKNOWN
    counterexample: torch.Tensor | None = None
    wrong: np.ndarray = field(init=False)
    found: float = field(init=False)

    def __post_init__(self) -> None:
        self.wrong = np.flatnonzero(np.arange(self.clean_margins.size) != int(self.label[0]))
        self.found = float(self.clean_margins[self.wrong].min())

    def remaining(self, time_limit: float) -> float:
        return time_limit - (time.perf_counter() - self.started)


class _Verifier:
    """The per-call state of :func:`milp_certify`: the network in float64 and the balls of the batch."""

    def __init__(self, network: PiecewiseLinearNetwork, ball: WassersteinBall, time_limit: float):
        self.network = network
        self.exact = _Network(network)
        self.ball = ball
        self.transport, self.box = ball.transport, ball.box
        self.time_limit = time_limit

    def safety_floor(self, input_magnitude: torch.Tensor, relu_bounds: list, labels: torch.Tensor) -> np.ndarray:
        """Per example, the floating-point part of the safety margin (:func:`~harness.certify.safety.float_error_bound`,
        worst wrong class) for the bounds ``relu_bounds`` on each ReLU's input."""
        per_class = float_error_bound(self.network, input_magnitude, relu_bounds, labels)
        return per_class.scatter(1, labels.view(-1, 1), -math.inf).amax(1).numpy()

    def certify(self, example: _Example, relu_bounds: list) -> None:
        """Solve the wrong classes of a correctly classified example, lowest priority value first.

        Certified only where every wrong class's bound exceeds ``example.safety``: first the floating-point part
        alone (no program), then, once the program is built, with :func:`highs_error_bound` added, whether the
        solves finished or ran out of time.
        """
        if (example.bounds[example.wrong] > example.safety).all():
            example.status = CertificateStatus.CERTIFIED
            return
        program = Program()
        ball = self.ball.encode(program, example.index)
        encoding = _encode_network(program, self.exact, ball, relu_bounds)
        label = int(example.label[0])
        example.safety += highs_error_bound(program, encoding, self.exact, relu_bounds, label)
        timed_out = False
        for k in example.wrong[np.argsort(example.priority[example.wrong], kind="stable")]:
            if example.bounds[k] > example.safety:
                continue
            remaining = example.remaining(self.time_limit)
            if remaining <= 0:
                timed_out = True
                break
            outcome = _solve_class(program, encoding, label, int(k), remaining)
            example.bounds[k] = max(example.bounds[k], outcome.bound)
            if outcome.solution is not None:
                point = ball.point(outcome.solution)
                self._found(example, point)
                if outcome.margin < 0:
                    if isinstance(self.exact.preprocess, Binarize):
                        point = self._binarized_candidate(example, relu_bounds, int(k), encoding, outcome.solution)
                        if point is not None:
                            self._found(example, point)
                    self._check_candidate(example, point)
                    return
            if example.bounds[k] <= example.safety and outcome.timed_out:
                timed_out = True
                break
        if (example.bounds[example.wrong] > example.safety).all():
            example.status = CertificateStatus.CERTIFIED
        else:
            example.status = CertificateStatus.TIMEOUT if timed_out else CertificateStatus.UNKNOWN

    def _found(self, example: _Example, point: np.ndarray) -> None:
        margins = self.exact.margins(torch.from_numpy(point)[None], example.label)[0]
        example.found = min(example.found, float(margins[example.wrong].min()))

    def _binarized_candidate(
        self, example: _Example, relu_bounds: list, wrong: int, encoding: _Encoding, solution: np.ndarray
    ) -> np.ndarray | None:
        """An image that binarizes to a pattern with a negative margin, or None.

        The incumbent's own pattern is tried first; if it needs a pixel at
        exactly the threshold to read 0, the class is solved again with the
        pixels that read 0 kept :data:`BINARIZATION_GAP` below it.
        """
        threshold = self.exact.preprocess.threshold

        def realize(encoding: _Encoding, solution: np.ndarray) -> np.ndarray | None:
            ones = solution[encoding.binarized_variables] > 0.5
            return _realize_pattern(
                self.ball, example.index, threshold, encoding.binarized_pixels, ones,
                max(example.remaining(self.time_limit), _REALIZATION_SECONDS),
            )

        point = realize(encoding, solution)
        remaining = example.remaining(self.time_limit)
        if point is not None or remaining <= 0:
            return point
        program = Program()
        ball = self.ball.encode(program, example.index)
        strict = _encode_network(program, self.exact, ball, relu_bounds, strict_gap=BINARIZATION_GAP)
        outcome = _solve_class(program, strict, int(example.label[0]), wrong, remaining)
        if outcome.solution is None or outcome.margin >= 0:
            return None
        return realize(strict, outcome.solution)

    def _check_candidate(self, example: _Example, point: np.ndarray | None) -> None:
        """Verify a candidate image (None: there is none); COUNTEREXAMPLE if it passes, else UNKNOWN."""
        if point is None:
            example.status = CertificateStatus.UNKNOWN
            return
        candidate = torch.from_numpy(point).to(example.x)[None]
        # Without the box the ball holds images with pixels above 1: the [0, 1] check is not part of its verification.
        tolerances = None if self.box else dataclasses.replace(Tolerances.for_images(candidate, self.transport.kernel_size), box=math.inf)
        verification = verify_wasserstein(
            self.network.model, example.x, example.label.to(example.x.device), candidate, torch.ones(1, dtype=torch.bool),
            torch.tensor([example.eps], dtype=torch.float64), self.transport.kernel_size, self.transport.p, tolerances=tolerances,
        )
        if int(verification.status[0]) == int(VerificationStatus.VERIFIED):
            example.status, example.counterexample = CertificateStatus.COUNTEREXAMPLE, verification.image[0]
        else:
            example.status = CertificateStatus.UNKNOWN
