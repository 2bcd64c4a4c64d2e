r"""Incomplete certificates: linear relaxation bounds with the Wasserstein ball as the input set.

For a network :math:`f = A_L \circ \mathrm{ReLU} \circ \dots \circ \mathrm{ReLU} \circ A_1`
(affine blocks :math:`A_l`) and a linear functional :math:`\Lambda` of one
layer's pre-activations, back-substitution (CROWN, Zhang et al. 2018)
replaces each ReLU by linear bounds valid on its input interval
:math:`[l, u]`,

.. math::

    \alpha z \le \mathrm{ReLU}(z) \le \frac{u}{u - l}(z - l)
    \quad (l < 0 < u), \qquad \alpha = [u > -l],

choosing per coefficient sign the side that keeps a lower bound, until the
functional is affine in the input image: :math:`\Lambda \cdot z \ge
\langle a, x'\rangle + c` (each layer's step is its rule in
:mod:`.layers`). Over the ball the minimum of
:math:`\langle a, x'\rangle` is :math:`-h(-a)`, the ball's support
function (:meth:`.perturbation.WassersteinBall.concretize`): a linear
maximization over local plans, exact without the box and a dual bound with
it. So the first layer's bounds are
exact, and every later layer is bounded by one such maximization per neuron
and direction, layer by layer, each using the intervals of the layers
before. An example is certified at :math:`\varepsilon` when the lower bound
of every margin :math:`f_y - f_k` exceeds the safety margin of
:mod:`.safety`: a bound on the model's own rounding (in its dtype, float32
for the zoo's models) plus one on the float64 rounding of the bound itself
(``LinearBounds.safety``). A bound in ``(0, safety]`` proves nothing and
leaves the example undecided.

A binarizing preprocessing is piecewise constant: each pixel's range over
the ball (two support-function values) decides whether its bit can flip,
and the network after it is bounded on the box of bits that can. The
threshold is the one the model compares its own pixels with
(:func:`~harness.certify.network.binarization_threshold`: a float32 model
compares float32 pixels with its threshold rounded to float32), and a range
within the support function's float64 rounding of it counts as reaching it.

Soundness is that of the relaxations and of weak duality; the safety margin
covers the floating point of both the bound and the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from solvers.geometry import LocalTransport

from .layers import LinearRelaxation, interval_bounds, rule_for
from .network import PiecewiseLinearNetwork
from .perturbation import SUPPORT_CHUNK, WassersteinBall
from .safety import float_error_bound

__all__ = ["InputSet", "LinearBounds", "linear_bounds"]

_EXAMPLES_AT_ONCE = 4
"""Examples bounded together (each holds a coefficient image per first-layer neuron and direction)."""


@dataclass
class LinearBounds:
    """Bounds over the ball, per example.

    Attributes
    ----------
    pre_activation : list of (Tensor, Tensor)
        ``(lower, upper)`` on the input of each ReLU, shape ``(B, *layer shape)``.
    margin : Tensor (B, classes)
        Lower bounds on :math:`f_y - f_k` (``+inf`` at ``k = y``), as computed (raw).
    safety : Tensor (B, classes)
        The safety margin of each class's bound (:func:`~harness.certify.safety.float_error_bound`; 0 at ``k = y``).
    """

    pre_activation: list[tuple[torch.Tensor, torch.Tensor]]
    margin: torch.Tensor
    safety: torch.Tensor

    @property
    def worst_margin(self) -> torch.Tensor:
        """Lower bound on the smallest margin over the wrong classes (raw: it decides nothing within :attr:`safety_margin`)."""
        return self.margin.amin(1)

    @property
    def safety_margin(self) -> torch.Tensor:
        """Per example, the margin every class's bound must exceed: the largest of its wrong classes' safety margins."""
        return self.safety.amax(1)

    @property
    def certified(self) -> torch.Tensor:
        """Where the bounds prove the prediction, floating point included: :attr:`worst_margin` > :attr:`safety_margin`."""
        return self.worst_margin > self.safety_margin


class InputSet:
    """Minima of linear functionals over the set the network's first block sees: the ball, or the box of possible bits.

    A binarization has no linear relaxation (:class:`.layers.BinarizeRule`): its output ranges over the bits that can
    flip, each pixel's range over the ball being two support-function values.
    """

    def __init__(self, network: PiecewiseLinearNetwork, ball: WassersteinBall):
        self.ball, self.unboxed = ball, ball.without_box() if ball.box else ball
        self.x, self.box = ball.x, ball.box
        self.bits = None
        if network.binarized:
            self.bits = self._bit_ranges(network.threshold)

    def _bit_ranges(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pixel's possible bits over the ball: low = 1 if it cannot fall below the threshold, high = 1 if it can
        reach it; a range within the support function's rounding of the threshold counts as crossing it."""
        batch, pixels = self.x.shape[0], self.x[0].numel()
        slack = self.ball.support_rounding()
        unit = torch.eye(pixels, dtype=torch.float64).view(pixels, *self.x.shape[1:])
        coefficients = torch.cat([unit, -unit]).repeat(batch, 1, 1, 1)
        example = torch.arange(batch).repeat_interleave(2 * pixels)
        def crossing(minima):
            # The box can only move a bit whose unboxed range crosses the threshold.
            pairs = minima.view(batch, 2, pixels)
            open_ = (pairs[:, 0] < threshold + slack[:, None]) & (-pairs[:, 1] >= threshold - slack[:, None])
            return open_[:, None, :].expand(-1, 2, -1).reshape(-1)

        minima = self.refined(coefficients, example, torch.zeros(coefficients.shape[0], dtype=torch.float64), crossing)
        minima = minima.view(batch, 2, *self.x.shape[1:])
        lowest, highest = minima[:, 0], -minima[:, 1]
        slack = slack.view(-1, 1, 1, 1)
        return (lowest >= threshold + slack).double(), (highest >= threshold - slack).double()

    def magnitude(self) -> torch.Tensor:
        """Bounds on the first block's input over the set, before any normalization (:func:`.safety.float_error_bound`)."""
        if self.bits is not None:
            return self.bits[1]
        return self.ball.pixel_bounds[1]

    def minimum(self, coefficients: torch.Tensor, example: torch.Tensor, box: bool = False) -> torch.Tensor:
        """Lower bounds on ``min <a_s, input>`` (S,) for coefficient images of the first block's input (over the
        boxed ball only with ``box``)."""
        if self.bits is None:
            return -(self.ball if box else self.unboxed).concretize(-coefficients, example)
        low, high = self.bits[0][example], self.bits[1][example]
        return (coefficients.clamp_min(0) * low + coefficients.clamp_max(0) * high).flatten(1).sum(1)

    def refined(self, coefficients, example, constant, needs_box) -> torch.Tensor:
        """``constant + min <a_s, input>``: over the unboxed ball first, then, with the box, again for the
        specifications ``needs_box`` selects from those values (the boxed ball is smaller, so both bounds hold)."""
        values = constant + self.minimum(coefficients, example)
        if self.box and self.bits is None:
            chosen = needs_box(values).nonzero().flatten()
            if chosen.numel():
                boxed = constant[chosen] + self.minimum(coefficients[chosen], example[chosen], box=True)
                values[chosen] = torch.maximum(values[chosen], boxed)
        return values


def _never_boxed(values: torch.Tensor) -> torch.Tensor:
    """Deeper layers' neurons are bounded over the unboxed ball (a superset): the box's prices cost a re-solve per
    round, and measured where it matters least, after the first layer's exact boxed bounds."""
    return torch.zeros_like(values, dtype=torch.bool)


def _unstable_pairs(neurons: int):
    """For specifications ``[+z; -z]`` of ``neurons`` neurons (per example): both entries of every neuron left unstable."""

    def select(minima: torch.Tensor) -> torch.Tensor:
        pairs = minima.view(-1, 2, neurons)
        unstable = (pairs[:, 0] < 0) & (pairs[:, 1] < 0)  # lower < 0 < upper
        return unstable[:, None, :].expand(-1, 2, -1).reshape(-1)

    return select


def _linear_form(weights, constant, level, example: int, network: PiecewiseLinearNetwork, relaxations: list[LinearRelaxation]):
    """``weights . h + constant`` (``h`` the output of ReLU ``level``) bounded below by an affine function of the input."""
    for depth in range(level, -1, -1):
        weights, extra = relaxations[depth].pull(weights, example)
        constant = constant + extra
        for step in reversed(network.block_relaxations[depth]):
            weights, extra = step.pull(weights, example)
            constant = constant + extra
    return weights, constant


def _first_layer_bounds(network: PiecewiseLinearNetwork, batch, inputs: InputSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on the first ReLU's input: one support-function value per neuron and direction (exact without the box)."""
    coefficients, bias = network.jacobian(0)
    neurons = coefficients.shape[0]
    spec = torch.cat([coefficients, -coefficients])
    example = torch.arange(batch).repeat_interleave(2 * neurons)
    constant = torch.cat([bias, -bias]).repeat(batch)
    minima = inputs.refined(spec.repeat(batch, 1, 1, 1), example, constant, _unstable_pairs(neurons)).view(batch, 2, neurons)
    return minima[:, 0], -minima[:, 1]


@torch.no_grad()
def linear_bounds(
    network: PiecewiseLinearNetwork,
    x: torch.Tensor,
    labels: torch.Tensor,
    eps,
    transport: LocalTransport,
    *,
    box: bool,
    capacity_rounds: int = 5,
) -> LinearBounds:
    """Bounds on every ReLU input and on the logit margins over the Wasserstein ball.

    Parameters
    ----------
    network : PiecewiseLinearNetwork
    x : Tensor (B, C, H, W)
        Clean images in [0, 1].
    labels : Tensor (B,)
    eps : float or Tensor (B,)
        Radii in normalized units.
    transport : LocalTransport
    box : bool
        Whether the ball keeps pixels at most 1 (the benchmark's boxed attacks do).
    capacity_rounds : int, default 5
        With the box: price updates of each support-function bound (see :mod:`solvers.support`).

    Returns
    -------
    LinearBounds
    """
    if x.shape[0] > _EXAMPLES_AT_ONCE:
        # Memory grows with examples x neurons x pixels: groups of a few examples keep it bounded.
        eps = torch.as_tensor(eps, dtype=torch.float64).expand(x.shape[0])
        parts = [
            linear_bounds(network, x[start : start + _EXAMPLES_AT_ONCE], labels[start : start + _EXAMPLES_AT_ONCE],
                          eps[start : start + _EXAMPLES_AT_ONCE], transport, box=box, capacity_rounds=capacity_rounds)
            for start in range(0, x.shape[0], _EXAMPLES_AT_ONCE)
        ]
        return LinearBounds(
            [(torch.cat([part.pre_activation[i][0] for part in parts]), torch.cat([part.pre_activation[i][1] for part in parts]))
             for i in range(len(parts[0].pre_activation))],
            torch.cat([part.margin for part in parts]),
            torch.cat([part.safety for part in parts]),
        )
    batch = x.shape[0]
    inputs = InputSet(network, WassersteinBall(x, eps, transport, box, capacity_rounds))
    blocks, shapes = network.blocks, network.layer_input_shapes
    intervals: list[tuple[torch.Tensor, torch.Tensor]] = []
    relaxations: list[LinearRelaxation] = []

    def lower_bounds(weights, constant, level, example, needs_box):
        forms = [
            _linear_form(
                weights[start : start + SUPPORT_CHUNK], constant[start : start + SUPPORT_CHUNK], level, example, network,
                relaxations,
            )
            for start in range(0, weights.shape[0], SUPPORT_CHUNK)
        ]
        coefficients, constant = torch.cat([form[0] for form in forms]), torch.cat([form[1] for form in forms])
        return inputs.refined(coefficients, torch.full((coefficients.shape[0],), example), constant, needs_box)

    for depth in range(len(blocks) - 1):
        if depth == 0:
            lower, upper = _first_layer_bounds(network, batch, inputs)
        else:
            # Interval arithmetic first: a cheap bound that the linear bounds refine where it leaves a neuron open.
            lower, upper = interval_bounds(network.activations[depth - 1], *intervals[-1])
            for layer in blocks[depth]:
                lower, upper = interval_bounds(layer, lower, upper)
            coefficients, bias = network.jacobian(depth)
            for index in range(batch):
                # Only the neurons interval arithmetic leaves unstable need the linear bounds.
                open_ = ((lower[index] < 0) & (upper[index] > 0)).flatten().nonzero().flatten()
                if open_.numel() == 0:
                    continue
                weights = torch.cat([coefficients[open_], -coefficients[open_]])
                constant = torch.cat([bias[open_], -bias[open_]])
                minima = lower_bounds(weights, constant, depth - 1, index, _never_boxed).view(2, -1)
                flat_lower, flat_upper = lower[index].flatten(), upper[index].flatten()
                flat_lower[open_] = torch.maximum(flat_lower[open_], minima[0])
                flat_upper[open_] = torch.minimum(flat_upper[open_], -minima[1])
        lower, upper = lower.reshape(batch, *shapes[depth + 1][0]), upper.reshape(batch, *shapes[depth + 1][0])
        intervals.append((lower, upper))
        activation = network.activations[depth]
        relaxations.append(rule_for(activation).relaxation(activation, shapes[depth + 1][0], lower, upper))
    last = network.layers[-1]
    if not isinstance(last, nn.Linear):
        raise ValueError("the logits layer must be Linear")
    classes = last.out_features
    coefficients, bias = network.jacobian(len(blocks) - 1)
    safety = float_error_bound(network, inputs.magnitude(), intervals, labels)
    margin = torch.full((batch, classes), float("inf"), dtype=torch.float64)
    for index in range(batch):
        label = int(labels[index])
        wrong = torch.tensor([k for k in range(classes) if k != label])
        weights = coefficients[label][None] - coefficients[wrong]
        # The box's prices are paid for the margins the unboxed ball leaves undecided.
        undecided = lambda values, floor=safety[index, wrong]: values <= floor  # noqa: E731
        margin[index, wrong] = lower_bounds(weights, bias[label] - bias[wrong], len(blocks) - 2, index, undecided)
    return LinearBounds(intervals, margin, safety)
