"""The exact verification is sound to float rounding.

An image whose mass changed by more than rounding lies in no Wasserstein
ball: claims that create, destroy or teleport (out of every window) a mass of
``1e-5 m(x)`` or more are rejected, for p = 1 and 2 and two window sizes,
while images that differ from a ball member by rounding alone verify, and the
outputs of every registered solver verify.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from conftest import digit_batch, tensor
from harness.attack.ball import Ball
from harness.attack.pgd import EpsSchedule, PGDAttack
from harness.attack.verify import Tolerances, VerificationStatus, verify_wasserstein
from solvers.exact import local_ot_distance
from solvers.iterate import StepRule

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (1, 28, 28)
EPS = 0.01


class AnswersZero(nn.Module):
    """A classifier that always says class 0: only the ball checks decide."""

    def forward(self, x):
        return torch.tensor([1.0, 0.0], dtype=x.dtype).expand(x.shape[0], 2)


def _digits(batch: int = 6) -> torch.Tensor:
    return tensor(digit_batch(11, batch, SHAPE, peak=0.9), torch.float32)


def _ink(image: np.ndarray, room_above: float) -> np.ndarray:
    """Flat indices of ten ink pixels with room to gain or lose ``room_above``."""
    flat = image.ravel()
    chosen = np.flatnonzero((flat > room_above) & (flat + room_above < 1))
    assert chosen.size >= 10, "the digit has too little ink for the probe"
    return chosen[:10]


def _blank_destination(image: np.ndarray, kernel_size: int) -> int:
    """A pixel whose whole window holds no mass: nothing can be delivered there."""
    half = kernel_size // 2
    mass = image[0]
    for r in range(mass.shape[0]):
        for c in range(mass.shape[1]):
            if not mass[max(r - half, 0) : r + half + 1, max(c - half, 0) : c + half + 1].any():
                return r * mass.shape[1] + c
    raise AssertionError("no blank window in the digit")


def _tampered(x: torch.Tensor, fraction: float, how: str, kernel_size: int) -> torch.Tensor:
    images = x.double().numpy().copy()
    for image in images:
        amount = fraction * image.sum()
        flat = image.reshape(-1)
        pixels = _ink(image, amount / 10)
        if how == "created":
            flat[pixels] += amount / 10
        elif how == "destroyed":
            flat[pixels] -= amount / 10
        else:
            flat[pixels] -= amount / 10
            flat[_blank_destination(image, kernel_size)] += amount
    return torch.from_numpy(images).float()


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("how", ["created", "destroyed", "teleported"])
@pytest.mark.parametrize("fraction", [1e-5, 1e-4, 1e-3])
def test_mass_created_destroyed_or_teleported_beyond_rounding_is_rejected(kernel_size, p, how, fraction):
    x = _digits()
    z = _tampered(x, fraction, how, kernel_size)
    y = torch.ones(x.shape[0], dtype=torch.int64)
    claims = torch.ones(x.shape[0], dtype=torch.bool), torch.full((x.shape[0],), EPS)
    verdict = verify_wasserstein(AnswersZero(), x, y, z, *claims, kernel_size, p)
    expected = "UNREACHABLE_MASS" if how == "teleported" else "MASS_NOT_CONSERVED"
    assert verdict.status_names() == [expected] * x.shape[0]
    assert np.isinf(verdict.verified_distance).all()
    # Every unit moved out of reach is counted where it is missing and where it lands.
    if how == "teleported":
        assert verdict.unreachable_mass == pytest.approx(np.full(x.shape[0], 2 * fraction), rel=1e-3)


def _moved_in_float64(x: torch.Tensor, share: float) -> np.ndarray:
    """Each image with ``share`` of every pixel's mass moved one pixel right (the last column keeps its own)."""
    images = x.double().numpy()
    moved = images * share
    moved[..., -1] = 0
    result = images - moved
    result[..., 1:] += moved[..., :-1]
    return result


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_rounding_alone_verifies_and_the_stored_image_is_a_rounded_ball_member(kernel_size, p):
    x = _digits()
    exact = _moved_in_float64(x, 0.05)
    z = torch.from_numpy(exact).float()  # one rounding of an exact ball member
    y = torch.ones(x.shape[0], dtype=torch.int64)
    true_distance = np.array([local_ot_distance(a, b, kernel_size, p).cost for a, b in zip(x.double().numpy(), exact)])
    verdict = verify_wasserstein(
        AnswersZero(), x, y, z, torch.ones(x.shape[0], dtype=torch.bool), torch.from_numpy(true_distance).float(), kernel_size, p
    )
    assert verdict.status_names() == ["VERIFIED"] * x.shape[0]
    tolerances = Tolerances.for_images(z, kernel_size, p)
    assert (verdict.unreachable_mass <= tolerances.mass).all()
    # The stored image differs from the claim by the repair alone, and its mass is x's to one rounding per pixel.
    stored = verdict.image.double().flatten(1).numpy()
    mass_x = x.double().flatten(1).sum(1).numpy()
    unit = torch.finfo(torch.float32).eps / 2
    assert (np.abs(stored.sum(1) - mass_x) <= unit * mass_x).all()
    repaired = np.abs(stored - z.double().flatten(1).numpy()).sum(1)
    assert (repaired <= (verdict.unreachable_mass + unit) * mass_x).all()
    # The verified distance never understates the cost of reaching the stored image's exact member.
    assert (verdict.verified_distance >= true_distance * (1 - 1e-9) - tolerances.repair_cost).all()


def test_the_model_judges_the_stored_image():
    """A model fooled only by the attack's exact bytes: on the repaired image that is stored, it is not."""
    x = _digits(3)
    z = torch.from_numpy(_moved_in_float64(x, 0.05)).float() * (1 + 2e-7)  # a mass error within rounding

    class FooledByTheClaimOnly(nn.Module):
        def forward(self, images):
            same = (images == z[: images.shape[0]]).flatten(1).all(1)
            return torch.stack([(~same).to(images.dtype), same.to(images.dtype)], dim=1)

    model = FooledByTheClaimOnly()
    y = torch.zeros(3, dtype=torch.int64)
    verdict = verify_wasserstein(model, x, y, z, torch.ones(3, dtype=torch.bool), torch.full((3,), 1.0), 3, 1.0)
    assert not torch.equal(verdict.image, z), "nothing was repaired: the test lost its point"
    assert (verdict.prediction == model(verdict.image).argmax(1).numpy()).all()
    assert verdict.status_names() == ["PREDICTION_UNCHANGED"] * 3


class _SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("name", [spec.name for spec in zoo.solver_specs()])
def test_every_registered_solver_makes_claims_that_verify(name):
    spec = zoo.solver_spec(name)
    model = _SmallNet().eval()
    x = tensor(digit_batch(5, 6, (1, 8, 8)), torch.float32)
    with torch.no_grad():
        y = model(x).argmax(1)
    ball = Ball.wasserstein(3, 1.0)
    image_space = spec.kind is zoo.SolverKind.IMAGE_SPACE
    iterate = ball.iterate(spec, {}, StepRule.LINF_SIGN if image_space else None, 0.1 if image_space else None)
    result = PGDAttack(model, iterate, EpsSchedule(0.1, 1.5, 2, 8)).run(x, y)
    verdict = ball.verify(model, x, y, result)
    claimed = result.success.numpy()
    assert claimed.any(), f"{name} broke nothing: the test lost its point"
    statuses = {VerificationStatus(int(code)).name for code in verdict.status[claimed]}
    allowed = {"VERIFIED"} if spec.box is not zoo.BoxHandling.NONE else {"VERIFIED", "OUTSIDE_BOX"}
    assert statuses <= allowed, f"{name}: {verdict.counts()}, mass errors {verdict.mass_error[claimed]}"
    assert (verdict.mass_error[claimed] <= Tolerances.for_images(x, 3, 1.0).mass).all()
    if spec.box is not zoo.BoxHandling.NONE:
        assert math.isfinite(float(np.min(verdict.verified_distance)))


@pytest.mark.parametrize("kernel_size,p", [(3, 1.0), (5, 2.0)])
def test_the_window_plan_of_a_verified_claim_reaches_its_stored_image_at_its_verified_cost(kernel_size, p):
    from solvers.plan_space import plan_cost, plan_image, window_layout

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).double().eval()
    x = _digits(3).double()
    with torch.no_grad():
        y = model(x).argmax(1)
    ball = Ball.wasserstein(kernel_size, p)
    iterate = ball.iterate(zoo.solver_spec("plan_pgd_box"), {}, None, None)
    result = PGDAttack(model, iterate, EpsSchedule(EPS, 1.5, 1, 20)).run(x, y)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, kernel_size, p)
    verified = np.flatnonzero(verdict.status == int(VerificationStatus.VERIFIED))
    assert verified.size == 3 and sorted(verdict.plans) == verified.tolist()
    cost, _ = window_layout(ball.transport, 28, 28, torch.float64)
    rounding = Tolerances.for_images(x, kernel_size, p)
    for b in verified:
        plan = torch.from_numpy(verdict.plans[int(b)])[None]
        assert float(plan.min()) >= 0
        assert torch.allclose(plan_image(plan, 28, 28)[0], verdict.image[b], rtol=0, atol=rounding.box)
        mass = float(x[b].sum())
        assert float(plan_cost(plan, cost)) / mass == pytest.approx(verdict.verified_distance[b], rel=rounding.radius, abs=1e-12)
