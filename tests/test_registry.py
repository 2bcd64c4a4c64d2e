"""Tests for the solver catalogue (zoo/solvers.py) and its input validation.

Errors must be ValueErrors whose message names the offending value and,
for unknown names, lists what is allowed. Custom solvers are registered in
isolated :class:`zoo.SolverRegistry` objects so the global catalogue is left
untouched.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import zoo
from conftest import digit_batch, exact_check_batch, mixed_push, tensor
from solvers import LocalTransport, Projector, SolveInfo, SolveStatus, projected_sinkhorn
from solvers.exact import exact_projection

pytestmark = pytest.mark.usefixtures("single_thread")

BUILTINS = ("exact_projection", "projected_sinkhorn", "projected_sinkhorn_box")
SINKHORN_TUNABLE = {"lam", "tol", "max_iter", "relaxation"}


def _problem(dtype=torch.float64, batch=2, shape=(1, 6, 6)):
    x = digit_batch(5, batch, shape)
    return tensor(x, dtype), tensor(mixed_push(x, 6), dtype)


# --------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------


def test_builtins_registered_and_usable():
    names = [spec.name for spec in zoo.solver_specs()]
    assert names == sorted(names)
    assert set(BUILTINS) <= set(names)
    x, w = _problem()
    for name in BUILTINS:
        spec = next(s for s in zoo.solver_specs() if s.name == name)
        assert spec.kind is zoo.SolverKind.IMAGE_SPACE and spec.summary and spec.reference
        solver = zoo.solver(name, kernel_size=3)
        assert isinstance(solver, Projector)
        z, info = solver.project(x, w, 0.3)
        assert isinstance(info, SolveInfo) and z.shape == x.shape and z.dtype == x.dtype
        exact_check_batch(x, z, 0.3, 3, 2.0, box=name.endswith("box"))


def test_pinned_variants_and_declarations_are_checked_at_registration():
    registry = zoo.SolverRegistry()

    class Boxable:
        def __init__(self, kernel_size=5, p=2.0, box=False, rounds=2):
            self.box, self.rounds = box, rounds

        def project(self, x, w, eps): ...

    rounds = zoo.Hyperparameter("rounds", int, 2, "inner rounds", low=1)
    for name, box in (("boxable", False), ("boxable_box", True)):
        zoo.register_solver(name, registry=registry, hyperparameters=(rounds,), fixed={"box": box},
                            box=zoo.BoxHandling.INSIDE if box else zoo.BoxHandling.NONE)(Boxable)
    assert registry.spec("boxable_box").create(rounds=4).box is True
    assert registry.spec("boxable").create().box is False
    with pytest.raises(ValueError, match="has no hyperparameter 'box'"):
        registry.spec("boxable").create(box=True)
    with pytest.raises(ValueError, match=r"'depth' not arguments of the factory"):
        zoo.register_solver("deep", registry=registry, hyperparameters=(zoo.Hyperparameter("depth", int, 2, "d"),))(Boxable)
    with pytest.raises(ValueError, match=r"'rounds' both pinned and tunable"):
        zoo.register_solver("both", registry=registry, hyperparameters=(rounds,), fixed={"rounds": 3})(Boxable)
    with pytest.raises(ValueError, match=r"default of hyperparameter 'rounds' is not allowed: rounds=0 is invalid"):
        zoo.Hyperparameter("rounds", int, 0, "inner rounds", low=1)
    with pytest.raises(ValueError, match=r"'kernel_size' is invalid: it must be a Python identifier other than kernel_size, p"):
        zoo.Hyperparameter("kernel_size", int, 5, "the ball's")


@pytest.mark.parametrize("name", ["plan_pgd", "plan_pgd_box", "frank_wolfe", "frank_wolfe_box"])
def test_plan_space_entries_build_ball_iterates_the_attack_uses_as_they_are(name):
    from harness.attack.pgd import make_iterate
    from solvers.iterate import BallIterate

    spec = zoo.solver_spec(name)
    assert spec.kind is zoo.SolverKind.PLAN_SPACE and "lam" not in spec.defaults and "box" not in spec.defaults
    iterate = zoo.solver(name, kernel_size=3, p=1.0)
    assert isinstance(iterate, BallIterate) and make_iterate(iterate) is iterate
    assert iterate.box is name.endswith("_box")
    with pytest.raises(ValueError, match="has no hyperparameter 'lam'"):
        zoo.solver(name, lam=1000.0)


def test_unknown_solver_lists_registered_names():
    with pytest.raises(ValueError, match="projected_sinkhorn_typo") as error:
        zoo.solver("projected_sinkhorn_typo")
    for name in BUILTINS:
        assert name in str(error.value)


@pytest.mark.parametrize("name", BUILTINS)
def test_unknown_hyperparameter_lists_allowed_ones(name):
    with pytest.raises(ValueError, match="lamda") as error:
        zoo.solver(name, lamda=10.0)
    message = str(error.value)
    spec = next(s for s in zoo.solver_specs() if s.name == name)
    assert spec.hyperparameters or "hyperparameters: none" in message
    for declared in spec.hyperparameters:
        assert declared.describe() in message, f"{declared.name!r} missing from: {message}"


@pytest.mark.parametrize("name", ["projected_sinkhorn", "projected_sinkhorn_box"])
def test_pinned_box_is_not_a_hyperparameter(name):
    """The two Sinkhorn entries pin ``box``; overriding it is an unknown hyperparameter."""
    with pytest.raises(ValueError, match="box"):
        zoo.solver(name, box=not name.endswith("box"))


def test_defaults_list_tunable_and_exclude_pinned():
    specs = {spec.name: spec for spec in zoo.solver_specs()}
    for name in ("projected_sinkhorn", "projected_sinkhorn_box"):
        defaults = specs[name].defaults
        assert set(defaults) == SINKHORN_TUNABLE
        assert "box" not in defaults
        assert defaults["lam"] == 1000.0
    assert specs["projected_sinkhorn_box"].fixed == {"box": True}
    assert specs["projected_sinkhorn_box"].box is zoo.BoxHandling.INSIDE
    assert specs["projected_sinkhorn"].box is zoo.BoxHandling.NONE
    assert specs["exact_projection"].defaults == {}


def test_hyperparameters_reach_the_solver():
    """zoo.solver(...).project equals a direct projected_sinkhorn call with the same settings."""
    x, w = _problem()
    settings = dict(kernel_size=3, p=1.0, lam=200.0, tol=1e-5, max_iter=50, relaxation=1.2)
    z, info = zoo.solver("projected_sinkhorn", **settings).project(x, w, 0.2)
    z_direct, info_direct = projected_sinkhorn(
        x, w, 0.2, LocalTransport(3, 1.0), lam=200.0, tol=1e-5, max_iter=50, box=False, relaxation=1.2
    )
    assert torch.equal(z, z_direct)
    assert torch.equal(info.iterations, info_direct.iterations)


def test_box_entry_enforces_box():
    """projected_sinkhorn_box keeps z <= 1 where the free projection does not.

    x is a 3x3 block of 0.8; w asks for all its mass on the centre pixel. With
    a large radius the free projection piles mass above 1 on the centre; the
    box entry must not.
    """
    x = np.zeros((1, 1, 7, 7))
    x[0, 0, 2:5, 2:5] = 0.8
    w = np.zeros_like(x)
    w[0, 0, 3, 3] = x.sum()
    xt, wt = tensor(x), tensor(w)
    z_free, _ = zoo.solver("projected_sinkhorn", kernel_size=3).project(xt, wt, 1.0)
    assert float(z_free.max()) > 1.5, "control: the free projection should exceed the box"
    z_box, info = zoo.solver("projected_sinkhorn_box", kernel_size=3).project(xt, wt, 1.0)
    assert float(z_box.max()) <= 1.0 + 1e-6
    exact_check_batch(xt, z_box, 1.0, 3, 2.0, box=True)
    z_exact, _ = zoo.solver("exact_projection_box", kernel_size=3).project(xt, wt, 1.0)
    np.testing.assert_allclose(z_exact.numpy()[0], exact_projection(x[0], w[0], 1.0, 3, 2.0, box=True), atol=1e-12)
    assert float(z_exact.max()) <= 1.0 + 1e-9


def test_exact_projection_entry_matches_reference():
    x, w = _problem()
    z, info = zoo.solver("exact_projection", kernel_size=3, p=1.0).project(x, w, 0.3)
    for b in range(2):
        np.testing.assert_allclose(z[b].numpy(), exact_projection(x[b].numpy(), w[b].numpy(), 0.3, 3, 1.0), atol=1e-12)
    assert info.status_names() == ["CONVERGED"] * 2


# --------------------------------------------------------------------------
# Invalid hyperparameter values
# --------------------------------------------------------------------------

INVALID = [
    ("kernel_size", 4),
    ("kernel_size", 2),
    ("kernel_size", 1),
    ("kernel_size", -3),
    ("kernel_size", 3.0),
    ("kernel_size", True),
    ("p", 0),
    ("p", -1.0),
    ("p", math.inf),
    ("lam", 0),
    ("lam", -5.0),
    ("lam", math.nan),
    ("lam", math.inf),
    ("relaxation", 0.0),
    ("relaxation", 2.0),
    ("relaxation", 2.5),
    ("relaxation", -0.5),
    ("tol", 0.0),
    ("max_iter", 0),
    ("max_iter", 2.5),
]


@pytest.mark.parametrize("name", ["projected_sinkhorn", "projected_sinkhorn_box"])
@pytest.mark.parametrize("parameter,value", INVALID, ids=[f"{p}={v!r}" for p, v in INVALID])
def test_invalid_value_named(name, parameter, value):
    with pytest.raises(ValueError, match=re.escape(f"{parameter}={value!r}")):
        zoo.solver(name, **{parameter: value})


@pytest.mark.parametrize("parameter,value", [("kernel_size", 6), ("p", -2.0)])
def test_invalid_value_named_exact(parameter, value):
    with pytest.raises(ValueError, match=re.escape(f"{parameter}={value!r}")):
        zoo.solver("exact_projection", **{parameter: value})


@pytest.mark.parametrize("value", [1e-3, 1.0, 1.999])
def test_relaxation_inside_open_interval_accepted(value):
    x, w = _problem()
    z, _ = zoo.solver("projected_sinkhorn", kernel_size=3, relaxation=value, max_iter=20).project(x, w, 0.3)
    exact_check_batch(x, z, 0.3, 3, 2.0)


# --------------------------------------------------------------------------
# Invalid inputs at project time
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_project_rejects_bad_inputs(name):
    solver = zoo.solver(name, kernel_size=3)
    x, w = _problem()
    with pytest.raises(ValueError, match=r"eps=-0\.1"):
        solver.project(x, w, -0.1)
    with pytest.raises(ValueError, match=r"eps=-0\.5 \(example 1\)"):
        solver.project(x, w, torch.tensor([0.1, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"eps=nan"):
        solver.project(x, w, math.nan)
    with pytest.raises(ValueError, match=r"eps has shape \(3,\)"):
        solver.project(x, w, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    negative = x.clone()
    negative[1, 0, 2, 2] = -0.25
    with pytest.raises(ValueError, match=r"x has negative entries \(min -0\.25\)"):
        solver.project(negative, w, 0.1)
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 1, 6, 6\).*\(2, 1, 6, 5\)"):
        solver.project(x, w[..., :5], 0.1)
    with pytest.raises(ValueError, match=r"\(1, 6, 6\).*4 dimensions"):
        solver.project(x[0], w[0], 0.1)
    for bad in (torch.float16, torch.int64):
        with pytest.raises(ValueError, match=re.escape(f"dtype {bad}")):
            solver.project(x.to(bad), w.to(bad), 0.1)
    with pytest.raises(ValueError, match="share dtype"):
        solver.project(x, w.float(), 0.1)
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        solver.project(nan_x, w, 0.1)
    with pytest.raises(ValueError, match="w must be a torch.Tensor"):
        solver.project(x, w.numpy(), 0.1)


def test_box_entry_rejects_centre_above_one():
    x, w = _problem()
    x[0, 0, 1, 1] = 1.5
    with pytest.raises(ValueError, match=r"above 1 \(max 1\.5\)"):
        zoo.solver("projected_sinkhorn_box").project(x, w, 0.1)


# --------------------------------------------------------------------------
# Custom solvers in an isolated registry
# --------------------------------------------------------------------------


def _make_custom(registry):
    @zoo.register_solver(
        "stay_put", registry=registry, reference="a test",
        hyperparameters=(zoo.Hyperparameter("patience", int, 3, "iterations it pretends to spend", low=1),),
    )
    class StayPut:
        """Returns the centre: trivially inside every ball."""

        def __init__(self, kernel_size=5, p=2.0, patience=3):
            self.transport = LocalTransport(kernel_size, p)
            self.patience = patience

        def project(self, x, w, eps):
            batch = x.shape[0]
            zeros = torch.zeros(batch, dtype=x.dtype)
            info = SolveInfo(
                iterations=torch.full((batch,), self.patience, dtype=torch.int64),
                converged=torch.ones(batch, dtype=torch.bool),
                transport_cost=zeros,
                status=torch.full((batch,), int(SolveStatus.CONVERGED)),
                marginal_error=zeros,
                repair=zeros,
                log_domain=torch.zeros(batch, dtype=torch.bool),
            )
            return x.clone(), info

    return StayPut


def test_custom_solver_in_isolated_registry():
    registry = zoo.SolverRegistry()
    factory = _make_custom(registry)
    assert factory.__name__ == "StayPut", "the decorator must return the class unchanged"
    assert registry.names() == ["stay_put"]
    assert "stay_put" not in [spec.name for spec in zoo.solver_specs()], "isolated registry leaked into the global one"
    with pytest.raises(ValueError, match="stay_put"):
        zoo.solver("stay_put")

    spec = registry.spec("stay_put")
    assert spec.summary == "Returns the centre: trivially inside every ball."
    assert spec.reference == "a test" and spec.kind is zoo.SolverKind.IMAGE_SPACE
    assert spec.defaults == {"patience": 3}
    solver = spec.create(kernel_size=3, patience=7)
    assert isinstance(solver, Projector)
    x, w = _problem()
    z, info = solver.project(x, w, 0.2)
    assert torch.equal(z, x) and info.iterations.tolist() == [7, 7]
    with pytest.raises(ValueError, match=r"patients.*patience \(an integer >= 1; default 3\)"):
        spec.create(patients=4)
    with pytest.raises(ValueError, match=r"patience=0 is invalid: it must be an integer >= 1"):
        spec.create(patience=0)
    with pytest.raises(ValueError, match=r"unknown solver 'nope'; registered solvers: stay_put"):
        registry.spec("nope")


def test_duplicate_registration_raises():
    registry = zoo.SolverRegistry()
    _make_custom(registry)
    with pytest.raises(ValueError, match="'stay_put' is already registered"):
        _make_custom(registry)
    assert registry.names() == ["stay_put"]
    # The built-in names are taken in the global catalogue as well.
    with pytest.raises(ValueError, match="'projected_sinkhorn' is already registered"):
        zoo.register_solver("projected_sinkhorn", summary="impostor")(lambda kernel_size=5, p=2.0: None)
    assert len([s for s in zoo.solver_specs() if s.name == "projected_sinkhorn"]) == 1
    # A registry seeded with the built-ins is independent of the global one.
    seeded = zoo.SolverRegistry(zoo.BUILTIN_SOLVERS)
    _make_custom(seeded)
    assert seeded.names() == sorted([*(spec.name for spec in zoo.BUILTIN_SOLVERS), "stay_put"])
    with pytest.raises(ValueError, match="already registered"):
        zoo.SolverRegistry(zoo.BUILTIN_SOLVERS + zoo.BUILTIN_SOLVERS[:1])
