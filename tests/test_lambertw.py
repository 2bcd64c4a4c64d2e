"""``lambertw_exp(s) = W(exp(s))`` against scipy's Lambert W, over the whole real line."""

import math

import numpy as np
import pytest
import torch
from scipy.special import lambertw

from solvers import lambertw_exp


@pytest.mark.parametrize(
    "dtype, rtol", [(torch.float64, 1e-13), (torch.float32, 5e-6)], ids=["f64", "f32"]
)
def test_matches_scipy_where_exp_is_representable(dtype, rtol):
    s = np.concatenate([np.linspace(-60, 60, 20001), np.linspace(60, 700, 2001)])
    reference = np.real(lambertw(np.exp(s)))
    values = lambertw_exp(torch.tensor(s, dtype=dtype)).double().numpy()
    np.testing.assert_allclose(values, reference, rtol=rtol)


def test_root_equation_beyond_float_range():
    """For arguments exp(s) that overflow float64, W still solves W + log W = s."""
    s = torch.tensor([1e3, 1e5, 1e7, 1e12], dtype=torch.float64)
    w = lambertw_exp(s)
    residual = (w + torch.log(w) - s) / s
    assert torch.all(residual.abs() < 1e-14), residual


def test_limits_are_finite():
    """Tiny arguments give W ~ exp(s) >= 0 (floored at a normal number); +inf stays finite."""
    for dtype in (torch.float32, torch.float64):
        s = torch.tensor([-math.inf, -1e4, -50.0, math.inf, 3e38], dtype=dtype)
        w = lambertw_exp(s)
        assert torch.isfinite(w).all() and (w > 0).all(), w
        assert w[2] == pytest.approx(math.exp(-50.0), rel=1e-5)
        assert w[0] <= torch.finfo(dtype).tiny ** 0.4
