"""The Lambert W function evaluated at exp(s), stable for any real s.

The beta step of projected Sinkhorn needs ``W(lam * exp(lam * w) * a)``, whose
argument overflows float32 as soon as ``lam * w`` exceeds about 88. Taking the
logarithm of the argument, ``s``, as input avoids forming it: ``W(e^s)`` is the
root of ``f(y) = y + log(y) - s``, which is smooth and monotone in ``y > 0``.
"""

from __future__ import annotations

import math

import torch

# From the start below, three steps reach float32 rounding and four float64's.
_NEWTON_STEPS = {torch.float32: 3, torch.float64: 4}


def lambertw_exp(s: torch.Tensor) -> torch.Tensor:
    """Principal branch ``W(exp(s))`` for real ``s``.

    Newton's method on :math:`f(y) = y + \\log y - s`, started from
    :math:`y_0 = \\max(e / (1 + e), s - \\log \\max(s, 1))` with
    :math:`e = e^{\\min(s, 1)}`, which is within a relative 0.3 of the root for
    every ``s``; the iteration

    .. math:: y \\leftarrow \\frac{y}{1 + y} \\, (1 + s - \\log y)

    then converges quadratically: three steps reach float32 rounding and
    four float64's, over the whole real line.

    ``s`` is clamped from below at ``log`` of the dtype's smallest normal
    number plus a margin, where ``W(e^s) = e^s`` is already below any mass the
    solvers resolve, and from above at the largest finite number, so the
    result is always finite and positive.

    Parameters
    ----------
    s : Tensor
        Logarithm of the argument of W; any shape, float32 or float64.

    Returns
    -------
    Tensor
        ``W(exp(s))``, same shape and dtype as ``s``.
    """
    info = torch.finfo(s.dtype)
    s = s.clamp(math.log(info.tiny) + 8, info.max)
    # Start from max(e / (1 + e), s - log s), e = exp(min(s, 1)): within a relative
    # 0.3 of the root everywhere, and unlike log1p(e^s) it needs no special
    # function, whose slow path for tiny arguments cost 20x the whole step.
    e = torch.exp(s.clamp_max(1.0))
    y = torch.maximum(e / (1 + e), s - torch.log(s.clamp_min(1.0)))
    for _ in range(_NEWTON_STEPS.get(s.dtype, 4)):
        # y / (1 + y) first: the product y * (1 + s - log y) overflows for huge s.
        y = y / (1 + y) * (1 + s - torch.log(y))
    return y
