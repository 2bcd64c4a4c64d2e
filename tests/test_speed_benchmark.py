"""``benchmarks/speed.py --quick`` on the published MNIST models: its table has every row, with finite positive numbers."""

import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_quick_table_has_finite_positive_costs(published_folders):
    data_root, weights_dir = published_folders
    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--data-root", data_root, "--weights-dir", weights_dir],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )
    assert finished.returncode == 0, finished.stderr
    rows = {}
    for line in finished.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("measure",):
            rows[cells[0]] = cells
    assert set(rows) == {"certify linear_bounds", "training attack", "training attack (fast)"}
    for measure, cells in rows.items():
        value, floor, ratio = (float(cell) for cell in cells[3:6])
        assert all(math.isfinite(number) and number > 0 for number in (value, floor, ratio)), (measure, cells)
    assert "torch threads" in finished.stdout and "N = 1" in finished.stdout
