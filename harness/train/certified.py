r"""Interval bound propagation (IBP) through a classifier, for certified training and certificates.

For an input box :math:`[l, u]` every layer maps a box to a box that
contains all its outputs: an affine layer :math:`y = W x + b` maps the box of
centre :math:`c = (u + l)/2` and radius :math:`r = (u - l)/2` to centre
:math:`W c + b` and radius :math:`|W| r`; a monotone activation (ReLU, a
max-pool, a normalization with positive scale) maps the bounds themselves.
The bounds are sound but loose (Gowal et al. 2018, "On the Effectiveness of
Interval Bound Propagation for Training Verifiably Robust Models").

Supported layers: ``Conv2d``, ``Linear``, ``ReLU``, ``Flatten``,
``Identity``, ``MaxPool2d``, the zoo's ``Normalize``,
``ClassifierWithPreprocessing`` and ``WongResidualBlock`` (each branch
bounded separately, then summed), and ``Sequential`` of these. Anything else
raises, naming the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.architectures import ClassifierWithPreprocessing, Normalize, WongResidualBlock

__all__ = ["interval_bounds", "worst_case_logits"]


def interval_bounds(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on ``module``'s output for every input in the box ``[lower, upper]``.

    Raises
    ------
    ValueError
        A layer without interval rule (its type is named).
    """
    if isinstance(module, ClassifierWithPreprocessing):
        lower, upper = interval_bounds(module.preprocess, lower, upper)
        return interval_bounds(module.net, lower, upper)
    if isinstance(module, nn.Sequential):
        for layer in module:
            lower, upper = interval_bounds(layer, lower, upper)
        return lower, upper
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        # In the bounds' precision (float64 for certificates), whatever the layer's.
        weight = module.weight.to(centre.dtype)
        bias = None if module.bias is None else module.bias.to(centre.dtype)
        if isinstance(module, nn.Linear):
            out_centre = F.linear(centre, weight, bias)
            out_radius = F.linear(radius, weight.abs())
        else:
            out_centre = module._conv_forward(centre, weight, bias)
            out_radius = module._conv_forward(radius, weight.abs(), None)
        return out_centre - out_radius, out_centre + out_radius
    if isinstance(module, WongResidualBlock):
        # relu(skip(x) + conv_b(relu(conv_a(x)))): each branch is bounded on the same input box, then summed.
        skip = interval_bounds(module.skip, lower, upper)
        inner = interval_bounds(module.conv_a, lower, upper)
        branch = interval_bounds(module.conv_b, F.relu(inner[0]), F.relu(inner[1]))
        return F.relu(skip[0] + branch[0]), F.relu(skip[1] + branch[1])
    if isinstance(module, (nn.ReLU, nn.Flatten, nn.Identity, nn.MaxPool2d)):
        return module(lower), module(upper)
    if isinstance(module, Normalize):
        # (x - mean) / std with std > 0 is increasing in x.
        return module(lower), module(upper)
    raise ValueError(
        f"interval bounds have no rule for layer {type(module).__name__}; supported: Sequential, Conv2d, Linear, "
        "ReLU, Flatten, Identity, MaxPool2d, Normalize, WongResidualBlock"
    )


def worst_case_logits(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Logits with the true class at its lower bound and every other class at its upper bound.

    The inputs range over the l_inf ball of radius ``eps`` around ``x``
    intersected with [0, 1]. If the true class still wins on these logits,
    the prediction is certified over the whole ball (see
    :func:`certified_accuracy` in :mod:`harness.train.loop`).
    """
    lower, upper = interval_bounds(model, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    true_class = F.one_hot(labels, lower.shape[1]).bool()
    return torch.where(true_class, lower, upper)
