"""Tests of the Parquet result store (harness/store.py): what lands on disk, and what readers see."""

from __future__ import annotations

import math
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.run import store
from harness.run.store import CELLS_SCHEMA, EXAMPLES_SCHEMA, Table, read_table, shard_exists, shard_path, write_shard


def example_columns(shard_id: str, rows: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    columns = {field.name: [None] * rows for field in EXAMPLES_SCHEMA if field.name != "schema_version"}
    columns.update(
        cell_id=["cell-a"] * rows,
        threat_model=["wasserstein"] * rows,
        solver=["projected_sinkhorn_box"] * rows,
        kernel_size=[5] * rows,
        p=[1.0] * rows,
        shard_id=[shard_id] * rows,
        example_index=np.arange(rows),
        label=rng.integers(0, 10, rows),
        success=rng.random(rows) < 0.5,
        eps_found=rng.random(rows),
        verified_distance=np.r_[rng.random(rows - 1), math.inf],
        verification_status=["VERIFIED"] * (rows - 1) + ["NOT_FOUND"],
    )
    return columns


def test_round_trip_with_partitions_and_types(tmp_path):
    first = write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "shard1", example_columns("shard1"))
    write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/binarized", "shard2", example_columns("shard2", rows=2, seed=1))
    assert first == tmp_path / "examples" / "dataset=mnist" / "model=mnist%2Fstandard" / "cell-cell-a" / "shard-shard1.parquet"
    assert pq.read_schema(first).equals(EXAMPLES_SCHEMA, check_metadata=False)
    frame = read_table(tmp_path)
    assert len(frame) == 5
    assert sorted(frame["model"].unique()) == ["mnist/binarized", "mnist/standard"]
    standard = frame[frame["model"] == "mnist/standard"].sort_values("example_index")
    expected = example_columns("shard1")
    assert np.allclose(standard["eps_found"], expected["eps_found"])
    assert np.isinf(standard["verified_distance"].iloc[-1])
    assert (frame["schema_version"] == store.SCHEMA_VERSION).all()
    # What a user types gets the same rows.
    by_pandas = pd.read_parquet(tmp_path / "examples", filters=[("model", "==", "mnist/standard")])
    assert len(by_pandas) == 3 and set(by_pandas["model"].astype(str)) == {"mnist/standard"}


def test_filters_on_partition_and_data_columns(tmp_path):
    write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", example_columns("s1", rows=4))
    write_shard(tmp_path, Table.EXAMPLES, "cifar10", "cifar10/resnet18", "s2", example_columns("s2", rows=2))
    assert len(read_table(tmp_path, filters=[("dataset", "==", "cifar10")])) == 2
    verified = read_table(tmp_path, filters=[("verification_status", "==", "VERIFIED"), ("dataset", "==", "mnist")])
    assert len(verified) == 3
    assert list(read_table(tmp_path, columns=["example_index", "model"]).columns) == ["example_index", "model"]


def test_rewriting_a_shard_replaces_it(tmp_path):
    write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", example_columns("s1", seed=0))
    write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", example_columns("s1", seed=5))
    frame = read_table(tmp_path)
    assert len(frame) == 3
    assert np.allclose(frame.sort_values("example_index")["eps_found"], example_columns("s1", seed=5)["eps_found"])
    assert shard_exists(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", "cell-a")
    assert not shard_exists(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s2", "cell-a")


def test_stray_temporary_files_are_ignored(tmp_path):
    path = write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", example_columns("s1"))
    (path.parent / f".{path.name}.0123.tmp").write_bytes(b"PAR1 half a file")
    (path.parent / "_scratch").write_bytes(b"not parquet")
    assert len(read_table(tmp_path)) == 3
    assert len(pd.read_parquet(tmp_path / "examples")) == 3


def test_a_crash_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_write(table, handle):
        handle.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(store.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", example_columns("s1"))
    folder = shard_path(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", "cell-a").parent
    assert list(folder.iterdir()) == []
    assert read_table(tmp_path).empty


def test_empty_store_gives_the_schema_columns(tmp_path):
    frame = read_table(tmp_path, Table.CELLS)
    assert frame.empty
    assert set(CELLS_SCHEMA.names) | {"dataset", "model"} == set(frame.columns)


def test_wrong_columns_are_named(tmp_path):
    columns = example_columns("s1")
    del columns["eps_found"]
    columns["epsilon"] = [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match=r"missing \['eps_found'\], unexpected \['epsilon'\]"):
        write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", columns)
    columns = example_columns("s1")
    columns["steps"] = ["many", "few", "none"]
    with pytest.raises(ValueError, match="column 'steps' .* does not convert to int32"):
        write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", columns)
    columns = example_columns("s1")
    columns["cell_id"] = ["a", None, "a"]
    with pytest.raises(ValueError, match="column 'cell_id' .* 1 missing values"):
        write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", columns)
    columns = example_columns("s1")
    columns["label"] = [1, 2]
    with pytest.raises(ValueError, match=r"different lengths: \[2, 3\]"):
        write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", columns)
    assert not (tmp_path / "examples").exists() or read_table(tmp_path).empty


@pytest.mark.parametrize("shard_id", ["", "../escape", "a b", None])
def test_bad_shard_ids_and_tables(tmp_path, shard_id):
    with pytest.raises(ValueError, match="shard_id="):
        shard_path(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", shard_id, "cell-a")
    with pytest.raises(ValueError, match="table='examples' is invalid"):
        read_table(tmp_path, "examples")
    with pytest.raises(ValueError, match="model='' is invalid"):
        shard_path(tmp_path, Table.EXAMPLES, "mnist", "", "s1", "cell-a")


def test_schemas_carry_a_version_and_share_the_cell_configuration():
    assert EXAMPLES_SCHEMA.names[0] == CELLS_SCHEMA.names[0] == "schema_version"
    config = [name for name in EXAMPLES_SCHEMA.names if name in CELLS_SCHEMA.names]
    assert {"cell_id", "solver", "kernel_size", "p", "lam", "seed", "gradient_mode"} <= set(config)
    assert not set(store.PARTITION_SCHEMA.names) & set(EXAMPLES_SCHEMA.names)
    assert EXAMPLES_SCHEMA.field("verified_distance").type == pa.float64()


V3_COLUMNS = {"final_eps", "ball_title", "ball_description", "hyperparameters_json", *store.TYPED_HYPERPARAMETERS} - {"lam"}


def unfoldered_path(results_dir, table: Table, shard_id: str, model: str = "mnist/standard"):
    """Where a store older than the cell folders kept a shard: directly in its partition folder."""
    return results_dir / table.value / "dataset=mnist" / f"model={quote(model, safe='')}" / f"shard-{shard_id}.parquet"


def _write_as_version_2(results_dir, table: Table, schema: pa.Schema, shard_id: str, rows: dict) -> None:
    """A shard as version 2 wrote it: without the version-3 columns, stamped version 2, in the partition folder."""
    older = pa.schema([field for field in schema if field.name not in V3_COLUMNS])
    columns = {name: rows[name] for name in older.names if name != "schema_version"}
    length = len(next(iter(columns.values())))
    arrow = pa.table({"schema_version": pa.array([2] * length, pa.int16()), **columns}, schema=older)
    path = unfoldered_path(results_dir, table, shard_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(arrow, path)


def test_version_2_stores_read_with_the_derivable_columns_filled(tmp_path):
    rows = example_columns("old", rows=3)
    rows.update(eps_initial=[0.3] * 3, eps_factor=[1.1] * 3, eps_every=[10] * 3, iterations=[200] * 3, lam=[1000.0] * 3)
    _write_as_version_2(tmp_path, Table.EXAMPLES, EXAMPLES_SCHEMA, "old", rows)
    linf = example_columns("old-linf", rows=2)
    linf.update(threat_model=["linf"] * 2, solver=[None] * 2, kernel_size=[None] * 2, p=[None] * 2, eps_initial=[0.1] * 2,
                eps_factor=[1.0] * 2, eps_every=[40] * 2, iterations=[40] * 2)
    _write_as_version_2(tmp_path, Table.EXAMPLES, EXAMPLES_SCHEMA, "old-linf", linf)
    cell = {name: [None] for name in CELLS_SCHEMA.names}
    cell.update({name: [values[0]] for name, values in rows.items() if name in CELLS_SCHEMA.names}, status=["complete"])
    _write_as_version_2(tmp_path, Table.CELLS, CELLS_SCHEMA, "cell-a", cell)
    frame = read_table(tmp_path).sort_values(["threat_model", "example_index"])
    assert frame["final_eps"].tolist() == pytest.approx([0.1, 0.1] + [0.3 * 1.1**19] * 3)
    assert frame["ball_title"].tolist() == ["linf ball"] * 2 + ["wasserstein ball, 5x5 local transport, p = 1"] * 3
    assert frame["lam"].tolist()[2:] == [1000.0] * 3 and frame["max_iter"].isna().all() and frame["hyperparameters_json"].isna().all()
    cells = read_table(tmp_path, Table.CELLS)
    assert cells["ball_description"].tolist() == ["not recorded (store version 2)"]
    assert read_table(tmp_path, columns=["final_eps"]).shape == (5, 1)


def test_version_5_stores_read_with_the_model_checks_empty(tmp_path):
    """Rows written before version 6 have no ``failed_model_checks``: null, not an empty list (which means all passed)."""
    old = example_columns("old", rows=2)
    older = pa.schema([field for field in EXAMPLES_SCHEMA if field.name != "failed_model_checks"])
    arrow = pa.table({"schema_version": pa.array([5, 5], pa.int16()), **{name: old[name] for name in older.names[1:]}}, schema=older)
    path = unfoldered_path(tmp_path, Table.EXAMPLES, "old")
    path.parent.mkdir(parents=True)
    pq.write_table(arrow, path)
    new = example_columns("new", rows=2)
    new.update(failed_model_checks=[[], ["probability_outputs", "zero_gradient_steps"]])
    write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "new", new)
    frame = read_table(tmp_path).sort_values(["schema_version", "example_index"])
    assert frame["schema_version"].tolist() == [5, 5, 6, 6] and store.SCHEMA_VERSION == 6
    checks = frame["failed_model_checks"].tolist()
    assert checks[:2] == [None, None] and list(checks[2]) == [] and list(checks[3]) == ["probability_outputs", "zero_gradient_steps"]
    assert EXAMPLES_SCHEMA.field("failed_model_checks").type == CELLS_SCHEMA.field("failed_model_checks").type == pa.list_(pa.string())


def test_a_shard_lands_in_its_cells_folder_and_holds_one_cell(tmp_path):
    path = write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", example_columns("s1"))
    assert path == shard_path(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1", "cell-a")
    assert path.parent.name == "cell-cell-a"
    two_cells = example_columns("s2")
    two_cells["cell_id"] = ["cell-a", "cell-b", "cell-a"]
    with pytest.raises(ValueError, match=r"holds the rows of one cell: these rows have cell ids \['cell-a', 'cell-b'\]"):
        write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s2", two_cells)
    with pytest.raises(ValueError, match="cell_id=None is invalid"):
        shard_exists(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "s1")
    # Hive readers see the data set and model, and nothing for the cell's folder.
    assert set(pd.read_parquet(tmp_path / "examples").columns) == set(EXAMPLES_SCHEMA.names) | {"dataset", "model"}


def _cell_columns(cell_id: str, shard_id: str, start: int, rows: int = 3) -> dict:
    columns = example_columns(shard_id, rows=rows)
    columns.update(cell_id=[cell_id] * rows, example_index=np.arange(start, start + rows))
    return columns


def test_read_cell_opens_only_the_cells_own_files(tmp_path):
    write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "a1", _cell_columns("cell-a", "a1", 0))
    write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "a2", _cell_columns("cell-a", "a2", 3))
    other = write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "b1", _cell_columns("cell-b", "b1", 0))
    other.write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(pa.ArrowInvalid):
        read_table(tmp_path)
    frame = store.read_cell(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "cell-a", ["example_index", "model", "eps_found"])
    assert list(frame.columns) == ["example_index", "model", "eps_found"]
    assert sorted(frame["example_index"]) == [0, 1, 2, 3, 4, 5] and set(frame["model"]) == {"mnist/standard"}
    everything = store.read_cell(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "cell-a")
    assert list(everything.columns) == [*EXAMPLES_SCHEMA.names, "dataset", "model"] and len(everything) == 6
    missing = store.read_cell(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "cell-c", ["example_index", "dataset"])
    assert missing.empty and list(missing.columns) == ["example_index", "dataset"]


def test_an_older_stores_shards_are_found_read_and_replaced_without_duplicates(tmp_path):
    """A store written before the cell folders: its shards lie in the partition folder, every cell's together."""
    for cell_id, shard_id in (("cell-a", "a1"), ("cell-b", "b1")):
        path = write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", shard_id, _cell_columns(cell_id, shard_id, 0))
        path.rename(unfoldered_path(tmp_path, Table.EXAMPLES, shard_id))
        path.parent.rmdir()
    assert shard_exists(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "a1", "cell-a")
    write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "a2", _cell_columns("cell-a", "a2", 3))
    read = store.read_cell(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "cell-a", ["example_index", "cell_id"])
    assert sorted(read["example_index"]) == [0, 1, 2, 3, 4, 5] and set(read["cell_id"]) == {"cell-a"}
    assert len(read_table(tmp_path)) == 9
    # Written again (a forced rerun): the shard moves to its cell's folder; its rows are not doubled.
    write_shard(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "a1", _cell_columns("cell-a", "a1", 0))
    assert not unfoldered_path(tmp_path, Table.EXAMPLES, "a1").exists()
    assert unfoldered_path(tmp_path, Table.EXAMPLES, "b1").exists()
    assert len(read_table(tmp_path)) == 9
    assert len(store.read_cell(tmp_path, Table.EXAMPLES, "mnist", "mnist/standard", "cell-a", ["example_index"])) == 6
