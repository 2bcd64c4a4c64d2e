"""Progress of a run: updates from inside a shard, bars per cell, an ETA weighted by each cell's measured cost."""

from __future__ import annotations

import io
import time

import pytest

from harness.run.grid import expand_blocks
from harness.run.progress import RunProgress
from harness.run.runner import RunContext, ShardOutcome, ShardProgress, ShardRunner

pytestmark = pytest.mark.usefixtures("single_thread")


def _cells(model, solvers, n_examples=6, iterations=12):
    return expand_blocks([{
        "dataset": "mnist", "model": model, "solver": solvers, "protocol": "paper_code_mnist",
        "n_examples": n_examples, "iterations": iterations,
    }])


def _shards(cells, size):
    return [shard for cell in cells for shard in cell.shards(size)]


def test_eta_charges_each_cell_its_own_measured_cost(world):
    """A cell measured at 10x the cost of another makes its remaining examples count 10x."""
    cells = _cells(world.model, ["projected_sinkhorn_box", "plan_pgd_box"], n_examples=10)
    shards = _shards(cells, 5)
    cheap, dear = cells
    meter = RunProgress(cells, shards, stream=io.StringIO())
    assert meter.eta_seconds() is None
    meter.shard_done(cheap.cell_id, ShardOutcome(shards[0].shard_id, cheap.cell_id, 5, 1.0, skipped=False))
    # Halfway through its steps after 5 s: 2 s per example.
    dear_shard = shards[2]
    meter.shard_progress(ShardProgress(dear_shard.shard_id, dear.cell_id, 0, 5, 6, 12, 0.3, 5.0))
    # Left: 5 cheap examples at 0.2 s, and 7.5 examples' worth of the dear cell at 2 s.
    assert meter.eta_seconds() == pytest.approx(5 * 0.2 + 7.5 * 2.0)
    meter.shard_done(dear.cell_id, ShardOutcome(dear_shard.shard_id, dear.cell_id, 5, 10.0, skipped=False))
    assert meter.eta_seconds() == pytest.approx(5 * 0.2 + 5 * 2.0)
    meter.close()


def test_a_shard_reports_progress_before_it_finishes(world, tmp_path):
    """Every attack step reports the examples decided so far, the step and the radius, long before the shard ends."""
    cells = _cells(world.model, "plan_pgd_box", n_examples=4, iterations=12)
    shard = _shards(cells, 4)[0]
    runner = ShardRunner(RunContext(str(world.data_root), str(tmp_path), str(world.weights_dir), "cpu"))
    reports = []
    started = time.perf_counter()
    outcome = runner.run_shard(shard, lambda progress: reports.append((time.perf_counter() - started, progress)))
    assert not outcome.skipped and reports
    first_at, first = reports[0]
    assert first.step == 0 and first.steps == 12 and first.examples == 4 and first.cell_id == cells[0].cell_id
    assert first_at < outcome.seconds
    steps = [progress.step for _, progress in reports]
    assert steps == sorted(steps) and steps[-1] <= 12
    decided = [progress.decided for _, progress in reports]
    assert decided == sorted(decided) and decided[-1] <= 4
    assert all(progress.seconds >= 0 for _, progress in reports)


def test_local_run_draws_bars_and_an_eta(world, tmp_path, monkeypatch):
    """The local executor feeds the bars from inside the shards: the stream shows the cell, its step and an ETA."""
    from harness.run import scheduler

    cells = _cells(world.model, ["projected_sinkhorn_box", "plan_pgd_box"], n_examples=4, iterations=8)
    stream = io.StringIO()
    monkeypatch.setattr(scheduler, "RunProgress", lambda *args, **kwargs: RunProgress(*args, **kwargs, stream=stream))
    report = scheduler.run_cells(
        cells, RunContext(str(world.data_root), str(tmp_path), str(world.weights_dir), "cpu"), 2, progress=True
    )
    assert not report.failures
    text = stream.getvalue()
    assert "plan_pgd_box" in text and "step " in text and "ETA" in text
    assert "examples 100%" in text
