"""The Parquet result store: one canonical schema per table, one file per shard.

Layout under ``results_dir``::

    examples/dataset=mnist/model=mnist%2Fstandard/cell-<cell id>/shard-<shard id>.parquet
    images/dataset=mnist/model=mnist%2Fstandard/cell-<cell id>/shard-<shard id>.parquet
    certificates/dataset=mnist/model=mnist%2Fstandard/cell-<cell id>/shard-<shard id>.parquet
    cells/dataset=mnist/model=mnist%2Fstandard/shard-<cell id>.parquet

Hive-partitioned by data set and model (partition values URI-encoded, so
registry names with ``/`` stay one folder). The shards of a cell share a
folder of their own (its name holds no ``=``, so Hive readers such as
:func:`pandas.read_parquet` see no column for it): :func:`read_cell` reads a
cell's rows from its own files, however many other cells the store holds.
A shard is written to a hidden temporary file in its final folder, flushed,
then renamed: readers never see half a file, and the names they skip
(leading ``.``) cover any temporary file a crash leaves behind. A shard's id
comes from a hash of its configuration, so a rerun finds what is done
(:func:`shard_exists`) and writing the same shard twice replaces it with
identical content instead of duplicating rows.

Stores written before the cell folders keep every shard directly in its
partition folder. They read, resume and grow as they are: the readers take
both places, :func:`shard_exists` finds a shard in either, and a shard
written again moves to its cell's folder. Their cells are read by
filtering every such file of the partition, as before; only shards written
since are read by folder. The columns did not change with the layout, so
neither did :data:`SCHEMA_VERSION` (it describes the rows, which both
layouts read alike).

Every table is cast to its schema (with a ``schema_version`` column) before it
is written; a column missing, extra, or of a type that does not convert is an
error that names it.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
import uuid
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

__all__ = [
    "CELLS_SCHEMA",
    "CERTIFICATES_SCHEMA",
    "EXAMPLES_SCHEMA",
    "IMAGES_SCHEMA",
    "PARTITION_SCHEMA",
    "SCHEMA_VERSION",
    "StoreTable",
    "Table",
    "read_cell",
    "read_table",
    "shard_exists",
    "shard_path",
    "write_shard",
]

SCHEMA_VERSION = 6
"""Bumped whenever a table or column is added, removed or changes meaning.

Version 2 added the ``images`` table, and to ``cells`` the model's
``trained_for``, ``model_training`` and ``model_paper`` and the attack's
``attack_summary`` and ``box_handling``. Version 3 added, to ``examples``
and ``cells``, ``final_eps`` (the largest radius the schedule searched),
``ball_title``, the typed solver hyperparameters of
:data:`TYPED_HYPERPARAMETERS` and ``hyperparameters_json`` (the full set),
and to ``cells`` ``ball_description``. Older files read with the new
columns filled where they can be derived (``final_eps``, ``ball_title``)
and empty otherwise. Version 4 added, to ``examples`` and ``cells``,
``eps_increment`` (the additive growth of a schedule; 0 in older rows) and
the evaluation suite of a suite cell (``suite``, ``suite_version``,
``suite_json``; empty for single attacks), and to ``examples`` the suite's
``schedule_radius``, ``found_by``, ``refined_by`` and ``rejected_claims``.
Version 5 added the ``certificates`` table (one row per example and radius
of a certify cell) and, to ``cells``, a certify cell's settings
(``certifier``, ``box``, ``time_limit``, ``radius_rounds``; empty for attack
cells, and in older rows). Version 6 added, to ``examples`` and ``cells``,
``failed_model_checks``: the :class:`~harness.vocabulary.ModelCheck` values
that failed on the model (:mod:`harness.attack.model_checks`, run on each
shard's clean images, with ``zero_gradient_steps`` where the attack counted
such steps; empty when every check passed; null in older rows and for
certify cells)."""

TYPED_HYPERPARAMETERS = {
    "lam": pa.float64(),
    "tol": pa.float64(),
    "max_iter": pa.int32(),
    "relaxation": pa.float64(),
    "box_tol": pa.float64(),
    "box_max_iter": pa.int32(),
}
"""Solver hyperparameters with a column of their own (null where a cell's solver does not
declare them); every hyperparameter, these included, is in ``hyperparameters_json``."""


class Table(enum.Enum):
    """The tables of the store."""

    EXAMPLES = "examples"
    """One row per attacked example."""
    CELLS = "cells"
    """One row per grid cell."""
    IMAGES = "images"
    """Clean and adversarial images of the first examples of each cell (galleries)."""
    CERTIFICATES = "certificates"
    """One row per certified example and radius."""


PARTITION_SCHEMA = pa.schema([pa.field("dataset", pa.string()), pa.field("model", pa.string())])
"""The partition columns, stored in the folder names rather than in the files."""

# The configuration of a cell: every hyperparameter that changes the numbers.
_CELL_CONFIG = [
    pa.field("cell_id", pa.string(), nullable=False),
    pa.field("threat_model", pa.string(), nullable=False),
    pa.field("ball_title", pa.string()),
    pa.field("solver", pa.string()),
    pa.field("kernel_size", pa.int32()),
    pa.field("p", pa.float64()),
    *(pa.field(name, kind) for name, kind in TYPED_HYPERPARAMETERS.items()),
    pa.field("hyperparameters_json", pa.string()),
    pa.field("step_rule", pa.string()),
    pa.field("step_size", pa.float64()),
    pa.field("clamp", pa.bool_()),
    pa.field("eps_initial", pa.float64()),
    pa.field("eps_factor", pa.float64()),
    pa.field("eps_every", pa.int32()),
    pa.field("eps_increment", pa.float64()),
    pa.field("iterations", pa.int32()),
    pa.field("final_eps", pa.float64()),
    pa.field("loss", pa.string()),
    pa.field("restarts", pa.int32()),
    pa.field("seed", pa.int64()),
    pa.field("gradient_mode", pa.string()),
    pa.field("suite", pa.string()),
    pa.field("suite_version", pa.int32()),
    pa.field("suite_json", pa.string()),
]

# The settings of a certify cell (null for attack cells).
_CERTIFY_CONFIG = [
    pa.field("certifier", pa.string()),
    pa.field("box", pa.bool_()),
    pa.field("time_limit", pa.float64()),
    pa.field("radius_rounds", pa.int32()),
]

EXAMPLES_SCHEMA = pa.schema(
    [pa.field("schema_version", pa.int16(), nullable=False)]
    + _CELL_CONFIG
    + [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("example_index", pa.int64(), nullable=False),
        pa.field("label", pa.int16()),
        pa.field("clean_prediction", pa.int16()),
        pa.field("adversarial_prediction", pa.int16()),
        pa.field("success", pa.bool_()),
        pa.field("eps_found", pa.float64()),
        pa.field("verification_status", pa.string()),
        pa.field("verified_distance", pa.float64()),
        pa.field("schedule_radius", pa.float64()),
        pa.field("found_by", pa.string()),
        pa.field("refined_by", pa.string()),
        pa.field("rejected_claims", pa.int32()),
        pa.field("distance", pa.float64()),
        pa.field("mass_error", pa.float64()),
        pa.field("box_violation", pa.float64()),
        pa.field("unreachable_mass", pa.float64()),
        pa.field("steps", pa.int32()),
        pa.field("restart", pa.int16()),
        pa.field("solver_iterations", pa.int64()),
        pa.field("unconverged_steps", pa.int32()),
        pa.field("failed_steps", pa.int32()),
        pa.field("zero_gradient_steps", pa.int32()),
        pa.field("failed_model_checks", pa.list_(pa.string())),
        pa.field("attack_seconds", pa.float64()),
        pa.field("verify_seconds", pa.float64()),
    ]
)
"""Columns of the ``examples`` table (the partition columns come from the path).

``failed_model_checks`` holds the shard's failed model checks (the same list
on each of its rows)."""

CELLS_SCHEMA = pa.schema(
    [pa.field("schema_version", pa.int16(), nullable=False)]
    + _CELL_CONFIG
    + _CERTIFY_CONFIG
    + [
        pa.field("status", pa.string(), nullable=False),
        pa.field("n_examples", pa.int64()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("seconds", pa.float64()),
        pa.field("clean_accuracy", pa.float64()),
        pa.field("robust_accuracy", pa.float64()),
        pa.field("failed_model_checks", pa.list_(pa.string())),
        pa.field("trained_for", pa.string()),
        pa.field("model_training", pa.string()),
        pa.field("model_paper", pa.string()),
        pa.field("attack_summary", pa.string()),
        pa.field("box_handling", pa.string()),
        pa.field("ball_description", pa.string()),
        pa.field("config_json", pa.string()),
        pa.field("package_versions_json", pa.string()),
        pa.field("git_commit", pa.string()),
        pa.field("device", pa.string()),
    ]
)
"""Columns of the ``cells`` table: the cell's configuration, outcome, model and provenance.

For a certify cell ``robust_accuracy`` is the certified accuracy at its
largest radius (``final_eps``), and ``attack_summary`` and ``box_handling``
describe the certifier. ``failed_model_checks`` is every check that failed
on any of the cell's shards on disk (null for a certify cell)."""

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int16(), nullable=False),
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("example_index", pa.int64(), nullable=False),
        pa.field("channels", pa.int16(), nullable=False),
        pa.field("height", pa.int16(), nullable=False),
        pa.field("width", pa.int16(), nullable=False),
        pa.field("original", pa.list_(pa.float32()), nullable=False),
        pa.field("adversarial", pa.list_(pa.float32()), nullable=False),
    ]
)
"""Columns of the ``images`` table: pixels in [0, 1], flattened channel-first.

Join with ``examples`` on ``cell_id`` and ``example_index`` for labels,
predictions and verified distances."""

CERTIFICATES_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int16(), nullable=False),
        pa.field("cell_id", pa.string(), nullable=False),
        pa.field("threat_model", pa.string(), nullable=False),
        pa.field("ball_title", pa.string()),
        pa.field("kernel_size", pa.int32()),
        pa.field("p", pa.float64()),
    ]
    + _CERTIFY_CONFIG
    + [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("example_index", pa.int64(), nullable=False),
        pa.field("label", pa.int16()),
        pa.field("clean_prediction", pa.int16()),
        pa.field("eps", pa.float64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("margin_lower", pa.float64()),
        pa.field("safety_margin", pa.float64()),
        pa.field("seconds", pa.float64()),
        pa.field("certified_radius", pa.float64()),
        pa.field("radius_search_seconds", pa.float64()),
    ]
)
"""Columns of the ``certificates`` table: one row per example and radius of a certify cell.

``status`` is a :class:`~harness.vocabulary.CertificateStatus` value;
``margin_lower`` the proven lower bound on the smallest logit margin over
the ball (null where that radius was not evaluated: the example was decided
at a smaller one); ``safety_margin`` the bound on the solver's and the
float error that ``margin_lower`` had to exceed for ``certified`` (schema
6; null in older stores); ``seconds`` the certifier's time on the example at that
radius. ``certified_radius`` (the largest radius proven, the bisection after
the ladder included; 0 when none) and ``radius_search_seconds`` (the
example's share of the rest of its shard's time: that bisection, reading the
network) belong to the example and repeat on each of its rows."""

_SCHEMAS = {
    Table.EXAMPLES: EXAMPLES_SCHEMA, Table.CELLS: CELLS_SCHEMA, Table.IMAGES: IMAGES_SCHEMA, Table.CERTIFICATES: CERTIFICATES_SCHEMA,
}
_PARTITIONING = pads.partitioning(PARTITION_SCHEMA, flavor="hive")


@dataclass(frozen=True)
class StoreTable:
    """A table beside the built-in ones, for a kind of cell a plugin adds: its folder name and its columns.

    It is partitioned, written and read like a :class:`Table`; its rows
    carry ``schema_version`` (the store's) as the first column.
    """

    value: str
    schema: pa.Schema

    def __post_init__(self):
        if self.value in {table.value for table in Table} or not self.value.isidentifier():
            raise ValueError(f"table name {self.value!r} is invalid: it must be an identifier, not one of {[t.value for t in Table]}")
        if self.schema.names[:1] != ["schema_version"]:
            raise ValueError(f"table {self.value!r}: its schema must start with schema_version (int16)")


def _check_table(table: Table | StoreTable) -> Table | StoreTable:
    if not isinstance(table, (Table, StoreTable)):
        raise ValueError(f"table={table!r} is invalid: allowed {[t.value for t in Table]} or a StoreTable")
    return table


def _schema(table: Table | StoreTable) -> pa.Schema:
    return table.schema if isinstance(table, StoreTable) else _SCHEMAS[table]


def _check_id(name: str, value: str) -> str:
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "-_" for c in value):
        raise ValueError(f"{name}={value!r} is invalid: it must be a non-empty string of letters, digits, '-' and '_'")
    return value


def _partition_folder(results_dir: str | os.PathLike, table: Table, dataset: str, model: str) -> Path:
    folder = Path(results_dir) / _check_table(table).value
    for field, value in (("dataset", dataset), ("model", model)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{field}={value!r} is invalid: it must be a non-empty string")
        folder = folder / f"{field}={quote(value, safe='')}"
    return folder


def _cell_folder(results_dir: str | os.PathLike, table: Table, dataset: str, model: str, cell_id: str) -> Path:
    return _partition_folder(results_dir, table, dataset, model) / f"cell-{_check_id('cell_id', cell_id)}"


def shard_path(
    results_dir: str | os.PathLike, table: Table, dataset: str, model: str, shard_id: str, cell_id: str | None = None
) -> Path:
    """Where the shard ``shard_id`` of ``table`` lives.

    Parameters
    ----------
    results_dir : str or os.PathLike
    table : Table
    dataset, model : str
        Partition values.
    shard_id : str
        The shard's id; in the ``cells`` table, the cell's.
    cell_id : str, optional
        The cell the shard belongs to: required for every table but
        ``cells`` (whose shard is the cell itself).
    """
    name = f"shard-{_check_id('shard_id', shard_id)}.parquet"
    if _check_table(table) is Table.CELLS:
        if cell_id is not None and cell_id != shard_id:
            raise ValueError(f"cell_id={cell_id!r} is invalid: a shard of the cells table is its cell, {shard_id!r}")
        return _partition_folder(results_dir, table, dataset, model) / name
    if cell_id is None:
        raise ValueError(f"cell_id=None is invalid: a shard of the {table.value} table lives in its cell's folder")
    return _cell_folder(results_dir, table, dataset, model, cell_id) / name


def _unfoldered_path(path: Path) -> Path:
    """Where a store older than the cell folders kept the shard at ``path``: in the partition folder itself."""
    return path.parent.parent / path.name


def shard_exists(
    results_dir: str | os.PathLike, table: Table, dataset: str, model: str, shard_id: str, cell_id: str | None = None
) -> bool:
    """Whether a finished file for this shard is on disk (in an older store's layout too); arguments as :func:`shard_path`."""
    path = shard_path(results_dir, table, dataset, model, shard_id, cell_id)
    return path.is_file() or (table is not Table.CELLS and _unfoldered_path(path).is_file())


def _as_arrow(table: Table, columns: Mapping[str, Any]) -> pa.Table:
    schema = _schema(table)
    expected = [name for name in schema.names if name != "schema_version"]
    missing = [name for name in expected if name not in columns]
    extra = [name for name in columns if name not in expected]
    if missing or extra:
        raise ValueError(
            f"the {table.value} table has the wrong columns: missing {missing or 'none'}, unexpected {extra or 'none'} "
            f"(schema version {SCHEMA_VERSION}: {', '.join(expected)})"
        )
    lengths = {len(value) for value in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"the {table.value} columns have different lengths: {sorted(lengths)}")
    (rows,) = lengths
    arrays = {"schema_version": pa.array([SCHEMA_VERSION] * rows, pa.int16())}
    for name in expected:
        field = schema.field(name)
        try:
            arrays[name] = pa.array(columns[name], type=field.type, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as error:
            raise ValueError(f"column {name!r} of the {table.value} table does not convert to {field.type}: {error}") from error
        if not field.nullable and arrays[name].null_count:
            raise ValueError(f"column {name!r} of the {table.value} table has {arrays[name].null_count} missing values; it must be complete")
    return pa.table(arrays, schema=schema)


def write_shard(
    results_dir: str | os.PathLike, table: Table, dataset: str, model: str, shard_id: str, columns: Mapping[str, Any]
) -> Path:
    """Write one shard atomically and return its path.

    Parameters
    ----------
    results_dir : str or os.PathLike
    table : Table
    dataset, model : str
        Partition values (e.g. ``"mnist"``, ``"mnist/standard"``).
    shard_id : str
        Hash of the shard's configuration (letters, digits, ``-``, ``_``).
    columns : mapping of str to array-like
        Exactly the table's columns except ``schema_version`` (added here),
        all of one length. Except in the ``cells`` table, every row has the
        same ``cell_id``: the shard goes to that cell's folder.

    Returns
    -------
    pathlib.Path
        The final file. An existing file for the same shard is replaced
        (one in an older store's layout too).
    """
    arrow = _as_arrow(_check_table(table), columns)
    path = shard_path(results_dir, table, dataset, model, shard_id, None if table is Table.CELLS else _only_cell(table, arrow))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            pq.write_table(arrow, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    if table is not Table.CELLS:  # the same shard in an older store's layout: replaced, not duplicated
        _unfoldered_path(path).unlink(missing_ok=True)
    return path


def _only_cell(table: Table, arrow: pa.Table) -> str:
    """The one cell whose rows a shard holds (its folder)."""
    cells = arrow.column("cell_id").unique().to_pylist()
    if len(cells) != 1:
        raise ValueError(f"a shard of the {table.value} table holds the rows of one cell: these rows have cell ids {cells}")
    return cells[0]


def read_table(
    results_dir: str | os.PathLike,
    table: Table = Table.EXAMPLES,
    filters=None,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """Read a table of the store as a pandas DataFrame.

    Parameters
    ----------
    results_dir : str or os.PathLike
    table : Table, default examples
    filters : list of tuples, optional
        As in :func:`pandas.read_parquet`, e.g.
        ``[("model", "==", "mnist/standard"), ("solver", "in", ["projected_sinkhorn_box"])]``;
        partition filters skip whole folders.
    columns : list of str, optional
        The columns to read (default all, partition columns included). The
        others are never read: name the few a caller needs, on a large store.

    Returns
    -------
    pandas.DataFrame
        Finished shards only (temporary files are never read); an empty frame
        with the table's columns when nothing has been written yet.

    See Also
    --------
    read_cell : The rows of one cell, from its own files.
    """
    schema = _schema(_check_table(table))
    root = Path(results_dir) / table.value
    if not root.is_dir():
        return _read(table, None, columns, None, {})
    full = pa.schema(list(schema) + list(PARTITION_SCHEMA))
    dataset = pads.dataset(str(root), format="parquet", partitioning=_PARTITIONING, schema=full, ignore_prefixes=[".", "_"])
    return _read(table, dataset, columns, pq.filters_to_expression(filters) if filters else None, {})


def read_cell(
    results_dir: str | os.PathLike, table: Table, dataset: str, model: str, cell_id: str, columns: list[str] | None = None
) -> pd.DataFrame:
    """Read the rows of one cell from its own files.

    Parameters
    ----------
    results_dir : str or os.PathLike
    table : Table
    dataset, model : str
        The cell's partition values.
    cell_id : str
    columns : list of str, optional
        The columns to read (default all, partition columns included).

    Returns
    -------
    pandas.DataFrame
        As :func:`read_table` filtered on ``cell_id``, in time that grows with
        the cell's own files, not the store's: the files of the cell's
        folder (the cell's one file, in the ``cells`` table). Shards of a
        store older than the cell folders are found by reading every such
        shard of the partition.
    """
    if _check_table(table) is Table.CELLS:
        path = shard_path(results_dir, table, dataset, model, cell_id)
        own, unfoldered = ([str(path)] if path.is_file() else []), []
    else:
        own = _shard_files(_cell_folder(results_dir, table, dataset, model, cell_id))
        unfoldered = _shard_files(_partition_folder(results_dir, table, dataset, model))
    source = pads.dataset(own + unfoldered, format="parquet", schema=_schema(table)) if own or unfoldered else None
    expression = pc.field("cell_id") == cell_id if unfoldered else None
    return _read(table, source, columns, expression, {"dataset": dataset, "model": model})


def _shard_files(folder: Path) -> list[str]:
    """The finished shard files directly in ``folder`` (none when it does not exist)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    return sorted(e.path for e in entries if e.name.startswith("shard-") and e.name.endswith(".parquet") and e.is_file())


def _read(
    table: Table, source: pads.Dataset | None, columns: list[str] | None, expression, partition: Mapping[str, str]
) -> pd.DataFrame:
    """``columns`` (default all) of the rows of ``source`` that match ``expression``, upgraded from older versions.

    ``partition`` holds the partition columns' values where ``source`` does not supply them.
    """
    schema = _schema(table)
    wanted = list(schema.names) + list(PARTITION_SCHEMA.names) if columns is None else list(columns)
    # The tables that existed before version 3 (the others have every column from their first version), where a
    # column that older rows lack is wanted.
    upgraded = table in (Table.EXAMPLES, Table.CELLS) and not _UPGRADED.isdisjoint(wanted)
    read = [name for name in dict.fromkeys([*wanted, *(_UPGRADE_INPUTS if upgraded else ())]) if name not in partition]
    if source is None:
        arrow = pa.schema(list(schema) + list(PARTITION_SCHEMA)).empty_table().select(read)
    else:
        arrow = source.to_table(columns=read, filter=expression)
    for name, value in partition.items():
        if name in wanted:
            arrow = arrow.append_column(PARTITION_SCHEMA.field(name), pa.array([value] * arrow.num_rows, pa.string()))
    # One chunk per file otherwise: pandas' string columns keep them, and every selection pays for each.
    frame = arrow.combine_chunks().to_pandas()
    frame = _upgrade(frame) if upgraded else frame
    return frame[wanted]


_UPGRADE_INPUTS = ("schema_version", "eps_initial", "eps_factor", "eps_every", "iterations", "threat_model", "kernel_size", "p")
"""The columns older rows' ``final_eps`` and ``ball_title`` are derived from."""
_UPGRADED = frozenset({"eps_increment", "final_eps", "ball_title", "ball_description"})
"""The columns :func:`_upgrade` fills in older rows."""


def _upgrade(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill the version-3 columns of rows written by older versions, where they can be derived."""
    if (frame["schema_version"] < 4).any() and "eps_increment" in frame:
        frame = frame.copy()
        frame.loc[frame["schema_version"] < 4, "eps_increment"] = 0.0
    old = frame["schema_version"] < 3
    if not old.any():
        return frame
    frame = frame.copy()
    schedule = frame.loc[old, ["eps_initial", "eps_factor", "eps_every", "iterations"]]
    # The largest radius of a schedule eps_initial * eps_factor ** (t // eps_every), t < iterations.
    frame.loc[old, "final_eps"] = schedule["eps_initial"] * schedule["eps_factor"] ** ((schedule["iterations"] - 1) // schedule["eps_every"])
    geometry = frame.loc[old, ["threat_model", "kernel_size", "p"]]
    frame.loc[old, "ball_title"] = [
        f"{kind} ball" if pd.isna(k) else f"{kind} ball, {int(k)}x{int(k)} local transport, p = {p:g}"
        for kind, k, p in geometry.itertuples(index=False)
    ]
    if "ball_description" in frame:  # a column of the cells table only
        frame.loc[old, "ball_description"] = "not recorded (store version " + frame.loc[old, "schema_version"].astype(str) + ")"
    return frame
