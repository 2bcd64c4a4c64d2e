"""Reads that scale: a cell finished from its own files, older stores resumed, the report's columns, the scale benchmark."""

from __future__ import annotations

import datetime
import importlib.util
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.report import build_report, write_report
from harness.run.grid import expand_blocks
from harness.run.runner import RunContext, ShardRunner
from harness.run.store import CELLS_SCHEMA, EXAMPLES_SCHEMA, Table, read_cell, read_table, shard_path, write_shard
from harness.vocabulary import CellStatus
from results_factory import attack, write_cell

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "store_scale.py"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
DISTANCES = [0.2, math.inf, 0.0, 5.0, 1.0, math.inf]


def _cell(seed: int = 0):
    (cell,) = expand_blocks([{
        "dataset": "mnist", "model": "mnist/standard", "solver": "projected_sinkhorn_box", "protocol": "paper_code_mnist",
        "n_examples": len(DISTANCES), "seed": seed,
    }])
    return cell


class Runner(ShardRunner):
    """A runner whose model's clean accuracy is given: computing it reads the test set, which these tests do not need."""

    def clean_accuracy(self, cell) -> float:
        return 0.98


def _write_examples(results_dir, shard) -> Path:
    """The shard's rows as a run writes them, with verified distances from DISTANCES and 0.5 s per example."""
    cell, rows = shard.cell, shard.stop - shard.start
    distances = DISTANCES[shard.start : shard.stop]
    columns = {name: [None] * rows for name in EXAMPLES_SCHEMA.names if name != "schema_version"}
    columns.update({name: [value] * rows for name, value in cell.columns().items() if name in columns})
    columns.update(
        cell_id=[cell.cell_id] * rows, shard_id=[shard.shard_id] * rows, example_index=np.arange(shard.start, shard.stop),
        gradient_mode=["exact"] * rows, verified_distance=distances, verification_status=["VERIFIED"] * rows,
        attack_seconds=[0.4] * rows, verify_seconds=[0.1] * rows, failed_model_checks=[[]] * rows,
    )
    return write_shard(results_dir, Table.EXAMPLES, cell.dataset, cell.model, shard.shard_id, columns)


def test_finishing_a_cell_reads_its_own_files_only(tmp_path):
    cell, other = _cell(seed=0), _cell(seed=1)
    for shard in cell.shards(2):
        _write_examples(tmp_path, shard)
    # Another cell of the same model: one shard unreadable, one of another shape.
    broken = _write_examples(tmp_path, other.shards(2)[0])
    broken.write_bytes(b"PAR1 not a parquet file")
    pq.write_table(pa.table({"cell_id": [other.cell_id], "something": [1.0]}), broken.with_name("shard-other.parquet"))
    with pytest.raises(pa.ArrowInvalid):
        read_table(tmp_path)
    row = Runner(RunContext(data_root=str(tmp_path), results_dir=str(tmp_path))).finish_cell(cell, NOW)
    assert row["n_examples"] == len(DISTANCES) and row["status"] == CellStatus.COMPLETE.value
    assert row["robust_accuracy"] == pytest.approx(np.mean(np.asarray(DISTANCES) > cell.final_eps))
    assert row["seconds"] == pytest.approx(0.5 * len(DISTANCES)) and row["failed_model_checks"] == []
    stored = read_cell(tmp_path, Table.CELLS, "mnist", "mnist/standard", cell.cell_id, ["n_examples", "robust_accuracy", "status"])
    assert stored.to_dict("records") == [{"n_examples": 6, "robust_accuracy": row["robust_accuracy"], "status": "complete"}]


def test_an_older_store_resumes_finishes_and_reports_without_duplicate_rows(tmp_path):
    """Shards written before the cell folders, directly in the partition folder: a rerun skips them, finishing and the
    report count each once, and a shard written again replaces its older file."""
    cell = _cell()
    shards = cell.shards(2)
    for shard in shards:
        path = _write_examples(tmp_path, shard)
        path.rename(path.parent.parent / path.name)
        path.parent.rmdir()
    runner = Runner(RunContext(data_root=str(tmp_path), results_dir=str(tmp_path)))
    assert all(runner.run_shard(shard).skipped for shard in shards)
    assert runner.finish_cell(cell, NOW)["n_examples"] == len(DISTANCES)
    assert build_report(tmp_path).provenance["examples attacked"] == str(len(DISTANCES))
    moved = _write_examples(tmp_path, shards[0])
    assert moved == shard_path(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", shards[0].shard_id, cell.cell_id)
    assert not (moved.parent.parent / moved.name).exists()
    assert len(read_table(tmp_path)) == len(DISTANCES)
    assert runner.finish_cell(cell, NOW)["n_examples"] == len(DISTANCES)


def _garble(path: Path, names: list[str]) -> None:
    """Rewrite ``names`` in the file at ``path`` as lists of numbers: no reader of the schema's types can take them."""
    table = pq.read_table(path)
    for name in names:
        table = table.set_column(table.schema.get_field_index(name), name, pa.array([[1.5]] * table.num_rows))
    pq.write_table(table, path)


def test_the_report_reads_only_the_columns_it_shows(tmp_path):
    for model, distances in (("mnist/alpha", [0.2, 0.9, math.inf, 0.0]), ("mnist/beta", [0.1, 0.4, 1.0, math.inf])):
        write_cell(tmp_path, model, attack(), distances, images=np.random.default_rng(0).random((2, 1, 4, 4)))
    hidden = {
        "examples": ["hyperparameters_json", "suite_json", "shard_id", "distance", "mass_error", "clean_prediction", "seed"],
        "cells": ["config_json", "hyperparameters_json", "suite_json", "n_examples", "seconds", "robust_accuracy"],
        "images": ["shard_id"],
    }
    for table, names in hidden.items():
        for path in (tmp_path / table).rglob("*.parquet"):
            _garble(path, names)
    with pytest.raises(pa.ArrowNotImplementedError):
        read_table(tmp_path)
    with pytest.raises(pa.ArrowNotImplementedError):
        read_table(tmp_path, Table.CELLS)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "mnist/alpha" in page and "mnist/beta" in page
    assert sorted(path.name for path in (tmp_path / "figures").iterdir())[:2] == ["gallery_mnist-wasserstein-k5-p1.png", "robust_accuracy.png"]
    assert set(CELLS_SCHEMA.names) > set(hidden["cells"])


def test_the_scale_benchmark_prints_one_row_per_store(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("store_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--output", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "load average" in lines[0] and lines[1].split() == [
        "files", "example", "rows", "cells", "finish", "s", "report", "s", "finish", "ms/file", "report", "ms/file",
    ]
    rows = [line.split() for line in lines[2:]]
    # 40 and 80 shard files of 10 rows, 4 shards a cell: the first 10 cells attack; the next 10 add 2 attack cells,
    # 4 suite cells and 4 certify cells. Files: the shards, the first shard's images of each non-certify cell, a cells row each.
    assert [row[:3] for row in rows] == [["60", "400", "10"], ["116", "640", "20"]]
    for files, _, _, finish, report, finish_per_file, report_per_file in rows:
        assert float(finish) > 0 and float(report) > 0
        rounding = 1000 * 0.005 / int(files) + 0.005  # both columns are printed to two decimals
        assert float(finish_per_file) == pytest.approx(1000 * float(finish) / int(files), abs=rounding)
        assert float(report_per_file) == pytest.approx(1000 * float(report) / int(files), abs=rounding)
    assert list(tmp_path.iterdir()) == []  # stores are removed unless kept
