"""The guardrail of refactors: cell ids of every built-in grid, and the rows the smoke grid writes, stay put.

A cell's id names its results on disk (a rerun resumes by it), so a change
that moves ids orphans every stored run. The pinned values live in
``tests/pinned/``; they change only with an intentional version bump,
written by ``python tests/test_pinned_ids.py --update`` and stated in the
change's notes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "tests" / "pinned"
CELL_IDS = PINNED / "cell_ids.json"
SMOKE_ROWS = PINNED / "smoke_rows.json"

SMOKE_EXAMPLES = 2
"""Examples per smoke cell in the pinned run (a minute on a CPU)."""
UNPINNED_COLUMNS = {"attack_seconds", "verify_seconds", "schema_version"}
"""Columns that measure the machine, not the attack."""


def built_in_grid_cells() -> dict[str, list[str]]:
    """Every built-in grid's cell ids, sorted."""
    from harness.run.grid import expand_blocks
    from harness.run.grid_files import GridFiles, grid_blocks

    built_in = GridFiles()
    return {name: sorted(cell.cell_id for cell in expand_blocks(grid_blocks(built_in.load(name)))) for name in built_in.names()}


def smoke_command(results_dir: Path, data_root: str, weights_dir: str) -> list[str]:
    """The main job's command line for the smoke grid on its first :data:`SMOKE_EXAMPLES` examples, seed 0, on Ray."""
    return [
        sys.executable, "run_benchmark.py", "grid=smoke", "executor=ray", "ray.num_cpus=2", f"n_examples={SMOKE_EXAMPLES}",
        "seed=0", f"results_dir={results_dir}", f"data_root={data_root}", f"weights_dir={weights_dir}", "device=cpu",
    ]


def smoke_rows(results_dir: Path) -> list[dict]:
    """The examples rows a smoke run wrote, without the columns that measure the machine."""
    from harness.run.store import read_table

    frame = read_table(results_dir).sort_values(["cell_id", "example_index"])
    frame = frame.drop(columns=[name for name in UNPINNED_COLUMNS if name in frame.columns])
    return json.loads(frame.to_json(orient="records", double_precision=15))


def test_cell_ids_of_every_built_in_grid_are_pinned():
    pinned = json.loads(CELL_IDS.read_text())
    found = built_in_grid_cells()
    assert sorted(found) == sorted(pinned), "a built-in grid was added or removed: update the pins"
    moved = {name: sorted(set(found[name]) ^ set(pinned[name])) for name in pinned if found[name] != pinned[name]}
    assert not moved, f"cell ids moved in grids {sorted(moved)}: bump the version on purpose, or restore them"


def test_smoke_grid_rows_are_pinned_through_the_command_line_on_ray(tmp_path, published_folders):
    """The main job's path end to end (Hydra, preflight, Ray workers, store, report) writes the pinned rows."""
    from harness.run.store import Table, read_table

    results = tmp_path / "out"
    command = smoke_command(results, *published_folders)
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "grid smoke: 8 cells, 8 shards, 16 examples" in finished.stdout
    assert "8 shards run, 0 already done, 0 failed" in finished.stdout
    assert len(read_table(results, Table.CELLS)) == 8
    assert f"leaderboard: {results / 'leaderboard.html'}" in finished.stdout and (results / "leaderboard.html").is_file()
    assert (results / "figures" / "robust_accuracy.png").is_file()
    pinned = json.loads(SMOKE_ROWS.read_text())
    found = smoke_rows(results)
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
    bad = subprocess.run(command + ["grid.blocks.0.kernel_size=4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "kernel_size=4 is invalid" in bad.stdout


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_pinned_ids.py --update  (DATA_ROOT and WEIGHTS_DIR set)")
    import os
    import tempfile

    sys.path.insert(0, str(ROOT))
    PINNED.mkdir(exist_ok=True)
    CELL_IDS.write_text(json.dumps(built_in_grid_cells(), indent=1, sort_keys=True) + "\n")
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(smoke_command(Path(folder), os.environ["DATA_ROOT"], os.environ["WEIGHTS_DIR"]), cwd=ROOT, check=True)
        rows = smoke_rows(Path(folder))
    SMOKE_ROWS.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"pinned {CELL_IDS} and {SMOKE_ROWS}")
