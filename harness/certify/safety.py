r"""Safety margins: how far above 0 a proven margin bound must be before it decides a verdict.

A certifier proves a lower bound :math:`L` on :math:`\min_{x'} f_y(x') - f_k(x')`
over the ball for the network in exact arithmetic. Two things stand between
that and the prediction an attack's exact verification sees:

1. the model computes its logits in its own dtype (float32 for the zoo's
   models), so its margin at an image of the ball differs from the exact
   one by rounding; and
2. the bound itself is computed in floating point (float64) or by a solver
   that meets its constraints only to tolerances (HiGHS).

A verdict is therefore ``certified`` only where :math:`L` exceeds a
*safety margin* :math:`S \ge` (bound on 1) + (bound on 2). This module
bounds both for the linear bounds and for the parts of the MILP that do not
come from HiGHS; :func:`harness.certify.milp.highs_error_bound` adds the
solver's part.

The model's rounding
--------------------
With unit roundoff :math:`u` of the model's dtype (``finfo.eps / 2``;
:math:`2^{-24}` for float32) and :math:`\gamma_n = nu / (1 - nu)`, a dot
product of :math:`n` terms plus a bias computed in any order (GEMM, direct
convolution, FMA or not) has :math:`|\mathrm{fl}(w^\top h + b) - (w^\top h + b)|
\le \gamma_{n+1} (|w|^\top |h| + |b|)` (Higham 2002, sec. 3.1). An image of
the ball is exact in the model's dtype (it is the image the verification
checks), a ReLU is exact and 1-Lipschitz, and a normalization
:math:`(x - m)/s` rounds twice. So the error :math:`e` of each layer's
computed values obeys, from :math:`e_0 = 0`,

.. math::

    e_{\text{out}} = |W| e_{\text{in}} + \gamma_{n+1}\big(|W| (H_{\text{in}} + e_{\text{in}}) + |b|\big),
    \qquad H_{\text{out}} = |W| H_{\text{in}} + |b|,

with :math:`H` a bound on the exact values' magnitudes over the ball (the
pixels' bounds of the ball, then at each ReLU the smaller of :math:`H` and
its proven interval's magnitude). The computed prediction is ``y`` wherever
the exact margin exceeds :math:`e_y + e_k` for every ``k``. This assumes
IEEE arithmetic with dot products summed in any order; it does not cover
Winograd or FFT convolutions or TF32 (a GPU's default for convolutions in
float32): certificates are computed and meant for the model on the CPU.

The bound's own rounding
------------------------
The linear bounds are float64 sums of products of the same weights,
relaxation slopes in [0, 1] and intercepts at most :math:`|l|`, and
pixels; each such product is bounded by a term of the absolute forward pass
:math:`A_{\text{out}} = |W| A_{\text{in}} + |b|` (plus :math:`|l|` at an
unstable ReLU), and no sum chains more than :math:`N` of them (the fan-ins
along the network plus the pixels the support function sums). Their error
is at most :math:`\gamma_N(2^{-53}) (A_y + A_k)`; the margin takes twice
that, since the support function's dual value re-evaluates the same terms
at a second point of the ball (the dual's plan). For a float32 model this
part is negligible beside the first (unit roundoff :math:`2^{-53}` against
:math:`2^{-24}`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.architectures import Normalize

from .layers import convolve

__all__ = ["float_error_bound", "gamma", "unit_roundoff", "worst_class"]


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of ``dtype``: the largest relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, u: float) -> float:
    """Higham's :math:`\\gamma_n = nu / (1 - nu)`: the relative error bound of a sum of ``n`` terms (inf once ``nu >= 1``)."""
    nu = n * u
    return math.inf if nu >= 1 else nu / (1 - nu)


def _fan_in(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size)


def _absolute(layer: nn.Module, h: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """``|W| h (+ |b|)`` for an affine layer, in float64."""
    weight = layer.weight.detach().double().abs()
    b = layer.bias.detach().double().abs() if bias and layer.bias is not None else None
    if isinstance(layer, nn.Linear):
        return F.linear(h, weight, b)
    return convolve(layer, h, weight, b)


@torch.no_grad()
def float_error_bound(network, input_magnitude: torch.Tensor, pre_activation, labels: torch.Tensor) -> torch.Tensor:
    r"""Per example and class, the safety margin of a float64 bound on :math:`f_y - f_k` (module docstring).

    Parameters
    ----------
    network : PiecewiseLinearNetwork
        Its ``dtype`` gives the model's unit roundoff.
    input_magnitude : Tensor (B, C, H, W)
        Bounds on the magnitude of the first block's input over the ball
        before any normalization: the pixels' upper bounds
        (:attr:`.perturbation.WassersteinBall.pixel_bounds`), or for a
        binarized network the bits that can be 1.
    pre_activation : list of (Tensor, Tensor)
        Proven ``(lower, upper)`` bounds on each ReLU's input, ``(B, *shape)``.
    labels : Tensor (B,)

    Returns
    -------
    Tensor (B, classes), float64
        :math:`e_y + e_k + 2 \gamma_N(2^{-53}) (A_y + A_k)`; 0 at ``k = y``.
    """
    u, u64 = unit_roundoff(network.dtype), unit_roundoff(torch.float64)
    magnitude = input_magnitude.double()
    error = torch.zeros_like(magnitude)
    absolute = magnitude.clone()
    terms = math.prod(magnitude.shape[1:])  # the support function sums over the pixels
    for depth, block in enumerate(network.blocks):
        for layer in block:
            if isinstance(layer, Normalize):
                mean, std = layer.mean.detach().double(), layer.std.detach().double()
                # Pixels lie in [0, magnitude]: |x - m| is largest at an end.
                exact = torch.maximum(mean.abs().expand_as(magnitude), (magnitude - mean).abs()) / std
                error = error / std + gamma(2, u) * (exact + error / std)
                magnitude, absolute = exact, (absolute + mean.abs()) / std
                terms += 2
            elif isinstance(layer, (nn.Conv2d, nn.Linear)):
                n = _fan_in(layer)
                error = _absolute(layer, error, bias=False) + gamma(n + 1, u) * _absolute(layer, magnitude + error)
                magnitude, absolute = _absolute(layer, magnitude), _absolute(layer, absolute)
                terms += n + 1
            else:  # Flatten
                magnitude, error, absolute = (t.flatten(1) for t in (magnitude, error, absolute))
        if depth < len(network.blocks) - 1:
            lower, upper = (bound.double().reshape(magnitude.shape) for bound in pre_activation[depth])
            # The ReLU is exact and 1-Lipschitz: the error passes; the exact output lies in [0, max(upper, 0)].
            magnitude = torch.minimum(magnitude, torch.maximum(lower.abs(), upper.abs())).minimum(upper.clamp_min(0))
            unstable = (lower < 0) & (upper > 0)
            absolute = absolute + torch.where(unstable, lower.abs(), torch.zeros_like(lower))
    labels = labels.long().view(-1, 1)
    per_class = error + error.gather(1, labels) + 2 * gamma(terms, u64) * (absolute + absolute.gather(1, labels))
    return per_class.scatter(1, labels, 0.0)


def worst_class(per_class: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The largest entry over the wrong classes, per example: one margin every class's bound must exceed."""
    return per_class.scatter(1, labels.long().view(-1, 1), -math.inf).amax(1)
