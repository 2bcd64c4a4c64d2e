"""The benchmark end to end: Hydra entry point, local and Ray executors, failures and resumption.

Ray tests use a real local Ray instance with 2 CPUs. Everything runs on the
paper's MNIST models, so the module needs DATA_ROOT and WEIGHTS_DIR.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from harness.run.benchmark import run_benchmark
from harness import data as datasets
from harness.run.grid import expand_blocks
from harness.run.runner import RunContext
from harness.run.scheduler import Executor, RayOptions, run_cells
from harness.run.store import Table, read_table

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
TIMING_COLUMNS = ["attack_seconds", "verify_seconds"]


@pytest.fixture(scope="module")
def folders():
    missing = [var for var in ("DATA_ROOT", "WEIGHTS_DIR") if not os.environ.get(var)]
    if missing:
        pytest.skip(f"set {' and '.join(missing)} to run the benchmark end to end")
    return os.environ["DATA_ROOT"], os.environ["WEIGHTS_DIR"]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    yield ray
    ray.shutdown()


def _cells(n_examples=6, models=("mnist/standard", "mnist/binarized")):
    return expand_blocks([{
        "dataset": "mnist", "model": list(models), "solver": "projected_sinkhorn_box",
        "protocol": "paper_code_mnist", "n_examples": n_examples,
    }])


def _rows(results_dir):
    frame = read_table(results_dir).drop(columns=TIMING_COLUMNS)
    frame["model"] = frame["model"].astype(str)
    frame["dataset"] = frame["dataset"].astype(str)
    return frame.sort_values(["cell_id", "example_index"]).reset_index(drop=True)


def _config(tmp_path, data_root, weights_dir, **changes):
    config = {
        "grid": {"name": "tiny", "blocks": [{
            "dataset": "mnist", "model": ["mnist/standard", "mnist/linf_certified"],
            "solver": ["projected_sinkhorn_box", "projected_sinkhorn"], "protocol": "paper_code_mnist", "n_examples": 4,
        }]},
        "executor": "local", "n_examples": None, "seed": None, "data_root": data_root, "weights_dir": weights_dir,
        "download": False, "results_dir": str(tmp_path / "results"), "device": "cpu", "batch_size": 3, "dry_run": False,
        "ray": {"address": None, "num_cpus": 2},
    }
    config.update(changes)
    return config


def test_local_run_writes_every_shard_once_and_a_rerun_resumes(tmp_path, folders, capsys):
    config = _config(tmp_path, *folders)
    assert run_benchmark(config) == 0
    examples = _rows(config["results_dir"])
    assert len(examples) == 4 * 4 and not examples.duplicated(["cell_id", "example_index"]).any()
    cells = read_table(config["results_dir"], Table.CELLS)
    assert len(cells) == 4 and (cells["status"] == "complete").all()
    assert set(cells["trained_for"]) == {"none", "linf_certified"}
    assert set(zip(cells["solver"], cells["box_handling"])) == {
        ("projected_sinkhorn_box", "kept in [0, 1] by the solver"),
        ("projected_sinkhorn", "none: images may leave [0, 1], and such claims fail verification"),
    }
    # Galleries: the first gallery_examples (default 8 > 4) examples keep their clean and adversarial images.
    images = read_table(config["results_dir"], Table.IMAGES)
    assert len(images) == 16 and set(images["example_index"]) == set(range(4))
    clean, _ = datasets.test_subset("mnist", folders[0], 4)
    for row in images.itertuples():
        assert np.array_equal(np.asarray(row.original).reshape(1, 28, 28), clean[row.example_index].numpy())
    results = Path(config["results_dir"])
    assert (results / "leaderboard.html").is_file() and (results / "figures" / "robust_accuracy.png").is_file()
    # An interrupted run: one shard file lost; the rerun redoes that one only.
    lost = sorted((Path(config["results_dir"]) / "examples").rglob("shard-*.parquet"))[0]
    lost.unlink()
    assert len(_rows(config["results_dir"])) == 16 - 3
    report = run_cells(
        expand_blocks(config["grid"]["blocks"]),
        RunContext(folders[0], config["results_dir"], folders[1], "cpu"),
        3,
        progress=False,
    )
    assert (report.shards_run, report.shards_skipped) == (1, 7)
    assert _rows(config["results_dir"]).equals(examples)
    assert "8 shards run, 0 already done, 0 failed, 0 retried, 0 workers replaced" in capsys.readouterr().out


def test_bad_grids_stop_before_any_work(tmp_path, folders):
    config = _config(tmp_path, folders[0], str(tmp_path), batch_size=0, executor="slurm")
    config["grid"]["blocks"][0]["kernel_size"] = 4
    lines = []

    class Sink:
        def write(self, text):
            lines.append(text)

    assert run_benchmark(config, stream=Sink()) == 2
    message = "".join(lines)
    for expected in (
        "executor='slurm' is invalid; allowed: local, ray",
        "batch_size=0 is invalid",
        "kernel_size=4 is invalid: it must be an odd integer >= 3",
    ):
        assert expected in message
    assert not (tmp_path / "results").exists()
    config = _config(tmp_path, folders[0], str(tmp_path))
    lines.clear()
    assert run_benchmark(config, stream=Sink()) == 2
    assert "mnist_vanilla.pth is missing (public URL https://github.com/locuslab/projected_sinkhorn" in "".join(lines)
    assert not (tmp_path / "results").exists()


def test_hydra_entry_point_smoke(tmp_path, folders):
    data_root, weights_dir = folders
    results = tmp_path / "out"
    command = [
        sys.executable, "run_benchmark.py", "grid=smoke", "executor=ray", "ray.num_cpus=2", "n_examples=2", f"results_dir={results}",
        f"data_root={data_root}", f"weights_dir={weights_dir}", "device=cpu",
    ]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "grid smoke: 8 cells, 8 shards, 16 examples" in finished.stdout
    assert "8 shards run, 0 already done, 0 failed" in finished.stdout
    assert len(read_table(results)) == 16 and len(read_table(results, Table.CELLS)) == 8
    assert f"leaderboard: {results / 'leaderboard.html'}" in finished.stdout and (results / "leaderboard.html").is_file()
    # Hydra leaves nothing in the working folder.
    assert not (ROOT / "outputs").exists() and not (ROOT / "run_benchmark.log").exists() and not (ROOT / ".hydra").exists()
    bad = subprocess.run(command + ["+grid.blocks.0.kernel_size=4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "kernel_size=4 is invalid" in bad.stdout


def test_ray_and_local_give_the_same_rows(tmp_path, folders, local_ray):
    data_root, weights_dir = folders
    cells = _cells()
    local = run_cells(cells, RunContext(data_root, str(tmp_path / "local"), weights_dir, "cpu"), 3, progress=False)
    ray_report = run_cells(
        cells, RunContext(data_root, str(tmp_path / "ray"), weights_dir, "cpu"), 3, Executor.RAY, RayOptions(), progress=False
    )
    assert (local.shards_run, ray_report.shards_run) == (4, 4) and not ray_report.failures
    assert _rows(tmp_path / "local").equals(_rows(tmp_path / "ray"))


def test_a_killed_actor_is_replaced_and_every_shard_lands_once(tmp_path, folders, local_ray):
    data_root, weights_dir = folders
    cells = _cells(n_examples=9, models=("mnist/wasserstein_adversarial",))
    results = tmp_path / "results"
    outcome = {}

    def run():
        outcome["report"] = run_cells(cells, RunContext(data_root, str(results), weights_dir, "cpu"), 3, Executor.RAY, progress=False)

    worker = threading.Thread(target=run)
    worker.start()
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and worker.is_alive() and killed is None:
        pids = subprocess.run(["pgrep", "-f", "ray::ShardActor.run_shard"], capture_output=True, text=True).stdout.split()
        if pids:
            killed = int(pids[0])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    worker.join(timeout=600)
    assert killed is not None, "no actor was busy with a shard"
    report = outcome["report"]
    assert not report.failures and report.shards_run == 3 and report.replaced_actors >= 1
    examples = _rows(results)
    assert len(examples) == 9 and not examples.duplicated(["cell_id", "example_index"]).any()
    files = {table: len(list((results / table.value).rglob("shard-*.parquet"))) for table in Table}
    assert files == {Table.EXAMPLES: 3, Table.CELLS: 1, Table.IMAGES: 3}  # images of examples 0..7 (gallery_examples=8)


def test_a_shard_that_keeps_failing_is_retried_then_reported(tmp_path, folders, local_ray):
    """Corrupt weights make every attempt raise: the run still ends, names what failed, and keeps nothing half-done."""
    import shutil

    data_root, weights_dir = folders
    corrupt = tmp_path / "weights"
    corrupt.mkdir()
    shutil.copy(Path(weights_dir) / "mnist_vanilla.pth", corrupt / "mnist_vanilla.pth")
    with open(corrupt / "mnist_vanilla.pth", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    cells = _cells(n_examples=4, models=("mnist/standard",))
    report = run_cells(
        cells, RunContext(data_root, str(tmp_path / "results"), str(corrupt), "cpu"), 2, Executor.RAY,
        RayOptions(max_retries=1), progress=False,
    )
    assert (report.shards_run, report.retries) == (0, 2)
    shard_failures = [what for what in report.failures if what.startswith("shard ")]
    assert len(shard_failures) == 2
    assert all("sha256" in report.failures[what] for what in shard_failures)
    assert f"cell {cells[0].cell_id}" in report.failures
    assert read_table(tmp_path / "results").empty
