"""The benchmark on the paper's MNIST models: a local run's rows and galleries (the smoke grid on Ray is in test_pinned_ids.py).

The run machinery itself is tested on synthetic data in ``test_scheduler.py``;
these tests check that the real grids, weights and data go through it. They
need MNIST under ``DATA_ROOT`` and the published weights under
``WEIGHTS_DIR``, and skip without them.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness import data as datasets
from harness.run.benchmark import run_benchmark
from harness.run.store import Table, read_table

pytestmark = pytest.mark.usefixtures("single_thread")


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
