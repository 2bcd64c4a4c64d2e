"""Soundness of the incomplete certificates: the support function against exact LPs, and bounds against sampled
points of the ball (the exact extremes, the safety margin and the standard suite: test_certify_soundness.py).

Problems are generated: small convolutional networks that are not in the zoo,
on 8x8 digit-like images. Points of the ball come from random plans projected
onto it (:func:`solvers.plan_space.project_plans`), so they share no code
with the bounds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.certify.bounds import linear_bounds
from harness.certify.network import PiecewiseLinearNetwork, UnsupportedNetwork
from harness.certify.perturbation import WassersteinBall
from harness.certify.run import CertifySettings, certify_batch
from harness.vocabulary import CertificateStatus, Certifier
from solvers.exact import linear_maximization
from solvers.geometry import LocalTransport
from solvers.plan_space import plan_image, plan_linear_maximization, plan_gradient, project_plans, window_layout
from solvers.support import wasserstein_support
from zoo.architectures import Binarize, ClassifierWithPreprocessing
from conftest import digit_batch

pytestmark = pytest.mark.usefixtures("single_thread")

TRANSPORT = LocalTransport(3, 1.0)
SHAPE = (1, 8, 8)


def _network(seed: int, preprocess: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=1, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 3),
    ).double()
    return ClassifierWithPreprocessing(preprocess or nn.Identity(), net).eval()


def _ball_points(x: torch.Tensor, eps: float, box: bool, seed: int, count: int) -> torch.Tensor:
    """``count`` points of the ball around each image (B * count, C, H, W): random plans, projected."""
    generator = torch.Generator().manual_seed(seed)
    centres = x.repeat_interleave(count, 0)
    cost, valid = window_layout(TRANSPORT, *x.shape[2:], dtype=x.dtype)
    # Plans far from the identity, so that the projection lands on the ball's boundary as well as inside.
    raw = torch.rand(centres.shape[0], 1, x[0].numel(), cost.numel(), generator=generator, dtype=x.dtype) ** 4
    raw = raw * valid * centres.flatten(1)[:, None, :, None] * 3
    projection = project_plans(raw, centres, cost, valid, eps, box=box)
    return plan_image(projection.plan, *x.shape[2:]).view_as(centres)


def _assert_margins_hold(logits: torch.Tensor, labels: torch.Tensor, margin_bounds: torch.Tensor, count: int) -> None:
    """Every sampled point's margins are at least their bounds (``count`` points per example, in order)."""
    margins = logits.gather(1, labels.repeat_interleave(count)[:, None]) - logits
    # At the true class the margin is 0 and its bound +inf by convention: only the wrong classes count.
    bounds = margin_bounds.repeat_interleave(count, 0)
    wrong = torch.isfinite(bounds)
    assert bool((margins[wrong] >= bounds[wrong] - 1e-9).all())


@pytest.fixture(scope="module")
def images():
    return torch.as_tensor(digit_batch(11, 6, SHAPE))


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.1, 0.4])
def test_unboxed_support_is_the_exact_linear_maximum(images, eps):
    a = torch.randn(images.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bound = wasserstein_support(a, images, torch.arange(images.shape[0]), eps, TRANSPORT)
    exact = np.array([linear_maximization(images[i], a[i], eps, 3, 1.0)[0] for i in range(images.shape[0])])
    assert bound.value.numpy() == pytest.approx(exact, rel=1e-6, abs=1e-7)
    assert bool(bound.exact.all())
    assert bool((bound.lower <= bound.value + 1e-12).all())


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.4])
def test_boxed_support_brackets_the_boxed_maximum(images, eps):
    a = torch.randn(images.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    example = torch.arange(images.shape[0])
    unboxed = wasserstein_support(a, images, example, eps, TRANSPORT)
    boxed = wasserstein_support(a, images, example, eps, TRANSPORT, box=True, capacity_rounds=30)
    cost, valid = window_layout(TRANSPORT, 8, 8, dtype=torch.float64)
    reference = plan_linear_maximization(plan_gradient(a, 3), images, cost, valid, eps, box=True, max_iter=300)
    assert bool(reference.converged.all())
    # The reference's plan is a point of the boxed ball: no upper bound may fall below it.
    assert bool((boxed.value >= reference.value.double() - 1e-9).all())
    assert bool((boxed.value <= unboxed.value + 1e-12).all())
    finite = torch.isfinite(boxed.lower)
    assert bool((boxed.lower[finite] <= reference.value.double()[finite] + 1e-6).all())
    # Exactness is claimed only where the bracket closed.
    assert bool((boxed.value[boxed.exact] - reference.value.double()[boxed.exact] <= 1e-6).all())


def test_support_bounds_every_sampled_point_of_the_ball(images):
    a = torch.randn(images.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for box in (False, True):
        points = _ball_points(images, 0.1, box, seed=4, count=40)
        values = (points * a.repeat_interleave(40, 0)).flatten(1).sum(1).view(images.shape[0], 40)
        bound = wasserstein_support(a, images, torch.arange(images.shape[0]), 0.1, TRANSPORT, box=box)
        assert bool((values.amax(1) <= bound.value + 1e-9).all())


@pytest.mark.parametrize("box", [False, True])
def test_the_balls_concretize_is_its_support_function_and_its_pixel_bounds_hold(images, box):
    a = torch.randn(images.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ball = WassersteinBall(images, 0.1, TRANSPORT, box, capacity_rounds=30)
    bound = ball.concretize(a, torch.arange(images.shape[0]))
    # The HiGHS reference's value is that of a point of the ball: no upper bound may fall below it.
    reference = np.array([linear_maximization(images[i], a[i], 0.1, 3, 1.0, box=box)[0] for i in range(images.shape[0])])
    assert bool((bound >= torch.from_numpy(reference) - 1e-9).all())
    if not box:
        assert bound.numpy() == pytest.approx(reference, rel=1e-6, abs=1e-7)
    lower, upper = ball.pixel_bounds
    points = _ball_points(images, 0.1, box, seed=6, count=20).view(images.shape[0], 20, *images.shape[1:])
    assert bool((points >= lower[:, None] - 1e-12).all() and (points <= upper[:, None] + 1e-12).all())


def test_support_rejects_bad_input(images):
    a = torch.zeros_like(images)
    with pytest.raises(ValueError, match="eps=.*invalid"):
        wasserstein_support(a, images, torch.arange(6), -0.1, TRANSPORT)
    with pytest.raises(ValueError, match="example has shape"):
        wasserstein_support(a, images, torch.arange(5), 0.1, TRANSPORT)
    with pytest.raises(ValueError, match="at most 1 with box=True"):
        wasserstein_support(a, images * 2, torch.arange(6), 0.1, TRANSPORT, box=True)


@pytest.mark.parametrize("box", [False, True])
def test_every_bound_holds_on_sampled_points_of_the_ball(images, box):
    model = _network(5)
    network = PiecewiseLinearNetwork.of(model, SHAPE)
    with torch.no_grad():
        labels = model(images).argmax(1)
    eps, count = 0.05, 30
    bounds = linear_bounds(network, images, labels, eps, TRANSPORT, box=box)
    points = _ball_points(images, eps, box, seed=6, count=count)
    with torch.no_grad():
        h, relu_index = points, 0
        for layer in network.layers:
            if isinstance(layer, nn.ReLU):
                lower, upper = (bound.repeat_interleave(count, 0) for bound in bounds.pre_activation[relu_index])
                assert bool((h >= lower - 1e-9).all()) and bool((h <= upper + 1e-9).all())
                relu_index += 1
            h = layer(h)
    _assert_margins_hold(h, labels, bounds.margin, count)
    # Not vacuous: some neurons are proven stable and some margins proven positive.
    first_lower, first_upper = bounds.pre_activation[0]
    assert bool(((first_lower > 0) | (first_upper < 0)).any())
    assert bool((bounds.worst_margin > 0).any())


def test_the_box_only_tightens_and_a_larger_ball_only_loosens(images):
    model = _network(7)
    network = PiecewiseLinearNetwork.of(model, SHAPE)
    with torch.no_grad():
        labels = model(images).argmax(1)
    unboxed = linear_bounds(network, images, labels, 0.05, TRANSPORT, box=False).pre_activation[0]
    boxed = linear_bounds(network, images, labels, 0.05, TRANSPORT, box=True).pre_activation[0]
    larger = linear_bounds(network, images, labels, 0.2, TRANSPORT, box=False).pre_activation[0]
    assert bool((boxed[0] >= unboxed[0] - 1e-12).all()) and bool((boxed[1] <= unboxed[1] + 1e-12).all())
    assert bool((boxed[1] < unboxed[1] - 1e-6).any())  # the box binds on saturated pixels
    assert bool((larger[0] <= unboxed[0] + 1e-12).all()) and bool((larger[1] >= unboxed[1] - 1e-12).all())


def test_binarized_inputs_are_bounded_through_the_bits_that_can_flip(images):
    model = _network(8, Binarize(0.5).double())
    network = PiecewiseLinearNetwork.of(model, SHAPE)
    with torch.no_grad():
        labels = model(images).argmax(1)
    eps, count = 0.005, 30
    bounds = linear_bounds(network, images, labels, eps, TRANSPORT, box=True)
    points = _ball_points(images, eps, True, seed=9, count=count)
    with torch.no_grad():
        logits = model(points)
    _assert_margins_hold(logits, labels, bounds.margin, count)
    assert bool((bounds.worst_margin > 0).any())


def test_unsupported_layers_are_named():
    with pytest.raises(UnsupportedNetwork, match="MaxPool2d"):
        PiecewiseLinearNetwork.of(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 2)), SHAPE)
    with pytest.raises(UnsupportedNetwork, match="must end in a Linear"):
        PiecewiseLinearNetwork.of(nn.Sequential(nn.Flatten(), nn.Linear(64, 2), nn.ReLU()), SHAPE)


@pytest.fixture(scope="module")
def certified_problem(images):
    model = _network(12)
    with torch.no_grad():
        labels = model(images).argmax(1)
    labels[0] = (labels[0] + 1) % 3  # one clean misclassification
    settings = CertifySettings(Certifier.LINEAR_BOUNDS, (0.01, 0.05, 0.2), box=True, radius_rounds=2)
    return model, labels, settings, certify_batch(model, images, labels, TRANSPORT, settings)


def test_the_radius_ladder_reports_what_it_proved(images, certified_problem):
    model, labels, settings, batch = certified_problem
    assert batch.status[0] == [CertificateStatus.CLEAN_MISCLASSIFIED] * 3 and batch.certified_radius[0] == 0
    for i in range(1, images.shape[0]):
        for j, eps in enumerate(settings.radii):
            certified = batch.status[i][j] is CertificateStatus.CERTIFIED
            assert certified == (batch.certified_radius[i] >= eps)
            # Evaluated rows keep the raw bound and the safety margin it had to exceed; certified exactly above it.
            evaluated = not np.isnan(batch.margin[i, j])
            assert evaluated == (not np.isnan(batch.safety_margin[i, j]))
            if evaluated:
                assert certified == (batch.margin[i, j] > batch.safety_margin[i, j] > 0)
    assert any(CertificateStatus.CERTIFIED in row for row in batch.status)
    assert any(CertificateStatus.UNKNOWN in row for row in batch.status)
    # The bisection reached radii between the ladder's rungs.
    assert set(np.round(batch.certified_radius, 9)) - {0.0, *settings.radii}
    with pytest.raises(ValueError, match="radii=\\[0.1, 0.05\\] are invalid"):
        CertifySettings(Certifier.LINEAR_BOUNDS, (0.1, 0.05), box=True)


def test_the_complete_certifier_decides_what_the_linear_bounds_leave_open(images, certified_problem):
    model, labels, _, _ = certified_problem
    # Example 3: certified by the linear bounds at 0.01, left open by them at 0.03, where the MILP proves it.
    x, y, radii = images[3:4], labels[3:4], (0.01, 0.03)
    incomplete = certify_batch(model, x, y, TRANSPORT, CertifySettings(Certifier.LINEAR_BOUNDS, radii, box=True, radius_rounds=0))
    complete = certify_batch(model, x, y, TRANSPORT, CertifySettings(Certifier.MILP, radii, box=True, time_limit=10, radius_rounds=0))
    assert incomplete.status[0] == [CertificateStatus.CERTIFIED, CertificateStatus.UNKNOWN]
    assert complete.status[0] == [CertificateStatus.CERTIFIED, CertificateStatus.CERTIFIED]
    assert complete.margin[0, 1] > 0 >= incomplete.margin[0, 1]
