"""The run machinery end to end on the synthetic world: executors, resumption, failures, plugins, Hydra.

Every test runs on :mod:`synthetic`'s data, weights and plugin model
(``mnist/tiny_synthetic``), so none needs a download or the published
weights; attacks are cut to a few iterations. Ray tests let
:func:`run_cells` start and stop an embedded Ray with 2 CPUs, as a user's
run does, so the workers see exactly what a user's workers see. The same
runs on the paper's models are in ``test_run_real_models.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import zoo
from harness.cli import run_and_report
from harness.run.benchmark import run_benchmark
from harness.run.grid import expand_blocks
from harness.run.runner import RunContext
from harness.run.scheduler import Executor, RayOptions, run_cells
from harness.run.store import Table, read_table
from synthetic import plugin_source

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
TIMING_COLUMNS = ["attack_seconds", "verify_seconds"]
EMBEDDED_RAY = RayOptions(num_cpus=2)
CWD_MODEL = "mnist/tiny_synthetic_from_cwd"
"""Registered by a plugin module found only through the working directory."""


def _block(model, n_examples=6, iterations=5, **settings):
    return {
        "dataset": "mnist", "model": model, "solver": "projected_sinkhorn_box", "protocol": "paper_code_mnist",
        "n_examples": n_examples, "iterations": iterations, **settings,
    }


def _context(world, results_dir, weights_dir=None) -> RunContext:
    return RunContext(str(world.data_root), str(results_dir), str(weights_dir or world.weights_dir), "cpu", gallery_examples=2)


def _rows(results_dir):
    frame = read_table(results_dir).drop(columns=TIMING_COLUMNS)
    frame["model"] = frame["model"].astype(str)
    frame["dataset"] = frame["dataset"].astype(str)
    return frame.sort_values(["cell_id", "example_index"]).reset_index(drop=True)


def _config(world, tmp_path, **changes):
    config = {
        "grid": {"name": "synthetic", "blocks": [
            _block(world.model, n_examples=4, solver=["projected_sinkhorn_box", "projected_sinkhorn"]),
        ]},
        "executor": "local", "n_examples": None, "seed": None, "data_root": str(world.data_root),
        "weights_dir": str(world.weights_dir), "download": False, "results_dir": str(tmp_path / "results"),
        "device": "cpu", "batch_size": 3, "gallery_examples": 2, "report": False, "dry_run": False,
        "plugins": [str(world.plugin)],
        "ray": {"address": None, "gpus_per_actor": 1.0, "cpus_per_actor": 1, "max_retries": 2, "num_cpus": 2},
    }
    config.update(changes)
    return config


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``, with its command line (Ray names a busy actor ``ray::Class.method``)."""
    listing = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    children, commands = {}, {}
    for line in listing.splitlines():
        child, parent, command = (line.split(None, 2) + [""])[:3]
        children.setdefault(int(parent), []).append(int(child))
        commands[int(child)] = command
    found, stack = {}, [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found[child] = commands[child]
            stack.append(child)
    return found


class _TableRows(HTMLParser):
    """The text of every ``<tr>`` of a page, its cells joined by ``|``."""

    def __init__(self):
        super().__init__()
        self.rows: list[str] = []
        self._cells: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._cells = []
        elif tag in ("td", "th") and self._cells is not None:
            self._cells.append("")

    def handle_endtag(self, tag):
        if tag == "tr" and self._cells is not None:
            self.rows.append("|".join(cell.strip() for cell in self._cells))
            self._cells = None

    def handle_data(self, data):
        if self._cells:
            self._cells[-1] += data


# --------------------------------------------------------------------------
# In process
# --------------------------------------------------------------------------


def test_local_run_writes_every_shard_once_and_a_rerun_resumes(world, tmp_path, capsys):
    config = _config(world, tmp_path)
    assert run_benchmark(config) == 0
    examples = _rows(config["results_dir"])
    assert len(examples) == 2 * 4 and not examples.duplicated(["cell_id", "example_index"]).any()
    assert set(examples["model"]) == {world.model}
    cells = read_table(config["results_dir"], Table.CELLS)
    assert len(cells) == 2 and (cells["status"] == "complete").all()
    # The model checks ran on every shard and the tiny network passed them all: empty lists, not nulls.
    assert all(list(names) == [] for names in [*examples["failed_model_checks"], *cells["failed_model_checks"]])
    assert set(zip(cells["solver"], cells["box_handling"])) == {
        ("projected_sinkhorn_box", "kept in [0, 1] by the solver"),
        ("projected_sinkhorn", "none: images may leave [0, 1], and such claims fail verification"),
    }
    images = read_table(config["results_dir"], Table.IMAGES)
    assert len(images) == 2 * 2 and set(images["example_index"]) == {0, 1}  # gallery_examples=2
    # An interrupted run: one shard file lost; the rerun redoes that one only.
    lost = sorted((Path(config["results_dir"]) / "examples").rglob("shard-*.parquet"))[0]
    lost_rows = pq.read_metadata(lost).num_rows
    lost.unlink()
    assert len(_rows(config["results_dir"])) == 8 - lost_rows
    report = run_cells(expand_blocks(config["grid"]["blocks"]), _context(world, config["results_dir"]), 3, progress=False)
    assert (report.shards_run, report.shards_skipped) == (1, 3)
    assert _rows(config["results_dir"]).equals(examples)
    assert "4 shards run, 0 already done, 0 failed, 0 retried, 0 workers replaced" in capsys.readouterr().out


def test_verification_processes_change_no_row_and_stop_with_the_run(world, tmp_path):
    inline = _config(world, tmp_path / "inline", verify_workers=0)
    pooled = _config(world, tmp_path / "pooled", verify_workers=2)
    assert run_benchmark(inline) == 0 and run_benchmark(pooled) == 0
    assert _rows(pooled["results_dir"]).equals(_rows(inline["results_dir"]))
    assert not [command for command in _descendants(os.getpid()).values() if "spawn_main" in command]


def test_batch_size_and_verify_workers_are_checked_and_auto_follows_the_device(world, tmp_path, capsys):
    assert run_benchmark(_config(world, tmp_path, batch_size="auto", dry_run=True)) == 0
    assert "batch size 100" in capsys.readouterr().out
    assert run_benchmark(_config(world, tmp_path, batch_size="big", verify_workers=-1)) == 2
    out = capsys.readouterr().out
    assert "batch_size='big' is invalid: it must be auto or an integer >= 1" in out
    assert "verify_workers=-1 is invalid: it must be auto or an integer >= 0" in out


def test_hydra_entry_point_with_a_plugin_model(world, tmp_path):
    results = tmp_path / "out"
    block = (
        f"{{dataset:mnist,model:'{world.model}',solver:projected_sinkhorn_box,protocol:paper_code_mnist,"
        "n_examples:4,iterations:5}"
    )
    command = [
        sys.executable, "run_benchmark.py", "executor=local", "grid.name=synthetic", f"grid.blocks=[{block}]",
        f"plugins=['{world.plugin}']", f"data_root={world.data_root}", f"weights_dir={world.weights_dir}",
        f"results_dir={results}", "device=cpu", "batch_size=2",
    ]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"grid synthetic: 1 cells, 2 shards, 4 examples ({world.model}: 1)" in finished.stdout
    assert "2 shards run, 0 already done, 0 failed" in finished.stdout
    assert len(read_table(results)) == 4 and len(read_table(results, Table.CELLS)) == 1
    assert f"leaderboard: {results / 'leaderboard.html'}" in finished.stdout and (results / "leaderboard.html").is_file()
    # Hydra leaves nothing in the working folder.
    assert not (ROOT / "outputs").exists() and not (ROOT / "run_benchmark.log").exists() and not (ROOT / ".hydra").exists()


# --------------------------------------------------------------------------
# On Ray
# --------------------------------------------------------------------------


def test_a_plugin_model_appears_in_the_leaderboard_of_a_ray_run(world, tmp_path):
    """A third-party checkpoint (state dict under a key, DataParallel prefix) in a plugin file, no project edit."""
    config = _config(world, tmp_path, executor="ray", plugins=[str(world.plugin)], report=True)
    config["grid"]["blocks"] = [_block(world.model, n_examples=4)]
    assert run_and_report(config) == 0  # the main job: the run, then the report
    page = _TableRows()
    page.feed((Path(config["results_dir"]) / "leaderboard.html").read_text())
    assert [row for row in page.rows if world.model in row.split("|")], f"no table row names {world.model}: {page.rows}"
    examples = _rows(config["results_dir"])
    assert len(examples) == 4 and set(examples["model"]) == {world.model}
    assert sorted(examples["example_index"]) == [0, 1, 2, 3]


def test_ray_and_local_give_the_same_rows_with_plugins_from_the_working_directory(world, tmp_path, monkeypatch):
    """The plugins: a file given relative to the working directory, and a module found only there."""
    user_folder = tmp_path / "user"
    user_folder.mkdir()
    (user_folder / "tiny_synthetic_from_cwd.py").write_text(plugin_source(CWD_MODEL, world.weights_dir / "tiny_synthetic.pt"))
    monkeypatch.chdir(user_folder)
    monkeypatch.syspath_prepend("")  # the driver imports from its working directory, as an interactive session does
    plugins = [os.path.relpath(world.plugin, user_folder), "tiny_synthetic_from_cwd"]
    zoo.import_plugins(plugins)  # the driver's own import, before the grid names the models
    cells = expand_blocks([_block([world.model, CWD_MODEL])])
    local = run_cells(cells, _context(world, tmp_path / "local"), 3, progress=False, plugins=plugins)
    on_ray = run_cells(
        cells, _context(world, tmp_path / "ray"), 3, Executor.RAY, EMBEDDED_RAY, progress=False, plugins=plugins
    )
    assert (local.shards_run, on_ray.shards_run) == (4, 4) and not local.failures and not on_ray.failures
    assert _rows(tmp_path / "local").equals(_rows(tmp_path / "ray"))
    assert set(_rows(tmp_path / "ray")["model"]) == {world.model, CWD_MODEL}


def test_a_killed_actor_is_replaced_and_every_shard_lands_once(world, tmp_path):
    # Shards long enough (200 steps) that the sampler below finds one running even on a loaded machine.
    cells = expand_blocks([_block(world.model, n_examples=12, iterations=200)])
    results = tmp_path / "results"
    killed = []

    def kill_the_first_busy_actor():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            busy = [pid for pid, command in _descendants(os.getpid()).items() if "ray::ShardActor.run_shard" in command]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_first_busy_actor, daemon=True)
    killer.start()
    report = run_cells(
        cells, _context(world, results), 3, Executor.RAY, EMBEDDED_RAY, progress=False, plugins=[str(world.plugin)]
    )
    killer.join(timeout=10)
    assert killed, "no actor was busy with a shard"
    assert not report.failures and report.shards_run == 4 and report.replaced_actors >= 1
    examples = _rows(results)
    assert len(examples) == 12 and not examples.duplicated(["cell_id", "example_index"]).any()
    files = {table: len(list((results / table.value).rglob("shard-*.parquet"))) for table in Table}
    assert files == {Table.EXAMPLES: 4, Table.CELLS: 1, Table.IMAGES: 1, Table.CERTIFICATES: 0}  # gallery_examples=2: the first shard only


def test_a_shard_that_keeps_failing_is_retried_then_reported(world, tmp_path):
    """Corrupt weights make every attempt raise: the run still ends, names what failed, and keeps nothing half-done."""
    corrupt = tmp_path / "weights"
    corrupt.mkdir()
    checkpoint = (world.weights_dir / "tiny_synthetic.pt").read_bytes()
    (corrupt / "tiny_synthetic.pt").write_bytes(checkpoint[:100] + b"\x00\x01\x02" + checkpoint[103:])
    cells = expand_blocks([_block(world.model, n_examples=4)])
    report = run_cells(
        cells, _context(world, tmp_path / "results", corrupt), 2, Executor.RAY, RayOptions(max_retries=1, num_cpus=2),
        progress=False, plugins=[str(world.plugin)],
    )
    assert (report.shards_run, report.retries) == (0, 2)
    shard_failures = [what for what in report.failures if what.startswith("shard ")]
    assert len(shard_failures) == 2
    assert all("sha256" in report.failures[what] for what in shard_failures)
    assert f"cell {cells[0].cell_id}" in report.failures
    assert read_table(tmp_path / "results").empty
