"""Tests of grid expansion and validation (harness/grid.py) and of the shard runner (harness/runner.py)."""

from __future__ import annotations

import datetime
import os

import numpy as np
import pytest

from harness.run.grid import GridError, ThreatModel, expand_blocks
from harness.run.store import Table, read_table

pytestmark = pytest.mark.usefixtures("single_thread")

PAPER_MODELS = ["mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial"]


def test_axes_expand_to_their_product_with_protocol_defaults():
    cells = expand_blocks(
        [{"dataset": "mnist", "model": PAPER_MODELS, "solver": ["projected_sinkhorn", "projected_sinkhorn_box"],
          "protocol": "paper_mnist", "n_examples": 10}]
    )
    assert len(cells) == 8
    assert {(c.model, c.solver) for c in cells} == {(m, s) for m in PAPER_MODELS for s in ("projected_sinkhorn", "projected_sinkhorn_box")}
    cell = cells[0]
    assert (cell.kernel_size, cell.p, cell.lam, cell.schedule.initial, cell.schedule.iterations) == (5, 1.0, 1000.0, 0.3, 200)
    assert cell.threat_model is ThreatModel.WASSERSTEIN and cell.clamp is False


def test_block_settings_override_the_protocol_and_duplicates_merge():
    blocks = [
        {"dataset": "mnist", "model": "mnist/standard", "solver": "projected_sinkhorn", "protocol": "paper_mnist",
         "kernel_size": [3, 5, 7], "n_examples": 4},
        {"dataset": "mnist", "model": "mnist/standard", "solver": "projected_sinkhorn", "protocol": "paper_mnist", "n_examples": 4},
    ]
    cells = expand_blocks(blocks)
    assert sorted(c.kernel_size for c in cells) == [3, 5, 7]  # the second block repeats the k=5 cell
    assert len({c.cell_id for c in cells}) == 3
    assert expand_blocks(blocks, {"n_examples": 9})[0].n_examples == 9


def test_ids_are_stable_and_depend_on_every_setting():
    block = {"dataset": "mnist", "model": "mnist/standard", "solver": "projected_sinkhorn", "protocol": "paper_mnist", "n_examples": 4}
    (cell,) = expand_blocks([block])
    (again,) = expand_blocks([dict(block)])
    assert cell.cell_id == again.cell_id
    for change in ({"seed": 1}, {"lam": 999.0}, {"p": 2.0}, {"clamp": True}, {"n_examples": 5}, {"loss": "logit_margin"}):
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
        "block 1: model='mnist/std' is not registered; registered: cifar10/resnet18",
        "block 1: solver='sinkhorn' is not registered; registered: exact_projection, frank_wolfe, frank_wolfe_box, plan_pgd",
        "block 2: kernel_size=4 is invalid: it must be an odd integer >= 3",
        "block 2: lam=0 is invalid: it must be a number > 0",
        "block 2: lam=-1 is invalid",
        "block 3: empty axis 'solver'",
        "block 4: unknown setting(s) 'colour'; allowed: dataset, model",
        "block 5: protocol='paper_cifarr' is unknown; allowed: paper_cifar, paper_code_mnist, paper_mnist",
        "block 5: model 'mnist/standard' classifies mnist, not dataset='cifar10'",
        "block 5: kernel_size is not set (set it, or a protocol",
        "block 6: the linf ball takes no solver",
        "block 6: factor=0.5 is invalid",
    ):
        assert expected in message, expected
    assert message.count("kernel_size=4 is invalid") == 1
    assert message.startswith("the grid cannot run; 15 problem(s)")


def test_plan_space_cells_record_no_lambda_or_step_rule_and_refuse_the_clamp():
    (plan,) = expand_blocks([
        {"dataset": "mnist", "model": "mnist/standard", "solver": "plan_pgd_box", "protocol": "paper_mnist", "n_examples": 3}
    ])
    config = plan.config()
    assert (config["lam"], config["step_rule"], config["step_size"], config["kernel_size"]) == (None, None, 0.1, 5)
    with pytest.raises(GridError, match="clamp=true is not allowed with the plan-space solver 'frank_wolfe'"):
        expand_blocks([{"dataset": "mnist", "model": "mnist/standard", "solver": "frank_wolfe", "clamp": True,
                        "protocol": "paper_mnist", "n_examples": 3}])


def _real_context(tmp_path):
    from harness.run.runner import RunContext

    missing = [var for var in ("DATA_ROOT", "WEIGHTS_DIR") if not os.environ.get(var)]
    if missing:
        pytest.skip(f"set {' and '.join(missing)} to run shards on the paper's models")
    return RunContext(data_root=os.environ["DATA_ROOT"], results_dir=str(tmp_path), weights_dir=os.environ["WEIGHTS_DIR"])


def test_runner_writes_shards_once_and_summarizes_cells_from_disk(tmp_path):
    from harness.run.runner import ShardRunner

    context = _real_context(tmp_path)
    (wasserstein, linf) = expand_blocks([
        {"dataset": "mnist", "model": "mnist/standard", "solver": "projected_sinkhorn_box", "protocol": "paper_code_mnist", "n_examples": 7},
        {"dataset": "mnist", "model": "mnist/standard", "threat_model": "linf", "eps_initial": 0.05, "eps_factor": 1.2,
         "eps_every": 5, "iterations": 40, "step_size": 0.01, "n_examples": 7},
    ])
    runner = ShardRunner(context)
    for cell in (wasserstein, linf):
        outcomes = [runner.run_shard(shard) for shard in cell.shards(3)]
        assert [o.skipped for o in outcomes] == [False, False, False]
        assert [o.skipped for o in (runner.run_shard(shard) for shard in cell.shards(3))] == [True, True, True]
        row = runner.finish_cell(cell, datetime.datetime.now(datetime.timezone.utc))
        assert row["status"] == "complete" and row["n_examples"] == 7
    examples = read_table(tmp_path)
    assert len(examples) == 14 and not examples.duplicated(["cell_id", "example_index"]).any()
    ours = examples[examples["cell_id"] == wasserstein.cell_id].sort_values("example_index")
    assert list(ours["example_index"]) == list(range(7))
    assert set(ours["verification_status"]) <= {"VERIFIED", "CLEAN_MISCLASSIFIED", "NOT_FOUND"}
    assert (ours["kernel_size"] == 7).all() and (ours["p"] == 2.0).all() and (ours["gradient_mode"] == "exact").all()
    cells = read_table(tmp_path, Table.CELLS).set_index("cell_id")
    expected = np.mean(ours["verified_distance"] > wasserstein.schedule.final_eps)
    assert cells.loc[wasserstein.cell_id, "robust_accuracy"] == pytest.approx(expected)
    assert cells.loc[wasserstein.cell_id, "clean_accuracy"] == pytest.approx(0.9889)
    compute = ours["attack_seconds"].sum() + ours["verify_seconds"].sum()
    assert cells.loc[wasserstein.cell_id, "seconds"] == pytest.approx(compute)
    assert cells.loc[linf.cell_id, "threat_model"] == "linf" and np.isnan(cells.loc[linf.cell_id, "kernel_size"])


def test_plan_space_solvers_run_through_the_runner_and_every_success_verifies(tmp_path):
    from harness.run.runner import ShardRunner

    runner = ShardRunner(_real_context(tmp_path))
    cells = expand_blocks([{
        "dataset": "mnist", "model": "mnist/standard", "solver": ["plan_pgd_box", "frank_wolfe_box"],
        "protocol": "paper_mnist", "n_examples": 4,
    }])
    for cell in cells:
        for shard in cell.shards(4):
            runner.run_shard(shard)
        runner.finish_cell(cell, datetime.datetime.now(datetime.timezone.utc))
    examples = read_table(tmp_path)
    assert len(examples) == 8 and examples["step_rule"].isna().all() and examples["lam"].isna().all()
    assert set(examples["verification_status"]) <= {"VERIFIED", "CLEAN_MISCLASSIFIED", "NOT_FOUND"}
    assert (examples["verification_status"] == "VERIFIED").sum() >= 6  # the standard model falls below eps 1.83
    cells_table = read_table(tmp_path, Table.CELLS)
    assert set(cells_table["box_handling"]) == {"kept in [0, 1] by the solver"}
