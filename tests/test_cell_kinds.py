"""Kinds of cells are types: a kind written in its own module runs through a grid with no edit elsewhere."""

from __future__ import annotations

import pytest

from harness.run.benchmark import run_benchmark
from harness.run.cells import register_cell_kind, unregister_cell_kind
from harness.run.grid import GridError, expand_blocks
from harness.run.store import Table, read_table
from toy_cell_kind import PREDICTIONS, CleanPredictionsCell

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def toy_kind():
    register_cell_kind(CleanPredictionsCell)
    yield CleanPredictionsCell
    unregister_cell_kind(CleanPredictionsCell)


def test_a_toy_kind_runs_through_a_grid_beside_an_attack(world, tmp_path, toy_kind):
    results = tmp_path / "results"
    attack = {"dataset": "mnist", "model": world.model, "solver": "projected_sinkhorn_box", "protocol": "paper_code_mnist",
              "iterations": 3, "n_examples": 4}
    config = {
        "grid": {"name": "toy", "blocks": [{"clean_predictions": True, "dataset": "mnist", "model": world.model, "n_examples": 5}, attack]},
        "executor": "local", "n_examples": None, "seed": None, "data_root": str(world.data_root), "weights_dir": str(world.weights_dir),
        "download": False, "results_dir": str(results), "device": "cpu", "batch_size": 2, "report": False, "dry_run": False,
        "plugins": [str(world.plugin)], "ray": {"address": None, "num_cpus": 1},
    }
    assert run_benchmark(config) == 0
    rows = read_table(results, PREDICTIONS)
    assert sorted(rows["example_index"]) == list(range(5))
    cells = read_table(results, Table.CELLS).set_index("attack_summary")
    toy = cells.loc["no attack: the clean predictions"]
    # The synthetic labels are the network's own predictions.
    assert (toy["status"], toy["n_examples"], toy["robust_accuracy"]) == ("complete", 5, 1.0)
    assert len(read_table(results)) == 4, "the attack cell beside it wrote its own rows"
    # A rerun finds both kinds' shards on disk.
    assert run_benchmark(config) == 0 and len(read_table(results, PREDICTIONS)) == 5


def test_a_toy_kind_validates_its_block_by_its_types(world, toy_kind):
    with pytest.raises(GridError) as raised:
        expand_blocks([
            {"clean_predictions": True, "dataset": "mnist", "model": world.model, "n_examples": 0},
            {"clean_predictions": True, "suite": "standard", "dataset": "mnist", "model": world.model, "n_examples": 1},
            {"clean_predictions": True, "dataset": "mnist", "model": world.model, "n_examples": 1, "solver": "frank_wolfe"},
        ])
    message = str(raised.value)
    assert "block 1: n_examples=0 is invalid: it must be an integer >= 1" in message
    assert "block 2: 'suite', 'clean_predictions' select different kinds of cells" in message
    assert "block 3: 'solver' cannot be set with clean_predictions" in message


def test_kinds_need_markers_of_their_own(toy_kind):
    with pytest.raises(ValueError, match="marker"):
        register_cell_kind(type("Again", (CleanPredictionsCell,), {}))
