r"""Worst-case logits over an :math:`\ell_\infty` ball, for certified training by interval bound propagation.

The interval bounds themselves are the certificates' (:func:`harness.certify.layers.interval_bounds`, one rule per
layer in :data:`harness.certify.layers.RULES`): sound but loose (Gowal et al. 2018, "On the Effectiveness of Interval
Bound Propagation for Training Verifiably Robust Models"). Any layer without an interval rule raises, naming the
layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..certify.layers import interval_bounds

__all__ = ["worst_case_logits"]


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
