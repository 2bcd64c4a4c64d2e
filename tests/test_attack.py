"""Tests of the attack loop (harness/attack.py) and its exact verification (harness/verify.py).

Every claimed success is judged by :mod:`harness.verify`, whose distance is
the exact LP of :mod:`solvers.exact` (no code shared with the solvers), and
the prediction checks re-run the model on the stored images. The models are
small seeded convolutional networks on generated digit-like images, labelled
with their own clean predictions so that every example starts correct.
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
from harness.attack.pgd import EpsSchedule, Loss, PGDAttack, make_iterate
from harness.attack.spec import PROTOCOLS
from harness.attack.verify import VerificationStatus, robust_accuracy, verify_norm, verify_wasserstein
from solvers.exact import local_ot_distance
from solvers.iterate import IterateState, Norm, NormBallIterate, StepReport, StepRule

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (1, 10, 10)
KERNEL, P = 3, 1.0
SCHEDULE = EpsSchedule(0.05, 1.5, 3, 24)


def small_net(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, classes))
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net.eval()


def problem(batch: int = 12, seed: int = 3):
    model = small_net()
    x = tensor(digit_batch(seed, batch, SHAPE), torch.float32)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def wasserstein_attack(model, solver_name="projected_sinkhorn_box", schedule=SCHEDULE, **kwargs):
    solver = zoo.solver(solver_name, kernel_size=KERNEL, p=P)
    return PGDAttack(model, make_iterate(solver, StepRule.LINF_SIGN, 0.1), schedule, **kwargs)


# --------------------------------------------------------------------------
# Successes are real
# --------------------------------------------------------------------------


def test_box_solver_attack_successes_all_verified():
    model, x, y = problem()
    result = wasserstein_attack(model).run(x, y)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P)
    assert int(result.success.sum()) >= 8, f"only {int(result.success.sum())} of 12 examples fooled"
    assert np.all(verdict.status[result.success.numpy()] == int(VerificationStatus.VERIFIED)), verdict.status_names()
    assert np.all(verdict.status[~result.success.numpy()] == int(VerificationStatus.NOT_FOUND))
    # Independent re-check of the first success, straight from the LP.
    b = int(torch.nonzero(result.success)[0])
    exact = local_ot_distance(x[b], result.adversarial[b], KERNEL, P)
    assert exact.cost <= float(result.eps_found[b]) * (1 + 1e-4)
    assert verdict.verified_distance[b] == pytest.approx(exact.cost, rel=1e-9, abs=1e-12)
    with torch.no_grad():
        assert model(result.adversarial[b : b + 1]).argmax(1).item() != y[b].item()
    assert result.adversarial_prediction[result.success].ne(y[result.success]).all()


def test_fast_training_attack_cuts_the_projection_short_and_its_successes_still_verify():
    """The fast training recipe's inexact box projection (one Newton step) still leaves every iterate in the ball."""
    from dataclasses import replace

    from harness.train.recipes import recipe

    model, x, y = problem()
    spec = replace(recipe("mnist_wasserstein_plan_pgd_fast").adversarial.attack, schedule=SCHEDULE)
    result = spec.attack(model, Ball.wasserstein(KERNEL, P), seed=0).run(x, y)
    assert int(result.unconverged_steps.sum()) > 0, "every projection converged in one step: nothing was cut short"
    assert int(result.success.sum()) >= 8, f"only {int(result.success.sum())} of 12 examples fooled"
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P)
    assert np.all(verdict.status[result.success.numpy()] == int(VerificationStatus.VERIFIED)), verdict.status_names()


def test_free_solver_successes_leave_box_and_are_rejected():
    """Sign steps push bright pixels past 1; without the box the projection keeps them there."""
    model, x, y = problem()
    result = wasserstein_attack(model, "projected_sinkhorn").run(x, y)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P)
    claimed = result.success.numpy()
    assert claimed.any()
    over = result.adversarial.flatten(1).amax(1).numpy() > 1 + 1e-6
    assert np.all(verdict.status[claimed & over] == int(VerificationStatus.OUTSIDE_BOX))
    assert np.all(verdict.status[claimed & ~over] == int(VerificationStatus.VERIFIED))
    assert np.all(np.isinf(verdict.verified_distance[claimed & over]))


def test_paper_clamp_breaks_mass_conservation_and_is_rejected():
    model, x, y = problem()
    solver = zoo.solver("projected_sinkhorn", kernel_size=KERNEL, p=P)
    result = PGDAttack(model, make_iterate(solver, StepRule.LINF_SIGN, 0.1, clamp=True), SCHEDULE).run(x, y)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P)
    claimed = result.success.numpy()
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    mass_x = x.flatten(1).sum(1).numpy()
    changed = np.abs(result.adversarial.flatten(1).sum(1).numpy() - mass_x) > 1e-4 * mass_x
    assert (claimed & changed).any(), "clamping removed no mass: the test lost its point"
    assert np.all(verdict.status[claimed & changed] == int(VerificationStatus.MASS_NOT_CONSERVED))


def test_fooled_examples_freeze_at_the_radius_they_were_found():
    model, x, y = problem()
    result = wasserstein_attack(model).run(x, y)
    found = result.success & (result.steps > 0)
    assert found.any()
    for b in torch.nonzero(found).flatten().tolist():
        steps = int(result.steps[b])
        assert float(result.eps_found[b]) == pytest.approx(SCHEDULE.eps_at(steps - 1))
    assert torch.all(result.steps[~result.success] == SCHEDULE.iterations)
    assert torch.all(torch.isinf(result.eps_found[~result.success]))
    # Later radii are never smaller: a schedule that grows gives the smallest radius per example.
    assert SCHEDULE.final_eps == pytest.approx(0.05 * 1.5**7)


def test_clean_misclassified_costs_nothing():
    model, x, y = problem()
    y = y.clone()
    y[0] = (y[0] + 1) % 3
    result = wasserstein_attack(model).run(x, y)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P)
    assert bool(result.success[0]) and float(result.eps_found[0]) == 0.0 and int(result.steps[0]) == 0
    assert torch.equal(result.adversarial[0], x[0])
    assert verdict.status[0] == int(VerificationStatus.CLEAN_MISCLASSIFIED) and verdict.verified_distance[0] == 0.0
    assert robust_accuracy(verdict.verified_distance, 0.0) <= (len(y) - 1) / len(y)


@pytest.mark.parametrize("loss", list(Loss))
def test_targeted_attack_reaches_its_target(loss):
    model, x, y = problem()
    # Aim at the classes an untargeted attack reaches, so that the targets are reachable.
    untargeted = wasserstein_attack(model).run(x, y)
    targets = torch.where(untargeted.success, untargeted.adversarial_prediction, (y + 1) % 3)
    result = wasserstein_attack(model, loss=loss).run(x, y, targets)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P, targets=targets)
    assert result.success.any()
    assert torch.equal(result.adversarial_prediction[result.success], targets[result.success])
    assert np.all(verdict.status[result.success.numpy()] == int(VerificationStatus.VERIFIED))


def test_margin_loss_untargeted_finds_examples():
    model, x, y = problem()
    result = wasserstein_attack(model, loss=Loss.LOGIT_MARGIN).run(x, y)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P)
    assert int(result.success.sum()) >= 8
    assert np.all(verdict.status[result.success.numpy()] == int(VerificationStatus.VERIFIED))


@pytest.mark.parametrize("rule", [StepRule.L2_NORMALIZED, StepRule.LINF_NORMALIZED_MASS, StepRule.WASSERSTEIN])
def test_other_step_rules_find_verified_examples(rule):
    model, x, y = problem(batch=6)
    step = {StepRule.L2_NORMALIZED: 1.0, StepRule.LINF_NORMALIZED_MASS: 0.06, StepRule.WASSERSTEIN: 0.5}[rule]
    solver = zoo.solver("projected_sinkhorn_box", kernel_size=KERNEL, p=P)
    result = PGDAttack(model, make_iterate(solver, rule, step), SCHEDULE).run(x, y)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P)
    assert result.success.any()
    assert np.all(verdict.status[result.success.numpy()] == int(VerificationStatus.VERIFIED))


@pytest.mark.parametrize("norm, step, eps", [(Norm.LINF, 0.02, 0.02), (Norm.L2, 0.2, 0.2)])
def test_norm_balls_in_the_same_loop(norm, step, eps):
    model, x, y = problem()
    result = PGDAttack(model, NormBallIterate(norm, step), EpsSchedule(eps, 1.5, 3, 24)).run(x, y)
    verdict = verify_norm(model, x, y, result.adversarial, result.success, result.eps_found, norm)
    assert result.success.any()
    assert np.all(verdict.status[result.success.numpy()] == int(VerificationStatus.VERIFIED))
    delta = (result.adversarial - x).flatten(1)
    order = math.inf if norm is Norm.LINF else 2.0
    sizes = torch.linalg.vector_norm(delta, ord=order, dim=1)
    assert torch.all(sizes[result.success] <= result.eps_found[result.success] * (1 + 1e-5) + 1e-6)
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1


# --------------------------------------------------------------------------
# Loop mechanics
# --------------------------------------------------------------------------


class ConstantLogits(nn.Module):
    """Ignores its input: every gradient is exactly zero."""

    def forward(self, x):
        return x.flatten(1)[:, :3] * 0 + torch.tensor([3.0, 0.0, 0.0])


def test_zero_gradients_are_counted():
    _, x, _ = problem(batch=4)
    y = torch.zeros(4, dtype=torch.int64)
    schedule = EpsSchedule(0.1, 1.0, 1, 5)
    result = wasserstein_attack(ConstantLogits(), schedule=schedule).run(x, y)
    assert not result.success.any()
    assert torch.equal(result.zero_gradient_steps, result.steps)
    assert torch.all(result.steps == 5)


def test_restarts_start_at_random_points_and_are_reproducible():
    model, x, y = problem(batch=6)
    schedule = EpsSchedule(0.001, 1.0, 1, 2)  # too small to fool anything
    first = wasserstein_attack(model, schedule=schedule, restarts=3, seed=7).run(x, y)
    again = wasserstein_attack(model, schedule=schedule, restarts=3, seed=7).run(x, y)
    assert not first.success.any()
    assert torch.all(first.steps == 3 * schedule.iterations)
    assert torch.equal(first.adversarial, again.adversarial)
    other = wasserstein_attack(model, schedule=schedule, restarts=3, seed=8).run(x, y)
    assert not torch.equal(first.adversarial, other.adversarial)


class ShiftRight:
    """A solver with its own state, used through BallIterate only: moves all mass one pixel right."""

    def start(self, x, eps, generator=None):
        return IterateState(x, x.clone(), {"shifts": torch.zeros(x.shape[0], dtype=torch.int64)})

    def step(self, state, grad, eps, iteration):
        image = torch.roll(state.image, 1, dims=-1)
        zero = torch.zeros(grad.shape[0], dtype=torch.bool)
        report = StepReport(converged=~zero, solver_iterations=torch.full_like(state.extra["shifts"], 2), zero_gradient=zero, failed=zero)
        return IterateState(state.center, image, {"shifts": state.extra["shifts"] + 1}), report


def test_custom_iterate_plugs_in_without_touching_the_loop():
    model, x, y = problem(batch=5)
    x = x.clone()
    x[..., -1] = 0  # nothing wraps around
    iterate = make_iterate(ShiftRight())
    assert isinstance(iterate, ShiftRight)
    result = PGDAttack(model, iterate, EpsSchedule(1.0, 1.0, 1, 1)).run(x, y)
    moved = torch.roll(x, 1, dims=-1)
    unbroken = ~result.success
    assert torch.equal(result.adversarial[unbroken], moved[unbroken])
    assert torch.all(result.solver_iterations[result.steps == 1] == 2)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P)
    # Moving all the mass by one pixel costs exactly 1 in normalized units.
    for b in np.flatnonzero(verdict.status == int(VerificationStatus.VERIFIED)):
        assert verdict.verified_distance[b] == pytest.approx(1.0, rel=1e-6)


# --------------------------------------------------------------------------
# Verification rejects planted invalid claims
# --------------------------------------------------------------------------


class AlwaysOne(nn.Module):
    def forward(self, x):
        return torch.stack([x.flatten(1).sum(1) * 0, x.flatten(1).sum(1) * 0 + 1], dim=1)


def _planted():
    x = torch.zeros(6, 1, 9, 9)
    x[:, 0, 4, 2] = 0.8
    x[:, 0, 5, 3] = 0.4
    z = x.clone()
    z[0, 0, 4, 2], z[0, 0, 4, 7] = 0.0, 0.8          # 0.8 moved 5 pixels: outside a 3x3 window
    z[1, 0, 0, 0] = 0.1                                # mass created
    z[2, 0, 4, 2], z[2, 0, 4, 3] = 0.0, 0.8            # a legal move of 0.8 by one pixel: cost 0.8 / 1.2
    z[3] = z[2]                                        # same move, but claimed at a smaller radius
    z[4, 0, 4, 2], z[4, 0, 4, 3] = 0.0, 0.8
    z[4, 0, 5, 3] += 0.8                               # pixel 1.2 > 1 (and mass created)
    return x, z


def test_verification_rejects_planted_invalid_examples():
    x, z = _planted()
    y = torch.zeros(6, dtype=torch.int64)
    success = torch.tensor([True, True, True, True, True, False])
    legal = 0.8 / 1.2
    eps = torch.tensor([2.0, 2.0, 1.0, 0.9 * legal, 2.0, math.inf])
    verdict = verify_wasserstein(AlwaysOne(), x, y, z, success, eps, 3, 1.0)
    assert verdict.status_names() == [
        "UNREACHABLE_MASS",
        "MASS_NOT_CONSERVED",
        "VERIFIED",
        "RADIUS_EXCEEDED",
        "OUTSIDE_BOX",
        "NOT_FOUND",
    ]
    assert verdict.verified_distance[2] == pytest.approx(legal, rel=1e-9)
    assert np.isinf(verdict.verified_distance[[0, 1, 3, 4, 5]]).all()
    # Counted where it is missing and where it is left over.
    assert verdict.unreachable_mass[0] == pytest.approx(2 * 0.8 / 1.2, rel=1e-6)
    assert verdict.mass_error[1] == pytest.approx(0.1 / 1.2, rel=1e-6)
    assert verdict.box_violation[4] == pytest.approx(0.2, rel=1e-6)
    assert robust_accuracy(verdict.verified_distance, 1.0) == pytest.approx(5 / 6)
    assert robust_accuracy(verdict.verified_distance, 0.5) == 1.0


def test_verification_rejects_claims_the_model_does_not_confirm():
    model, x, y = problem(batch=3)
    success = torch.ones(3, dtype=torch.bool)
    verdict = verify_wasserstein(model, x, y, x.clone(), success, torch.full((3,), 0.5), KERNEL, P)
    assert verdict.status_names() == ["PREDICTION_UNCHANGED"] * 3


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


def test_bad_inputs_are_named():
    model, x, y = problem(batch=2)
    solver = zoo.solver("projected_sinkhorn_box", kernel_size=KERNEL)
    with pytest.raises(ValueError, match="factor=0.5"):
        EpsSchedule(0.1, 0.5)
    with pytest.raises(ValueError, match="iterations=0"):
        EpsSchedule(0.1, 1.1, 10, 0)
    with pytest.raises(ValueError, match="initial=-1"):
        EpsSchedule(-1)
    with pytest.raises(ValueError, match="loss='ce'.*cross_entropy"):
        PGDAttack(model, make_iterate(solver), SCHEDULE, loss="ce")
    with pytest.raises(ValueError, match="neither an image-space projector"):
        make_iterate(object())
    with pytest.raises(ValueError, match="step_size=0"):
        make_iterate(solver, StepRule.LINF_SIGN, 0)
    with pytest.raises(ValueError, match="targets equal the true label for examples \\[0, 1\\]"):
        PGDAttack(model, make_iterate(solver), SCHEDULE).run(x, y, y.clone())
    with pytest.raises(ValueError, match="outside \\[0, 1\\].*max 1.5"):
        PGDAttack(model, make_iterate(solver), SCHEDULE).run(x * 0 + 1.5, y)
    with pytest.raises(ValueError, match="y has classes \\[7\\]; the model has classes 0..2"):
        PGDAttack(model, make_iterate(solver), SCHEDULE).run(x, torch.full_like(y, 7))
    with pytest.raises(ValueError, match="norm='l1'"):
        NormBallIterate("l1", 0.1)


def test_protocol_presets():
    code = PROTOCOLS["paper_code_mnist"]
    assert (code.kernel_size, code.p, code.schedule.initial) == (7, 2.0, 0.7)
    paper = PROTOCOLS["paper_mnist"].schedule
    assert paper.final_eps == pytest.approx(0.3 * 1.1**19)  # 1.83 as in Figure 7; the text's "2" counts one growth more
    cifar = PROTOCOLS["paper_cifar"].schedule
    assert cifar.final_eps == pytest.approx(0.001 * 1.17**39)  # the text's 0.53 counts one growth more


# --------------------------------------------------------------------------
# The paper's models on real MNIST (need DATA_ROOT and WEIGHTS_DIR)
# --------------------------------------------------------------------------


def _real(name: str, n: int):
    import os

    from harness.data import test_subset

    missing = [var for var in ("DATA_ROOT", "WEIGHTS_DIR") if not os.environ.get(var)]
    if missing:
        pytest.skip(f"set {' and '.join(missing)} to run the attack on the paper's MNIST models")
    model = zoo.model(name, weights_dir=os.environ["WEIGHTS_DIR"])
    x, y = test_subset("mnist", os.environ["DATA_ROOT"], n)
    return model, x, y


@pytest.mark.parametrize("name", ["mnist/standard", "mnist/binarized"])
def test_paper_model_attack_every_success_verified(name):
    """The paper's code protocol with the box solver; the binarized model is attacked through BPDA."""
    model, x, y = _real(name, 16)
    protocol = PROTOCOLS["paper_code_mnist"]
    solver = zoo.solver("projected_sinkhorn_box", kernel_size=protocol.kernel_size, p=protocol.p, lam=protocol.lam)
    iterate = make_iterate(solver, protocol.attack.step_rule, protocol.attack.step_size)
    result = PGDAttack(model, iterate, protocol.schedule).run(x, y)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, protocol.kernel_size, protocol.p)
    assert int(result.success.sum()) >= 14, f"{name}: only {int(result.success.sum())} of 16 fooled"
    counted = np.isin(verdict.status, [int(VerificationStatus.VERIFIED), int(VerificationStatus.CLEAN_MISCLASSIFIED)])
    assert np.all(counted[result.success.numpy()]), verdict.status_names()
    assert int(result.zero_gradient_steps.sum()) == 0, "the straight-through gradient vanished"
    assert robust_accuracy(verdict.verified_distance, 2.0) <= 2 / 16


# --------------------------------------------------------------------------
# Batched evaluation
# --------------------------------------------------------------------------


def test_attack_and_verify_columns():
    from harness.attack.evaluate import attack_and_verify, clean_accuracy

    model, x, y = problem(batch=7)
    solver = zoo.solver("projected_sinkhorn_box", kernel_size=KERNEL, p=P)
    ball = Ball.wasserstein(KERNEL, P)
    columns = attack_and_verify(model, x, y, ball, make_iterate(solver), SCHEDULE, batch_size=3)
    assert {len(value) for value in columns.values()} == {7}
    assert columns["adversarial"].shape == tuple(x.shape)
    assert np.array_equal(columns["label"], y.numpy())
    verified = columns["verification_status"] == int(VerificationStatus.VERIFIED)
    assert np.array_equal(verified, columns["success"])  # every example starts correct, every claim holds
    assert np.all(columns["verified_distance"][verified] <= columns["eps_found"][verified] * (1 + 1e-4))
    assert np.array_equal(columns["verified_prediction"], columns["adversarial_prediction"])
    assert np.all(columns["attack_seconds"] > 0)
    assert clean_accuracy(model, x, y) == 1.0
    with pytest.raises(ValueError, match="pass a harness.attack.ball.Ball"):
        attack_and_verify(model, x, y, "wasserstein", make_iterate(solver), SCHEDULE)
    with pytest.raises(ValueError, match="batch_size=0"):
        attack_and_verify(model, x, y, ball, make_iterate(solver), SCHEDULE, batch_size=0)


def test_verification_in_worker_processes_gives_the_same_verdicts():
    """The exact LPs in a process pool, started as claims arrive during the attack, change no column but the times."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from harness.attack.evaluate import attack_and_verify

    model, x, y = problem(batch=9)
    ball = Ball.wasserstein(KERNEL, P)
    run = lambda executor: attack_and_verify(
        model, x, y, ball, ball.iterate(zoo.solver_spec("plan_pgd_box"), {}, None, None), SCHEDULE, batch_size=5,
        verify_executor=executor,
    )
    inline = run(None)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pooled = run(pool)
    assert int(inline["success"].sum()) >= 6
    for name, column in inline.items():
        if name not in ("attack_seconds", "verify_seconds"):
            np.testing.assert_array_equal(pooled[name], column, err_msg=name)


def test_early_distance_is_reused_only_for_the_same_image():
    """A distance submitted for an image that is not the one finally checked is computed again on the checked one."""
    from concurrent.futures import ThreadPoolExecutor

    from harness.attack.verify import ExactDistances

    model, x, y = problem(batch=2)
    result = wasserstein_attack(model).run(x, y)
    assert bool(result.success.all())
    xs, zs = x.double().numpy(), result.adversarial.double().numpy()
    with ThreadPoolExecutor(1) as executor:
        distances = ExactDistances(executor, KERNEL, P)
        distances.submit(0, xs[0], zs[0])
        distances.submit(1, xs[1], xs[1])  # stale: the claim checked below is zs[1]
        verdict = verify_wasserstein(
            model, x, y, result.adversarial, result.success, result.eps_found, KERNEL, P, distances=distances,
        )
        with pytest.raises(ValueError, match="this ball is 5x5"):
            verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, 5, P, distances=distances)
    for b in range(2):
        assert verdict.distance[b] == pytest.approx(local_ot_distance(x[b], result.adversarial[b], KERNEL, P).cost, rel=1e-12)
    assert verdict.distance[1] > 0


@pytest.mark.parametrize("name", ["cifar10/small_resnet", "cifar10/resnet18"])
def test_cifar_architectures_attack_and_verify(name):
    """Colour images through the whole loop: untrained weights, real CIFAR-10 images, labels = own predictions."""
    import os

    from harness.data import test_subset

    if not os.environ.get("DATA_ROOT"):
        pytest.skip("set DATA_ROOT to run the attack on real CIFAR-10 images")
    x, _ = test_subset("cifar10", os.environ["DATA_ROOT"], 4)
    spec = zoo.model_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    protocol = PROTOCOLS["paper_cifar"]
    solver = zoo.solver("projected_sinkhorn_box", kernel_size=protocol.kernel_size, p=protocol.p, lam=protocol.lam)
    result = PGDAttack(model, make_iterate(solver, protocol.attack.step_rule, protocol.attack.step_size), EpsSchedule(0.01, 1.5, 2, 12)).run(x, y)
    verdict = verify_wasserstein(model, x, y, result.adversarial, result.success, result.eps_found, protocol.kernel_size, protocol.p)
    assert result.success.any()
    assert np.all(verdict.status[result.success.numpy()] == int(VerificationStatus.VERIFIED)), verdict.status_names()
