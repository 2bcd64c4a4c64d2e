"""Soundness of the certificates, with teeth: exact extremes, the safety margin, the model's own dtype, and the full suite.

* The linear bounds' ReLU pre-activation bounds and margin bounds against
  the exact extremes over the ball (one HiGHS LP per activation pattern, a
  reference that shares no code with the certifiers), at several radii,
  with and without the box; certified verdicts (linear bounds and MILP)
  against the exact minimum.
* The safety margin: it covers the float32 model's own rounding on points
  of the ball, a bound inside it decides nothing (for the linear bounds and
  the MILP, finished or out of time), and a bound above it still certifies.
* Binarization in the model's dtype, and the one list of supported layers.
* The certified examples of a tiny float32 network attacked by the standard
  evaluation suite at its full budget: no verified radius at or below a
  certified one.
* ``benchmarks/certify_soundness.py`` on a hand-made store.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

import zoo
from conftest import digit_batch
from results_factory import attack, suite_evaluation, write_cell, write_certificates
from test_certify_milp import (
    box_sensitive_network, conv_as_matrix, exact_minimum, plan_polytope, random_ball_images, tiny_network, two_corner_image,
)

from harness.attack.ball import Ball
from harness.attack.suite import MemberRole, attack_suite, evaluate
from harness.certify import milp as milp_module
from harness.certify.bounds import linear_bounds
from harness.certify.milp import milp_certify
from harness.certify.network import PiecewiseLinearNetwork, UnsupportedNetwork, binarization_threshold, check_certifiable
from harness.certify.run import CertifySettings, certify_batch
from harness.run.store import Table, read_table, shard_path
from harness.vocabulary import CertificateStatus, Certifier
from solvers.geometry import LocalTransport
from zoo.architectures import Binarize, ClassifierWithPreprocessing

pytestmark = pytest.mark.usefixtures("single_thread")

S = CertificateStatus
TRANSPORT = LocalTransport(3, 1.0)
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "certify_soundness.py"


# --------------------------------------------------------------------------
# The exact extremes over the ball, by one LP per activation pattern
# --------------------------------------------------------------------------


def exact_pre_activation_ranges(net: nn.Sequential, x: np.ndarray, eps: float, box: bool):
    """Exact ``(min, max)`` of each input of both ReLUs of a :func:`tiny_network` over the ball.

    The first layer's pre-activations are affine in the plan: one LP each.
    The second's are affine on the region of each activation pattern of the
    first (non-strict signs, which cover the ball): one LP per pattern.
    """
    cost, mass, image_of_plan, rows_equal, massive = plan_polytope(x)
    pixels = mass.size
    first, first_bias = conv_as_matrix(net[0], x.shape)
    z1 = first @ image_of_plan
    w2, b2 = net[3].weight.detach().double().numpy(), net[3].bias.detach().double().numpy()
    base_a, base_b = [cost[None]], [[eps * mass.sum()]]
    if box:
        base_a, base_b = base_a + [image_of_plan], base_b + [np.ones(pixels)]

    def minimum(objective, a_ub=(), b_ub=()):
        result = linprog(
            objective, A_ub=np.vstack([*base_a, *a_ub]), b_ub=np.concatenate([*base_b, *b_ub]), A_eq=rows_equal[massive],
            b_eq=mass[massive], bounds=(0, None), method="highs",
            options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
        )
        return result.fun if result.status == 0 else None

    first_range = (
        np.array([minimum(row) for row in z1]) + first_bias,
        -np.array([minimum(-row) for row in z1]) + first_bias,
    )
    low2, high2 = np.full(w2.shape[0], np.inf), np.full(w2.shape[0], -np.inf)
    for pattern in itertools.product((0.0, 1.0), repeat=z1.shape[0]):
        on = np.array(pattern)
        sign = 1 - 2 * on  # on: z1 >= 0, off: z1 <= 0, as A P <= b
        region = ([sign[:, None] * z1], [-sign * first_bias])
        z2, constant = w2 @ (on[:, None] * z1), w2 @ (on * first_bias) + b2
        for i in range(w2.shape[0]):
            low = minimum(z2[i], *region)
            if low is None:
                break  # the pattern's region misses the ball
            low2[i] = min(low2[i], low + constant[i])
            high2[i] = max(high2[i], -minimum(-z2[i], *region) + constant[i])
    return first_range, (low2, high2)


@pytest.mark.parametrize("seed, clean_margin", [(5, 0.4), (6, 0.2)])
def test_linear_bounds_never_pass_the_exact_extremes_and_certify_only_robust_examples(seed, clean_margin):
    # The benchmark's dtype, for the model and the image (the references see the same float32 values in float64).
    x = two_corner_image(0.7, 0.6).astype(np.float32).astype(np.float64)
    net = tiny_network(seed, x, clean_margin, dtype=torch.float32)
    network = PiecewiseLinearNetwork.of(net, x.shape)
    batch, label = torch.from_numpy(x).float()[None], torch.tensor([0])
    verdicts = []
    for eps, box in itertools.product((0.05, 0.15, 0.3, 1.0), (False, True)):
        bounds = linear_bounds(network, batch, label, eps, TRANSPORT, box=box)
        exact = exact_pre_activation_ranges(net, x, eps, box)
        for (lower, upper), (exact_low, exact_high) in zip(bounds.pre_activation, exact):
            lower, upper = lower.flatten().numpy(), upper.flatten().numpy()
            assert (lower <= exact_low + 1e-9).all() and (upper >= exact_high - 1e-9).all(), (eps, box)
        if not box:
            # Not vacuous: without the box the first layer's bounds are the support function's exact values.
            first_low, first_high = exact[0]
            assert bounds.pre_activation[0][0].flatten().numpy() == pytest.approx(first_low, abs=1e-7)
            assert bounds.pre_activation[0][1].flatten().numpy() == pytest.approx(first_high, abs=1e-7)
        minimum = exact_minimum(net, x, eps, 3, 1.0, box)
        # exact_minimum's LPs run at HiGHS's default tolerances (1e-7).
        assert float(bounds.margin[0, 1]) <= minimum + 1e-7, (eps, box)
        if bool(bounds.certified[0]):
            assert minimum > float(bounds.safety_margin[0]) > 0, (eps, box)
        complete = milp_certify(net, batch, label, eps, TRANSPORT, box=box, time_limit=10.0)
        assert complete.margin_lower[0] <= minimum + 1e-6
        if complete.status == [S.CERTIFIED]:
            assert minimum > complete.safety_margin[0] > 0 and complete.margin_lower[0] > complete.safety_margin[0]
        if complete.status == [S.COUNTEREXAMPLE]:
            assert minimum < 0
        verdicts.append((bool(bounds.certified[0]), complete.status[0]))
    # Both verdicts occur on the grid: the comparisons above decided something.
    assert {certified for certified, _ in verdicts} == {True, False}
    assert S.CERTIFIED in {status for _, status in verdicts}


# --------------------------------------------------------------------------
# The safety margin
# --------------------------------------------------------------------------


def test_the_safety_margin_covers_the_float32_models_rounding_on_points_of_the_ball():
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 3),
    )
    model = ClassifierWithPreprocessing(nn.Identity(), net).eval()
    x = torch.as_tensor(digit_batch(2, 3, (1, 8, 8))).float()
    with torch.no_grad():
        labels = model(x).argmax(1)
    eps, count = 0.2, 200
    bounds = linear_bounds(PiecewiseLinearNetwork.of(model, x.shape[1:]), x, labels, eps, TRANSPORT, box=False)
    worst, largest_safety = 0.0, 0.0
    for b in range(x.shape[0]):
        points = torch.from_numpy(random_ball_images(x[b].double().numpy(), eps, 3, 1.0, count, seed=b)).float()
        with torch.no_grad():
            single, double = model(points).double(), copy.deepcopy(model).double()(points.double())
        label = int(labels[b])
        error = ((single[:, label, None] - single) - (double[:, label, None] - double)).abs()
        # Every point's float32 margin is within the safety margin of its exact (float64) margin, class by class.
        assert bool((error <= bounds.safety[b][None]).all())
        worst = max(worst, float(error.max()))
        largest_safety = max(largest_safety, float(bounds.safety_margin[b]))
    # The rounding is there to be covered, and the margin stays far below the network's margins.
    assert worst > 0 and largest_safety < 1e-3


@pytest.mark.parametrize("gap, expected", [(1e-7, S.UNKNOWN), (1e-2, S.CERTIFIED)])
def test_a_bound_inside_the_safety_margin_decides_nothing(gap, expected):
    # f_0 - f_1 = 1.75 - 1.5 x'_mid on 1x1x3 images; without the box x'_mid reaches eps m(x) = 1.5 eps, so the exact
    # minimum is `gap` > 0 and the unboxed linear bounds (exact for a linear network) prove it up to float64 rounding.
    x = torch.tensor([[[[0.75, 0.0, 0.75]]]])
    net = box_sensitive_network(hidden_relu=False).float()
    eps = (1.75 - gap) / 2.25
    bounds = linear_bounds(PiecewiseLinearNetwork.of(net, x.shape[1:]), x, torch.tensor([0]), eps, TRANSPORT, box=False)
    raw, safety = float(bounds.worst_margin[0]), float(bounds.safety_margin[0])
    assert raw == pytest.approx(gap, rel=1e-6) and 1e-7 < safety < 1e-5
    assert bool(bounds.certified[0]) == (expected is S.CERTIFIED)
    for certifier in Certifier:
        batch = certify_batch(net, x, torch.tensor([0]), TRANSPORT, CertifySettings(certifier, (eps,), box=False, radius_rounds=0))
        assert batch.status[0] == [expected], certifier
        assert batch.margin[0, 0] > 0 and batch.safety_margin[0, 0] >= safety
        assert (batch.margin[0, 0] > batch.safety_margin[0, 0]) == (expected is S.CERTIFIED)
        assert batch.certified_radius[0] == (eps if expected is S.CERTIFIED else 0.0)
    # The MILP on its own (no linear bounds given): the interval bound, or an LP whose optimum is the gap.
    alone = milp_certify(net, x, torch.tensor([0]), eps, TRANSPORT, box=False, time_limit=10.0)
    assert alone.status == [expected] and alone.margin_lower[0] == pytest.approx(gap, rel=1e-3, abs=1e-6)
    assert (alone.margin_lower[0] > alone.safety_margin[0]) == (expected is S.CERTIFIED)
    if expected is S.UNKNOWN:
        assert alone.safety_margin[0] > safety  # the program was solved: the solver's part is added to the floating point's


@pytest.mark.parametrize("bound, timed_out, expected", [
    (1e-12, True, S.TIMEOUT), (1e-12, False, S.UNKNOWN), (10.0, True, S.CERTIFIED), (10.0, False, S.CERTIFIED),
])
def test_a_milp_certifies_through_its_dual_bound_only_above_the_safety_margin(monkeypatch, bound, timed_out, expected):
    # Every class's solve reports `bound` as its dual bound (finished or out of time) and no incumbent.
    x = two_corner_image(0.7, 0.6)
    net = tiny_network(5, x, 0.4)
    batch = torch.from_numpy(x)[None]
    assert milp_certify(net, batch, torch.tensor([0]), 0.3, TRANSPORT, box=True, time_limit=10.0).status == [S.COUNTEREXAMPLE]

    def solve(program, encoding, label, wrong, time_limit):
        return milp_module._ClassOutcome(bound, math.inf, None, timed_out)

    monkeypatch.setattr(milp_module, "_solve_class", solve)
    result = milp_certify(net, batch, torch.tensor([0]), 0.3, TRANSPORT, box=True, time_limit=10.0)
    assert result.status == [expected]
    assert result.margin_lower[0] == bound and result.safety_margin[0] > 1e-9
    assert (result.margin_lower[0] > result.safety_margin[0]) == (expected is S.CERTIFIED)


# --------------------------------------------------------------------------
# Binarization in the model's dtype; the supported layers
# --------------------------------------------------------------------------


def test_binarization_is_read_in_the_models_dtype_with_its_own_comparison():
    threshold32 = float(torch.tensor(0.7, dtype=torch.float32))
    assert threshold32 < 0.7  # 0.7 rounds down in float32: a float32 pixel at that value reads 1 in the model, 0 in float64
    assert binarization_threshold(Binarize(0.7), torch.float32) == threshold32
    assert binarization_threshold(Binarize(0.7), torch.float64) == 0.7
    assert binarization_threshold(Binarize(0.5), torch.float32) == 0.5
    # f_0 - f_1 = 0.5 - bit of the middle pixel, which sits exactly at the float32 threshold.
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))
        net[1].bias.copy_(torch.tensor([0.5, 0.0]))
    model = ClassifierWithPreprocessing(Binarize(0.7), net).eval()
    x = torch.tensor([[[[0.2, threshold32, 0.3]]]])
    with torch.no_grad():
        logits = model(x)
    clean = float(logits[0, 0] - logits[0, 1])
    assert clean == -0.5  # the model reads the bit as 1
    network = PiecewiseLinearNetwork.of(model, x.shape[1:])
    for eps in (0.0, 1e-3):
        # The clean image is a point of every ball: no lower bound on the margin may exceed its margin there.
        for box in (False, True):
            assert float(linear_bounds(network, x, torch.tensor([0]), eps, TRANSPORT, box=box).margin[0, 1]) <= clean
        assert milp_certify(network, x, torch.tensor([0]), eps, TRANSPORT, box=True, time_limit=5.0).margin_lower[0] <= clean


class _ShiftedConv(nn.Conv2d):
    """A subclass that computes something else: its type is not on the list even though it is a Conv2d."""

    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize("layer, named", [
    (nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
    (nn.Conv2d(1, 2, 3, padding=1, padding_mode="replicate"), "padding_mode='replicate'"),
    (nn.Conv2d(1, 2, 4, padding="same"), "padding='same'"),
    (_ShiftedConv(1, 2, 3, padding=1), "_ShiftedConv"),
    (nn.MaxPool2d(1), "MaxPool2d"),
    (nn.Flatten(start_dim=2), "Flatten"),
])
def test_layers_without_a_rule_are_refused_before_any_work_naming_what_is_allowed(layer, named):
    tail = [nn.Flatten(), nn.Linear(2 * 8 * 8, 2)] if not isinstance(layer, nn.MaxPool2d) else [nn.Flatten(), nn.Linear(64, 2)]
    model = nn.Sequential(layer, nn.ReLU(), *tail) if not isinstance(layer, nn.Flatten) else nn.Sequential(layer, nn.Linear(8, 2))
    x = torch.as_tensor(digit_batch(4, 1, (1, 8, 8))).float()
    for refuse in (
        lambda: check_certifiable(model, (1, 8, 8)),
        lambda: PiecewiseLinearNetwork.of(model, (1, 8, 8)),
        lambda: certify_batch(model, x, torch.tensor([0]), TRANSPORT, CertifySettings(Certifier.LINEAR_BOUNDS, (0.01,), box=True)),
        lambda: milp_certify(model, x, torch.tensor([0]), 0.01, TRANSPORT, box=True, time_limit=1.0),
    ):
        with pytest.raises(UnsupportedNetwork, match=named) as raised:
            refuse()
        assert "supported" in str(raised.value)
    # Built directly, a network with such a layer is refused as well.
    with pytest.raises(UnsupportedNetwork, match=named):
        PiecewiseLinearNetwork(nn.Identity(), (layer, nn.ReLU(), *tail), (1, 8, 8), model)


def test_linear_on_an_unflattened_input_is_refused_and_symmetric_same_padding_is_zero_padding():
    with pytest.raises(UnsupportedNetwork, match="must read a flat input"):
        check_certifiable(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(6, 2)), (1, 8, 8))
    with pytest.raises(UnsupportedNetwork, match="must end in a Linear"):
        check_certifiable(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), (1, 8, 8))
    # padding='same' with an odd kernel is padding=1 with zeros: the same bounds.
    torch.manual_seed(0)
    same = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    ones = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    ones.load_state_dict(same.state_dict())
    x = torch.as_tensor(digit_batch(5, 2, (1, 8, 8))).float()
    labels = torch.tensor([0, 1])
    a = linear_bounds(PiecewiseLinearNetwork.of(same, (1, 8, 8)), x, labels, 0.05, TRANSPORT, box=True)
    b = linear_bounds(PiecewiseLinearNetwork.of(ones, (1, 8, 8)), x, labels, 0.05, TRANSPORT, box=True)
    assert torch.allclose(a.margin, b.margin, rtol=1e-12, atol=1e-12) and torch.allclose(a.safety, b.safety, rtol=1e-12)


@pytest.mark.parametrize("name", ["mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial"])
def test_the_certify_grids_models_pass_the_layer_check(name):
    check_certifiable(zoo.model_spec(name).build(), (1, 28, 28))


# --------------------------------------------------------------------------
# The standard evaluation suite at its full budget against the certificates
# --------------------------------------------------------------------------


def test_the_full_standard_suite_breaks_no_certified_example():
    # A tiny float32 network on 6x6 images, its logit bias set between the two closest clean margins: the three
    # examples nearest the decision boundary have certified radii just below the radii the suite verifies, so a
    # certificate that overstated its radius would be broken.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Linear(8, 2))
    model = ClassifierWithPreprocessing(nn.Identity(), net).eval()
    images = torch.as_tensor(digit_batch(3, 8, (1, 6, 6))).float()
    difference = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        ordered = torch.sort(model(images) @ difference).values
        closest = int(torch.argmin(ordered[1:] - ordered[:-1]))
        net[-1].bias[1] += float(ordered[closest] + ordered[closest + 1]) / 2
        margin = model(images) @ difference
    labels = (margin < 0).long()
    chosen = np.argsort(margin.abs().numpy(), kind="stable")[:3]
    settings = CertifySettings(Certifier.LINEAR_BOUNDS, (0.0005, 0.001, 0.002, 0.004), box=True, radius_rounds=2)
    certified = certify_batch(model, images[chosen], labels[chosen], TRANSPORT, settings).certified_radius
    assert (certified > 0).all()
    frame = evaluate(model, images[chosen], labels[chosen], Ball.wasserstein(TRANSPORT.kernel_size, TRANSPORT.p), dataset="mnist")
    # The standard suite as defined (members, budgets, refinement): every member that searches a schedule attacked
    # (the fixed-radius member starts at the standard radius 0.1, above every radius here).
    assert frame["suite"].eq("standard").all()
    scheduled = {member.name for member in attack_suite("standard", "mnist").members if member.role is not MemberRole.FIXED_RADII}
    assert len(scheduled) >= 3 and scheduled <= set(frame.attrs["member_seconds"])
    verified = frame["verified_distance"].to_numpy()
    # The suite breaks every one (the comparison bites), never at or below its certified radius.
    assert np.isfinite(verified).all()
    assert (verified > certified).all(), (verified, certified)


# --------------------------------------------------------------------------
# benchmarks/certify_soundness.py
# --------------------------------------------------------------------------


def _script():
    spec = importlib.util.spec_from_file_location("certify_soundness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_soundness_script_lists_contradictions_by_the_suite_and_counts_what_the_margin_changed(tmp_path, capsys):
    script = _script()
    assert script.main(str(tmp_path)) == 2  # nothing stored
    # Suite radii per example; certified radii (linear bounds, box) at the ladder 0.001, 0.01, 0.05, 0.1.
    write_cell(tmp_path, "mnist/alpha", suite_evaluation(), [0.02, 0.3, math.inf, 0.0])
    write_certificates(tmp_path, "mnist/alpha", [0.01, 0.1, 0.1, 0.0], misclassified=[3])
    # One undecided row whose raw bound is positive: the safety margin changed that verdict.
    shard = read_table(tmp_path, Table.CERTIFICATES).iloc[0]
    path = shard_path(tmp_path, Table.CERTIFICATES, "mnist", "mnist/alpha", shard["shard_id"], shard["cell_id"])
    table = pq.read_table(path).to_pandas()
    changed = (table["example_index"] == 0) & (table["eps"] == 0.05)
    assert table.loc[changed, "status"].tolist() == ["unknown"]
    table.loc[changed, "margin_lower"] = 1e-7
    pq.write_table(pa.Table.from_pandas(table, schema=pq.read_schema(path), preserve_index=False), path)
    # A plain attack's verified radius within a certificate is certificate_violations' business, not this script's.
    write_cell(tmp_path, "mnist/alpha", attack("plan_pgd_box"), [0.005, math.inf, math.inf, 0.0])
    assert script.main(str(tmp_path)) == 0
    counts = script.margin_table(read_table(tmp_path, Table.CERTIFICATES)).set_index("eps")
    assert counts["changed_by_margin"].to_dict() == {0.001: 0, 0.01: 0, 0.05: 1, 0.1: 0}
    assert counts.loc[0.1, "certified"] == 2 and counts.loc[0.05, "evaluated"] == 3
    # A plain attack's contradiction is not the suite's; a suite radius within a certified one is.
    write_cell(tmp_path, "mnist/beta", suite_evaluation(), [0.05, math.inf])
    write_certificates(tmp_path, "mnist/beta", [0.1, 0.001])
    capsys.readouterr()
    assert script.main(str(tmp_path)) == 1
    found = script.contradictions(read_table(tmp_path, Table.EXAMPLES), read_table(tmp_path, Table.CERTIFICATES))
    assert found[["model", "example_index"]].drop_duplicates().values.tolist() == [["mnist/beta", 0]]
    assert sorted(found["eps"]) == [0.05, 0.1] and (found["suite"] == "standard").all()
    assert "2 certificate(s) contradicted by a verified suite radius" in capsys.readouterr().out
