"""Tests of the plan-space solvers (solvers/plan_space.py).

Problems are generated (digit-like images with exact zeros and saturated
pixels, random gradients and targets). Optimality is judged by certificates
and references that share no code with the solvers: the KKT conditions of
the projection QP, a Clarabel QP over the plan entries (with and without the
pixel box), and the HiGHS LP of :func:`solvers.exact.linear_maximization`.
Feasibility of attack iterates is judged by the exact transport LP of
:func:`solvers.exact.local_ot_distance`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from conftest import digit_batch, exact_check, tensor
from harness.attack.pgd import EpsSchedule, PGDAttack, make_iterate
from harness.attack.verify import VerificationStatus, verify_wasserstein
from solvers.exact import linear_maximization_batch
from solvers.geometry import LocalTransport
from solvers.iterate import BallIterate, IterateState
from solvers.plan_space import (
    FrankWolfeIterate,
    PlanPGDIterate,
    identity_plan,
    plan_cost,
    plan_gradient,
    plan_image,
    plan_linear_maximization,
    project_plans,
    window_layout,
)

pytestmark = pytest.mark.usefixtures("single_thread")

GEOMETRIES = [(3, 1.0, (1, 5, 5)), (5, 2.0, (2, 6, 6)), (5, 1.0, (1, 6, 7)), (3, 2.0, (3, 5, 4))]


def layout(k, p, shape, dtype=torch.float64):
    return window_layout(LocalTransport(k, p), shape[-2], shape[-1], dtype)


def random_target(x, k, seed, step=0.3, noise=0.05):
    """A plan-space target as an attack makes it: identity plan + step along a gathered gradient, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    B, C, H, W = x.shape
    jitter = torch.randn((B, C, H * W, k * k), generator=generator, dtype=x.dtype)
    return identity_plan(x, k) + step * plan_gradient(g, k) + noise * jitter


def assert_feasible(plan, x, cost, valid, eps, *, box=False, rel=1e-12, atol=1e-12):
    """Rows sum to x, entries >= 0 and 0 off the window and on empty pixels, budget met, (box)."""
    B, C, H, W = x.shape
    assert torch.isfinite(plan).all()
    assert plan.min() >= 0
    assert (plan[..., ~valid] == 0).all(), "mass on offsets outside the image"
    empty = x.reshape(B, C, H * W) == 0
    assert (plan[empty] == 0).all(), "mass leaving an empty pixel"
    row_error = (plan.sum(-1) - x.reshape(B, C, H * W)).abs().max()
    assert row_error <= atol + rel * float(x.max()), f"row sums off by {float(row_error):.3g}"
    budget = torch.as_tensor(eps, dtype=torch.float64).expand(B) * x.double().flatten(1).sum(1)
    spent = plan_cost(plan.double(), cost.double())
    assert (spent <= budget * (1 + rel) + atol).all(), f"cost {spent.tolist()} over budget {budget.tolist()}"
    if box:
        assert plan_image(plan, H, W).max() <= 1 + atol, "a pixel above 1"


def assert_kkt(target, x, cost, valid, eps, result, atol=1e-9):
    r"""KKT certificate of the projection QP (sufficient for optimality: the QP is convex).

    Stationarity: :math:`T - P - \mu c = \nu_i \mathbf 1 - \lambda` with
    :math:`\lambda \ge 0`, :math:`\lambda_{io} P_{io} = 0`: on each row the
    residual is a constant :math:`\nu_i` on the support and at most
    :math:`\nu_i` off it; :math:`\mu \ge 0` and
    :math:`\mu (b - \langle c, P\rangle) = 0`.
    """
    plan, mu = result.plan, result.multiplier.double()
    assert_feasible(plan, x, cost, valid, eps)
    B, C, H, W = x.shape
    budget = float(eps) * x.flatten(1).sum(1)
    assert (mu >= 0).all()
    slackness = mu * (budget - plan_cost(plan, cost))
    assert slackness.abs().max() <= atol * max(1.0, float(budget.max())), f"complementary slackness {slackness.tolist()}"
    residual = target - plan - mu.view(-1, 1, 1, 1) * cost
    support = plan > atol
    massive = (x.reshape(B, C, H * W) > 0)[..., None] & valid
    level = (residual * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True).clamp_min(1)
    on_support = ((residual - level).abs() * support).max()
    assert on_support <= atol, f"residual not constant on the support: {float(on_support):.3g}"
    off_support = ((residual - level) * (massive & ~support)).max()
    assert off_support <= atol, f"residual above the support's level off the support: {float(off_support):.3g}"


def plan_entries(x, valid, K):
    """The free entries of one example's plan (massive rows, valid offsets): flat index, row, offset, destination pixel."""
    C, H, W = x.shape
    N, k = H * W, math.isqrt(K)
    mass = x.reshape(C * N).numpy()
    entries = np.nonzero((np.tile(valid.numpy(), (C, 1)) & (mass[:, None] > 0)).reshape(-1))[0]
    row, offset = entries // K, entries % K
    pixel, channel = row % N, row // N
    destination = channel * N + (pixel // W + offset // k - k // 2) * W + pixel % W + offset % k - k // 2
    return mass, entries, row, offset, destination


def reference_qp(target, x, cost, valid, eps, box=False):
    """The projection QP over the plan entries of one example, solved by Clarabel (float64)."""
    clarabel = pytest.importorskip("clarabel")
    C, N, K = target.shape
    mass, entries, row, offset, destination = plan_entries(x, valid, K)
    n = entries.size
    columns = np.arange(n)
    used = np.unique(row)
    rows_sum = sp.csr_matrix((np.ones(n), (np.searchsorted(used, row), columns)), shape=(used.size, n))
    spend = sp.csr_matrix(cost.numpy()[offset].reshape(1, -1))
    blocks, bounds = [rows_sum, spend], [mass[used], [float(eps) * mass.sum()]]
    if box:
        blocks.append(sp.csr_matrix((np.ones(n), (destination, columns)), shape=(C * N, n)))
        bounds.append(np.ones(C * N))
    blocks.append(-sp.identity(n))
    bounds.append(np.zeros(n))
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = 1e-12
    solution = clarabel.DefaultSolver(
        sp.identity(n, format="csc"),
        -target.reshape(-1).numpy()[entries],
        sp.vstack(blocks).tocsc(),
        np.concatenate(bounds),
        [clarabel.ZeroConeT(used.size), clarabel.NonnegativeConeT(sum(len(b) for b in bounds[1:]))],
        settings,
    ).solve()
    assert str(solution.status) == "Solved", solution.status
    plan = np.zeros(C * N * K)
    plan[entries] = solution.x
    return torch.as_tensor(plan.reshape(C, N, K))


# --------------------------------------------------------------------------
# Layout: column sums, their adjoint, the identity plan
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k, p, shape", GEOMETRIES)
def test_layout_matches_explicit_windows(k, p, shape):
    """Offsets in LocalTransport.cost() order, validity, column sums and gather, against explicit loops."""
    C, H, W = shape
    cost, valid = layout(k, p, shape)
    assert torch.equal(cost, LocalTransport(k, p).cost(torch.float64).flatten())
    generator = torch.Generator().manual_seed(k + C)
    plan = torch.rand((2, C, H * W, k * k), generator=generator, dtype=torch.float64) * valid
    image = torch.zeros(2, C, H, W, dtype=torch.float64)
    for i in range(H * W):
        for o in range(k * k):
            r, s = i // W + o // k - k // 2, i % W + o % k - k // 2
            inside = 0 <= r < H and 0 <= s < W
            assert bool(valid[i, o]) == inside
            assert float(cost[o]) == pytest.approx(((o // k - k // 2) ** 2 + (o % k - k // 2) ** 2) ** (p / 2))
            if inside:
                image[:, :, r, s] += plan[:, :, i, o]
    assert torch.allclose(plan_image(plan, H, W), image, rtol=0, atol=1e-14)
    # plan_gradient is the chain rule through the column sums.
    g = torch.randn((2, C, H, W), generator=generator, dtype=torch.float64)
    leaf = plan.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad((plan_image(leaf, H, W) * g).sum(), leaf)
    assert torch.allclose(plan_gradient(g, k) * valid, autograd * valid, rtol=0, atol=1e-14)
    x = tensor(digit_batch(k, 2, shape))
    assert torch.equal(plan_image(identity_plan(x, k), H, W), x)


# --------------------------------------------------------------------------
# Exact projection
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k, p, shape", GEOMETRIES)
@pytest.mark.parametrize("eps", [0.02, 0.2, 3.0])
def test_projection_satisfies_kkt(k, p, shape, eps):
    x = tensor(digit_batch(11 * k, 4, shape))
    cost, valid = layout(k, p, shape)
    target = random_target(x, k, seed=int(10 * eps) + k)
    result = project_plans(target, x, cost, valid, eps, tol=1e-12)
    assert result.converged.all()
    # Newton on the piecewise linear budget function needs a handful of evaluations, not bisection's dozens.
    assert result.iterations.max() <= 12, result.iterations.tolist()
    assert_kkt(target, x, cost, valid, eps, result)
    if eps < 1:
        assert (result.multiplier > 0).all(), "these targets are far outside the small balls"


@pytest.mark.parametrize("k, p, shape", GEOMETRIES[:3])
def test_projection_matches_reference_qp(k, p, shape):
    x = tensor(digit_batch(7, 2, shape))
    cost, valid = layout(k, p, shape)
    target = random_target(x, k, seed=5)
    result = project_plans(target, x, cost, valid, 0.1, tol=1e-12)
    for b in range(2):
        reference = reference_qp(target[b], x[b], cost, valid, 0.1)
        assert torch.allclose(result.plan[b], reference, rtol=0, atol=1e-7)


@pytest.mark.parametrize("k, p, shape", [(3, 1.0, (1, 5, 5)), (5, 2.0, (2, 6, 6))])
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_box_projection_matches_reference_qp(k, p, shape, eps):
    x = tensor(digit_batch(5, 2, shape))
    cost, valid = layout(k, p, shape)
    target = random_target(x, k, seed=1, step=0.5, noise=0.0)
    free = project_plans(target, x, cost, valid, eps)
    assert plan_image(free.plan, *shape[1:]).max() > 1.05, "the box must be active for this test to mean anything"
    result = project_plans(target, x, cost, valid, eps, box=True, tol=1e-12, box_tol=1e-10, box_max_iter=5000)
    assert result.converged.all()
    assert_feasible(result.plan, x, cost, valid, eps, box=True)
    for b in range(2):
        reference = reference_qp(target[b], x[b], cost, valid, eps, box=True)
        assert torch.allclose(result.plan[b], reference, rtol=0, atol=1e-7)


def test_box_projection_float32_matches_reference_qp_to_1e6():
    """Float32 problems at the default tolerances, MNIST-like saturated strokes and an active box: within 1e-6 of the QP."""
    shape = (1, 10, 10)
    x = tensor(digit_batch(21, 3, shape), torch.float32)
    cost, valid = layout(5, 1.0, shape, torch.float32)
    target = random_target(x, 5, seed=8, step=0.4, noise=0.02)
    assert plan_image(project_plans(target, x, cost, valid, 0.3).plan, 10, 10).max() > 1.05
    result = project_plans(target, x, cost, valid, 0.3, box=True)
    assert result.converged.all()
    assert_feasible(result.plan, x, cost, valid, 0.3, box=True, rel=1e-6, atol=1e-6)
    for b in range(3):
        reference = reference_qp(target[b].double(), x[b].double(), cost.double(), valid, 0.3, box=True)
        assert (result.plan[b].double() - reference).abs().max() <= 1e-6
        # The multipliers are the QP's: positive only on pixels filled to the brim.
        filled = plan_image(reference[None], 10, 10)[0]
        assert (result.capacity_multiplier[b][filled < 1 - 1e-5] == 0).all()


def test_box_projection_warm_start_takes_fewer_newton_steps():
    """As in an attack, the next target is the projected plan pushed the same way again: warm multipliers save Newton steps."""
    shape = (2, 8, 8)
    x = tensor(digit_batch(4, 3, shape))
    cost, valid = layout(5, 2.0, shape)
    push = 0.3 * plan_gradient(torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64), 5)
    first = project_plans(identity_plan(x, 5) + push, x, cost, valid, 0.2, box=True, tol=1e-10, box_tol=1e-10)
    pushed_again = first.plan + push
    cold = project_plans(pushed_again, x, cost, valid, 0.2, box=True, tol=1e-10, box_tol=1e-10)
    warm = project_plans(
        pushed_again, x, cost, valid, 0.2, box=True, tol=1e-10, box_tol=1e-10,
        multiplier=first.multiplier, capacity_multiplier=first.capacity_multiplier,
    )
    assert cold.converged.all() and warm.converged.all()
    assert warm.iterations.sum() < cold.iterations.sum()
    assert torch.allclose(warm.plan, cold.plan, rtol=0, atol=1e-8)


@pytest.mark.parametrize("box", [False, True], ids=["free", "box"])
def test_projection_with_gpu_stopping_tests_matches(monkeypatch, box):
    """The GPU path reads the stopping test only every few iterations; on CPU tensors it gives the same projection."""
    import solvers.plan_space as plan_space

    shape = (1, 8, 8)
    x = tensor(digit_batch(7, 4, shape))
    cost, valid = layout(5, 1.0, shape)
    target = random_target(x, 5, seed=9, step=0.5)
    eps = torch.tensor([0.05, 0.3, 0.3, 1.0], dtype=torch.float64)
    every_step = project_plans(target, x, cost, valid, eps, box=box, tol=1e-10, box_tol=1e-10)
    monkeypatch.setattr(plan_space, "sync_interval", lambda device: 4)
    batched = project_plans(target, x, cost, valid, eps, box=box, tol=1e-10, box_tol=1e-10)
    assert batched.converged.all()
    assert torch.equal(batched.iterations, every_step.iterations)
    assert torch.allclose(batched.plan, every_step.plan, rtol=0, atol=1e-9)


@pytest.mark.parametrize("k, p, shape", [(3, 1.0, (1, 7, 7)), (5, 2.0, (2, 6, 6)), (5, 1.0, (1, 9, 8))])
@pytest.mark.parametrize("eps", [0.05, 0.4])
def test_boxed_oracle_matches_highs(k, p, shape, eps):
    x = tensor(digit_batch(2 * k, 3, shape))
    cost, valid = layout(k, p, shape)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(k + 1), dtype=torch.float64)
    gradient = plan_gradient(g, k)
    result = plan_linear_maximization(gradient, x, cost, valid, eps, box=True, tol=1e-7)
    free = plan_linear_maximization(gradient, x, cost, valid, eps)
    assert result.converged.all()
    assert_feasible(result.plan, x, cost, valid, eps, box=True, rel=1e-9, atol=1e-9)
    assert (plan_image(free.plan, *shape[1:]).flatten(1).amax(1) > 1 + 1e-3).any(), "the box must bind somewhere"
    optima, _ = linear_maximization_batch(x.numpy(), g.numpy(), eps, k, p, box=True)
    for b, optimum in enumerate(optima):
        scale = float(x[b].sum() * g[b].abs().max())
        assert abs(float(result.value[b]) - optimum) <= 1e-7 * scale
        assert float(result.value[b]) <= float(free.value[b]) + 1e-12


def test_box_projection_is_feasible_when_stopped_early():
    """Out of Dykstra iterations, the repair still returns a plan inside the ball and the box."""
    shape = (2, 6, 6)
    x = tensor(digit_batch(9, 3, shape), torch.float32)
    cost, valid = layout(5, 2.0, shape, torch.float32)
    target = random_target(x, 5, seed=2, step=1.0, noise=0.1)
    result = project_plans(target, x, cost, valid, 0.3, box=True, box_max_iter=3)
    assert_feasible(result.plan, x, cost, valid, 0.3, box=True, rel=1e-6, atol=1e-6)
    assert result.iterations.max() <= 3
    for b in range(3):
        exact_check(x[b], plan_image(result.plan, 6, 6)[b], 0.3, 5, 2.0, box=True, dtype=torch.float32)


def test_inside_target_is_returned():
    """A feasible target is its own projection, found at the first evaluation with mu = 0."""
    shape = (1, 6, 6)
    x = tensor(digit_batch(2, 3, shape))
    cost, valid = layout(5, 2.0, shape)
    inside = project_plans(random_target(x, 5, seed=4), x, cost, valid, 0.2, tol=1e-12).plan
    again = project_plans(inside, x, cost, valid, 0.2)
    assert torch.allclose(again.plan, inside, rtol=0, atol=1e-14)
    assert (again.multiplier == 0).all() and (again.iterations == 1).all()


def test_warm_start_saves_iterations():
    shape = (1, 8, 8)
    x = tensor(digit_batch(3, 6, shape))
    cost, valid = layout(5, 2.0, shape)
    target = random_target(x, 5, seed=8)
    cold = project_plans(target, x, cost, valid, 0.1)
    warm = project_plans(target, x, cost, valid, 0.1, multiplier=cold.multiplier)
    assert (warm.iterations == 1).all() and (cold.iterations > 1).all()
    assert torch.allclose(warm.plan, cold.plan, rtol=0, atol=1e-9)
    # Along an attack-like sequence of targets, the previous multiplier is a good start.
    generator = torch.Generator().manual_seed(0)
    plan, multiplier, spent_cold, spent_warm = cold.plan, cold.multiplier, 0, 0
    for _ in range(6):
        g = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        step = plan + 0.1 * plan_gradient(g / g.abs().amax(), 5)
        fresh = project_plans(step, x, cost, valid, 0.1)
        warmed = project_plans(step, x, cost, valid, 0.1, multiplier=multiplier)
        assert torch.allclose(fresh.plan, warmed.plan, rtol=0, atol=1e-8)
        spent_cold, spent_warm = spent_cold + int(fresh.iterations.sum()), spent_warm + int(warmed.iterations.sum())
        plan, multiplier = warmed.plan, warmed.multiplier
    assert spent_warm <= spent_cold


def test_degenerate_inputs_give_no_nan():
    """float32, an empty image, eps = 0, and huge targets of both signs."""
    shape = (2, 6, 6)
    x = tensor(digit_batch(4, 4, shape), torch.float32)
    x[1] = 0.0
    cost, valid = layout(5, 2.0, shape, torch.float32)
    generator = torch.Generator().manual_seed(0)
    huge = 1e30 * torch.randn((4, 2, 36, 25), generator=generator)
    for target in (huge, -huge, random_target(x, 5, seed=3)):
        for eps in (0.0, 0.05, torch.tensor([0.3, 0.3, 0.0, 1e6])):
            for box in (False, True):
                # Dykstra cannot converge on huge targets in float32 (its corrections are huge too): cap it.
                result = project_plans(target, x, cost, valid, eps, box=box, box_max_iter=30)
                assert torch.isfinite(result.multiplier).all()
                assert_feasible(result.plan, x, cost, valid, eps, box=box, rel=2e-6, atol=1e-6)
                assert (result.plan[1] == 0).all(), "an empty image has the empty plan"
                zero_radius = torch.as_tensor(eps).expand(4) == 0
                assert torch.equal(result.plan[zero_radius], identity_plan(x, 5)[zero_radius])
    result = plan_linear_maximization(plan_gradient(1e30 * torch.randn(x.shape, generator=generator), 5), x, cost, valid, 0.2)
    assert torch.isfinite(result.value).all() and torch.isfinite(result.multiplier).all()
    assert_feasible(result.plan, x, cost, valid, 0.2, rel=1e-6, atol=1e-6)
    zero = plan_linear_maximization(torch.zeros(4, 2, 36, 25), x, cost, valid, 0.2)
    assert torch.equal(zero.plan, identity_plan(x, 5)) and (zero.value == 0).all()


# --------------------------------------------------------------------------
# Linear maximization oracle
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k, p, shape", GEOMETRIES)
@pytest.mark.parametrize("eps", [0.0, 0.03, 0.3, 5.0])
def test_oracle_matches_exact_lp(k, p, shape, eps):
    x = tensor(digit_batch(3 * k, 3, shape))
    cost, valid = layout(k, p, shape)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    result = plan_linear_maximization(plan_gradient(g, k), x, cost, valid, eps)
    reference, _ = linear_maximization_batch(x.numpy(), g.numpy(), eps, k, p)
    assert result.converged.all()
    assert_feasible(result.plan, x, cost, valid, eps)
    assert np.allclose(result.value.numpy(), reference, rtol=1e-9, atol=1e-12)
    # The value is that of the returned plan's image.
    image_value = (plan_image(result.plan, *shape[1:]) * g).flatten(1).sum(1)
    assert torch.allclose(result.value, image_value, rtol=1e-12, atol=1e-12)


def test_oracle_float32_matches_exact_lp():
    shape = (1, 12, 12)
    x = tensor(digit_batch(1, 4, shape), torch.float32)
    cost, valid = layout(5, 2.0, shape, torch.float32)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    result = plan_linear_maximization(plan_gradient(g, 5), x, cost, valid, 0.2)
    reference, _ = linear_maximization_batch(x.double().numpy(), g.double().numpy(), 0.2, 5, 2.0)
    assert np.allclose(result.value.double().numpy(), reference, rtol=1e-5)
    assert_feasible(result.plan, x, cost, valid, 0.2, rel=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# The attacks as BallIterates
# --------------------------------------------------------------------------


ITERATES = {
    "pgd": lambda: PlanPGDIterate(3, 2.0, step_size=0.1),
    "pgd_sign": lambda: PlanPGDIterate(3, 2.0, step_size=0.05, step_rule="sign"),
    "pgd_box": lambda: PlanPGDIterate(3, 2.0, step_size=0.3, box=True),
    "frank_wolfe": lambda: FrankWolfeIterate(3, 2.0),
    "frank_wolfe_box": lambda: FrankWolfeIterate(3, 2.0, box=True),
    "frank_wolfe_box_oracle": lambda: FrankWolfeIterate(3, 2.0, box=True, box_oracle=True),
}
BOXED = ("pgd_box", "frank_wolfe_box", "frank_wolfe_box_oracle")


@pytest.mark.parametrize("name", sorted(ITERATES))
def test_iterates_stay_in_the_ball(name):
    """20 steps with random gradients and a growing radius; every image checked by the exact LP."""
    iterate = ITERATES[name]()
    assert isinstance(iterate, BallIterate)
    shape = (1, 6, 6)
    x = tensor(digit_batch(21, 2, shape), torch.float32)
    cost, valid = layout(3, 2.0, shape, torch.float32)
    box = name in BOXED
    generator = torch.Generator().manual_seed(0)
    schedule = EpsSchedule(0.05, 1.3, 4, 20)
    state = iterate.start(x, schedule.initial)
    assert torch.equal(state.image, x)
    for step in range(schedule.iterations):
        eps = schedule.eps_at(step)
        grad = torch.randn(x.shape, generator=generator)
        state, report = iterate.step(state, grad, eps, step)
        for field in ("converged", "solver_iterations", "zero_gradient", "failed"):
            assert getattr(report, field).shape == (2,)
        assert not report.failed.any() and not report.zero_gradient.any()
        plan = state.extra["plan"]
        if name == "frank_wolfe_box":  # the plan runs without the box; the model sees its box projection
            assert_feasible(plan, x, cost, valid, eps, box=False, rel=2e-6, atol=1e-6)
        else:
            assert torch.allclose(plan_image(plan, 6, 6), state.image, rtol=0, atol=1e-6)
            assert_feasible(plan, x, cost, valid, eps, box=box, rel=2e-6, atol=1e-6)
        for b in range(2):
            exact_check(x[b], state.image[b], eps, 3, 2.0, box=box, dtype=torch.float32)
    assert not torch.equal(state.image, x), "the iterate never moved"
    kept = state.select(torch.tensor([False, True]))
    assert kept.extra["plan"].shape[0] == 1 and kept.extra["multiplier"].shape == (1,)


@pytest.mark.parametrize("name", sorted(ITERATES))
def test_random_start_is_in_the_ball(name):
    iterate = ITERATES[name]()
    shape = (1, 6, 6)
    x = tensor(digit_batch(8, 3, shape), torch.float32)
    cost, valid = layout(3, 2.0, shape, torch.float32)
    state = iterate.start(x, 0.2, torch.Generator().manual_seed(1))
    assert not torch.equal(state.image, x)
    assert_feasible(state.extra["plan"], x, cost, valid, 0.2, box=name == "pgd_box", rel=2e-6, atol=1e-6)
    for b in range(3):
        exact_check(x[b], state.image[b], 0.2, 3, 2.0, box=name in BOXED, dtype=torch.float32)


def test_ascent_on_a_fixed_linear_objective():
    """With a constant gradient, PGD's value rises monotonically to the LP optimum; Frank-Wolfe's first step reaches it."""
    shape = (1, 6, 6)
    x = tensor(digit_batch(13, 2, shape))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    optimum, _ = linear_maximization_batch(x.numpy(), g.numpy(), 0.3, 5, 1.0)
    pgd = PlanPGDIterate(5, 1.0, step_size=0.2, tol=1e-12)
    state, previous = pgd.start(x, 0.3), (x * g).flatten(1).sum(1)
    for step in range(60):
        state, _ = pgd.step(state, g, 0.3, step)
        value = (state.image * g).flatten(1).sum(1)
        assert (value >= previous - 1e-12).all() and (value.numpy() <= optimum + 1e-9).all()
        previous = value
    assert np.allclose(previous.numpy(), optimum, rtol=1e-6)
    frank_wolfe = FrankWolfeIterate(5, 1.0)
    state, _ = frank_wolfe.step(frank_wolfe.start(x, 0.3), g, 0.3, 0)
    assert np.allclose((state.image * g).flatten(1).sum(1).numpy(), optimum, rtol=1e-9)
    # gamma = 2 / (s + 2) towards the same vertex keeps it there.
    again, _ = frank_wolfe.step(state, g, 0.3, 1)
    assert torch.allclose(again.extra["plan"], state.extra["plan"], rtol=0, atol=1e-12)
    # A larger radius restarts the step sizes: the first step there jumps to the new optimum.
    larger, _ = linear_maximization_batch(x.numpy(), g.numpy(), 0.6, 5, 1.0)
    grown, _ = frank_wolfe.step(again, g, 0.6, 2)
    assert np.allclose((grown.image * g).flatten(1).sum(1).numpy(), larger, rtol=1e-9)
    assert (larger > optimum + 1e-6).all()


def test_frank_wolfe_refits_a_shrinking_radius():
    shape = (1, 6, 6)
    x = tensor(digit_batch(6, 2, shape))
    cost, valid = layout(3, 2.0, shape)
    iterate = FrankWolfeIterate(3, 2.0)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state, _ = iterate.step(iterate.start(x, 0.5), g, 0.5, 0)
    state, _ = iterate.step(state, -g, 0.1, 1)
    assert_feasible(state.extra["plan"], x, cost, valid, 0.1)


def test_non_finite_gradient_fails_to_the_centre():
    shape = (1, 6, 6)
    x = tensor(digit_batch(2, 2, shape), torch.float32)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    grad[1, 0, 2, 2] = math.nan
    for iterate in (PlanPGDIterate(3, 2.0), FrankWolfeIterate(3, 2.0)):
        state, report = iterate.step(iterate.start(x, 0.2), grad, 0.2, 0)
        assert report.failed.tolist() == [False, True]
        assert torch.equal(state.image[1], x[1]) and torch.isfinite(state.image).all()
        zero_state, zero_report = iterate.step(iterate.start(x, 0.2), torch.zeros_like(x), 0.2, 0)
        assert zero_report.zero_gradient.all() and torch.equal(zero_state.image, x)


def test_plan_pgd_attack_successes_verified():
    """In the attack loop, plan-space PGD with the box produces claims that pass exact verification."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = tensor(digit_batch(3, 6, (1, 8, 8)), torch.float32)
    with torch.no_grad():
        y = model(x).argmax(1)
    iterate = make_iterate(PlanPGDIterate(3, 1.0, step_size=0.2, box=True))
    result = PGDAttack(model, iterate, EpsSchedule(0.05, 1.5, 3, 15)).run(x, y)
    assert int(result.success.sum()) >= 3, f"only {int(result.success.sum())} of 6 examples fooled"
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, 3, 1.0)
    assert np.all(verdict.status[result.success.numpy()] == int(VerificationStatus.VERIFIED)), verdict.status_names()


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: PlanPGDIterate(kernel_size=4), "kernel_size=4"),
        (lambda: PlanPGDIterate(p=0.0), "p=0.0"),
        (lambda: PlanPGDIterate(step_size=0.0), "step_size=0.0"),
        (lambda: PlanPGDIterate(step_size=math.nan), "step_size=nan"),
        (lambda: PlanPGDIterate(step_rule="l2"), "step_rule='l2'"),
        (lambda: PlanPGDIterate(box="yes"), "box='yes'"),
        (lambda: PlanPGDIterate(tol=2.0), "tol=2.0"),
        (lambda: PlanPGDIterate(max_iter=0), "max_iter=0"),
        (lambda: PlanPGDIterate(box_max_iter=1.5), "box_max_iter=1.5"),
        (lambda: FrankWolfeIterate(kernel_size=2), "kernel_size=2"),
        (lambda: FrankWolfeIterate(box=1), "box=1"),
        (lambda: FrankWolfeIterate(tol=-1.0), "tol=-1.0"),
    ],
)
def test_bad_hyperparameters_raise(build, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_bad_inputs_raise():
    shape = (1, 5, 5)
    x = tensor(digit_batch(1, 2, shape))
    cost, valid = layout(3, 1.0, shape)
    target = random_target(x, 3, seed=0)
    with pytest.raises(ValueError, match="eps=-0.1"):
        project_plans(target, x, cost, valid, -0.1)
    with pytest.raises(ValueError, match="target has shape"):
        project_plans(target[:, :, :-1], x, cost, valid, 0.1)
    bad = target.clone()
    bad[0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="target has NaN or infinite"):
        project_plans(bad, x, cost, valid, 0.1)
    with pytest.raises(ValueError, match="box=True needs centres"):
        project_plans(target, 2 * x, cost, valid, 0.1, box=True)
    with pytest.raises(ValueError, match=r"multiplier must be .* shape \(2,\)"):
        project_plans(target, x, cost, valid, 0.1, multiplier=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="window_layout"):
        project_plans(target, x, cost[:-1], valid, 0.1)
    with pytest.raises(ValueError, match="gradient has NaN"):
        plan_linear_maximization(bad.nan_to_num(posinf=math.nan), x, cost, valid, 0.1)
    with pytest.raises(ValueError, match="iteration=-1"):
        FrankWolfeIterate(3, 1.0).step(IterateState(x, x, {"plan": identity_plan(x, 3)}), x, 0.1, -1)
    with pytest.raises(ValueError, match=r"grad has shape \(2, 1, 5\)"):
        PlanPGDIterate(3, 1.0).step(PlanPGDIterate(3, 1.0).start(x, 0.1), x[..., 0], 0.1, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    shape = (1, 12, 12)
    x = tensor(digit_batch(0, 8, shape), torch.float32)
    cost, valid = layout(5, 2.0, shape, torch.float32)
    target = random_target(x, 5, seed=0)
    g = plan_gradient(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), 5)
    for box in (False, True):
        cpu = project_plans(target, x, cost, valid, 0.1, box=box)
        gpu = project_plans(target.cuda(), x.cuda(), cost.cuda(), valid.cuda(), 0.1, box=box)
        assert torch.allclose(gpu.plan.cpu(), cpu.plan, atol=1e-4)
    cpu = plan_linear_maximization(g, x, cost, valid, 0.1)
    gpu = plan_linear_maximization(g.cuda(), x.cuda(), cost.cuda(), valid.cuda(), 0.1)
    assert torch.allclose(gpu.value.cpu(), cpu.value, rtol=1e-5)
