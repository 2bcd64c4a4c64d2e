"""The benchmark on the paper's MNIST models: the Hydra smoke grid on Ray, and a local run's rows and galleries.

The run machinery itself is tested on synthetic data in ``test_scheduler.py``;
these tests check that the real grids, weights and data go through it. They
need MNIST under ``DATA_ROOT`` and the published weights under
``WEIGHTS_DIR``, and skip without them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import data as datasets
from harness.run.benchmark import run_benchmark
from harness.run.store import Table, read_table

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


def test_local_run_of_two_paper_models(tmp_path, published_folders):
    data_root, weights_dir = published_folders
    config = {
        "grid": {"name": "tiny", "blocks": [{
            "dataset": "mnist", "model": ["mnist/standard", "mnist/linf_certified"],
            "solver": ["projected_sinkhorn_box", "projected_sinkhorn"], "protocol": "paper_code_mnist", "n_examples": 4,
        }]},
        "executor": "local", "n_examples": None, "seed": None, "data_root": data_root, "weights_dir": weights_dir,
        "download": False, "results_dir": str(tmp_path / "results"), "device": "cpu", "batch_size": 3, "dry_run": False,
        "report": False, "plugins": [], "ray": {"address": None, "num_cpus": 2},
    }
    assert run_benchmark(config) == 0
    examples = read_table(config["results_dir"])
    assert len(examples) == 4 * 4 and not examples.duplicated(["cell_id", "example_index"]).any()
    cells = read_table(config["results_dir"], Table.CELLS)
    assert len(cells) == 4 and (cells["status"] == "complete").all()
    assert set(cells["trained_for"]) == {"none", "linf_certified"}
    # Galleries: the first gallery_examples (default 8 > 4) examples keep their clean and adversarial images.
    images = read_table(config["results_dir"], Table.IMAGES)
    assert len(images) == 16 and set(images["example_index"]) == set(range(4))
    clean, _ = datasets.test_subset("mnist", data_root, 4)
    for row in images.itertuples():
        assert np.array_equal(np.asarray(row.original).reshape(1, 28, 28), clean[row.example_index].numpy())


def test_hydra_entry_point_smoke(tmp_path, published_folders):
    data_root, weights_dir = published_folders
    results = tmp_path / "out"
    command = [
        sys.executable, "run_benchmark.py", "grid=smoke", "executor=ray", "ray.num_cpus=2", "n_examples=2",
        f"results_dir={results}", f"data_root={data_root}", f"weights_dir={weights_dir}", "device=cpu",
    ]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "grid smoke: 8 cells, 8 shards, 16 examples" in finished.stdout
    assert "8 shards run, 0 already done, 0 failed" in finished.stdout
    assert len(read_table(results)) == 16 and len(read_table(results, Table.CELLS)) == 8
    assert f"leaderboard: {results / 'leaderboard.html'}" in finished.stdout and (results / "leaderboard.html").is_file()
    assert (results / "figures" / "robust_accuracy.png").is_file()
    bad = subprocess.run(command + ["+grid.blocks.0.kernel_size=4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "kernel_size=4 is invalid" in bad.stdout
