"""The standard evaluation: schedules, per-example radii, the suite's guarantees, ``harness.evaluate`` and the suite grid.

The suite runs on generated problems: a small convolutional network that is
not in the zoo, on 12x12 digit-like images, with the suite's budgets cut
(every member and the refinement keep their roles and order). Every claim
is re-checked here with the exact LP, independently of the suite's own
verification.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import harness
import zoo
from harness.attack import suite as suite_module
from harness.attack.ball import Ball
from harness.attack.pgd import EpsSchedule, PGDAttack
from harness.attack.spec import PROTOCOLS
from harness.attack.suite import MemberRole, attack_suite, evaluate_batch
from harness.run.benchmark import run_benchmark
from harness.run.grid import GridError, expand_blocks
from harness.run.kinds import SuiteCell
from harness.run.store import Table, read_table
from harness.attack.verify import Verification
from harness.vocabulary import VerificationStatus
from solvers.iterate import StepRule
from solvers.exact import local_ot_distance
from conftest import digit_batch

pytestmark = pytest.mark.usefixtures("single_thread")

BALL = Ball.wasserstein(3, 1.0)
RADII = (0.02, 0.05, 0.1)
LATEST = max(version for name, dataset, version in suite_module.SUITES if (name, dataset) == ("standard", "mnist"))


def _cut(suite, iterations: int = 12):
    """The suite with every budget cut to ``iterations`` steps, its structure kept."""

    def cut_member(member):
        if member.role is MemberRole.FIXED_RADII:
            return replace(member, attack=replace(member.attack, schedule=EpsSchedule.fixed(1.0, iterations)))
        return replace(member, attack=replace(member.attack, schedule=EpsSchedule(0.005, 1.3, 1, iterations)))

    refinement = replace(suite.refinement, member=cut_member(suite.refinement.member), rounds=2)
    return replace(suite, radii=RADII, members=tuple(cut_member(m) for m in suite.members), refinement=refinement)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 12 * 12, 10)).double()
    x = torch.as_tensor(digit_batch(3, 8, (1, 12, 12)))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10  # one clean misclassification
    return model.eval(), x, y


@pytest.fixture(scope="module")
def evaluated(problem):
    model, x, y = problem
    suite = _cut(attack_suite("standard", "mnist"))
    return suite, evaluate_batch(model, x, y, BALL, suite)


def test_additive_and_multiplicative_schedules():
    hu = PROTOCOLS["hu2020"].schedule
    assert [hu.eps_at(t) for t in (0, 1, 2)] == pytest.approx([0.01, 0.02, 0.03])
    assert hu.final_eps == pytest.approx(2.0)
    assert EpsSchedule(0.3, 1.1, 10, 200).eps_at(25) == pytest.approx(0.3 * 1.1**2)
    assert PROTOCOLS["wu2020_mnist"].schedule.final_eps == 0.5
    with pytest.raises(ValueError, match="increment=-0.1 is invalid"):
        EpsSchedule(0.1, increment=-0.1)


def test_per_example_radii_and_giving_up(problem):
    model, x, y = problem
    iterate = BALL.iterate(zoo.solver_spec("plan_pgd_box"), {}, None, None)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0, 1.0, 1.0, 1.0], dtype=x.dtype)
    ceiling = torch.tensor([math.inf] * 4 + [0.0, 0.02, math.inf, math.inf], dtype=x.dtype)
    result = PGDAttack(model, iterate, EpsSchedule(0.01, 1.5, 1, 10)).run(x, y, radius_scale=scale, give_up_above=ceiling)
    moved = result.success & (result.eps_found > 0)
    # A found radius is the schedule's radius at that step times the example's scale.
    steps = torch.log(result.eps_found[moved] / (0.01 * scale[moved])) / math.log(1.5)
    assert torch.allclose(steps, steps.round(), atol=1e-6)
    assert int(result.steps[4]) == 0  # gave up before the first step
    assert float(result.eps_found[5]) <= 0.02 or not bool(result.success[5])
    assert int(result.steps[5]) <= 2
    with pytest.raises(ValueError, match="radius_scale=0.0 \\(example 1\\) is invalid"):
        PGDAttack(model, iterate, EpsSchedule(0.01)).run(x, y, radius_scale=torch.tensor([1.0, 0, 1, 1, 1, 1, 1, 1]))


def test_every_suite_radius_is_an_exact_distance_of_a_misclassified_image(problem, evaluated):
    model, x, y = problem
    _, outcome = evaluated
    columns = outcome.columns
    assert columns["verification_status"][0] == int(VerificationStatus.CLEAN_MISCLASSIFIED)
    assert columns["verified_distance"][0] == 0 and columns["found_by"][0] == suite_module.CLEAN
    with torch.no_grad():
        predictions = model(outcome.adversarial).argmax(1)
    broken = np.flatnonzero(np.isfinite(columns["verified_distance"]) & (columns["verified_distance"] > 0))
    assert broken.size >= 4
    for index in broken:
        assert int(predictions[index]) != int(y[index])
        exact = local_ot_distance(x[index].numpy(), outcome.adversarial[index].numpy(), 3, 1.0)
        assert exact.cost == pytest.approx(columns["verified_distance"][index], rel=1e-6, abs=1e-9)
        assert float(outcome.adversarial[index].max()) <= 1 + 1e-6
    # The refined radius counts, and never exceeds the schedule's.
    assert np.all(columns["verified_distance"] <= columns["schedule_radius"])
    assert np.any(columns["verified_distance"] < columns["schedule_radius"])
    assert set(columns["refined_by"][broken]) <= {"none", "segment", "bisection"}


def test_the_suite_is_at_least_as_strong_as_each_of_its_schedule_members_alone(problem, evaluated):
    model, x, y = problem
    suite, outcome = evaluated
    for member in suite.members:
        if member.role is not MemberRole.SCHEDULE:
            continue
        result = member.attack.attack(model, BALL, 0).run(x, y)
        alone = BALL.verify(model, x, y, result).verified_distance
        assert np.all(outcome.columns["verified_distance"] <= alone + 1e-12), member.name


def test_only_better_verified_claims_are_kept_and_rejected_ones_are_counted(problem):
    _, x, y = problem
    best = suite_module._Best(x[:3], y[:3], y[:3])
    codes = VerificationStatus

    def verdict(statuses, distances, images):
        n = len(statuses)
        return Verification(
            status=np.array([int(s) for s in statuses]), verified_distance=np.array(distances, dtype=float),
            distance=np.array(distances, dtype=float), mass_error=np.zeros(n), box_violation=np.zeros(n),
            unreachable_mass=np.zeros(n), prediction=np.array([7] * n), image=images,
        )

    images = x[:3] * 0.5
    first = verdict([codes.VERIFIED, codes.RADIUS_EXCEEDED, codes.NOT_FOUND], [0.3, math.inf, math.inf], images)
    assert best.absorb(np.arange(3), first, "a", suite_module.RefinementStep.NONE).tolist() == [True, False, False]
    second = verdict([codes.VERIFIED, codes.VERIFIED], [0.4, 0.2], images[:2] * 0.5)
    assert best.absorb(np.array([0, 1]), second, "b", suite_module.RefinementStep.SEGMENT).tolist() == [False, True]
    # The kept image is the verified (stored) one of the claim that won.
    assert torch.equal(best.image[0], images[0]) and torch.equal(best.image[1], images[1] * 0.5) and torch.equal(best.image[2], x[2])
    assert best.radius.tolist() == [0.3, 0.2, math.inf] and best.rejected_claims.tolist() == [0, 1, 0]
    # A refinement keeps the member that found the example (none yet for example 1) and says it refined it.
    assert best.found_by.tolist() == ["a", "", ""] and best.refined_by.tolist() == ["none", "segment", "none"]


def test_evaluate_on_a_model_outside_the_zoo_returns_one_row_per_example(problem, monkeypatch):
    model, x, y = problem
    monkeypatch.setitem(suite_module.SUITES, ("standard", "mnist", LATEST), _cut(attack_suite("standard", "mnist"), iterations=4))
    frame = harness.evaluate(model, x[:5], y[:5], BALL, dataset="mnist", batch_size=3)
    assert isinstance(frame, pd.DataFrame) and list(frame["example_index"]) == [0, 1, 2, 3, 4]
    assert set(frame["suite"]) == {"standard"} and set(frame["suite_version"]) == {LATEST}
    assert frame.attrs["robust_accuracy"] == {r: float((frame["verified_distance"] > r).mean()) for r in RADII}
    assert frame.attrs["median_radius"] == float(np.median(frame["verified_distance"]))
    assert "plan_pgd_box_targeted" in frame["suite_json"][0]
    with pytest.raises(ValueError, match="match no data set"):
        harness.evaluate(model, x, y, BALL)
    with pytest.raises(ValueError, match="suites attack Wasserstein balls"):
        harness.evaluate(model, x, y, Ball.of("linf"), dataset="mnist")
    with pytest.raises(ValueError, match="suite='strong' for dataset='mnist' does not exist"):
        harness.evaluate(model, x, y, BALL, suite="strong", dataset="mnist")


def test_the_2020_presets_expand_and_only_an_additive_schedule_records_its_increment():
    blocks = [
        {"dataset": "mnist", "model": "mnist/wasserstein_adversarial", "solver": "projected_sinkhorn_box", "protocol": "hu2020", "n_examples": 1},
        {"dataset": "mnist", "model": "mnist/wasserstein_adversarial", "solver": "plan_pgd_box", "protocol": "wu2020_mnist", "n_examples": 1},
    ]
    hu, wu = expand_blocks(blocks)
    assert hu.attack.schedule == EpsSchedule(0.01, 1.0, 1, 200, increment=0.01) and hu.attack.step_rule.value == "linf_normalized_mass"
    assert hu.config()["eps_increment"] == 0.01 and hu.final_eps == pytest.approx(2.0)
    assert "eps_increment" not in wu.config() and wu.attack.schedule == EpsSchedule.fixed(0.5, 300)
    assert dict(wu.attack.hyperparameters)["step_size"] == 0.1 and (wu.ball.transport.kernel_size, wu.ball.transport.p) == (5, 1.0)


def test_suite_blocks_refuse_attack_settings():
    block = {"dataset": "mnist", "model": "mnist/standard", "suite": "standard", "kernel_size": 5, "p": 1, "n_examples": 2}
    (cell,) = expand_blocks([block])
    assert isinstance(cell, SuiteCell) and cell.label == f"standard v{LATEST}" and cell.config()["suite_version"] == LATEST
    (first,) = expand_blocks([{**block, "suite_version": 1}])
    assert first.label == "standard v1" and first.cell_id != cell.cell_id
    with pytest.raises(GridError, match="suite='standard' version=9 for dataset='mnist' does not exist; suites: .*standard v1"):
        expand_blocks([{**block, "suite_version": 9}])
    with pytest.raises(GridError, match="'eps_initial', 'solver' cannot be set with suite='standard'"):
        expand_blocks([{**block, "solver": "plan_pgd_box", "eps_initial": 0.1}])
    with pytest.raises(GridError, match="suites attack Wasserstein balls"):
        expand_blocks([{**block, "threat_model": "linf"}])
    with pytest.raises(GridError, match="model 'mnist/standard' classifies mnist, not dataset='cifar10'"):
        expand_blocks([{**block, "dataset": "cifar10"}])


def test_suite_grid_lands_on_disk_and_a_rerun_resumes(world, tmp_path, monkeypatch):
    monkeypatch.setitem(suite_module.SUITES, ("standard", "mnist", LATEST), _cut(attack_suite("standard", "mnist"), iterations=3))
    config = {
        "grid": {"name": "evaluate", "blocks": [
            {"dataset": "mnist", "model": "mnist/standard", "suite": "standard", "kernel_size": 5, "p": 1, "n_examples": 3},
        ]},
        "models": [world.model], "executor": "local", "n_examples": None, "seed": None, "data_root": str(world.data_root),
        "weights_dir": str(world.weights_dir), "download": False, "results_dir": str(tmp_path / "results"), "device": "cpu",
        "batch_size": 2, "gallery_examples": 1, "report": False, "dry_run": False, "plugins": [str(world.plugin)],
        "ray": {"address": None, "gpus_per_actor": 1.0, "cpus_per_actor": 1, "max_retries": 0, "num_cpus": 2},
    }
    printed = io.StringIO()
    assert run_benchmark(config, printed) == 0
    examples = read_table(tmp_path / "results", Table.EXAMPLES)
    robust = ", ".join(f"{r:g}: {100 * (examples['verified_distance'] > r).mean():.1f}%" for r in RADII)
    assert f"standard v{LATEST}  {world.model}" in printed.getvalue() and robust in printed.getvalue()
    assert len(examples) == 3 and set(examples["model"].astype(str)) == {world.model}
    assert set(examples["suite"]) == {"standard"} and examples["suite_json"].str.contains(f'"version": {LATEST}').all()
    assert (examples["verified_distance"] <= examples["schedule_radius"]).all()
    assert examples["solver"].isna().all() and examples["found_by"].notna().all() and examples["rejected_claims"].notna().all()
    cells = read_table(tmp_path / "results", Table.CELLS)
    assert cells["attack_summary"].str.startswith(f"attack suite standard v{LATEST}").all()
    written = sorted(path.stat().st_mtime_ns for path in (tmp_path / "results").rglob("*.parquet") if "examples" in str(path))
    assert run_benchmark(config) == 0
    assert sorted(path.stat().st_mtime_ns for path in (tmp_path / "results").rglob("*.parquet") if "examples" in str(path)) == written
    config["models"] = ["cifar10/resnet18"]
    assert run_benchmark(config) == 2


@pytest.mark.parametrize("version", [1, 2])
def test_earlier_versions_keep_their_definitions_and_stay_runnable(problem, version):
    import json
    from pathlib import Path

    pinned = json.loads((Path(__file__).parent / "pinned" / f"suite_standard_v{version}.json").read_text())
    for dataset, definition in pinned.items():
        assert json.loads(attack_suite("standard", dataset, version).definition_json()) == definition
    assert attack_suite("standard", "mnist").version == LATEST > version
    model, x, y = problem
    outcome = evaluate_batch(model, x[:4], y[:4], BALL, _cut(attack_suite("standard", "mnist", version), iterations=4))
    members = {m.name for m in attack_suite("standard", "mnist", version).members}
    assert set(outcome.columns["found_by"]) <= members | {"", suite_module.CLEAN}


def test_a_start_plan_is_the_attacks_first_iterate(problem):
    from solvers.plan_space import identity_plan

    model, x, y = problem
    iterate = BALL.iterate(zoo.solver_spec("plan_pgd_box"), {}, None, None)
    verdict = BALL.verify(model, x, y, PGDAttack(model, iterate, EpsSchedule(0.01, 1.5, 1, 12)).run(x, y))
    broken = [b for b in sorted(verdict.plans) if verdict.verified_distance[b] > 0]
    assert broken
    plans = torch.stack([torch.from_numpy(verdict.plans[b]) for b in broken]).to(x)
    chosen = torch.as_tensor(broken)
    # At its own radius the verified plan is adversarial before any step: found at step 0, at that plan's image.
    radius = torch.as_tensor(verdict.verified_distance[broken], dtype=x.dtype) * (1 + 1e-6)
    started = PGDAttack(model, iterate, EpsSchedule.fixed(1.0, 5)).run(x[chosen], y[chosen], radius_scale=radius, start_plans=plans)
    assert bool(started.success.all()) and int(started.steps.sum()) == 0
    assert torch.allclose(started.adversarial, verdict.image[chosen], atol=1e-9)
    # The mix with the identity plan costs that fraction of the verified radius.
    t = 0.5
    mixed = t * plans + (1 - t) * identity_plan(x[chosen], 3)
    distances = [local_ot_distance(x[b].numpy(), image.numpy(), 3, 1.0).cost for b, image in zip(broken, iterate.geometry.image(mixed, x[chosen]))]
    assert np.all(np.array(distances) <= t * verdict.verified_distance[broken] * (1 + 1e-6) + 1e-12)
    sinkhorn = BALL.iterate(zoo.solver_spec("projected_sinkhorn"), {}, StepRule.LINF_SIGN, 0.1)
    with pytest.raises(ValueError, match="start_plans is for plan-space solvers"):
        PGDAttack(model, sinkhorn, EpsSchedule(0.01)).run(x[chosen], y[chosen], start_plans=plans)


def test_a_banded_member_attacks_only_below_the_radius_found_and_from_its_band(problem, monkeypatch):
    model, x, y = problem
    suite = attack_suite("standard", "mnist")
    banded = next(member for member in suite.members if member.band is not None and member.role is MemberRole.SCHEDULE)
    run = suite_module._SuiteRun(model, x, y, BALL, 0)
    run.best.radius[:] = [0.0, 0.2, np.inf, 0.4, np.inf, 0.1, 0.3, 0.05]
    calls = []
    monkeypatch.setattr(run, "_attack", lambda member, indices, *args, **options: calls.append((indices, options)))
    run._member(banded, suite.radii)
    (in_band, band_options), (unbroken, plain_options) = calls
    assert in_band.tolist() == [1, 3, 5, 6, 7] and unbroken.tolist() == [2, 4]
    start = band_options["radius_scale"].numpy() * banded.schedule.initial
    assert np.allclose(start, banded.band * run.best.radius[in_band])
    assert np.allclose(band_options["give_up_above"].numpy(), run.best.radius[in_band])
    assert "radius_scale" not in plain_options and np.isinf(plain_options["give_up_above"].numpy()).all()
    with pytest.raises(ValueError, match="band=1.5 is invalid"):
        replace(banded, band=1.5)
    with pytest.raises(ValueError, match="warm_start is for fixed_radii members"):
        replace(banded, warm_start=True)


def test_verification_in_worker_processes_gives_the_same_verdicts(problem, evaluated):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    model, x, y = problem
    suite, alone = evaluated
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pooled = evaluate_batch(model, x, y, BALL, suite, verify_executor=pool)
    for name in ("verification_status", "verified_distance", "found_by", "refined_by", "steps", "rejected_claims"):
        assert np.array_equal(pooled.columns[name], alone.columns[name]), name
    assert torch.equal(pooled.adversarial, alone.adversarial)
    assert pooled.verify_seconds > 0
