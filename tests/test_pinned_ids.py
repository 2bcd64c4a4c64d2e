"""The guardrail of refactors: cell ids of every built-in grid, and the rows the smoke grid writes, stay put.

A cell's id names its results on disk (a rerun resumes by it), so a change
that moves ids orphans every stored run. The pinned values live in
``tests/pinned/``; they change only with an intentional version bump,
written by ``python tests/test_pinned_ids.py --update`` and stated in the
change's notes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "tests" / "pinned"
CELL_IDS = PINNED / "cell_ids.json"
SMOKE_ROWS = PINNED / "smoke_rows.json"

SMOKE_EXAMPLES = 2
"""Examples per smoke cell in the pinned run (seconds on a CPU)."""
UNPINNED_COLUMNS = {"attack_seconds", "verify_seconds", "schema_version"}
"""Columns that measure the machine, not the attack."""


def built_in_grid_cells() -> dict[str, list[str]]:
    """Every built-in grid's cell ids, sorted."""
    from harness.run.grid import expand_blocks
    from harness.run.grid_files import GridFiles, grid_blocks

    built_in = GridFiles()
    return {name: sorted(cell.cell_id for cell in expand_blocks(grid_blocks(built_in.load(name)))) for name in built_in.names()}


def smoke_rows(results_dir: Path, data_root: str, weights_dir: str) -> list[dict]:
    """The examples rows of the smoke grid on its first :data:`SMOKE_EXAMPLES` examples, seed 0, run in process."""
    from harness.run.benchmark import run_benchmark
    from harness.run.grid_files import GridFiles
    from harness.run.store import read_table

    grid = GridFiles().load("smoke")
    config = {
        "grid": grid, "executor": "local", "n_examples": SMOKE_EXAMPLES, "seed": 0, "data_root": data_root,
        "weights_dir": weights_dir, "download": False, "results_dir": str(results_dir), "device": "cpu",
        "batch_size": SMOKE_EXAMPLES, "dry_run": False, "report": False, "plugins": [], "verify_workers": 0,
        "ray": {"address": None, "num_cpus": 1},
    }
    code = run_benchmark(config)
    assert code == 0, f"the smoke run exited with {code}"
    frame = read_table(results_dir).sort_values(["cell_id", "example_index"])
    frame = frame.drop(columns=[name for name in UNPINNED_COLUMNS if name in frame.columns])
    return json.loads(frame.to_json(orient="records", double_precision=15))


def test_cell_ids_of_every_built_in_grid_are_pinned():
    pinned = json.loads(CELL_IDS.read_text())
    found = built_in_grid_cells()
    assert sorted(found) == sorted(pinned), "a built-in grid was added or removed: update the pins"
    moved = {name: sorted(set(found[name]) ^ set(pinned[name])) for name in pinned if found[name] != pinned[name]}
    assert not moved, f"cell ids moved in grids {sorted(moved)}: bump the version on purpose, or restore them"


@pytest.mark.usefixtures("single_thread")
def test_smoke_grid_rows_are_pinned(tmp_path, published_folders):
    pinned = json.loads(SMOKE_ROWS.read_text())
    found = smoke_rows(tmp_path / "results", *published_folders)
    assert len(found) == len(pinned)
    for row, expected in zip(found, pinned):
        assert sorted(row) == sorted(expected)
        where = f"cell {expected['cell_id']} example {expected['example_index']}"
        for name, value in expected.items():
            if isinstance(value, float) and isinstance(row[name], float):
                # The attack is the same computation in the same order; a single float32 rounding is the
                # largest difference a changed summation order may bring.
                assert row[name] == pytest.approx(value, rel=float(np.finfo(np.float32).eps), abs=1e-12), f"{where}: {name}"
            else:
                assert row[name] == value, f"{where}: {name}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_pinned_ids.py --update  (DATA_ROOT and WEIGHTS_DIR set)")
    import os
    import tempfile

    sys.path.insert(0, str(ROOT))
    PINNED.mkdir(exist_ok=True)
    CELL_IDS.write_text(json.dumps(built_in_grid_cells(), indent=1, sort_keys=True) + "\n")
    with tempfile.TemporaryDirectory() as folder:
        rows = smoke_rows(Path(folder), os.environ["DATA_ROOT"], os.environ["WEIGHTS_DIR"])
    SMOKE_ROWS.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"pinned {CELL_IDS} and {SMOKE_ROWS}")
