"""Tests of the complete verifier (harness/certify/milp.py).

The references share no code with the verifier:

* brute force over a grid of plans: every non-stay entry of the massive
  pixels moves a multiple of ``step = budget / m`` (rounding a feasible
  plan's moves down to the grid keeps it feasible without the box, and moves
  each entry by less than a step, which a Lipschitz bound turns into a
  tolerance on the margin);
* the exact minimum over the ball by enumerating activation patterns, one
  HiGHS LP over the plan entries per pattern (for binarized networks, one LP
  per pattern of bits);
* :func:`solvers.exact.linear_maximization`, the one HiGHS reference for the
  linear maximum over the ball, with and without the box, and
  :func:`solvers.exact.local_ot_distance` for counterexamples.
"""

from __future__ import annotations

import copy
import itertools
import math
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linprog
from torch import nn

from conftest import digit_batch
from harness.certify.layers import interval_bounds
from harness.certify.milp import MIP_RELATIVE_GAP, milp_certify
from harness.certify.network import PiecewiseLinearNetwork
from harness.certify.perturbation import WassersteinBall
from harness.certify.program import Program
from harness.vocabulary import CertificateStatus
from solvers.exact import linear_maximization, local_ot_distance
from solvers.geometry import LocalTransport
from zoo.architectures import Binarize, ClassifierWithPreprocessing, Normalize

pytestmark = pytest.mark.usefixtures("single_thread")

S = CertificateStatus
TRANSPORT = LocalTransport(3, 1.0)


# --------------------------------------------------------------------------
# The ball, written out independently: moves, random plans, grids
# --------------------------------------------------------------------------


def moves(x: np.ndarray, kernel_size: int, p: float):
    """Source, destination (flat pixels) and cost of every in-window move of the massive pixels, the stay included."""
    channels, height, width = x.shape
    h = kernel_size // 2
    source, destination, cost = [], [], []
    for c, r, s in zip(*np.nonzero(x)):
        for dr in range(-h, h + 1):
            for ds in range(-h, h + 1):
                if 0 <= r + dr < height and 0 <= s + ds < width:
                    source.append((c * height + r) * width + s)
                    destination.append((c * height + r + dr) * width + s + ds)
                    cost.append(float(dr * dr + ds * ds) ** (p / 2))
    return np.array(source), np.array(destination), np.array(cost)


def plan_polytope(x: np.ndarray, kernel_size: int = 3, p: float = 1.0):
    """The plans of the ball around ``x`` as matrices over the moves of :func:`moves`: their costs, the flat mass,
    the image a plan makes (pixels x moves), the rows that must sum to the mass, and which of them hold mass."""
    source, destination, cost = moves(x, kernel_size, p)
    mass = x.reshape(-1)
    pixels, entries = mass.size, source.size
    image_of_plan = sp.csr_matrix((np.ones(entries), (destination, np.arange(entries))), shape=(pixels, entries)).toarray()
    rows_equal = sp.csr_matrix((np.ones(entries), (source, np.arange(entries))), shape=(pixels, entries)).toarray()
    return cost, mass, image_of_plan, rows_equal, mass > 0


def bounded_compositions(total: int, parts: int) -> np.ndarray:
    """Every vector of ``parts`` non-negative integers with sum at most ``total`` (stars and bars)."""
    bars = np.array(list(itertools.combinations(range(total + parts), parts)))
    return np.diff(np.concatenate([np.full((len(bars), 1), -1), bars], axis=1), axis=1) - 1


def grid_images(x: np.ndarray, eps: float, kernel_size: int, p: float, box: bool, steps: int):
    """The images of the grid plans of the ball, and the step of each move."""
    source, destination, cost = moves(x, kernel_size, p)
    moving = cost > 0
    source, destination, cost = source[moving], destination[moving], cost[moving]
    step = eps * x.sum() / steps
    counts = bounded_compositions(steps, source.size)
    counts = counts[counts @ cost <= steps * (1 + 1e-12)]
    amounts = counts * step
    images = np.tile(x.reshape(-1), (len(counts), 1))
    np.add.at(images.T, destination, amounts.T)
    np.subtract.at(images.T, source, amounts.T)
    keep = (images >= -1e-12).all(1)  # no pixel sends more than its mass
    if box:
        keep &= (images <= 1 + 1e-12).all(1)
    return images[keep].reshape(-1, *x.shape), step, (source, destination)


def random_ball_images(x: np.ndarray, eps: float, kernel_size: int, p: float, count: int, seed: int) -> np.ndarray:
    """Images of random plans of the ball (random row distributions, mixed with staying to fit the budget)."""
    rng = np.random.default_rng(seed)
    source, destination, cost = moves(x, kernel_size, p)
    mass = x.reshape(-1)
    images = []
    for _ in range(count):
        weights = rng.exponential(size=source.size) * (rng.random(source.size) < 0.5)
        weights[cost == 0] += 1e-3
        totals = np.bincount(source, weights=weights, minlength=mass.size)
        plan = weights / totals[source] * mass[source]
        spent = plan @ cost
        theta = min(1.0, eps * mass.sum() / spent) if spent > 0 else 1.0
        plan = theta * plan + (1 - theta) * np.where(cost == 0, mass[source], 0.0)
        images.append(np.bincount(destination, weights=plan, minlength=mass.size))
    return np.array(images).reshape(-1, *x.shape)


# --------------------------------------------------------------------------
# Tiny networks and the exact minimum over the ball by activation patterns
# --------------------------------------------------------------------------


def tiny_network(seed: int, x: np.ndarray, clean_margin: float, dtype=torch.float64) -> nn.Sequential:
    """Conv2d(1, 2, 2) ReLU Flatten Linear ReLU Linear(., 2), with the logit bias set so that class 0 wins by ``clean_margin`` at x."""
    torch.manual_seed(seed)
    height, width = x.shape[1:]
    features = 2 * (height - 1) * (width - 1)
    net = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(features, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter *= 2
        hidden = net[:5](torch.from_numpy(x)[None])[0]
        difference = net[5].weight[0] - net[5].weight[1]
        net[5].bias[0] = net[5].bias[1] + clean_margin - difference @ hidden
    return net.to(dtype)


def margins(net: nn.Module, images: np.ndarray) -> np.ndarray:
    """``f_0 - f_1`` at each image, in float64."""
    with torch.no_grad():
        logits = copy.deepcopy(net).double()(torch.from_numpy(images).double())
    return (logits[:, 0] - logits[:, 1]).numpy()


def conv_as_matrix(conv: nn.Conv2d, shape) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` with ``conv(x).flatten() = W x.flatten() + b``, from the responses to the unit images."""
    pixels = int(np.prod(shape))
    conv = copy.deepcopy(conv).double()
    with torch.no_grad():
        bias = conv(torch.zeros(1, *shape, dtype=torch.float64)).reshape(-1)
        responses = conv(torch.eye(pixels, dtype=torch.float64).view(pixels, *shape)).reshape(pixels, -1) - bias
    return responses.T.numpy(), bias.numpy()


def exact_minimum(net: nn.Sequential, x: np.ndarray, eps: float, kernel_size: int, p: float, box: bool) -> float:
    """min over the ball of ``f_0 - f_1`` for a Conv ReLU Flatten Linear ReLU Linear network, one LP per activation pattern.

    On the region of a pattern the network is affine in the image, hence in
    the plan entries; the regions (with non-strict signs) cover the ball.
    """
    source, destination, cost = moves(x, kernel_size, p)
    mass = x.reshape(-1)
    pixels = mass.size
    entries = source.size
    first, first_bias = conv_as_matrix(net[0], x.shape)
    # Pre-activations of the first layer as functions of the plan: (neurons, entries).
    image_of_plan = sp.csr_matrix((np.ones(entries), (destination, np.arange(entries))), shape=(pixels, entries)).toarray()
    z1 = first @ image_of_plan
    w2, b2 = net[3].weight.detach().double().numpy(), net[3].bias.detach().double().numpy()
    w3, b3 = net[5].weight.detach().double().numpy(), net[5].bias.detach().double().numpy()
    rows_equal = sp.csr_matrix((np.ones(entries), (source, np.arange(entries))), shape=(pixels, entries)).toarray()
    massive = mass > 0
    best = np.inf
    for first_on in itertools.product((0.0, 1.0), repeat=z1.shape[0]):
        d1 = np.array(first_on)
        z2 = w2 @ (d1[:, None] * z1)
        z2_constant = w2 @ (d1 * first_bias) + b2
        for second_on in itertools.product((0.0, 1.0), repeat=z2.shape[0]):
            d2 = np.array(second_on)
            objective = (w3[0] - w3[1]) @ (d2[:, None] * z2)
            constant = (w3[0] - w3[1]) @ (d2 * z2_constant) + b3[0] - b3[1]
            # Sign of each pre-activation: on means >= 0, off means <= 0; written as A P <= b.
            sign1, sign2 = 1 - 2 * d1, 1 - 2 * d2
            a_ub = [sign1[:, None] * z1, sign2[:, None] * z2, cost[None]]
            b_ub = [-sign1 * first_bias, -sign2 * z2_constant, [eps * mass.sum()]]
            if box:
                a_ub.append(image_of_plan)
                b_ub.append(np.ones(pixels))
            result = linprog(
                objective, A_ub=np.vstack(a_ub), b_ub=np.concatenate(b_ub), A_eq=rows_equal[massive], b_eq=mass[massive],
                bounds=(0, None), method="highs",
            )
            if result.status == 0:
                best = min(best, result.fun + constant)
    return best


def lipschitz_per_pixel(net: nn.Sequential, shape) -> np.ndarray:
    """A bound on |d (f_0 - f_1) / d x_j| per pixel: |w3_0 - w3_1| |W2| |W1| with the conv as a matrix."""
    first, _ = conv_as_matrix(net[0], shape)
    last = (net[5].weight[0] - net[5].weight[1]).abs().detach().double().numpy()
    return last @ net[3].weight.abs().detach().double().numpy() @ np.abs(first)


def two_corner_image(first: float, second: float) -> np.ndarray:
    """A 1x2x3 image with mass at two corners whose 3x3 windows overlap in the middle column."""
    x = np.zeros((1, 2, 3))
    x[0, 0, 0], x[0, 1, 2] = first, second
    return x


# --------------------------------------------------------------------------
# 1. The linear maximum over the ball
# --------------------------------------------------------------------------


def test_linear_maximum_with_and_without_the_box_bounds_every_point_of_the_ball():
    rng = np.random.default_rng(0)
    x = digit_batch(3, 1, (2, 4, 4))[0]
    a = rng.standard_normal(x.shape)
    for transport in (LocalTransport(3, 1.0), LocalTransport(3, 2.0)):
        k, p = transport.kernel_size, transport.p
        assert linear_maximization(x, a, 0.0, k, p, box=True)[0] == pytest.approx(float((a * x).sum()), abs=1e-9)
        for eps in (0.05, 0.4):
            value, _ = linear_maximization(x, a, eps, k, p)
            boxed, maximizer = linear_maximization(torch.from_numpy(x), torch.from_numpy(a), eps, k, p, box=True)
            assert boxed <= value + 1e-9
            assert maximizer.max() <= 1 + 4 * np.finfo(np.float64).eps
            images = random_ball_images(x, eps, k, p, 200, seed=1)
            attained = images.reshape(len(images), -1) @ a.reshape(-1)
            assert attained.max() <= value + 1e-9
            inside = (images <= 1).all(axis=(1, 2, 3))
            assert inside.any() and attained[inside].max() <= boxed + 1e-9


def test_linear_maximum_box_binds_and_bad_input():
    # Two pixels at 0.8 next to each other: without the box all 1.6 can pile onto the pixel a rewards.
    x = np.zeros((1, 1, 3))
    x[0, 0, 0] = x[0, 0, 2] = 0.8
    a = np.zeros_like(x)
    a[0, 0, 1] = 1.0
    assert linear_maximization(x, a, 10.0, 3, 1.0)[0] == pytest.approx(1.6, abs=1e-9)
    assert linear_maximization(x, a, 10.0, 3, 1.0, box=True)[0] == pytest.approx(1.0, abs=1e-9)
    # The budget binds: 1.6 * eps units of mass at cost 1 each.
    assert linear_maximization(x, a, 0.25, 3, 1.0, box=True)[0] == pytest.approx(0.4, abs=1e-9)
    assert linear_maximization(np.zeros_like(x), a, 1.0, 3, 1.0, box=True)[0] == 0.0
    with pytest.raises(ValueError, match="box=True"):
        linear_maximization(2 * x, a, 0.1, 3, 1.0, box=True)
    with pytest.raises(ValueError, match="shape"):
        linear_maximization(x, a[0], 0.1, 3, 1.0)
    with pytest.raises(ValueError, match="eps"):
        linear_maximization(x, a, -0.1, 3, 1.0)


@pytest.mark.parametrize("box", [False, True])
def test_the_programs_ball_has_the_reference_maximum_and_its_points_lie_in_the_ball(box):
    """The MILP's polytope (:meth:`WassersteinBall.encode`) against the HiGHS reference, and its repaired points."""
    rng = np.random.default_rng(2)
    x = digit_batch(3, 1, (2, 4, 4))[0]
    a = rng.standard_normal(x.shape)
    for transport in (LocalTransport(3, 1.0), LocalTransport(3, 2.0)):
        for eps in (0.05, 0.4):
            program = Program()
            ball = WassersteinBall(torch.from_numpy(x)[None], eps, transport, box).encode(program, 0)
            objective = np.zeros(program.size)
            receiving = ball.image.variable >= 0
            objective[ball.image.variable[receiving]] = -a.reshape(-1)[receiving]
            result = program.minimize(objective, time_limit=60.0)
            reference, _ = linear_maximization(x, a, eps, transport.kernel_size, transport.p, box=box)
            # HiGHS meets the rows to its feasibility tolerance (1e-7) on masses of order 1.
            assert -result.fun == pytest.approx(reference, abs=1e-6)
            point = ball.point(result.x)
            assert float((a * point).sum()) == pytest.approx(reference, abs=1e-6)
            distance = local_ot_distance(x, point, transport.kernel_size, transport.p)
            assert distance.cost <= eps * (1 + 1e-9) and distance.undelivered_mass <= 1e-9
            assert not box or point.max() <= 1.0


# --------------------------------------------------------------------------
# 2. The verifier against brute force and the exact minimum
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, clean_margin, eps, box, expected",
    [
        (5, 0.4, 0.15, False, S.CERTIFIED),
        (6, 0.2, 0.3, False, S.CERTIFIED),
        (6, 0.4, 1.0, True, S.CERTIFIED),
        (4, 0.4, 0.15, False, S.COUNTEREXAMPLE),
        (5, 0.4, 0.3, True, S.COUNTEREXAMPLE),
        (6, 0.2, 1.0, True, S.COUNTEREXAMPLE),
    ],
)
def test_verifier_agrees_with_brute_force(seed, clean_margin, eps, box, expected):
    x = two_corner_image(0.7, 0.6)
    net = tiny_network(seed, x, clean_margin)
    result = milp_certify(net, torch.from_numpy(x)[None], torch.tensor([0]), eps, TRANSPORT, box=box, time_limit=10.0)
    lower, found = float(result.margin_lower[0]), float(result.margin_found[0])

    exact = exact_minimum(net, x, eps, 3, 1.0, box)
    images, step, (source, destination) = grid_images(x, eps, 3, 1.0, box, steps=12)
    grid = margins(net, images).min()
    assert exact <= grid + 1e-9
    if not box:
        # Rounding a plan's moves down to the grid moves each entry by less than a step.
        lipschitz = lipschitz_per_pixel(net, x.shape)
        assert grid - exact <= step * (lipschitz[source] + lipschitz[destination]).sum()

    # Sound: nothing below the proven bound; real: the points found are in the ball.
    assert lower <= exact + 1e-7 and lower <= grid + 1e-7
    assert found >= exact - 1e-7
    assert result.seconds[0] < 10.0
    # Solved to optimality (within the gap), the bound and the incumbent meet the exact minimum.
    assert found - lower <= MIP_RELATIVE_GAP * abs(found) + 1e-6
    assert lower >= exact - MIP_RELATIVE_GAP * abs(exact) - 1e-6
    assert found <= exact + MIP_RELATIVE_GAP * abs(exact) + 1e-6
    assert (exact > 1e-6 if expected is S.CERTIFIED else exact < -1e-6)
    assert result.status == [expected]
    assert torch.isnan(result.counterexample).all() == (expected is S.CERTIFIED)


def test_a_class_certified_by_its_interval_bound_is_not_solved():
    x = two_corner_image(0.7, 0.6)
    net = tiny_network(1, x, 0.3)
    result = milp_certify(net, torch.from_numpy(x)[None], torch.tensor([0]), 0.6, TRANSPORT, box=True, time_limit=10.0)
    exact = exact_minimum(net, x, 0.6, 3, 1.0, True)
    assert result.status == [S.CERTIFIED]
    assert 0 < result.margin_lower[0] <= exact + 1e-7
    assert result.margin_found[0] == pytest.approx(0.3)  # only the clean image was evaluated


@pytest.mark.parametrize("eps, expected", [(0.15, S.CERTIFIED), (0.3, S.COUNTEREXAMPLE)])
def test_given_bounds_are_used_and_trusted(eps, expected):
    x = two_corner_image(0.7, 0.6)
    net = tiny_network(5, x, 0.4)
    batch = torch.from_numpy(x)[None]
    exact = exact_minimum(net, x, eps, 3, 1.0, False)
    # Valid but loose: interval arithmetic from [0, window mass] per pixel, widened by 1.
    window = torch.nn.functional.avg_pool2d(batch, 3, stride=1, padding=1, divisor_override=1)
    lower1, upper1 = interval_bounds(net[0], torch.zeros_like(batch), window)
    lower2, upper2 = interval_bounds(net[1:4], lower1, upper1)
    loose = milp_certify(
        net, batch, torch.tensor([0]), eps, TRANSPORT, box=False, time_limit=10.0,
        pre_activation_bounds=[(lower1 - 1, upper1 + 1), (lower2 - 1, upper2 + 1)],
    )
    assert loose.status == [expected]
    assert loose.margin_lower[0] == pytest.approx(exact, abs=MIP_RELATIVE_GAP * abs(exact) + 1e-6)
    assert loose.margin_found[0] == pytest.approx(exact, abs=MIP_RELATIVE_GAP * abs(exact) + 1e-6)
    # Bounds that claim every ReLU is dead are trusted: the network is then constant, f = its last bias.
    dead = [(torch.full_like(lower1, -2.0), torch.full_like(lower1, -1.0)), (torch.full_like(lower2, -2.0), torch.full_like(lower2, -1.0))]
    constant = milp_certify(net, batch, torch.tensor([0]), eps, TRANSPORT, box=False, time_limit=10.0, pre_activation_bounds=dead)
    bias = net[5].bias.detach()
    assert constant.margin_lower[0] == pytest.approx(float(bias[0] - bias[1]), abs=1e-9)


def test_given_margin_bounds_skip_the_classes_they_certify():
    x = two_corner_image(0.7, 0.6)
    net = tiny_network(5, x, 0.4)
    batch = torch.from_numpy(x)[None]
    solved = milp_certify(net, batch, torch.tensor([0]), 0.15, TRANSPORT, box=False, time_limit=10.0)
    assert solved.status == [S.CERTIFIED] and solved.margin_found[0] < 0.2  # without them the class is solved
    skipped = milp_certify(
        net, batch, torch.tensor([0]), 0.15, TRANSPORT, box=False, time_limit=10.0, margin_bounds=torch.tensor([[math.inf, 0.05]])
    )
    assert skipped.status == [S.CERTIFIED]
    assert skipped.margin_lower[0] == pytest.approx(0.05) and skipped.margin_found[0] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="margin_bounds"):
        milp_certify(net, batch, torch.tensor([0]), 0.15, TRANSPORT, box=False, time_limit=10.0, margin_bounds=torch.zeros(1, 3))


@pytest.mark.parametrize("eps, expected", [(0.15, S.CERTIFIED), (0.3, S.COUNTEREXAMPLE)])
def test_normalization_is_affine(eps, expected):
    # A conv without padding folds (x - mean) / std into its weights exactly; both models must get the same answer.
    x = two_corner_image(0.7, 0.6)
    net = tiny_network(5, x, 0.4)
    mean, std = 0.3, 0.5
    normalized = ClassifierWithPreprocessing(Normalize([mean], [std]), net).double()
    folded = nn.Sequential(*[layer for layer in net]).double()
    folded[0] = nn.Conv2d(1, 2, 2).double()
    with torch.no_grad():
        folded[0].weight.copy_(net[0].weight / std)
        folded[0].bias.copy_(net[0].bias - net[0].weight.sum((1, 2, 3)) * mean / std)
    batch = torch.from_numpy(x)[None]
    with torch.no_grad():
        assert torch.allclose(normalized(batch), folded(batch))
        logits = normalized(batch)
    label = logits.argmax(1)
    a = milp_certify(normalized, batch, label, eps, TRANSPORT, box=False, time_limit=10.0)
    b = milp_certify(folded, batch, label, eps, TRANSPORT, box=False, time_limit=10.0)
    assert a.status == b.status == [expected]
    clean = float(logits[0, label] - logits[0, 1 - label])
    assert a.margin_found[0] < clean - 0.1  # the program was solved, not only the interval bound
    assert a.margin_found[0] == pytest.approx(b.margin_found[0], abs=1e-6)
    assert a.margin_lower[0] == pytest.approx(b.margin_lower[0], abs=MIP_RELATIVE_GAP * abs(a.margin_found[0]) + 1e-6)


# --------------------------------------------------------------------------
# 3. Counterexamples are real
# --------------------------------------------------------------------------


def test_counterexamples_are_verified_images_of_the_ball():
    # float32, as the benchmark's models; one batch, radii per example: certified at the smallest, broken at the others.
    x = two_corner_image(0.9, 0.8)
    net = tiny_network(4, x, 0.2, dtype=torch.float32)
    batch = torch.from_numpy(x).float()[None].repeat(3, 1, 1, 1)
    labels = torch.zeros(3, dtype=torch.long)
    eps = torch.tensor([0.02, 0.4, 0.8])
    result = milp_certify(net, batch, labels, eps, TRANSPORT, box=True, time_limit=10.0)
    assert result.status == [S.CERTIFIED, S.COUNTEREXAMPLE, S.COUNTEREXAMPLE]
    assert torch.isnan(result.counterexample[0]).all()
    for b in (1, 2):
        found = result.counterexample[b]
        assert found.dtype == torch.float32 and not torch.isnan(found).any()
        with torch.no_grad():
            assert int(net(found[None]).argmax(1)) != 0
        assert float(found.min()) >= 0 and float(found.max()) <= 1
        transport = local_ot_distance(x, found.double().numpy(), 3, 1.0)
        assert transport.cost <= float(eps[b]) * (1 + 1e-6)
        assert transport.undelivered_mass <= 1e-6 and transport.unused_mass <= 1e-6
        assert result.margin_found[b] < 0 and result.margin_lower[b] <= result.margin_found[b]


def box_sensitive_network(hidden_relu: bool) -> nn.Sequential:
    """f_0 - f_1 = 1 - 1.5 relu(x'_mid - 0.5) on 1x1x3 images (or 1.75 - 1.5 x'_mid without the ReLU)."""
    if hidden_relu:
        net = nn.Sequential(nn.Flatten(), nn.Linear(3, 1), nn.ReLU(), nn.Linear(1, 2)).double()
        weights = [torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([-0.5]), torch.tensor([[0.0], [1.5]]), torch.tensor([1.0, 0.0])]
    else:
        net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2)).double()
        weights = [torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.5, 0.0]]), torch.tensor([1.75, 0.0])]
    with torch.no_grad():
        for parameter, value in zip(net.parameters(), weights):
            parameter.copy_(value)
    return net


@pytest.mark.parametrize("hidden_relu", [True, False])
def test_the_box_decides(hidden_relu):
    # 0.8 at both ends of a 1x1x3 image: without the box all 1.6 fits in the middle (cost 1.6 = eps m at eps = 1).
    x = torch.tensor([[[[0.8, 0.0, 0.8]]]], dtype=torch.float64)
    net = box_sensitive_network(hidden_relu)
    boxed = milp_certify(net, x, torch.tensor([0]), 1.0, TRANSPORT, box=True, time_limit=10.0)
    free = milp_certify(net, x, torch.tensor([0]), 1.0, TRANSPORT, box=False, time_limit=10.0)
    # The middle pixel reaches 1 with the box, 1.6 without.
    minimum = (lambda mid: 1 - 1.5 * max(mid - 0.5, 0.0)) if hidden_relu else (lambda mid: 1.75 - 1.5 * mid)
    assert boxed.status == [S.CERTIFIED]
    assert boxed.margin_lower[0] == pytest.approx(minimum(1.0), abs=MIP_RELATIVE_GAP * minimum(1.0) + 1e-6)
    assert free.status == [S.COUNTEREXAMPLE]
    assert free.margin_found[0] == pytest.approx(minimum(1.6), abs=MIP_RELATIVE_GAP + 1e-6)
    assert float(free.counterexample[0, 0, 0, 1]) == pytest.approx(1.6, abs=1e-6)


def test_clean_misclassification_is_reported_without_solving():
    x = two_corner_image(0.7, 0.6)
    net = tiny_network(1, x, -0.2)
    result = milp_certify(net, torch.from_numpy(x)[None], torch.tensor([0]), 0.3, TRANSPORT, box=True, time_limit=10.0)
    assert result.status == [S.CLEAN_MISCLASSIFIED]
    assert result.margin_found[0] == pytest.approx(-0.2)
    assert result.margin_lower[0] <= -0.2 + 1e-9
    assert torch.isnan(result.counterexample).all()


# --------------------------------------------------------------------------
# 4. Time limits
# --------------------------------------------------------------------------


def wide_network(seed: int, x: torch.Tensor, clean_margin: float) -> nn.Sequential:
    """Conv 1->8 3x3 ReLU Flatten Linear(., 40) ReLU Linear(40, 10), class 0 ahead by ``clean_margin`` at x[0]."""
    torch.manual_seed(seed)
    height, width = x.shape[2:]
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * (height - 2) * (width - 2), 40), nn.ReLU(), nn.Linear(40, 10)
    ).double()
    with torch.no_grad():
        logits = net(x[:1])[0]
        net[5].bias[0] += logits[1:].max() + clean_margin - logits[0]
    return net


def test_time_limit_gives_timeout_not_a_wrong_certificate():
    x = torch.from_numpy(digit_batch(5, 2, (1, 12, 12)))
    net = wide_network(0, x, 0.05)
    labels = torch.zeros(2, dtype=torch.long)
    eps = 1.0
    # A point of the ball that changes the prediction (on the segment to the linear minimizer of the margin's gradient):
    # CERTIFIED would be wrong.
    clean = x[:1].clone().requires_grad_(True)
    logits = net(clean)
    (logits[0, 0] - logits[0, 1:].max()).backward()
    _, target = linear_maximization(x[0].numpy(), -clean.grad[0].numpy(), eps, 3, 1.0)
    steps = torch.linspace(0, 1, 11, dtype=torch.float64)[:, None, None, None]
    with torch.no_grad():
        assert (net(x[:1] + steps * (torch.from_numpy(target)[None] - x[:1])).argmax(1) != 0).any()
    result = milp_certify(net, x, labels, eps, TRANSPORT, box=False, time_limit=0.3)
    assert len(result.status) == 2 and result.margin_lower.shape == (2,) and result.seconds.shape == (2,)
    assert result.status[0] in (S.TIMEOUT, S.COUNTEREXAMPLE)
    # Certified only through a dual bound above the safety margin, whether or not the solve ran out of time.
    assert all(status is not S.CERTIFIED or lower > safety > 0
               for status, lower, safety in zip(result.status, result.margin_lower, result.safety_margin))
    assert (result.margin_found >= result.margin_lower - 1e-7).all()
    assert (result.seconds < 3.0).all()


@pytest.fixture(scope="module")
def mnist():
    missing = [variable for variable in ("DATA_ROOT", "WEIGHTS_DIR") if not os.environ.get(variable)]
    if missing:
        pytest.skip(f"set {' and '.join(missing)} to certify the paper's MNIST models")
    import zoo
    from harness import data

    images, labels = data.test_subset("mnist", os.environ["DATA_ROOT"], 2, 0)
    return zoo.model("mnist/standard", weights_dir=os.environ["WEIGHTS_DIR"]), images, labels


def test_time_limit_on_a_real_mnist_model(mnist):
    model, images, labels = mnist
    network = PiecewiseLinearNetwork.of(model, (1, 28, 28))
    # Interval bounds certify no class at eps = 2, and building the program alone outlasts 0.01 s.
    result = milp_certify(network, images, labels, 2.0, LocalTransport(5, 1.0), box=True, time_limit=0.01)
    assert len(result.status) == 2 and result.counterexample.shape == images.shape
    assert set(result.status) <= {S.TIMEOUT, S.CLEAN_MISCLASSIFIED}
    assert (result.margin_lower < 0).all()
    assert (result.seconds < 2.0).all()


# --------------------------------------------------------------------------
# 5. Bad input
# --------------------------------------------------------------------------


def test_bad_input_is_refused_by_name():
    x = two_corner_image(0.7, 0.6)
    net = tiny_network(1, x, 0.3)
    batch, labels = torch.from_numpy(x)[None], torch.tensor([0])

    def certify(**changes):
        arguments = dict(network=net, x=batch, labels=labels, eps=0.1, transport=TRANSPORT, box=True, time_limit=1.0)
        arguments.update(changes)
        return milp_certify(**arguments)

    for limit in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="time_limit"):
            certify(time_limit=limit)
    with pytest.raises(ValueError, match=r"does not take images of shape \(1, 3, 3\)"):
        certify(x=torch.zeros(1, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x has shape \(1, 1, 3, 3\)"):
        certify(network=PiecewiseLinearNetwork.of(net, (1, 2, 3)), x=torch.zeros(1, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        certify(x=batch[0])
    with pytest.raises(ValueError, match="labels"):
        certify(labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        certify(labels=torch.tensor([2]))
    with pytest.raises(ValueError, match="eps"):
        certify(eps=-0.5)
    with pytest.raises(ValueError, match="box=True"):
        certify(x=2 * batch)
    with pytest.raises(ValueError, match="transport"):
        certify(transport=3)
    with pytest.raises(ValueError, match="2 ReLUs"):
        certify(pre_activation_bounds=[(torch.zeros(1, 2, 1, 2), torch.ones(1, 2, 1, 2))])
    with pytest.raises(ValueError, match=r"pre_activation_bounds\[0\] lower has shape"):
        certify(pre_activation_bounds=[(torch.zeros(1, 4), torch.ones(1, 4)), (torch.zeros(1, 3), torch.ones(1, 3))])
    with pytest.raises(ValueError, match="lower > upper"):
        certify(pre_activation_bounds=[(torch.ones(1, 2, 1, 2), torch.zeros(1, 2, 1, 2)), (torch.zeros(1, 3), torch.ones(1, 3))])
    pooled = nn.Sequential(nn.Conv2d(1, 2, 2), nn.MaxPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="MaxPool2d"):
        certify(network=pooled)


# --------------------------------------------------------------------------
# 6. Binarized inputs
# --------------------------------------------------------------------------


def pattern_minimum(net: nn.Module, x: np.ndarray, eps: float, threshold: float, box: bool, strict_gap: float) -> float:
    """min of ``f_0 - f_1`` over the bit patterns the ball reaches, by one LP per pattern.

    A pattern is reached if some image of the ball has pixels ``>= threshold``
    where its bits are 1 and ``<= threshold - strict_gap`` where they are 0
    (``strict_gap = 0``: the verifier's relaxation, where a pixel at exactly
    the threshold may read 0). ``net`` takes the bits.
    """
    cost, mass, image_of_plan, rows_equal, massive = plan_polytope(x)
    pixels = mass.size
    best = np.inf
    for bits in itertools.product((0.0, 1.0), repeat=pixels):
        bits = np.array(bits)
        on = bits == 1
        # on: -x'_j <= -t ; off: x'_j <= t - gap ; budget ; box.
        a_ub = [-image_of_plan[on], image_of_plan[~on], cost[None]]
        b_ub = [np.full(on.sum(), -threshold), np.full((~on).sum(), threshold - strict_gap), [eps * mass.sum()]]
        if box:
            a_ub.append(image_of_plan)
            b_ub.append(np.ones(pixels))
        result = linprog(
            np.zeros(cost.size), A_ub=np.vstack(a_ub), b_ub=np.concatenate(b_ub), A_eq=rows_equal[massive], b_eq=mass[massive],
            bounds=(0, None), method="highs",
        )
        if result.status == 0:
            best = min(best, float(margins(net, bits.reshape(1, *x.shape))[0]))
    return best


@pytest.mark.parametrize("eps, box", [(0.1, True), (0.25, False), (0.25, True), (0.5, True), (1.0, True)])
def test_binarized_network_agrees_with_pattern_enumeration(eps, box):
    x = two_corner_image(0.9, 0.7)
    threshold = 0.5
    bare = tiny_network(4, (x >= threshold).astype(np.float64), 0.4)
    model = ClassifierWithPreprocessing(Binarize(threshold), bare).double()
    result = milp_certify(model, torch.from_numpy(x)[None], torch.tensor([0]), eps, TRANSPORT, box=box, time_limit=10.0)
    lower = float(result.margin_lower[0])
    # Every pixel at the threshold may read 0 (below the verifier's relaxation), or none may (the true minimum, near enough).
    relaxed = pattern_minimum(bare, x, eps, threshold, box, strict_gap=0.0)
    reached = pattern_minimum(bare, x, eps, threshold, box, strict_gap=1e-6)
    images, _, _ = grid_images(x, eps, 3, 1.0, box, steps=12)
    clear = (np.abs(images - threshold) > 1e-9).all(axis=(1, 2, 3))  # grid points whose bits rounding cannot flip
    grid = margins(bare, (images[clear] >= threshold).astype(np.float64)).min()
    assert relaxed <= reached <= grid + 1e-9
    assert relaxed - MIP_RELATIVE_GAP * abs(relaxed) - 1e-6 <= lower <= reached + 1e-7
    if lower > 0:
        assert result.status == [S.CERTIFIED]
    if reached < -1e-6:
        assert result.status == [S.COUNTEREXAMPLE]
        found = result.counterexample
        with torch.no_grad():
            assert int(model(found).argmax(1)) != 0
        assert result.margin_found[0] == pytest.approx(float(margins(bare, (found.numpy() >= threshold).astype(np.float64))[0]))
        assert local_ot_distance(x, found[0].numpy(), 3, 1.0).cost <= eps * (1 + 1e-6)
    else:
        assert result.status == [S.CERTIFIED]


@pytest.mark.parametrize("keep_second, expected", [(0.5, S.COUNTEREXAMPLE), (1.2, S.UNKNOWN)])
def test_binarized_boundary_patterns_are_not_counterexamples(keep_second, expected):
    # Pixels A = 0.9 and C = 0.7 read 0 only below 0.5: turning both off costs at least 0.4 + 0.2 = 0.6, the whole budget,
    # so that pattern exists only in the relaxation (a pixel at exactly 0.5 reads 1). The margin is
    # -1 + 1.5 bit_A + keep_second bit_C: both off -1; A off alone -1 + keep_second, strictly reachable.
    x = two_corner_image(0.9, 0.7)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.zero_()
        net[1].weight[0, 0], net[1].weight[0, 5], net[1].bias[0] = 1.5, keep_second, -1.0
    model = ClassifierWithPreprocessing(Binarize(0.5), net).double()
    eps = 0.6 / 1.6
    result = milp_certify(model, torch.from_numpy(x)[None], torch.tensor([0]), eps, TRANSPORT, box=True, time_limit=10.0)
    assert result.margin_lower[0] == pytest.approx(-1.0, abs=1e-6)
    assert result.status == [expected]
    if expected is S.COUNTEREXAMPLE:
        found = result.counterexample
        assert result.margin_found[0] == pytest.approx(-1 + keep_second, abs=1e-9)
        assert float(found[0, 0, 0, 0]) < 0.5 <= float(found[0, 0, 1, 2])
        assert local_ot_distance(x, found[0].numpy(), 3, 1.0).cost <= eps * (1 + 1e-6)
    else:
        assert torch.isnan(result.counterexample).all() and result.margin_found[0] > 0
