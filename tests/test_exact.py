"""Tests for solvers/exact.py (exact LP/QP reference solvers for the local ball).

Problems are generated with known answers (unit shifts, block shifts,
out-of-window moves) or checked through properties (symmetry, triangle
inequality for the global W1 metric, monotonicity, feasibility, idempotence,
variational inequality).  A tiny independent dense two-stage LP, written here
with explicit loops, cross-checks the penalized single-solve distance LP.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from solvers.exact import (
    ExactSolverError,
    TransportResult,
    exact_projection,
    exact_projection_batch,
    linear_maximization,
    linear_maximization_batch,
    local_ot_distance,
    local_ot_distance_batch,
)

HYP = settings(max_examples=20, deadline=None, derandomize=True)
SHAPES = [(1, 8, 8), (3, 6, 6), (2, 5, 7)]


# --------------------------------------------------------------------------
# Independent helpers (explicit loops; no code shared with the module)
# --------------------------------------------------------------------------


def pairs_loop(shape, k, p):
    """All in-window pairs (i, j, cost) by brute force over flattened indices."""
    C, H, W = shape
    h = k // 2
    out = []
    for c, r, s in itertools.product(range(C), range(H), range(W)):
        i = (c * H + r) * W + s
        for dr in range(-h, h + 1):
            for ds in range(-h, h + 1):
                rr, ss = r + dr, s + ds
                if 0 <= rr < H and 0 <= ss < W:
                    j = (c * H + rr) * W + ss
                    out.append((i, j, float(dr * dr + ds * ds) ** (p / 2)))
    return out


def random_pushforward(x, k, p, rng, eps=None, sparsity=0.5):
    """Column sums of a random local plan with rows x (cost <= eps*mass if given)."""
    pairs = pairs_loop(x.shape, k, p)
    src = np.array([a for a, _, _ in pairs])
    dst = np.array([b for _, b, _ in pairs])
    cost = np.array([c for _, _, c in pairs])
    xf = x.ravel()
    wts = rng.random(src.size) * (rng.random(src.size) < sparsity)
    wts[src == dst] += 1e-3
    rs = np.bincount(src, wts, xf.size)
    P = wts / rs[src] * xf[src]
    if eps is not None:
        c = float(cost @ P)
        budget = eps * xf.sum()
        if c > budget:
            theta = budget / c
            P = theta * P
            diag = src == dst
            P[diag] += (1 - theta) * xf[src[diag]]
    return np.bincount(dst, P, xf.size).reshape(x.shape)


def dense_two_stage(x, z, k, p):
    """Reference lexicographic LP: two dense HiGHS solves (max delivery, min cost)."""
    pairs = pairs_loop(x.shape, k, p)
    n, m = x.size, len(pairs)
    A = np.zeros((2 * n, m))
    cost = np.zeros(m)
    for e, (i, j, c) in enumerate(pairs):
        A[i, e] = 1.0
        A[n + j, e] = 1.0
        cost[e] = c
    b = np.concatenate([x.ravel(), z.ravel()])
    opts = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
    r1 = linprog(-np.ones(m), A_ub=A, b_ub=b, bounds=(0, None), method="highs", options=opts)
    dstar = -r1.fun
    A2 = np.vstack([A, -np.ones((1, m))])
    # relax the delivery level slightly: D* itself may sit just past the boundary
    b2 = np.concatenate([b, [-(dstar - 1e-9 * max(b.sum(), 1e-300))]])
    r2 = linprog(cost, A_ub=A2, b_ub=b2, bounds=(0, None), method="highs", options=opts)
    assert r1.status == 0 and r2.status == 0, (r1.message, r2.message)
    return dstar, r2.fun


def window_max(g, k):
    """max of g over the k x k window around each pixel (same channel)."""
    C, H, W = g.shape
    h = k // 2
    out = np.empty_like(g)
    for c, r, s in itertools.product(range(C), range(H), range(W)):
        out[c, r, s] = g[c, max(0, r - h): r + h + 1, max(0, s - h): s + h + 1].max()
    return out


def rand_image(rng, shape, density=1.0):
    x = rng.random(shape) * (rng.random(shape) < density)
    x.flat[0] += 0.1
    return x


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


class TestValidation:
    x = np.ones((1, 4, 4))

    @pytest.mark.parametrize("k", [1, 2, 4, 0, -3, 3.0, "3", True, None])
    def test_bad_kernel_size(self, k):
        with pytest.raises(ValueError, match="kernel_size must be an odd int >= 3"):
            local_ot_distance(self.x, self.x, k, 1)
        with pytest.raises(ValueError, match="kernel_size"):
            exact_projection(self.x, self.x, 0.1, k, 1)
        with pytest.raises(ValueError, match="kernel_size"):
            linear_maximization(self.x, self.x, 0.1, k, 1)

    def test_numpy_int_kernel_ok(self):
        assert local_ot_distance(self.x, self.x, np.int64(3), 1).cost == 0.0

    @pytest.mark.parametrize("p", [0, -1, float("nan"), float("inf"), "a"])
    def test_bad_p(self, p):
        with pytest.raises(ValueError, match="p must be a finite real number > 0"):
            local_ot_distance(self.x, self.x, 3, p)

    @pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
    def test_bad_eps(self, eps):
        with pytest.raises(ValueError, match="eps must be a finite real number >= 0"):
            linear_maximization(self.x, self.x, eps, 3, 1)
        with pytest.raises(ValueError, match="eps must be"):
            exact_projection(self.x, self.x, eps, 3, 1)

    def test_negative_x(self):
        x = self.x.copy()
        x[0, 1, 1] = -1e-12
        with pytest.raises(ValueError, match="x must be non-negative"):
            local_ot_distance(x, self.x, 3, 1)
        with pytest.raises(ValueError, match="non-negative"):
            exact_projection(x, self.x, 0.1, 3, 1)
        with pytest.raises(ValueError, match="non-negative"):
            linear_maximization(x, self.x, 0.1, 3, 1)

    def test_shapes(self):
        with pytest.raises(ValueError, match="z must have the same shape as x"):
            local_ot_distance(self.x, np.ones((1, 4, 5)), 3, 1)
        with pytest.raises(ValueError, match="w must have the same shape"):
            exact_projection(self.x, np.ones((2, 4, 4)), 0.1, 3, 1)
        with pytest.raises(ValueError, match=r"x must be a 3-D array of shape \(C, H, W\)"):
            local_ot_distance(np.ones((4, 4)), np.ones((4, 4)), 3, 1)
        with pytest.raises(ValueError, match="3-D"):
            linear_maximization(np.ones((1, 1, 4, 4)), np.ones((1, 1, 4, 4)), 0.1, 3, 1)
        with pytest.raises(ValueError, match="4-D"):
            local_ot_distance_batch(self.x, self.x, 3, 1)
        with pytest.raises(ValueError, match=r"eps must be a scalar or have shape \(2,\)"):
            exact_projection_batch(np.ones((2, 1, 3, 3)), np.ones((2, 1, 3, 3)), [0.1] * 3, 3, 1)

    def test_non_finite(self):
        z = self.x.copy()
        z[0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="z must contain only finite values"):
            local_ot_distance(self.x, z, 3, 1)
        with pytest.raises(ValueError, match="g must contain only finite"):
            linear_maximization(self.x, z, 0.1, 3, 1)


# --------------------------------------------------------------------------
# local_ot_distance
# --------------------------------------------------------------------------


class TestDistance:
    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("k", [3, 5])
    @pytest.mark.parametrize("p", [1, 2])
    def test_self_distance_zero(self, shape, k, p):
        x = rand_image(np.random.default_rng(0), shape, 0.7)
        r = local_ot_distance(x, x, k, p)
        assert isinstance(r, TransportResult)
        assert r.cost == pytest.approx(0.0, abs=1e-12)
        assert r.undelivered_mass <= 1e-12 and r.unused_mass <= 1e-12
        assert r.mass_x == pytest.approx(x.sum()) and r.mass_z == pytest.approx(x.sum())
        assert isinstance(r.cost, float) and isinstance(r.undelivered_mass, float)

    @pytest.mark.parametrize("p", [0.5, 1, 2, 3])
    @pytest.mark.parametrize("k", [3, 5])
    def test_unit_shift_isolated(self, p, k):
        x = np.zeros((1, 6, 7))
        x[0, 2, 3] = 1.0
        for (dr, ds), expected in [((0, 1), 1.0), ((1, 0), 1.0), ((1, 1), 2 ** (p / 2))]:
            z = np.zeros_like(x)
            z[0, 2 + dr, 3 + ds] = 1.0
            r = local_ot_distance(x, z, k, p)
            assert r.cost == pytest.approx(expected, rel=1e-9)
            assert r.undelivered_mass <= 1e-12

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("p", [1, 2])
    @pytest.mark.parametrize("k", [3, 5])
    def test_unit_shift_on_background(self, shape, p, k):
        # One extra unit moved by one pixel on top of a positive background:
        # normalized cost = 1/mass (and 2^(p/2)/mass diagonally, for p <= 2).
        rng = np.random.default_rng(1)
        bg = 0.5 + rng.random(shape)
        c = shape[0] - 1
        for (dr, ds), expected in [((0, 1), 1.0), ((1, 1), 2 ** (p / 2))]:
            x = bg.copy()
            z = bg.copy()
            x[c, 2, 2] += 1.0
            z[c, 2 + dr, 2 + ds] += 1.0
            r = local_ot_distance(x, z, k, p)
            assert r.cost == pytest.approx(expected / x.sum(), rel=1e-8)
            assert r.raw_cost == pytest.approx(expected, rel=1e-8)

    @pytest.mark.parametrize("p", [1, 2])
    @pytest.mark.parametrize("k", [3, 5])
    def test_block_shift(self, p, k):
        # 2-pixel horizontal block moved right (or down) by one: each unit moves
        # one pixel, total raw cost 2 (for p=1 moving the left unit by 2 ties).
        x = np.zeros((1, 5, 6))
        x[0, 1, 1:3] = 1.0
        right = np.zeros_like(x)
        right[0, 1, 2:4] = 1.0
        down = np.zeros_like(x)
        down[0, 2, 1:3] = 1.0
        for z in (right, down):
            r = local_ot_distance(x, z, k, p)
            assert r.raw_cost == pytest.approx(2.0, rel=1e-9)
            assert r.cost == pytest.approx(1.0, rel=1e-9)
            assert r.undelivered_mass <= 1e-12

    def test_out_of_window_is_undelivered(self):
        x = np.zeros((1, 6, 6))
        x[0, 0, 0] = 1.0
        x[0, 5, 5] = 2.0
        z = np.zeros_like(x)
        z[0, 0, 3] = 1.0  # distance 3 > k//2 = 2
        z[0, 5, 4] = 2.0  # reachable, cost 2
        r = local_ot_distance(x, z, 5, 1)
        assert r.undelivered_mass == pytest.approx(1.0, abs=1e-9)
        assert r.unused_mass == pytest.approx(1.0, abs=1e-9)
        assert r.raw_cost == pytest.approx(2.0, rel=1e-9)
        assert r.cost == pytest.approx(2.0 / 3.0, rel=1e-9)
        # with a 7x7 window the far unit becomes reachable at cost 3
        r7 = local_ot_distance(x, z, 7, 1)
        assert r7.undelivered_mass <= 1e-12
        assert r7.raw_cost == pytest.approx(5.0, rel=1e-9)

    def test_channels_do_not_mix(self):
        x = np.zeros((2, 3, 3))
        x[0, 1, 1] = 1.0
        z = np.zeros_like(x)
        z[1, 1, 1] = 1.0
        r = local_ot_distance(x, z, 3, 1)
        assert r.undelivered_mass == pytest.approx(1.0)
        assert r.cost == 0.0

    def test_float32_rounding_is_not_an_error(self):
        rng = np.random.default_rng(2)
        x = rng.random((1, 28, 28)).astype(np.float32).astype(np.float64)
        x[0, 3, 3] = 0.0  # an empty pixel that comes back as -1e-9 noise
        z = (x * (1 + 1e-7 * rng.standard_normal(x.shape))).astype(np.float32)
        z[0, 3, 3] = -1e-9  # tiny negative float noise
        r = local_ot_distance(x, z, 5, 2)
        m = x.sum()
        assert r.cost < 1e-5
        assert 0.0 <= r.undelivered_mass < 1e-5 * m
        assert r.unused_mass < 1e-5 * m
        assert r.clipped_mass == pytest.approx(1e-9, rel=1e-3)
        assert r.undelivered_mass >= r.clipped_mass

    def test_negative_z_counted(self):
        x = np.ones((1, 3, 3))
        z = x.copy()
        z[0, 0, 0] = -0.5
        r = local_ot_distance(x, z, 3, 1)
        assert r.clipped_mass == pytest.approx(0.5)
        assert r.undelivered_mass >= 0.5 - 1e-12

    def test_zero_mass(self):
        x = np.zeros((1, 4, 4))
        r = local_ot_distance(x, x, 3, 1)
        assert (r.cost, r.raw_cost, r.undelivered_mass) == (0.0, 0.0, 0.0)
        z = np.zeros_like(x)
        z[0, 1, 1] = 0.3
        r = local_ot_distance(x, z, 3, 1)
        assert r.cost == 0.0 and r.undelivered_mass == pytest.approx(0.3)
        r = local_ot_distance(z, x, 3, 1)  # nothing demanded
        assert r.cost == 0.0 and r.undelivered_mass == 0.0
        assert r.unused_mass == pytest.approx(0.3)

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("kp", [(3, 1), (5, 2)])
    def test_symmetry(self, shape, kp):
        k, p = kp
        rng = np.random.default_rng(3)
        x = rand_image(rng, shape, 0.8)
        z = random_pushforward(x, k, p, rng)
        a = local_ot_distance(x, z, k, p)
        b = local_ot_distance(z, x, k, p)
        assert a.undelivered_mass < 1e-9 * x.sum()
        assert a.cost == pytest.approx(b.cost, rel=1e-8, abs=1e-12)

    def test_plan(self):
        rng = np.random.default_rng(4)
        x = rand_image(rng, (2, 5, 7), 0.7)
        z = random_pushforward(x, 3, 2, rng)
        z[0, 0, 0] += 0.5
        r = local_ot_distance(x, z, 3, 2, return_plan=True)
        P = r.plan.toarray()
        assert P.min() >= 0
        assert np.all(P.sum(1) <= x.ravel() + 1e-12)
        assert np.all(P.sum(0) <= z.ravel() + 1e-12)
        costs = np.zeros_like(P)
        for i, j, c in pairs_loop(x.shape, 3, 2):
            costs[i, j] = c
        off = np.ones_like(P, dtype=bool)
        for i, j, _ in pairs_loop(x.shape, 3, 2):
            off[i, j] = False
        assert np.all(P[off] == 0)  # only in-window pairs carry mass
        assert float((P * costs).sum()) == pytest.approx(r.raw_cost, rel=1e-12)
        assert r.undelivered_mass == pytest.approx(0.5, rel=1e-6)

    @HYP
    @given(
        seed=st.integers(0, 2**32 - 1),
        shape=st.sampled_from([(1, 3, 4), (2, 3, 3), (1, 4, 4)]),
        k=st.sampled_from([3, 5]),
        p=st.sampled_from([0.5, 1.0, 2.0]),
        density=st.sampled_from([0.4, 1.0]),
    )
    def test_matches_dense_two_stage_lp(self, seed, shape, k, p, density):
        """Penalized single solve == independent two-stage lexicographic LP."""
        rng = np.random.default_rng(seed)
        x = rng.random(shape) * (rng.random(shape) < density)
        z = rng.random(shape) * (rng.random(shape) < density) * rng.uniform(0.5, 2)
        r = local_ot_distance(x, z, k, p)
        dstar, cstar = dense_two_stage(x, z, k, p)
        scale = max(x.sum(), z.sum(), 1e-300)
        assert r.mass_z - r.undelivered_mass == pytest.approx(dstar, abs=1e-8 * scale)
        assert r.raw_cost == pytest.approx(cstar, rel=1e-7, abs=1e-7 * scale)

    @HYP
    @given(
        seed=st.integers(0, 2**32 - 1),
        shape=st.sampled_from([(1, 3, 3), (1, 2, 4), (2, 3, 2)]),
    )
    def test_triangle_inequality_global_window_p1(self, seed, shape):
        """With the window covering the image, p=1 is the W1 metric."""
        rng = np.random.default_rng(seed)
        x, y, z = (rand_image(rng, shape, 0.7) + 1e-3 for _ in range(3))
        # channels never mix: equalize the per-channel masses
        y *= x.sum(axis=(1, 2), keepdims=True) / y.sum(axis=(1, 2), keepdims=True)
        z *= x.sum(axis=(1, 2), keepdims=True) / z.sum(axis=(1, 2), keepdims=True)
        k = 2 * max(shape[1:]) + 1
        dxy = local_ot_distance(x, y, k, 1)
        dyz = local_ot_distance(y, z, k, 1)
        dxz = local_ot_distance(x, z, k, 1)
        assert max(dxy.undelivered_mass, dyz.undelivered_mass, dxz.undelivered_mass) < 1e-9
        assert dxz.cost <= dxy.cost + dyz.cost + 1e-9

    @HYP
    @given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(1, 1, 5), (1, 1, 7)]))
    def test_triangle_inequality_local_1d_p1(self, seed, shape):
        rng = np.random.default_rng(seed)
        x = rand_image(rng, shape, 0.8)
        y = random_pushforward(x, 3, 1, rng)
        z = random_pushforward(y, 3, 1, rng)
        dxz = local_ot_distance(x, z, 3, 1)
        if dxz.undelivered_mass > 1e-9:
            return
        dxy = local_ot_distance(x, y, 3, 1)
        dyz = local_ot_distance(y, z, 3, 1)
        assert dxz.cost <= dxy.cost + dyz.cost + 1e-9

    def test_triangle_inequality_fails_for_local_windows(self):
        """Documented counterexample: the local-window cost is not a metric.

        x->y and y->z each move one unit by one pixel (cost 1), but x->z must
        move a unit by 2 columns, which a 3x3 window forbids; the cheapest
        local plan reroutes two diagonal moves (cost 2*sqrt(2) > 2).
        """
        x = np.array([[[0, 0, 1], [0, 1, 1]]], dtype=float)
        y = np.array([[[0, 1, 0], [0, 1, 1]]], dtype=float)
        z = np.array([[[1, 0, 0], [0, 1, 1]]], dtype=float)
        dxy = local_ot_distance(x, y, 3, 1)
        dyz = local_ot_distance(y, z, 3, 1)
        dxz = local_ot_distance(x, z, 3, 1)
        assert max(dxy.undelivered_mass, dyz.undelivered_mass, dxz.undelivered_mass) < 1e-12
        assert dxy.raw_cost == pytest.approx(1.0) and dyz.raw_cost == pytest.approx(1.0)
        assert dxz.raw_cost == pytest.approx(2 * np.sqrt(2))

    def test_torch_and_float32_inputs(self):
        torch = pytest.importorskip("torch")
        x = torch.rand(1, 5, 5, dtype=torch.float32, requires_grad=True)
        r = local_ot_distance(x, x * 1.0, 3, 1)
        assert r.cost == pytest.approx(0.0, abs=1e-12)
        assert r.mass_x == pytest.approx(float(x.detach().double().sum()), rel=1e-12)
        xb = x.detach().to(torch.bfloat16)  # no numpy dtype: converted exactly
        r = local_ot_distance(xb, xb, 3, 1)
        assert r.mass_x == pytest.approx(float(xb.double().sum()), rel=1e-12)

    def test_batch(self):
        rng = np.random.default_rng(5)
        xb = rng.random((3, 1, 4, 4))
        zb = xb.copy()
        zb[1] = np.roll(zb[1], 1, axis=-1)
        res = local_ot_distance_batch(xb, zb, 3, 1)
        assert len(res) == 3
        assert res[0].cost == pytest.approx(0.0, abs=1e-12)
        assert res[1].cost > 0


# --------------------------------------------------------------------------
# linear_maximization
# --------------------------------------------------------------------------


class TestLinearMaximization:
    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("kp", [(3, 1), (5, 2)])
    def test_eps_zero(self, shape, kp):
        rng = np.random.default_rng(6)
        x, g = rand_image(rng, shape), rng.standard_normal(shape)
        v, z = linear_maximization(x, g, 0.0, *kp)
        assert v == pytest.approx(float((x * g).sum()), rel=1e-12)
        np.testing.assert_allclose(z, x)

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("kp", [(3, 1), (3, 2), (5, 1), (5, 2)])
    def test_monotone_bounded_feasible(self, shape, kp):
        k, p = kp
        rng = np.random.default_rng(7)
        x = rand_image(rng, shape, 0.8)
        g = rng.standard_normal(shape)
        lower = float((x * g).sum())
        upper = float((x * window_max(g, k)).sum())
        prev = lower
        for eps in [0.01, 0.05, 0.2, 0.5, 1.0]:
            v, z = linear_maximization(x, g, eps, k, p)
            assert isinstance(v, float) and z.dtype == np.float64 and z.shape == shape
            assert v == pytest.approx(float((z * g).sum()), rel=1e-12)
            assert prev - 1e-9 <= v <= upper + 1e-9
            prev = v
            r = local_ot_distance(x, z, k, p)
            assert r.cost <= eps * (1 + 1e-6) + 1e-9
            assert r.undelivered_mass < 1e-8 * x.sum() and r.unused_mass < 1e-8 * x.sum()
            # no random feasible point does better
            for _ in range(3):
                u = random_pushforward(x, k, p, rng, eps=eps)
                assert float((u * g).sum()) <= v + 1e-9
        # a budget above the largest cost is not binding: the bound is attained
        cmax = (2 * (k // 2) ** 2) ** (p / 2)
        v, _ = linear_maximization(x, g, cmax * 1.01, k, p)
        assert v == pytest.approx(upper, rel=1e-8)

    def test_zero_mass_and_zero_g(self):
        x = np.zeros((1, 4, 4))
        v, z = linear_maximization(x, np.ones_like(x), 0.3, 3, 1)
        assert v == 0.0 and np.all(z == 0)
        x = np.ones((1, 4, 4))
        v, z = linear_maximization(x, np.zeros_like(x), 0.3, 3, 1)
        assert v == 0.0 and np.allclose(z.sum(), 16)

    def test_single_pixel_known_value(self):
        x = np.zeros((1, 5, 5))
        x[0, 2, 2] = 2.0
        g = np.zeros_like(x)
        g[0, 2, 3] = 1.0
        # budget eps*mass = 0.25*2 = 0.5 moves half a unit by one pixel
        v, z = linear_maximization(x, g, 0.25, 3, 2)
        assert v == pytest.approx(0.5, rel=1e-9)
        assert z[0, 2, 3] == pytest.approx(0.5, rel=1e-9)

    def test_batch(self):
        rng = np.random.default_rng(8)
        xb, gb = rng.random((2, 1, 4, 4)), rng.standard_normal((2, 1, 4, 4))
        vals, zs = linear_maximization_batch(xb, gb, [0.0, 0.1], 3, 1)
        assert vals.shape == (2,) and zs.shape == xb.shape
        assert vals[0] == pytest.approx(float((xb[0] * gb[0]).sum()))


# --------------------------------------------------------------------------
# exact_projection
# --------------------------------------------------------------------------


def _ball_points(x, k, p, eps, rng, n=6, box=False):
    """Random points of the ball (pushforwards, convex combos with x)."""
    pts = [x.copy()]
    while len(pts) < n:
        u = random_pushforward(x, k, p, rng, eps=eps)
        t = rng.random()
        v = t * u + (1 - t) * x if rng.random() < 0.5 else u
        if box and v.max() > 1:
            continue
        pts.append(v)
    return pts


class TestProjection:
    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("kp", [(3, 1), (5, 2)])
    def test_inside_returns_w(self, shape, kp):
        k, p = kp
        rng = np.random.default_rng(9)
        x = rand_image(rng, shape)
        w = random_pushforward(x, k, p, rng, eps=0.1)
        z = exact_projection(x, w, 0.1 * (1 + 1e-6), k, p)
        assert z.dtype == np.float64 and z.shape == shape
        np.testing.assert_allclose(z, w, atol=1e-7, rtol=0)
        np.testing.assert_allclose(exact_projection(x, x, 0.1, k, p), x, atol=1e-7)

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("kp", [(3, 1), (3, 2), (5, 1), (5, 2)])
    @pytest.mark.parametrize("box", [False, True])
    def test_feasible_idempotent_variational_inequality(self, shape, kp, box):
        k, p = kp
        eps = 0.2
        rng = np.random.default_rng(10)
        x = rand_image(rng, shape, 0.8) * 0.6
        w = x + 0.5 * rng.standard_normal(shape)
        z, info = exact_projection(x, w, eps, k, p, box=box, return_info=True)
        assert info.status == "Solved" and info.cost <= eps * (1 + 1e-9)
        # feasibility, checked by the independent LP
        r = local_ot_distance(x, z, k, p)
        m = x.sum()
        assert r.cost <= eps * (1 + 1e-6)
        assert abs(z.sum() - m) <= 1e-9 * m
        assert r.undelivered_mass <= 1e-7 * m and r.unused_mass <= 1e-7 * m
        assert z.min() >= -1e-12
        if box:
            assert z.max() <= 1 + 1e-9
        # idempotence
        np.testing.assert_allclose(exact_projection(x, z, eps, k, p, box=box), z, atol=1e-7)
        # variational inequality <w - z*, v - z*> <= 0 for v in the ball
        for v in _ball_points(x, k, p, eps, rng, box=box):
            assert float(((w - z) * (v - z)).sum()) <= 1e-7
            assert float(((w - z) ** 2).sum()) <= float(((w - v) ** 2).sum()) + 1e-9

    @HYP
    @given(
        seed=st.integers(0, 2**32 - 1),
        shape=st.sampled_from(SHAPES),
        kp=st.sampled_from([(3, 1), (3, 2), (5, 1), (5, 2)]),
        eps=st.sampled_from([0.01, 0.1, 0.5]),
        density=st.sampled_from([0.3, 1.0]),
    )
    def test_optimality_certificate(self, seed, shape, kp, eps, density):
        """LP certificate: phi(z) = max_{v in ball} <w - z, v - z> bounds
        ||z - z*||^2, and phi(z*) = 0; computed with linear_maximization."""
        k, p = kp
        rng = np.random.default_rng(seed)
        x = rand_image(rng, shape, density)
        w = x + rng.uniform(0.05, 1.0) * rng.standard_normal(shape)
        z, info = exact_projection(x, w, eps, k, p, return_info=True)
        val, _ = linear_maximization(x, w - z, eps, k, p)
        phi = val - float(((w - z) * z).sum())
        assert phi <= 1e-9
        assert info.status in ("Solved", "Inside")
        if info.status == "Solved":
            assert info.cost <= eps * (1 + 1e-9)
            # polished and unpolished interior-point answers agree
            z_ipm = exact_projection(x, w, eps, k, p, polish=False)
            np.testing.assert_allclose(z_ipm, z, atol=1e-5)

    def test_polish_and_inside_paths(self):
        rng = np.random.default_rng(13)
        x = rand_image(rng, (2, 5, 7), 0.8)
        w = x + 0.4 * rng.standard_normal(x.shape)
        z, info = exact_projection(x, w, 0.2, 5, 2, return_info=True)
        assert info.status == "Solved" and info.polished and info.kkt_residual < 1e-12
        z2, info2 = exact_projection(x, z, 0.2, 5, 2, return_info=True)
        assert info2.status == "Inside"
        np.testing.assert_allclose(z2, z, atol=1e-12)
        assert info.distance_sq == pytest.approx(float(((w - z) ** 2).sum()))

    def test_box_is_active(self):
        x = np.zeros((1, 5, 5))
        x[0, 2, 2] = 0.9
        x[0, 2, 3] = 0.9
        w = np.zeros_like(x)
        w[0, 2, 2] = 5.0
        z = exact_projection(x, w, 1.0, 3, 1, box=True)
        assert z.max() <= 1 + 1e-9
        assert z[0, 2, 2] == pytest.approx(1.0, abs=1e-7)
        zf = exact_projection(x, w, 1.0, 3, 1, box=False)
        assert zf[0, 2, 2] > 1.5

    def test_known_two_pixel_projection(self):
        # 1x1x3 line, k=3: a unit at pixel 0 can only move to pixel 1 (cost 1
        # per unit), so the ball is {(1-t, t, 0) : 0 <= t <= min(eps, 1)} and
        # the projection of w = (a, b, 0) is t = clip((1 - a + b)/2, 0, min(eps, 1)).
        x = np.zeros((1, 1, 3))
        x[0, 0, 0] = 1.0
        for a, b in [(0.0, 1.0), (0.3, 0.7), (0.2, 0.4), (2.0, 0.0)]:
            w = np.array([[[a, b, 5.0]]])
            for eps in [0.1, 0.4, 0.9, 1.5]:
                t = float(np.clip((1 - a + b) / 2, 0, min(eps, 1)))
                z = exact_projection(x, w, eps, 3, 2)
                np.testing.assert_allclose(z.ravel(), [1 - t, t, 0.0], atol=1e-9)

    def test_special_cases(self):
        x = np.zeros((2, 3, 3))
        w = np.ones_like(x)
        np.testing.assert_array_equal(exact_projection(x, w, 0.5, 3, 1), 0.0)
        x = np.random.default_rng(11).random((2, 3, 3))
        np.testing.assert_array_equal(exact_projection(x, w, 0.0, 3, 1), x)
        with pytest.raises(ExactSolverError, match="empty"):
            exact_projection(x + 1.0, w, 0.0, 3, 1, box=True)

    def test_box_infeasible_raises(self):
        x = np.full((1, 2, 2), 1.5)  # mass 6 cannot fit into 4 pixels <= 1
        with pytest.raises(ExactSolverError, match="Clarabel did not solve"):
            exact_projection(x, x, 5.0, 3, 1, box=True)

    def test_batch_and_torch(self):
        torch = pytest.importorskip("torch")
        generator = torch.Generator().manual_seed(0)
        xb = torch.rand(2, 1, 4, 4, dtype=torch.float64, generator=generator)
        wb = xb + 0.3 * torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=generator)
        zb = exact_projection_batch(xb, wb, torch.tensor([0.0, 0.2]), 3, 1)
        assert isinstance(zb, np.ndarray) and zb.shape == (2, 1, 4, 4)
        np.testing.assert_allclose(zb[0], xb[0].numpy())
        # eps reaches the batch as float32 (0.2 + 3e-9), the single call as float64.
        np.testing.assert_allclose(zb[1], exact_projection(xb[1], wb[1], 0.2, 3, 1), atol=1e-7)

    def test_missing_clarabel_message(self, monkeypatch):
        import sys

        monkeypatch.setitem(sys.modules, "clarabel", None)
        x = np.ones((1, 3, 3))
        with pytest.raises(ImportError, match=r"pip install -e \.\[test\]"):
            exact_projection(x, x + 1.0, 0.1, 3, 1)

    @pytest.mark.slow
    def test_mnist_size_timing(self):
        rng = np.random.default_rng(12)
        x = rng.random((1, 28, 28))  # dense: 19600 plan variables
        w = x + 0.3 * rng.standard_normal(x.shape)
        t0 = time.perf_counter()
        z, info = exact_projection(x, w, 0.5, 5, 2, return_info=True)
        t_proj = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = local_ot_distance(x, z, 5, 2)
        t_dist = time.perf_counter() - t0
        assert info.n_variables == 134 * 134 + 784  # in-window pairs + z
        assert r.cost <= 0.5 * (1 + 1e-6) and r.undelivered_mass < 1e-7 * x.sum()
        assert t_proj < 10.0 and t_dist < 5.0
