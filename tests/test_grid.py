"""Tests of grid expansion and validation (harness/run/grid.py) and of the shard runner (harness/run/runner.py).

The runner tests attack the synthetic plugin model of :mod:`synthetic`
(fixture ``world``), so they need no downloaded data or weights.
"""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest

import zoo
from harness.attack.ball import Ball
from harness.run.grid import GridError, expand_blocks
from harness.run.runner import RunContext, ShardRunner
from harness.run.store import Table, read_table
from harness.vocabulary import BallKind, CellStatus, VerificationStatus

pytestmark = pytest.mark.usefixtures("single_thread")

PAPER_MODELS = ["mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial"]


def test_axes_expand_to_their_product_with_protocol_defaults():
    cells = expand_blocks(
        [{"dataset": "mnist", "model": PAPER_MODELS, "solver": ["projected_sinkhorn", "projected_sinkhorn_box"],
          "protocol": "paper_mnist", "n_examples": 10}]
    )
    assert len(cells) == 8
    assert {(c.model, c.attack.solver) for c in cells} == {(m, s) for m in PAPER_MODELS for s in ("projected_sinkhorn", "projected_sinkhorn_box")}
    cell = cells[0]
    assert cell.ball == Ball.wasserstein(5, 1.0) and cell.ball.kind is BallKind.WASSERSTEIN
    assert (dict(cell.attack.hyperparameters)["lam"], cell.attack.schedule.initial, cell.attack.schedule.iterations) == (1000.0, 0.3, 200)
    assert cell.attack.clamp is False


def test_block_settings_override_the_protocol_and_duplicates_merge():
    blocks = [
        {"dataset": "mnist", "model": "mnist/standard", "solver": "projected_sinkhorn", "protocol": "paper_mnist",
         "kernel_size": [3, 5, 7], "n_examples": 4},
        {"dataset": "mnist", "model": "mnist/standard", "solver": "projected_sinkhorn", "protocol": "paper_mnist", "n_examples": 4},
    ]
    cells = expand_blocks(blocks)
    assert sorted(c.ball.transport.kernel_size for c in cells) == [3, 5, 7]  # the second block repeats the k=5 cell
    assert len({c.cell_id for c in cells}) == 3
    assert expand_blocks(blocks, {"n_examples": 9})[0].n_examples == 9


def test_ids_are_stable_and_depend_on_every_setting():
    block = {"dataset": "mnist", "model": "mnist/standard", "solver": "projected_sinkhorn", "protocol": "paper_mnist", "n_examples": 4}
    (cell,) = expand_blocks([block])
    (again,) = expand_blocks([dict(block)])
    assert cell.cell_id == again.cell_id
    changes = ({"seed": 1}, {"lam": 999.0}, {"tol": 1e-4}, {"max_iter": 20}, {"relaxation": 1.0}, {"p": 2.0},
               {"clamp": True}, {"n_examples": 5}, {"loss": "logit_margin"})
    for change in changes:
        (other,) = expand_blocks([{**block, **change}])
        assert other.cell_id != cell.cell_id, change
    shards = cell.shards(3)
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 4)]
    assert len({s.shard_id for s in shards}) == 2


def test_every_problem_is_listed_once_with_what_is_allowed():
    blocks = [
        {"dataset": "mnist", "model": ["mnist/std"], "solver": "sinkhorn", "protocol": "paper_mnist", "n_examples": 10},
        {"dataset": "mnist", "model": "mnist/standard", "solver": "projected_sinkhorn", "protocol": "paper_mnist",
         "kernel_size": [4, 5], "lam": [0, -1], "n_examples": 10},
        {"dataset": "mnist", "model": "mnist/standard", "solver": [], "n_examples": 1},
        {"dataset": "mnist", "model": "mnist/standard", "colour": "red"},
        {"dataset": "cifar10", "model": "mnist/standard", "solver": "projected_sinkhorn", "protocol": "paper_cifarr", "n_examples": 1},
        {"dataset": "mnist", "model": "mnist/standard", "threat_model": "linf", "solver": "projected_sinkhorn",
         "eps_initial": 0.1, "step_size": 0.01, "eps_factor": 0.5, "n_examples": 1},
    ]
    with pytest.raises(GridError) as raised:
        expand_blocks(blocks)
    message = str(raised.value)
    for expected in (
        "block 1: model='mnist/std' is not registered; registered: cifar10/fast_standard",
        "block 1: solver='sinkhorn' is not registered; registered: exact_projection, exact_projection_box, frank_wolfe, frank_wolfe_box",
        "block 2: kernel_size=4 is invalid: it must be an odd integer >= 3",
        "block 2: lam=0 is invalid: it must be a number > 0",
        "block 2: lam=-1 is invalid",
        "block 3: empty axis 'solver'",
        "block 4: unknown setting(s) 'colour'; allowed: dataset, model",
        "block 5: protocol='paper_cifarr' is unknown; allowed: hu2020, paper_cifar, paper_code_mnist, paper_mnist, wu2020_cifar, wu2020_mnist",
        "block 5: model 'mnist/standard' classifies mnist, not dataset='cifar10'",
        "block 5: kernel_size is not set (set it, or a protocol",
        "block 6: the linf ball takes no solver",
        "block 6: factor=0.5 is invalid",
    ):
        assert expected in message, expected
    assert message.count("kernel_size=4 is invalid") == 1
    assert message.startswith("the grid cannot run; 15 problem(s)")


def test_every_declared_hyperparameter_is_settable_and_recorded_exactly():
    for spec in zoo.solver_specs():
        if spec.name.startswith("exact_projection"):
            continue
        chosen = {h.name: h.default for h in spec.hyperparameters}
        for h in spec.hyperparameters:
            if h.type is int:
                chosen[h.name] = h.default + 1
            elif h.type is float and h.default is not None:
                chosen[h.name] = h.default / 2
            elif h.choices:
                chosen[h.name] = h.choices[-1]
        (cell,) = expand_blocks([{"dataset": "mnist", "model": "mnist/standard", "solver": spec.name,
                                  "protocol": "paper_mnist", "n_examples": 2, **chosen}])
        assert dict(cell.attack.hyperparameters) == chosen, spec.name
        assert cell.config()["hyperparameters"] == chosen
        solver = cell.iterate()
        built = getattr(solver, "projector", solver)
        for name, value in chosen.items():
            assert getattr(built, name) == value, (spec.name, name)


def test_hyperparameters_no_solver_of_the_block_uses_are_refused_with_the_allowed_list():
    block = {"dataset": "mnist", "model": "mnist/standard", "protocol": "paper_mnist", "n_examples": 2}
    with pytest.raises(GridError) as raised:
        expand_blocks([{**block, "solver": "frank_wolfe", "step_size": 0.2}, {**block, "solver": "plan_pgd", "lam": 10.0},
                       {**block, "solver": "projected_sinkhorn", "lamda": 10.0},
                       {**block, "threat_model": "linf", "kernel_size": 5, "eps_initial": 0.1, "step_size": 0.01}])
    message = str(raised.value)
    assert "block 1: 'step_size' is used by none of the block's cells" in message
    assert "hyperparameters of frank_wolfe: tol, max_iter" in message
    assert "block 2: 'lam' is used by none of the block's cells" in message
    assert "hyperparameters of plan_pgd: step_size, step_rule, tol, max_iter" in message
    assert "block 3: unknown setting(s) 'lamda'" in message and "hyperparameters of projected_sinkhorn: lam, tol" in message
    assert "block 4: 'kernel_size' is used by none of the block's cells" in message
    # A hyperparameter one solver of a mixed block declares is fine; the others simply do not take it.
    cells = expand_blocks([{**block, "solver": ["projected_sinkhorn", "frank_wolfe"], "lam": [10.0, 100.0]}])
    assert sorted((c.attack.solver, dict(c.attack.hyperparameters).get("lam")) for c in cells) == [
        ("frank_wolfe", None), ("projected_sinkhorn", 10.0), ("projected_sinkhorn", 100.0)]
    with pytest.raises(GridError, match=r"max_iter=0 is invalid: it must be an integer >= 1"):
        expand_blocks([{**block, "solver": "projected_sinkhorn", "max_iter": 0}])
    with pytest.raises(GridError, match=r"step_rule='diagonal' is invalid: it must be one of 'linf_normalized', 'sign'"):
        expand_blocks([{**block, "solver": "plan_pgd", "step_rule": "diagonal"}])


def test_plan_space_cells_record_their_own_step_and_refuse_the_clamp():
    plan, frank_wolfe = expand_blocks([
        {"dataset": "mnist", "model": "mnist/standard", "solver": ["plan_pgd_box", "frank_wolfe"], "protocol": "paper_mnist",
         "n_examples": 3}
    ])
    config = plan.config()
    assert (config["step_rule"], config["step_size"], config["kernel_size"]) == (None, None, 5)
    assert config["hyperparameters"] == {"step_size": 0.1, "step_rule": "linf_normalized", "tol": 1e-6, "max_iter": 100,
                                         "box_tol": 1e-6, "box_max_iter": 100}
    assert frank_wolfe.config()["hyperparameters"] == {"tol": None, "max_iter": 100}  # no step size it would not use
    with pytest.raises(GridError, match="clamp=true is not allowed with the plan-space solver 'frank_wolfe'"):
        expand_blocks([{"dataset": "mnist", "model": "mnist/standard", "solver": "frank_wolfe", "clamp": True,
                        "protocol": "paper_mnist", "n_examples": 3}])


def _context(world, tmp_path) -> RunContext:
    return RunContext(data_root=str(world.data_root), results_dir=str(tmp_path), weights_dir=str(world.weights_dir))


def test_runner_writes_shards_once_and_summarizes_cells_from_disk(world, tmp_path):
    (wasserstein, linf) = expand_blocks([
        {"dataset": "mnist", "model": world.model, "solver": "projected_sinkhorn_box", "protocol": "paper_code_mnist",
         "eps_initial": 0.05, "iterations": 30, "eps_every": 3, "max_iter": 100, "n_examples": 7},
        {"dataset": "mnist", "model": world.model, "threat_model": "linf", "eps_initial": 0.02, "eps_factor": 1.2,
         "eps_every": 5, "iterations": 40, "step_size": 0.01, "n_examples": 7},
    ])
    runner = ShardRunner(_context(world, tmp_path))
    for cell in (wasserstein, linf):
        outcomes = [runner.run_shard(shard) for shard in cell.shards(3)]
        assert [o.skipped for o in outcomes] == [False, False, False]
        assert [o.skipped for o in (runner.run_shard(shard) for shard in cell.shards(3))] == [True, True, True]
        row = runner.finish_cell(cell, datetime.datetime.now(datetime.timezone.utc))
        assert row["status"] == CellStatus.COMPLETE.value and row["n_examples"] == 7
    examples = read_table(tmp_path)
    assert len(examples) == 14 and not examples.duplicated(["cell_id", "example_index"]).any()
    ours = examples[examples["cell_id"] == wasserstein.cell_id].sort_values("example_index")
    assert list(ours["example_index"]) == list(range(7))
    counted = {VerificationStatus.VERIFIED.name, VerificationStatus.CLEAN_MISCLASSIFIED.name, VerificationStatus.NOT_FOUND.name}
    assert set(ours["verification_status"]) <= counted
    assert (ours["verification_status"] == VerificationStatus.VERIFIED.name).sum() >= 4  # a random tiny net falls easily
    assert (ours["kernel_size"] == 7).all() and (ours["p"] == 2.0).all() and (ours["gradient_mode"] == "exact").all()
    assert (ours["final_eps"] == wasserstein.attack.schedule.final_eps).all()
    assert (ours["ball_title"] == wasserstein.ball.title).all()
    assert (ours["max_iter"] == 100).all() and (ours["lam"] == 1000.0).all() and ours["box_tol"].isna().all()
    assert json.loads(ours["hyperparameters_json"].iloc[0]) == dict(wasserstein.attack.hyperparameters)
    cells = read_table(tmp_path, Table.CELLS).set_index("cell_id")
    expected = np.mean(ours["verified_distance"] > wasserstein.attack.schedule.final_eps)
    assert cells.loc[wasserstein.cell_id, "robust_accuracy"] == pytest.approx(expected)
    assert cells.loc[wasserstein.cell_id, "clean_accuracy"] == 1.0  # the synthetic labels are the net's predictions
    compute = ours["attack_seconds"].sum() + ours["verify_seconds"].sum()
    assert cells.loc[wasserstein.cell_id, "seconds"] == pytest.approx(compute)
    assert cells.loc[wasserstein.cell_id, "ball_description"] == wasserstein.ball.description
    assert cells.loc[linf.cell_id, "threat_model"] == BallKind.LINF.value and np.isnan(cells.loc[linf.cell_id, "kernel_size"])
    assert cells.loc[linf.cell_id, "box_handling"] == "clipped to [0, 1] after each step"


def test_plan_space_solvers_run_through_the_runner_and_every_success_verifies(world, tmp_path):
    runner = ShardRunner(_context(world, tmp_path))
    cells = expand_blocks([{
        "dataset": "mnist", "model": world.model, "solver": ["plan_pgd_box", "frank_wolfe_box"],
        "protocol": "paper_mnist", "eps_initial": 0.05, "iterations": 30, "eps_every": 3, "n_examples": 4,
    }])
    for cell in cells:
        for shard in cell.shards(4):
            runner.run_shard(shard)
        runner.finish_cell(cell, datetime.datetime.now(datetime.timezone.utc))
    examples = read_table(tmp_path)
    by_solver = examples.groupby("solver")
    assert len(examples) == 8 and examples["lam"].isna().all()
    assert set(by_solver["step_rule"].first().dropna()) == {"linf_normalized"}  # plan PGD's own rule; Frank-Wolfe has none
    assert by_solver["step_size"].first().isna().tolist() == [True, False]
    assert set(examples["verification_status"]) <= {VerificationStatus.VERIFIED.name, VerificationStatus.NOT_FOUND.name}
    assert (examples["verification_status"] == VerificationStatus.VERIFIED.name).sum() >= 6
    cells_table = read_table(tmp_path, Table.CELLS)
    assert set(cells_table["box_handling"]) == {"kept in [0, 1] by the solver"}
