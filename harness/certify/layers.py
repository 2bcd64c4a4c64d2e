r"""The certificates' one table of layer rules: what each supported layer contributes to every bound.

A :class:`LayerRule` per layer type owns that layer's part of each certificate:

interval rule (:meth:`LayerRule.interval`)
    A box :math:`[l, u]` of inputs to a box of outputs that contains all of
    them (interval bound propagation, Gowal et al. 2018): an affine layer
    :math:`y = W h + b` maps the box of centre :math:`c = (u + l)/2` and
    radius :math:`r = (u - l)/2` to centre :math:`W c + b` and radius
    :math:`|W| r`; a monotone layer (ReLU, max-pool, a normalization with
    positive scale, a binarization) maps the bounds themselves.
linear relaxation (:meth:`LayerRule.relaxation`)
    Back-substitution (CROWN, Zhang et al. 2018): a functional
    :math:`\Lambda \cdot y` of the layer's output bounded below by an affine
    function of its input. Exact for an affine layer,
    :math:`\Lambda \cdot (W h + b) = (W^\top \Lambda) \cdot h + \Lambda \cdot b`;
    for a ReLU with input bounds :math:`l < 0 < u` the bounds
    :math:`\alpha z \le \mathrm{ReLU}(z) \le \frac{u}{u - l}(z - l)`,
    :math:`\alpha = [u > -l]`, chosen per coefficient sign.
MILP encoding (:meth:`LayerRule.encoding`)
    The layer as rows of a :class:`~.program.Program`: an affine layer as
    the sparse matrix of its action, a ReLU exactly with one binary per
    unstable neuron (Tjeng, Xiao, Tedrake 2019), a binarization with one
    binary per pixel that can cross its threshold.

:data:`RULES` maps each layer type (exactly, not subclasses, which may
compute something else) to its rule and :func:`rule_for` looks a layer up;
:func:`interval_bounds` (also certified training's), the linear bounds
(:mod:`.bounds`), the MILP (:mod:`.milp`) and :func:`.network.check_certifiable`
(hence the run's preflight) all go through it. A rule that lacks one of the
three says so (:meth:`LayerRule.missing`): ``MaxPool2d`` and the residual
block have interval rules only, so interval bounds cover them and the
certifiers refuse them by name.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from zoo.architectures import Binarize, ClassifierWithPreprocessing, Normalize, WongResidualBlock

from .program import Program, ProgramValues

__all__ = [
    "AffineEncoding", "LayerEncoding", "LayerRule", "LinearRelaxation", "RULES", "ReluRelaxation", "Role",
    "UnsupportedNetwork", "conv_zero_padding", "convolve", "interval_bounds", "rule_for",
]

CONV_BASIS_ENTRIES = 1 << 22
"""Size of the response block (basis images times outputs) a convolution's MILP matrix is built from at once."""


class UnsupportedNetwork(ValueError):
    """A model with a layer that no certificate rule covers."""


class Role(enum.Enum):
    """Where a layer may stand in a certifiable network."""

    LAYER = "layer"
    """In the list of layers after the preprocessing."""
    PREPROCESSING = "preprocessing"
    """The preprocessing step of a :class:`~zoo.architectures.ClassifierWithPreprocessing`."""
    CONTAINER = "container"
    """Holds other layers; interval bounds go through it, the certifiers read its layers instead."""


# --------------------------------------------------------------------------
# Convolutions through their public attributes
# --------------------------------------------------------------------------


def _padding_amounts(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of a convolution, as ``F.pad`` takes it, from ``padding`` and the kernel.

    ``'same'`` pads a total of ``dilation * (kernel - 1)`` per axis, the smaller half first, as PyTorch does.
    """
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        (total_h, total_w) = (d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size))
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    rows, columns = (int(p) for p in layer.padding)
    return (columns, columns, rows, rows)


def conv_zero_padding(layer: nn.Conv2d) -> tuple[int, int] | None:
    """The convolution's padding as ``(rows, columns)`` of zeros on each side, or None where it is not that.

    ``padding='valid'`` is no padding; ``padding='same'`` is symmetric zero padding when the dilated kernel has odd
    size (PyTorch pads even kernels more on one side, which the bounds' transposed convolution cannot express).
    """
    if layer.padding_mode != "zeros":
        return None
    left, right, top, bottom = _padding_amounts(layer)
    return (top, left) if (top, left) == (bottom, right) else None


def convolve(layer: nn.Conv2d, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``layer``'s convolution (its stride, padding, dilation and groups) of ``h`` with other weights and bias."""
    if layer.padding_mode == "zeros":
        return F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    padded = F.pad(h, _padding_amounts(layer), mode=layer.padding_mode)
    return F.conv2d(padded, weight, bias, layer.stride, 0, layer.dilation, layer.groups)


# --------------------------------------------------------------------------
# Linear relaxations and MILP encodings
# --------------------------------------------------------------------------


class LinearRelaxation(Protocol):
    """A layer's back-substitution step."""

    def pull(self, weights: torch.Tensor, example) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients ``(S, *input shape)`` and constants ``(S,)`` with ``weights . output >= coefficients . input +
        constant`` for the specifications ``weights`` ``(S, *output shape)`` of example ``example``."""


@dataclass(frozen=True)
class ExactRelaxation:
    """An affine layer's back-substitution: exact, the same for every example."""

    rule: "LayerRule"
    layer: nn.Module
    input_shape: tuple[int, ...]

    def pull(self, weights: torch.Tensor, example=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rule.backward(self.layer, weights, self.input_shape)


@dataclass
class ReluRelaxation:
    """The linear bounds of one ReLU layer, per example: ``slope_low z <= relu(z) <= slope_up z + intercept_up``."""

    slope_low: torch.Tensor
    slope_up: torch.Tensor
    intercept_up: torch.Tensor

    @classmethod
    def of(cls, lower: torch.Tensor, upper: torch.Tensor) -> "ReluRelaxation":
        unstable = (lower < 0) & (upper > 0)
        active = (lower >= 0).double()
        slope_up = torch.where(unstable, upper / (upper - lower).clamp_min(1e-300), active)
        intercept_up = torch.where(unstable, -slope_up * lower, torch.zeros_like(lower))
        slope_low = torch.where(unstable, (upper > -lower).double(), active)
        return cls(slope_low, slope_up, intercept_up)

    def pull(self, weights: torch.Tensor, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace ``weights . relu(z)`` by a linear lower bound in ``z``, for specifications of one example."""
        negative = weights.clamp_max(0)
        low = self.slope_low[example]
        pulled = weights * low + negative * (self.slope_up[example] - low)
        constant = (negative * self.intercept_up[example]).flatten(1).sum(1)
        return pulled, constant


class LayerEncoding(Protocol):
    """A layer (read in float64) ready to be added to programs."""

    def add(self, program: Program, values: ProgramValues, bounds) -> ProgramValues:
        """Add the layer on the input ``values`` to ``program``; its output values.

        ``bounds`` are flat float64 ``(lower, upper)`` valid over the ball, on the values the encoding bounds its new
        variables by: an affine layer's outputs (None: from the program's variable bounds), a ReLU's or a
        binarization's input; other layers ignore them.
        """


@dataclass(frozen=True)
class AffineEncoding:
    """``W h + b`` with ``W`` sparse (flat outputs by flat inputs)."""

    matrix: sp.csr_matrix
    bias: np.ndarray

    def expression(self, values: ProgramValues):
        """``W h + b`` for the values ``h``: the sparse linear part over program variables and the constant part.

        Returns ``(rows, columns, coefficients, constant)``.
        """
        entries = self.matrix.tocoo()
        variable = values.variable[entries.col]
        used = variable >= 0
        coefficients = entries.data[used] * values.scale[entries.col[used]]
        return entries.row[used], variable[used], coefficients, self.matrix @ values.offset + self.bias

    def add(self, program: Program, values: ProgramValues, bounds) -> ProgramValues:
        """A variable ``z_i = sum coefficients v + constant_i`` in ``[lower_i, upper_i]`` per output that depends on the
        program and may be positive (``upper_i > 0``); the others are constants (0 for the dead ones, whose ReLU drops
        them)."""
        rows, columns, coefficients, constant = self.expression(values)
        lower, upper = bounds if bounds is not None else _row_bounds(program, rows, columns, coefficients, constant)
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
        return ProgramValues(variable, np.ones(outputs), offset, (outputs,))


def _row_bounds(program: Program, rows, columns, coefficients, constant) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds on ``sum coefficients v + constant`` per row from the variables' bounds: implied by the rows, so
    they change no optimum, and every variable of a program has a finite range (the MILP's safety margin sums them)."""
    lower, upper = program.variable_bounds()
    low, high = coefficients * lower[columns], coefficients * upper[columns]
    size = constant.size
    return (
        constant + np.bincount(rows, weights=np.minimum(low, high), minlength=size),
        constant + np.bincount(rows, weights=np.maximum(low, high), minlength=size),
    )


class _Unchanged:
    """An encoding that adds nothing: the layer leaves the values as they are."""

    def add(self, program: Program, values: ProgramValues, bounds) -> ProgramValues:
        return values


class _Flattened:
    """``Flatten(1, -1)``: the same values, one axis."""

    def add(self, program: Program, values: ProgramValues, bounds) -> ProgramValues:
        return values.reshaped((values.variable.size,))


class _ReluEncoding:
    """``max(z, 0)``: 0 where ``upper <= 0``, ``z`` where ``lower >= 0``, the big-M rows of Tjeng et al. elsewhere."""

    def add(self, program: Program, values: ProgramValues, bounds) -> ProgramValues:
        lower, upper = bounds
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
        return ProgramValues(variable, scale, offset, values.shape)


@dataclass(frozen=True)
class _NormalizeEncoding:
    """``(x - mean) / std`` per channel: the same variables, rescaled."""

    mean: np.ndarray
    std: np.ndarray

    def add(self, program: Program, values: ProgramValues, bounds) -> ProgramValues:
        per_pixel = values.variable.size // self.mean.size
        mean, std = np.repeat(self.mean, per_pixel), np.repeat(self.std, per_pixel)
        return ProgramValues(values.variable, values.scale / std, (values.offset - mean) / std, values.shape)


@dataclass(frozen=True)
class BinarizeEncoding:
    r"""``[x' >= t]``: a pixel whose bounds straddle the threshold, :math:`l_j < t \le u_j`, gets a binary
    :math:`\beta_j` with :math:`x'_j \ge t \beta_j` and :math:`x'_j \le t - g + (u_j - t + g)\, \beta_j`; the others
    binarize to constants.

    With ``strict_gap`` :math:`g = 0` this is a sound relaxation (a pixel at exactly :math:`t` may read either bit);
    with :math:`g > 0` a pixel whose binary is 0 stays that far below the threshold: no longer a relaxation, but every
    solution is then an image the network binarizes as its binaries say. The output's variables are the binaries.
    """

    threshold: float
    strict_gap: float = 0.0

    def add(self, program: Program, values: ProgramValues, bounds) -> ProgramValues:
        lower, upper = bounds
        t, gap = self.threshold, self.strict_gap
        crossing = np.flatnonzero((values.variable >= 0) & (lower < t) & (upper >= t))
        binary = program.add_variables(np.zeros(crossing.size), 1.0, integer=True)
        pixel = values.variable[crossing]
        program.add_sums([(pixel, 1.0), (binary, -t)], 0.0, np.inf)  # x' >= t beta
        program.add_sums([(pixel, 1.0), (binary, t - gap - upper[crossing])], -np.inf, t - gap)
        variable = np.full(values.variable.size, -1, dtype=np.int64)
        variable[crossing] = binary
        # A pixel that cannot cross binarizes to a constant: 1 iff even its lowest value reaches the threshold.
        offset = (lower >= t).astype(np.float64)
        offset[crossing] = 0.0
        return ProgramValues(variable, np.ones(variable.size), offset, values.shape)


# --------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------


class LayerRule:
    """What the certificates know about one layer type; subclasses override the rules they have.

    Attributes
    ----------
    layer_type : type
        The exact module type the rule is for.
    role : Role
        Where the layer may stand.
    allowed : str
        The layer and its conditions in words (the refusals quote it); empty for rules that certify nothing.
    """

    layer_type: ClassVar[type[nn.Module]]
    role: ClassVar[Role] = Role.LAYER
    allowed: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return self.layer_type.__name__

    def missing(self) -> tuple[str, ...]:
        """The rules this layer lacks, in words (empty for a layer both certifiers read)."""
        own = type(self)
        return tuple(
            words
            for method, words in (("interval", "interval rule"), ("relaxation", "linear relaxation"), ("encoding", "MILP encoding"))
            if getattr(own, method) is getattr(LayerRule, method)
        )

    @property
    def certifiable(self) -> bool:
        """Whether both certifiers read this layer (where its role allows it)."""
        return self.role is not Role.CONTAINER and not self.missing()

    def problem(self, layer: nn.Module) -> str | None:
        """Why ``layer``'s settings put it outside the rule (a sentence naming it), or None."""
        return None

    def input_problem(self, layer: nn.Module, input_shape: tuple[int, ...]) -> str | None:
        """Why the rule cannot take an input of shape ``input_shape`` (per image), or None."""
        return None

    def interval(self, layer: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds on the output for every input in the box ``[lower, upper]``, in the bounds' dtype."""
        raise UnsupportedNetwork(f"interval bounds have no rule for layer {self.name}")

    def forward(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The layer on ``h`` in float64 (the layer's own parameters are left as they are)."""
        return layer(h)

    def backward(self, layer: nn.Module, weights: torch.Tensor, input_shape) -> tuple[torch.Tensor, torch.Tensor]:
        """An exact layer's pull-back of ``weights`` (S, *output shape): input coefficients and the bias's constant (S,)."""
        raise UnsupportedNetwork(f"certificates have no exact pull-back for layer {self.name}")

    def relaxation(self, layer: nn.Module, input_shape, lower=None, upper=None) -> LinearRelaxation:
        """The layer's back-substitution step; ``lower``, ``upper`` bound its input per example (a ReLU needs them)."""
        raise UnsupportedNetwork(f"certificates have no linear relaxation for layer {self.name}")

    def encoding(self, layer: nn.Module, input_shape) -> LayerEncoding:
        """The layer, read in float64, as rows of a program (input of shape ``input_shape`` per image)."""
        raise UnsupportedNetwork(f"certificates have no MILP encoding for layer {self.name}")


class _Monotone(LayerRule):
    """A layer nondecreasing in every input: the box maps to the box of its corners."""

    def interval(self, layer, lower, upper):
        return layer(lower), layer(upper)


class _Exact(LayerRule):
    """An affine layer: its back-substitution is its exact pull-back."""

    def relaxation(self, layer, input_shape, lower=None, upper=None) -> LinearRelaxation:
        return ExactRelaxation(self, layer, tuple(input_shape))


class LinearRule(_Exact):
    layer_type = nn.Linear
    allowed = "Linear (on a flat input)"

    def input_problem(self, layer, input_shape):
        if len(input_shape) != 1:
            return (
                f"certificates have no rule for {layer!r} on an input of shape {tuple(input_shape)}: a Linear layer must "
                "read a flat input (put a Flatten before it)"
            )
        return None

    def interval(self, layer, lower, upper):
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        # In the bounds' precision (float64 for certificates), whatever the layer's.
        weight = layer.weight.to(centre.dtype)
        bias = None if layer.bias is None else layer.bias.to(centre.dtype)
        out_centre, out_radius = F.linear(centre, weight, bias), F.linear(radius, weight.abs())
        return out_centre - out_radius, out_centre + out_radius

    def forward(self, layer, h):
        return F.linear(h, layer.weight.double(), None if layer.bias is None else layer.bias.double())

    def backward(self, layer, weights, input_shape):
        constant = weights @ layer.bias.double() if layer.bias is not None else weights.new_zeros(weights.shape[0])
        return weights @ layer.weight.double(), constant

    def encoding(self, layer, input_shape) -> AffineEncoding:
        weight = layer.weight.detach().double().numpy()
        bias = layer.bias.detach().double().numpy() if layer.bias is not None else np.zeros(weight.shape[0])
        return AffineEncoding(sp.csr_matrix(weight), bias)


class Conv2dRule(_Exact):
    layer_type = nn.Conv2d
    allowed = "Conv2d (zero padding: padding_mode='zeros', numeric or 'valid' padding, or 'same' with symmetric padding)"

    def problem(self, layer):
        if conv_zero_padding(layer) is None:
            return (
                f"certificates have no rule for {layer!r} (padding={layer.padding!r}, padding_mode={layer.padding_mode!r}): "
                "the bounds pull functionals back through zero padding only"
            )
        return None

    def input_problem(self, layer, input_shape):
        if len(input_shape) != 3:
            return f"certificates have no rule for {layer!r} on an input of shape {tuple(input_shape)}"
        return None

    def interval(self, layer, lower, upper):
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        weight = layer.weight.to(centre.dtype)
        bias = None if layer.bias is None else layer.bias.to(centre.dtype)
        out_centre, out_radius = convolve(layer, centre, weight, bias), convolve(layer, radius, weight.abs(), None)
        return out_centre - out_radius, out_centre + out_radius

    def forward(self, layer, h):
        return convolve(layer, h, layer.weight.double(), None if layer.bias is None else layer.bias.double())

    def backward(self, layer, weights, input_shape):
        specs = weights.shape[0]
        # Zero padding only (problem() refuses the rest): the pull-back is the transposed convolution.
        pulled = torch.nn.grad.conv2d_input(
            (specs, *input_shape), layer.weight.double(), weights, layer.stride, conv_zero_padding(layer), layer.dilation,
            layer.groups,
        )
        constant = (weights.sum((2, 3)) @ layer.bias.double()) if layer.bias is not None else weights.new_zeros(specs)
        return pulled, constant

    def encoding(self, layer, input_shape) -> AffineEncoding:
        """The convolution's matrix from its responses to the unit images, :data:`CONV_BASIS_ENTRIES` at a time."""
        inputs = math.prod(input_shape)
        with torch.no_grad():
            outputs = convolve(layer, torch.zeros(1, *input_shape, dtype=torch.float64), layer.weight, None).shape
            positions = outputs[2] * outputs[3]
            chunk = max(1, CONV_BASIS_ENTRIES // (positions * outputs[1]))
            blocks = []
            for start in range(0, inputs, chunk):
                count = min(chunk, inputs - start)
                basis = torch.zeros(count, inputs, dtype=torch.float64)
                basis[torch.arange(count), start + torch.arange(count)] = 1.0
                response = convolve(layer, basis.view(count, *input_shape), layer.weight, None)
                blocks.append(sp.csr_matrix(response.reshape(count, -1).numpy().T))
        bias = layer.bias.detach().numpy() if layer.bias is not None else np.zeros(outputs[1])
        return AffineEncoding(sp.hstack(blocks).tocsr(), np.repeat(bias, positions))


class FlattenRule(_Exact, _Monotone):
    layer_type = nn.Flatten
    allowed = "Flatten (start_dim=1, end_dim=-1)"

    def problem(self, layer):
        if (layer.start_dim, layer.end_dim) != (1, -1):
            return f"certificates have no rule for {layer!r}: only Flatten(start_dim=1, end_dim=-1)"
        return None

    def backward(self, layer, weights, input_shape):
        return weights.reshape(weights.shape[0], *input_shape), weights.new_zeros(weights.shape[0])

    def encoding(self, layer, input_shape):
        return _Flattened()


class ReLURule(_Monotone):
    layer_type = nn.ReLU
    allowed = "ReLU"

    def relaxation(self, layer, input_shape, lower=None, upper=None) -> ReluRelaxation:
        if lower is None or upper is None:
            raise ValueError("a ReLU's relaxation needs bounds on its input")
        return ReluRelaxation.of(lower, upper)

    def encoding(self, layer, input_shape):
        return _ReluEncoding()


class IdentityRule(_Exact, _Monotone):
    layer_type = nn.Identity
    role = Role.PREPROCESSING
    allowed = "Identity"

    def backward(self, layer, weights, input_shape):
        return weights, weights.new_zeros(weights.shape[0])

    def encoding(self, layer, input_shape):
        return _Unchanged()


class NormalizeRule(_Exact, _Monotone):
    """``(x - mean) / std`` with ``std > 0``: affine and increasing."""

    layer_type = Normalize
    role = Role.PREPROCESSING
    allowed = "Normalize"

    def forward(self, layer, h):
        return (h - layer.mean.double()) / layer.std.double()

    def backward(self, layer, weights, input_shape):
        std, mean = layer.std.double(), layer.mean.double()
        return weights / std, -(weights * (mean / std)).flatten(1).sum(1)

    def encoding(self, layer, input_shape):
        return _NormalizeEncoding(layer.mean.detach().double().numpy().reshape(-1), layer.std.detach().double().numpy().reshape(-1))


class BinarizeRule(_Monotone):
    """``[x >= t]``: piecewise constant and nondecreasing.

    It has no linear relaxation: the linear bounds see its output as the box
    of bits that can flip over the ball (:class:`.bounds.InputSet`), which
    needs the threshold the model compares its own pixels with
    (:func:`.network.binarization_threshold`); the MILP encodes it with that
    threshold too (the ``layer`` it is given compares with it).
    """

    layer_type = Binarize
    role = Role.PREPROCESSING
    allowed = "Binarize"

    def encoding(self, layer, input_shape) -> BinarizeEncoding:
        return BinarizeEncoding(layer.threshold)

    @property
    def certifiable(self) -> bool:
        return True


class MaxPool2dRule(_Monotone):
    layer_type = nn.MaxPool2d


class WongResidualBlockRule(LayerRule):
    """``relu(skip(x) + conv_b(relu(conv_a(x))))``: each branch bounded on the same input box, then summed."""

    layer_type = WongResidualBlock

    def interval(self, layer, lower, upper):
        skip = interval_bounds(layer.skip, lower, upper)
        inner = interval_bounds(layer.conv_a, lower, upper)
        branch = interval_bounds(layer.conv_b, F.relu(inner[0]), F.relu(inner[1]))
        return F.relu(skip[0] + branch[0]), F.relu(skip[1] + branch[1])


class SequentialRule(LayerRule):
    layer_type = nn.Sequential
    role = Role.CONTAINER

    def interval(self, layer, lower, upper):
        for inner in layer:
            lower, upper = interval_bounds(inner, lower, upper)
        return lower, upper


class ClassifierWithPreprocessingRule(LayerRule):
    layer_type = ClassifierWithPreprocessing
    role = Role.CONTAINER

    def interval(self, layer, lower, upper):
        lower, upper = interval_bounds(layer.preprocess, lower, upper)
        return interval_bounds(layer.net, lower, upper)


RULES: dict[type[nn.Module], LayerRule] = {
    rule.layer_type: rule
    for rule in (
        Conv2dRule(), LinearRule(), FlattenRule(), ReLURule(), IdentityRule(), NormalizeRule(), BinarizeRule(),
        MaxPool2dRule(), WongResidualBlockRule(), SequentialRule(), ClassifierWithPreprocessingRule(),
    )
}
"""The one table: each supported module type (exactly that type) and its rule."""


def rule_for(layer: nn.Module) -> LayerRule:
    """The rule of ``layer``'s type.

    Raises
    ------
    UnsupportedNetwork
        No rule covers the type (named, with the types the table covers).
    """
    rule = RULES.get(type(layer))
    if rule is None:
        raise UnsupportedNetwork(
            f"certificates have no rule for layer {type(layer).__name__}; the rules cover "
            f"{', '.join(sorted(rule.name for rule in RULES.values()))}"
        )
    return rule


def interval_bounds(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on ``module``'s output for every input in the box ``[lower, upper]`` (interval bound propagation).

    Every module of :data:`RULES` has an interval rule; the bounds are sound but loose (Gowal et al. 2018).

    Raises
    ------
    UnsupportedNetwork
        A layer without a rule (its type is named).
    """
    return rule_for(module).interval(module, lower, upper)
