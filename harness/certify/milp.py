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
input box of the interval bounds.

The network
-----------
The preprocessing is an affine map (per-channel normalization) or a
binarization :math:`\beta_j = [x'_j \ge t]`: a pixel whose bounds straddle
the threshold, :math:`l_j < t \le u_j`, gets a binary :math:`\beta_j` with

.. math:: x'_j \ge t \beta_j, \qquad x'_j \le t + (u_j - t)\, \beta_j,

a sound relaxation (a pixel at exactly :math:`t` may take either value);
the other pixels binarize to constants. Affine layers are equality rows
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
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from torch import nn

from solvers.checks import check_positive
from solvers.geometry import LocalTransport, check_images, check_nonnegative_eps
from solvers.plan_space import _repair_capacity, plan_image, window_layout
from zoo.architectures import Binarize, Normalize

from ..attack.verify import Tolerances, verify_wasserstein
from ..train.certified import interval_bounds
from ..vocabulary import CertificateStatus, VerificationStatus
from .network import PiecewiseLinearNetwork
from .safety import float_error_bound

__all__ = ["MilpCertificates", "ball_linear_maximum", "highs_error_bound", "milp_certify"]

MIP_RELATIVE_GAP = 1e-2
"""Relative gap at which a class's branch and bound stops.

A verdict needs only the sign of each class's minimum, which any gap below 1
preserves; 1% keeps the reported bound close to the optimum without proving
digits nobody reads."""

BINARIZATION_GAP = 1e-5
"""How far below the threshold the search for a counterexample of a binarized network keeps the pixels that read 0.

The certification program lets a pixel at exactly the threshold read 0 (a
relaxation); a minimizer that uses this sits on the boundary, where no image
binarizes that way, and the search is repeated with this gap."""

LP_TOLERANCE = 1e-9
"""Primal and dual feasibility tolerance of the reference LP of :func:`ball_linear_maximum`."""

PRIMAL_FEASIBILITY_TOLERANCE = 1e-7
"""HiGHS's ``primal_feasibility_tolerance`` in the certification programs (its default, set explicitly because the
safety margin of :func:`highs_error_bound` is computed from it): how far a solution may violate a row or a bound."""

DUAL_FEASIBILITY_TOLERANCE = 1e-7
"""HiGHS's ``dual_feasibility_tolerance`` (its default, set explicitly): how far a reduced cost may have the wrong sign
at an LP optimum, i.e. how much a node's LP bound may overstate the node's minimum per unit of a column's range."""

MIP_FEASIBILITY_TOLERANCE = 1e-6
"""HiGHS's ``mip_feasibility_tolerance`` (its default, set explicitly): how far from 0 or 1 a binary counts as integral."""

_REALIZATION_SECONDS = 1.0
"""Least time given to the LP that realizes a binarized candidate's pattern (part of verifying it)."""

_CONV_BASIS_ENTRIES = 1 << 22
"""Size of the response block (basis images times outputs) a convolution is applied to at once."""


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
# A program built block by block
# --------------------------------------------------------------------------


class _Program:
    """Variables with bounds (some integer) and sparse rows ``lower <= A v <= upper``, added block by block."""

    def __init__(self) -> None:
        self.size = 0
        self.rows = 0
        self._bounds: list[tuple[np.ndarray, np.ndarray, bool]] = []
        self._entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._row_bounds: list[tuple[np.ndarray, np.ndarray]] = []

    def add_variables(self, lower, upper, integer: bool = False) -> np.ndarray:
        """New variables with bounds ``lower`` and ``upper`` (arrays or scalars); returns their indices."""
        lower, upper = np.broadcast_arrays(np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64))
        index = np.arange(self.size, self.size + lower.size)
        self._bounds.append((lower.ravel().copy(), upper.ravel().copy(), integer))
        self.size += lower.size
        return index

    def add_rows(self, rows, columns, values, lower, upper) -> None:
        r"""Rows :math:`l_r \le \sum_{e:\, \text{rows}_e = r} \text{values}_e\, v_{\text{columns}_e} \le u_r`.

        ``rows`` number the new rows from 0; their count is the length of the
        bound arrays ``lower``, ``upper`` (scalars broadcast against each other).
        """
        lower, upper = np.broadcast_arrays(np.atleast_1d(np.asarray(lower, dtype=np.float64)), np.asarray(upper, dtype=np.float64))
        rows, columns = np.asarray(rows, dtype=np.int64), np.asarray(columns, dtype=np.int64)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), rows.shape)
        self._entries.append((rows + self.rows, columns, values))
        self._row_bounds.append((lower.copy(), upper.copy()))
        self.rows += lower.size

    def add_sums(self, terms, lower, upper) -> None:
        r"""Rows :math:`l_r \le \sum_t c_{t, r}\, v_{j_{t, r}} \le u_r`, one per position ``r`` of the
        ``(columns j_t, coefficients c_t)`` terms (coefficients and bounds may be scalars)."""
        count = len(terms[0][0])
        self.add_rows(
            np.tile(np.arange(count), len(terms)),
            np.concatenate([columns for columns, _ in terms]),
            np.concatenate([np.broadcast_to(np.asarray(values, dtype=np.float64), (count,)) for _, values in terms]),
            np.broadcast_to(np.asarray(lower, dtype=np.float64), (count,)),
            np.broadcast_to(np.asarray(upper, dtype=np.float64), (count,)),
        )

    def _assembled(self):
        matrix = sp.csr_matrix(
            (
                np.concatenate([values for _, _, values in self._entries]),
                (np.concatenate([rows for rows, _, _ in self._entries]), np.concatenate([cols for _, cols, _ in self._entries])),
            ),
            shape=(self.rows, self.size),
        )
        row_lower = np.concatenate([lower for lower, _ in self._row_bounds])
        row_upper = np.concatenate([upper for _, upper in self._row_bounds])
        lower = np.concatenate([lower for lower, _, _ in self._bounds])
        upper = np.concatenate([upper for _, upper, _ in self._bounds])
        integer = np.concatenate([np.full(lower.size, int(flag)) for lower, _, flag in self._bounds])
        return matrix, row_lower, row_upper, lower, upper, integer

    @property
    def has_integers(self) -> bool:
        return any(flag and lower.size for lower, _, flag in self._bounds)

    def variable_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The lower and upper bounds of every variable so far."""
        if not self._bounds:
            return np.zeros(0), np.zeros(0)
        return np.concatenate([lower for lower, _, _ in self._bounds]), np.concatenate([upper for _, upper, _ in self._bounds])

    def minimize(self, objective: np.ndarray, time_limit: float, offset: float = 0.0):
        """``min objective . v + offset`` by HiGHS (branch and bound if there are integers); scipy's ``OptimizeResult``.

        The offset rides on a variable fixed at 1, so that HiGHS measures its
        relative gap on the objective itself.
        """
        matrix, row_lower, row_upper, lower, upper, integer = self._assembled()
        options = {
            "time_limit": time_limit, "disp": False, "mip_rel_gap": MIP_RELATIVE_GAP,
            "primal_feasibility_tolerance": PRIMAL_FEASIBILITY_TOLERANCE,
            "dual_feasibility_tolerance": DUAL_FEASIBILITY_TOLERANCE,
            "mip_feasibility_tolerance": MIP_FEASIBILITY_TOLERANCE,
        }
        with warnings.catch_warnings():
            # scipy passes the tolerances to HiGHS verbatim (and checks them there), warning that it does.
            warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
            result = milp(
                np.append(objective, offset),
                integrality=np.append(integer, 0),
                bounds=Bounds(np.append(lower, 1.0), np.append(upper, 1.0)),
                constraints=LinearConstraint(sp.hstack([matrix, sp.csr_matrix((self.rows, 1))]).tocsr(), row_lower, row_upper),
                options=options,
            )
        if result.x is not None:
            result.x = result.x[:-1]
        return result

    def minimize_lp(self, objective: np.ndarray):
        """``min objective . v`` over the continuous program by HiGHS ``linprog``, with tight tolerances."""
        matrix, row_lower, row_upper, lower, upper, _ = self._assembled()
        equal = row_lower == row_upper
        above, below = ~equal & np.isfinite(row_upper), ~equal & np.isfinite(row_lower)
        return linprog(
            objective,
            A_ub=sp.vstack([matrix[above], -matrix[below]]),
            b_ub=np.concatenate([row_upper[above], -row_lower[below]]),
            A_eq=matrix[equal],
            b_eq=row_lower[equal],
            bounds=np.column_stack([lower, upper]),
            method="highs",
            options={"primal_feasibility_tolerance": LP_TOLERANCE, "dual_feasibility_tolerance": LP_TOLERANCE},
        )


@dataclass
class _Values:
    """A layer's values in a program: component ``j`` is ``scale[j] * v[variable[j]] + offset[j]``, or the
    constant ``offset[j]`` where ``variable[j] == -1``; flat, in the order of ``shape``."""

    variable: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    shape: tuple[int, ...]

    def reshaped(self, shape) -> "_Values":
        return _Values(self.variable, self.scale, self.offset, tuple(shape))


# --------------------------------------------------------------------------
# The ball
# --------------------------------------------------------------------------


@dataclass
class _Ball:
    """The plan entries of one image's ball in a program, and the image they transport to.

    Entry ``e`` moves mass from pixel ``source[e]`` (flat over ``C H W``) by
    window offset ``offset[e]`` to pixel ``destination[e]``; ``row[e]``
    numbers its source among the pixels with mass, and ``stay[r]`` is the
    entry of row ``r`` at offset ``(0, 0)``.
    """

    x: np.ndarray
    transport: LocalTransport
    budget: float
    row_mass: np.ndarray
    row: np.ndarray
    source: np.ndarray
    offset: np.ndarray
    destination: np.ndarray
    stay: np.ndarray
    cost: np.ndarray
    plan: np.ndarray
    image: _Values
    lower: np.ndarray
    upper: np.ndarray


def _pixel_bounds(x: np.ndarray, eps: float, transport: LocalTransport, box: bool) -> tuple[np.ndarray, np.ndarray]:
    r"""Flat bounds on the pixels of the ball's images (module docstring); ``x`` is float64 ``(C, H, W)``.

    The window mass :math:`\sum_{i \in \text{window}(j)} x_i` is a sum
    pooling of each channel.
    """
    budget = float(eps) * float(x.sum())
    k = transport.kernel_size
    window = torch.nn.functional.avg_pool2d(
        torch.from_numpy(x)[None], k, stride=1, padding=k // 2, count_include_pad=True, divisor_override=1
    )[0].numpy().reshape(-1)
    mass = x.reshape(-1)
    upper = np.minimum(window, mass + budget)
    return np.maximum(mass - budget, 0.0), np.minimum(upper, 1.0) if box else upper


def _add_ball(program: _Program, x: np.ndarray, eps: float, transport: LocalTransport, box: bool) -> _Ball:
    """Add the plans of the ball around ``x`` (float64, ``(C, H, W)``) and their image to ``program``."""
    channels, height, width = x.shape
    pixels = height * width
    offset_cost, valid = (t.numpy() for t in window_layout(transport, height, width, dtype=torch.float64))
    mass = x.reshape(-1)
    rows = np.flatnonzero(mass > 0)
    row, offset = np.nonzero(valid[rows % pixels])
    source = rows[row]
    k, h = transport.kernel_size, transport.radius
    destination = source + (offset // k - h) * width + (offset % k - h)
    stay = np.flatnonzero(offset == k * k // 2)
    cost = offset_cost[offset]
    budget = float(eps) * float(mass.sum())
    lower, upper = _pixel_bounds(x, eps, transport, box)

    plan = program.add_variables(0.0, mass[source])
    receiving = np.unique(destination)
    pixel = program.add_variables(lower[receiving], upper[receiving])
    variable = np.full(mass.size, -1, dtype=np.int64)
    variable[receiving] = pixel

    program.add_rows(row, plan, 1.0, mass[rows], mass[rows])
    moving = cost > 0
    if moving.any():
        program.add_rows(np.zeros(int(moving.sum())), plan[moving], cost[moving], -np.inf, budget)
    arriving = np.searchsorted(receiving, destination)
    program.add_rows(
        np.concatenate([np.arange(receiving.size), arriving]), np.concatenate([pixel, plan]),
        np.concatenate([np.ones(receiving.size), -np.ones(plan.size)]), np.zeros(receiving.size), 0.0,
    )
    image = _Values(variable, np.ones(mass.size), np.zeros(mass.size), (channels, height, width))
    return _Ball(x, transport, budget, mass[rows], row, source, offset, destination, stay, cost, plan, image, lower, upper)


def _ball_point(ball: _Ball, solution: np.ndarray, box: bool) -> np.ndarray:
    r"""The image of a solver's plan after moving the plan exactly into the ball, ``(C, H, W)`` float64.

    Solvers meet the rows only to their tolerances. The plan is clipped at 0
    and each row rescaled to :math:`x_i` (an empty row keeps its mass in
    place); a plan over budget is mixed with the identity plan :math:`D`,
    which costs nothing, :math:`P \leftarrow \theta P + (1 - \theta) D`;
    with the box, mass arriving at over-full pixels is sent back to its
    source (:func:`solvers.plan_space.project_plans`'s repair), which keeps
    the rows and can only lower the cost.
    """
    entries = np.maximum(solution[ball.plan], 0.0)
    sent = np.bincount(ball.row, weights=entries, minlength=ball.row_mass.size)
    empty = sent <= 0
    entries *= np.where(empty, 0.0, ball.row_mass / np.where(empty, 1.0, sent))[ball.row]
    entries[ball.stay[empty]] = ball.row_mass[empty]
    spent = float(ball.cost @ entries)
    if spent > ball.budget:
        theta = ball.budget / spent
        entries *= theta
        entries[ball.stay] += (1.0 - theta) * ball.row_mass
    channels, height, width = ball.x.shape
    k2 = ball.transport.kernel_size**2
    plan = torch.zeros(channels * height * width, k2, dtype=torch.float64)
    plan[torch.from_numpy(ball.source), torch.from_numpy(ball.offset)] = torch.from_numpy(entries)
    plan = plan.view(1, channels, height * width, k2)
    x = torch.from_numpy(ball.x)[None]
    if box:
        _, valid = window_layout(ball.transport, height, width, dtype=torch.float64)
        plan, _ = _repair_capacity(plan, x, valid)
    return plan_image(plan, height, width)[0].numpy()


def _image_array(value, name: str) -> np.ndarray:
    array = value.detach().cpu().double().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"{name} has shape {array.shape}: it must be one image of shape (C, H, W)")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    return array


def ball_linear_maximum(a, x, eps: float, transport: LocalTransport, *, box: bool) -> float:
    r"""Exact :math:`\max_{x' \in \mathcal B_\varepsilon(x)} \langle a, x' \rangle` for one image, by a HiGHS LP.

    The polytope is the one :func:`milp_certify` builds (plans on the rows
    with mass, budget :math:`\varepsilon\, m(x)`, with ``box`` also
    :math:`x' \le 1`), solved with feasibility tolerances
    :data:`LP_TOLERANCE`: the reference for fast support functions.

    Parameters
    ----------
    a, x : Tensor or ndarray (C, H, W)
        Coefficients and centre (``x >= 0``; with the box ``x <= 1``).
    eps : float
        Radius, ``>= 0``.
    transport : LocalTransport
        Window size and cost exponent.
    box : bool
        Intersect the ball with :math:`x' \le 1`.

    Returns
    -------
    float
        The maximum (``0.0`` for an image without mass, whose ball is ``{0}``).

    Raises
    ------
    ValueError
        Shapes, negative or non-finite entries, a radius below 0, or a
        centre above 1 with the box.
    """
    a, x = _image_array(a, "a"), _image_array(x, "x")
    if a.shape != x.shape:
        raise ValueError(f"a has shape {a.shape} but x has {x.shape}; they must be equal")
    _check_centre(x, box)
    eps = float(check_nonnegative_eps(eps, 1, torch.empty(0, dtype=torch.float64))[0])
    if not isinstance(transport, LocalTransport):
        raise ValueError(f"transport={transport!r} is invalid: it must be a LocalTransport")
    program = _Program()
    ball = _add_ball(program, x, eps, transport, box)
    if program.size == 0:
        return 0.0
    objective = np.zeros(program.size)
    receiving = ball.image.variable >= 0
    objective[ball.image.variable[receiving]] = -a.reshape(-1)[receiving]
    result = program.minimize_lp(objective)
    if result.status != 0:
        raise RuntimeError(f"HiGHS failed on the linear maximization over the ball (status {result.status}): {result.message}")
    return -float(result.fun)


def _check_centre(x: np.ndarray, box: bool) -> None:
    if (x < 0).any():
        raise ValueError(f"x has negative entries (min {x.min():.3g}): an image is mass and must be >= 0")
    if box and (x > 1).any():
        raise ValueError(f"box=True needs images with pixels <= 1 (max {x.max():.6g}): otherwise the ball is empty")


# --------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------


def _affine_matrix(layer: nn.Module, input_shape: tuple[int, ...]) -> tuple[sp.csr_matrix, np.ndarray]:
    """The float64 layer (``Linear`` or ``Conv2d``) as ``W`` (sparse, flat outputs by flat inputs) and bias ``b``."""
    if isinstance(layer, nn.Linear):
        weight = layer.weight.detach().numpy()
        bias = layer.bias.detach().numpy() if layer.bias is not None else np.zeros(weight.shape[0])
        return sp.csr_matrix(weight), bias
    inputs = int(np.prod(input_shape))
    with torch.no_grad():
        outputs = layer._conv_forward(torch.zeros(1, *input_shape, dtype=torch.float64), layer.weight, None).shape
        positions = outputs[2] * outputs[3]
        chunk = max(1, _CONV_BASIS_ENTRIES // (positions * outputs[1]))
        blocks = []
        for start in range(0, inputs, chunk):
            count = min(chunk, inputs - start)
            basis = torch.zeros(count, inputs, dtype=torch.float64)
            basis[torch.arange(count), start + torch.arange(count)] = 1.0
            response = layer._conv_forward(basis.view(count, *input_shape), layer.weight, None)
            blocks.append(sp.csr_matrix(response.reshape(count, -1).numpy().T))
    bias = layer.bias.detach().numpy() if layer.bias is not None else np.zeros(outputs[1])
    return sp.hstack(blocks).tocsr(), np.repeat(bias, positions)


class _Network:
    """A :class:`PiecewiseLinearNetwork` in float64, with its affine layers as sparse matrices.

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
        self.relu_shapes = [shape for shape, layer in zip(shapes, self.layers) if isinstance(layer, nn.ReLU)]
        self.affine = {
            index: _affine_matrix(layer, shapes[index])
            for index, layer in enumerate(self.layers)
            if isinstance(layer, (nn.Conv2d, nn.Linear))
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
                gains = np.asarray(abs(self.affine[index][0]).T @ gains)
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
        # Normalize (positive std) and Binarize are nondecreasing: the box maps to the box of its corners.
        lower, upper = self.preprocess(lower), self.preprocess(upper)
        relu_bounds = []
        for layer in self.layers[:-1]:
            if isinstance(layer, nn.ReLU):
                if given is not None:
                    lower, upper = given[len(relu_bounds)]
                relu_bounds.append((lower, upper))
                lower, upper = lower.clamp_min(0), upper.clamp_min(0)
            else:
                lower, upper = interval_bounds(layer, lower, upper)
        return relu_bounds, (lower, upper)

    def interval_margins(self, lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        r"""Lower bounds on :math:`f_y - f_k` per class from a box ``[lower, upper]`` on the logit layer's input.

        :math:`\min_{l \le h \le u} (w_y - w_k)^\top h + b_y - b_k
        = \sum_j \min(d_j l_j, d_j u_j) + b_y - b_k` with :math:`d = w_y - w_k`.
        """
        matrix, bias = self.affine[len(self.layers) - 1]
        weight = matrix.toarray()
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


def _encode_preprocess(
    program: _Program, preprocess: nn.Module, ball: _Ball, strict_gap: float
) -> tuple[_Values, np.ndarray, np.ndarray]:
    """The preprocessed image; for a binarization also the pixels that got a binary, and those binaries.

    With ``strict_gap > 0`` a pixel whose binary is 0 stays that far below
    the threshold: no longer a relaxation, but every solution is then an
    image the network binarizes as its binaries say.
    """
    image = ball.image
    none = np.zeros(0, dtype=np.int64)
    if isinstance(preprocess, Normalize):
        channels = image.shape[0]
        per_pixel = image.variable.size // channels
        mean = np.repeat(preprocess.mean.detach().numpy().reshape(-1), per_pixel)
        std = np.repeat(preprocess.std.detach().numpy().reshape(-1), per_pixel)
        return _Values(image.variable, image.scale / std, (image.offset - mean) / std, image.shape), none, none
    if isinstance(preprocess, Binarize):
        threshold = preprocess.threshold
        crossing = np.flatnonzero((image.variable >= 0) & (ball.lower < threshold) & (ball.upper >= threshold))
        binary = program.add_variables(np.zeros(crossing.size), 1.0, integer=True)
        pixel = image.variable[crossing]
        program.add_sums([(pixel, 1.0), (binary, -threshold)], 0.0, np.inf)  # x' >= t beta
        # x' - (u - t + gap) beta <= t - gap
        program.add_sums([(pixel, 1.0), (binary, threshold - strict_gap - ball.upper[crossing])], -np.inf, threshold - strict_gap)
        variable = np.full(image.variable.size, -1, dtype=np.int64)
        variable[crossing] = binary
        # A pixel that cannot cross binarizes to a constant: 1 iff even its lowest value reaches the threshold.
        offset = (ball.lower >= threshold).astype(np.float64)
        offset[crossing] = 0.0
        return _Values(variable, np.ones(variable.size), offset, image.shape), crossing, binary
    return image, none, none


def _encode_affine(matrix: sp.csr_matrix, bias: np.ndarray, values: _Values):
    """``W h + b`` for the values ``h``: the sparse linear part over program variables and the constant part.

    Returns ``(rows, columns, coefficients, constant)``.
    """
    entries = matrix.tocoo()
    variable = values.variable[entries.col]
    used = variable >= 0
    return entries.row[used], variable[used], entries.data[used] * values.scale[entries.col[used]], matrix @ values.offset + bias


def _materialize(program: _Program, rows, columns, coefficients, constant, lower, upper) -> _Values:
    """A variable ``z_i`` in ``[lower_i, upper_i]`` with ``z_i = sum coefficients v + constant_i`` per output that depends on
    the program and may be positive (``upper_i > 0``); the others are constants (0 for the dead ones, whose ReLU drops them)."""
    outputs = constant.size
    depends = np.bincount(rows, minlength=outputs) > 0
    needed = depends & (upper > 0)
    variable = np.full(outputs, -1, dtype=np.int64)
    variable[needed] = program.add_variables(lower[needed], upper[needed])
    local = np.cumsum(needed) - 1
    kept = needed[rows]
    count = int(needed.sum())
    program.add_rows(
        np.concatenate([np.arange(count), local[rows[kept]]]), np.concatenate([variable[needed], columns[kept]]),
        np.concatenate([np.ones(count), -coefficients[kept]]), constant[needed], constant[needed],
    )
    offset = np.where(depends, 0.0, constant)
    return _Values(variable, np.ones(outputs), offset, (outputs,))


def _encode_relu(program: _Program, values: _Values, lower: np.ndarray, upper: np.ndarray) -> _Values:
    """``max(z, 0)``: 0 where ``upper <= 0``, ``z`` where ``lower >= 0``, the big-M rows of Tjeng et al. elsewhere."""
    variable, scale, offset = values.variable.copy(), values.scale.copy(), values.offset.copy()
    constant = variable < 0
    dead = upper <= 0
    offset[constant] = np.maximum(offset[constant], 0.0)
    variable[dead], offset[dead] = -1, 0.0
    unstable = np.flatnonzero(~constant & ~dead & (lower < 0))
    if unstable.size:
        l, u = lower[unstable], upper[unstable]
        # The pre-activation is z = s v + o, with v its variable.
        v, s, o = values.variable[unstable], values.scale[unstable], values.offset[unstable]
        y = program.add_variables(np.zeros(unstable.size), u)
        a = program.add_variables(np.zeros(unstable.size), 1.0, integer=True)
        program.add_sums([(y, 1.0), (v, -s)], o, np.inf)  # y >= z
        program.add_sums([(y, 1.0), (v, -s), (a, -l)], -np.inf, o - l)  # y <= z - l (1 - a)
        program.add_sums([(y, 1.0), (a, -u)], -np.inf, 0.0)  # y <= u a
        variable[unstable], scale[unstable], offset[unstable] = y, 1.0, 0.0
    return _Values(variable, scale, offset, values.shape)


def _row_bounds(program: _Program, rows, columns, coefficients, constant) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds on ``sum coefficients v + constant`` per row from the variables' bounds: implied by the rows, so
    they change no optimum, and every variable of a program has a finite range (:func:`highs_error_bound` sums them)."""
    lower, upper = program.variable_bounds()
    low, high = coefficients * lower[columns], coefficients * upper[columns]
    size = constant.size
    return (
        constant + np.bincount(rows, weights=np.minimum(low, high), minlength=size),
        constant + np.bincount(rows, weights=np.maximum(low, high), minlength=size),
    )


def _encode_network(program: _Program, network: _Network, ball: _Ball, relu_bounds: list, strict_gap: float = 0.0) -> _Encoding:
    """Add the network on the ball's image to ``program``; ``relu_bounds`` holds flat float64 ``(lower, upper)`` per ReLU.

    ``strict_gap``: see :func:`_encode_preprocess`.
    """
    values, binarized_pixels, binarized_variables = _encode_preprocess(program, network.preprocess, ball, strict_gap)
    relu = 0
    for index, layer in enumerate(network.layers[:-1]):
        if isinstance(layer, nn.Flatten):
            values = values.reshaped((values.variable.size,))
        elif isinstance(layer, nn.ReLU):
            values = _encode_relu(program, values, *relu_bounds[relu])
            relu += 1
        else:
            rows, columns, coefficients, constant = _encode_affine(*network.affine[index], values)
            if index in network.feeds_relu:
                lower, upper = relu_bounds[network.feeds_relu[index]]
            else:
                lower, upper = _row_bounds(program, rows, columns, coefficients, constant)
            values = _materialize(program, rows, columns, coefficients, constant, lower, upper)
    rows, columns, coefficients, constant = _encode_affine(*network.affine[len(network.layers) - 1], values)
    matrix = sp.csr_matrix((coefficients, (rows, columns)), shape=(constant.size, program.size))
    return _Encoding(matrix, constant, binarized_pixels, binarized_variables)


def highs_error_bound(program: _Program, encoding: _Encoding, network: _Network, relu_bounds: list, label: int) -> float:
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


def _solve_class(program: _Program, encoding: _Encoding, label: int, wrong: int, time_limit: float) -> _ClassOutcome:
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
    x: np.ndarray, eps: float, transport: LocalTransport, box: bool, threshold: float, pixels: np.ndarray, ones: np.ndarray,
    time_limit: float,
) -> np.ndarray | None:
    r"""A point of the ball whose binarization is the pattern exactly, or None.

    The relaxation lets a pixel at exactly :math:`t` binarize to 0. This LP
    maximizes the gap :math:`s` by which the flat ``pixels`` meant to be 0
    stay below the threshold, the others (``ones``) at or above it; a
    pattern with :math:`s^\star = 0` is reached only on the relaxation's
    boundary, by no image the network binarizes that way, and one with
    :math:`s^\star` below half :data:`BINARIZATION_GAP` counts as such.
    """
    program = _Program()
    ball = _add_ball(program, x, eps, transport, box)
    gap = program.add_variables(0.0, threshold)
    pixel = ball.image.variable[pixels]
    above, below = pixel[ones], pixel[~ones]
    program.add_sums([(above, 1.0)], threshold, np.inf)
    program.add_sums([(below, 1.0), (np.repeat(gap, below.size), 1.0)], -np.inf, threshold)
    objective = np.zeros(program.size)
    objective[gap] = -1.0
    result = program.minimize(objective, time_limit)
    # A gap within rounding of 0 would not survive the image's float32 rounding or the repair.
    if result.status != 0 or result.x is None or result.x[gap[0]] < BINARIZATION_GAP / 2:
        return None
    return _ball_point(ball, result.x, box)


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
    radii = check_nonnegative_eps(eps, batch, torch.empty(0, dtype=torch.float64)).numpy()
    images = x.detach().cpu().double()
    _check_centre(images.numpy(), box)
    verifier = _Verifier(network, transport, box, time_limit)
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
    pixel_bounds = [_pixel_bounds(image.numpy(), radius, transport, box) for image, radius in zip(images, radii)]
    relu_bounds, logit_inputs = verifier.exact.interval_bounds(
        torch.from_numpy(np.stack([lower for lower, _ in pixel_bounds])).view(images.shape),
        torch.from_numpy(np.stack([upper for _, upper in pixel_bounds])).view(images.shape),
        given,
    )
    known_bounds = verifier.exact.interval_margins(*logit_inputs, labels)
    if margin_bounds is not None:
        known_bounds = np.maximum(known_bounds, margin_bounds)
    priority = clean_margins if margin_bounds is None else known_bounds
    pixel_upper = torch.from_numpy(np.stack([upper for _, upper in pixel_bounds])).view(images.shape)
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
            x[b : b + 1], labels[b : b + 1], float(radii[b]), started, known_bounds[b].copy(), clean_margins[b], priority[b],
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
    """The per-call state of :func:`milp_certify`: the network in float64 and the ball's settings."""

    def __init__(self, network: PiecewiseLinearNetwork, transport: LocalTransport, box: bool, time_limit: float):
        self.network = network
        self.exact = _Network(network)
        self.transport = transport
        self.box = box
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
        centre = example.x[0].detach().cpu().double().numpy()
        program = _Program()
        ball = _add_ball(program, centre, example.eps, self.transport, self.box)
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
                point = _ball_point(ball, outcome.solution, self.box)
                self._found(example, point)
                if outcome.margin < 0:
                    if isinstance(self.exact.preprocess, Binarize):
                        point = self._binarized_candidate(example, centre, relu_bounds, int(k), encoding, outcome.solution)
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
        self, example: _Example, centre: np.ndarray, relu_bounds: list, wrong: int, encoding: _Encoding, solution: np.ndarray
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
                centre, example.eps, self.transport, self.box, threshold, encoding.binarized_pixels, ones,
                max(example.remaining(self.time_limit), _REALIZATION_SECONDS),
            )

        point = realize(encoding, solution)
        remaining = example.remaining(self.time_limit)
        if point is not None or remaining <= 0:
            return point
        program = _Program()
        ball = _add_ball(program, centre, example.eps, self.transport, self.box)
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
