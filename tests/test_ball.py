"""The threat-model object (harness/attack/ball.py): it builds its iterate, verifies and describes itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from conftest import digit_batch, tensor
from harness.attack.ball import Ball
from harness.attack.pgd import EpsSchedule, PGDAttack
from harness.attack.verify import verify_norm, verify_wasserstein
from harness.vocabulary import BallKind
from solvers.iterate import Norm, NormBallIterate, ProjectedGradientIterate, StepRule

pytestmark = pytest.mark.usefixtures("single_thread")


def _problem(batch=4):
    x = tensor(digit_batch(3, batch, (1, 8, 8)), torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_every_kind_names_and_stores_itself():
    wasserstein = Ball.of("wasserstein", 5, 1.0)
    assert wasserstein == Ball.wasserstein(5, 1.0) and wasserstein.kind is BallKind.WASSERSTEIN
    assert wasserstein.config() == {"threat_model": "wasserstein", "kernel_size": 5, "p": 1.0}
    assert wasserstein.title == "Wasserstein ball, 5x5 local transport, p = 1"
    assert "exact LP" in wasserstein.description and wasserstein.key == "wasserstein-k5-p1"
    for kind, title in ((BallKind.LINF, "l_inf ball"), (BallKind.L2, "l_2 ball")):
        ball = Ball.of(kind.value, 5, 1.0)  # a norm ball ignores the geometry
        assert ball == Ball(kind) and ball.title == title and not ball.takes_solver
        assert ball.config() == {"threat_model": kind.value, "kernel_size": None, "p": None}
    assert len({Ball.wasserstein(k, p).key for k in (3, 5) for p in (1.0, 2.0, 1.5)}) == 6


def test_bad_balls_are_named():
    with pytest.raises(ValueError, match=r"threat_model='l1' is not allowed; allowed: 'wasserstein', 'linf', 'l2'"):
        Ball.of("l1")
    with pytest.raises(ValueError, match="the wasserstein ball needs kernel_size and p"):
        Ball.of("wasserstein")
    with pytest.raises(ValueError, match="kernel_size=4 is invalid"):
        Ball.of("wasserstein", 4, 1.0)
    with pytest.raises(ValueError, match="the linf ball takes no local transport geometry"):
        Ball(BallKind.LINF, Ball.wasserstein(5, 1.0).transport)


def test_iterates_follow_the_ball_and_the_solver_kind():
    wasserstein = Ball.wasserstein(3, 1.0)
    image_space = wasserstein.iterate(zoo.solver_spec("projected_sinkhorn_box"), {"lam": 100.0}, StepRule.LINF_SIGN, 0.05)
    assert isinstance(image_space, ProjectedGradientIterate) and image_space.step_size == 0.05
    assert image_space.projector.lam == 100.0 and image_space.projector.box is True
    assert image_space.projector.transport == wasserstein.transport
    plan_space = wasserstein.iterate(zoo.solver_spec("plan_pgd_box"), {"step_size": 0.2}, None, None)
    assert plan_space.step_size == 0.2 and plan_space.box is True and plan_space.transport == wasserstein.transport
    norm = Ball(BallKind.L2).iterate(None, {}, StepRule.L2_NORMALIZED, 0.3)
    assert isinstance(norm, NormBallIterate) and norm.norm is Norm.L2 and norm.step_size == 0.3
    with pytest.raises(ValueError, match="needs a solver"):
        wasserstein.iterate(None, {}, StepRule.LINF_SIGN, 0.1)
    with pytest.raises(ValueError, match="takes no solver"):
        Ball(BallKind.LINF).iterate(zoo.solver_spec("projected_sinkhorn"), {}, StepRule.LINF_SIGN, 0.1)


def test_descriptions_of_box_handling_and_attack():
    wasserstein, linf = Ball.wasserstein(5, 1.0), Ball(BallKind.LINF)
    assert wasserstein.box_handling(zoo.solver_spec("projected_sinkhorn_box"), clamp=False) == "kept in [0, 1] by the solver"
    assert wasserstein.box_handling(zoo.solver_spec("projected_sinkhorn"), clamp=False).startswith("none: images may leave")
    assert "does not conserve mass" in wasserstein.box_handling(zoo.solver_spec("projected_sinkhorn"), clamp=True)
    assert linf.box_handling(None, clamp=False) == "clipped to [0, 1] after each step"
    assert wasserstein.attack_summary(zoo.solver_spec("frank_wolfe"), None) == zoo.solver_spec("frank_wolfe").summary
    assert linf.attack_summary(None, StepRule.LINF_SIGN) == "PGD in the l_inf ball, step rule linf_sign"


@pytest.mark.parametrize("ball", [Ball.wasserstein(3, 1.0), Ball(BallKind.LINF), Ball(BallKind.L2)], ids=lambda b: b.key)
def test_verify_is_the_exact_check_of_its_kind(ball):
    model, x, y = _problem()
    solver = zoo.solver_spec("projected_sinkhorn_box") if ball.takes_solver else None
    step_rule = StepRule.L2_NORMALIZED if ball.kind is BallKind.L2 else StepRule.LINF_SIGN
    iterate = ball.iterate(solver, {}, step_rule, 0.05)
    result = PGDAttack(model, iterate, EpsSchedule(0.05, 1.5, 2, 20)).run(x, y)
    verdict = ball.verify(model, x, y, result)
    claims = (model, x, y, result.adversarial, result.success, result.eps_found)
    if ball.takes_solver:
        expected = verify_wasserstein(*claims, 3, 1.0)
    else:
        expected = verify_norm(*claims, Norm(ball.kind.value))
    assert result.success.any()
    for name, value in expected.to_dict().items():
        assert np.array_equal(getattr(verdict, name), value, equal_nan=True), name
