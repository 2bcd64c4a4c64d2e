"""The project is a complete package: its wheel holds every subpackage and the grids, and its command line
runs from any folder, where a grid of the user's may include built-in grids and other grids of the user's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("harness", "solvers", "zoo")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (so that no earlier build folder leaks into it), without internet."""
    sources = tmp_path_factory.mktemp("sources")
    for name in ("pyproject.toml", "README.md", *TOP_LEVEL):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, sources / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    wheels = tmp_path_factory.mktemp("wheels")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(sources), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = wheels.glob("*.whl")
    return found


def test_the_wheel_holds_every_subpackage_and_the_configuration(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(
        path.parent.relative_to(ROOT).as_posix() for package in TOP_LEVEL for path in (ROOT / package).rglob("__init__.py")
    )
    assert {"harness/train", "harness/certify", "harness/conf", "zoo/contrib"} <= set(packages)
    missing = [package for package in packages if f"{package}/__init__.py" not in names]
    assert not missing, f"subpackages missing from the wheel: {missing}"
    modules = sorted(path.relative_to(ROOT).as_posix() for package in TOP_LEVEL for path in (ROOT / package).rglob("*.py"))
    assert not [module for module in modules if module not in names]
    grids = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "harness" / "conf" / "grid").glob("*.yaml"))
    assert "harness/conf/grid/smoke.yaml" in grids and "harness/conf/config.yaml" in names
    assert not [grid for grid in grids if grid not in names]
    assert not [name for name in names if name.startswith(("tests/", "benchmarks/", "docs/", "conf/"))]
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "wasserstein-bench = harness.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_a_users_grid_includes_a_built_in_grid_and_another_users_grid_from_any_folder(world, tmp_path):
    """``python -m harness --config-dir DIR``: ``include`` looks grids up along Hydra's search path."""
    grids = tmp_path / "my_conf" / "grid"
    grids.mkdir(parents=True)
    (grids / "tiny.yaml").write_text(
        "name: tiny\n"
        f"blocks: [{{dataset: mnist, model: {world.model}, solver: projected_sinkhorn_box, protocol: paper_code_mnist, n_examples: 4}}]\n"
    )
    # The built-in smoke grid's models have no weights here: the grid skips them, which shows they were included.
    (grids / "mine.yaml").write_text("name: mine\ninclude: [smoke, tiny]\nskip_missing_weights: true\n")
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, not an installed one
    finished = subprocess.run(
        [
            sys.executable, "-m", "harness", "--config-dir", str(tmp_path / "my_conf"), "grid=mine", "dry_run=true",
            "executor=local", f"plugins=['{world.plugin}']", f"data_root={world.data_root}",
            f"weights_dir={world.weights_dir}", "results_dir=out",
        ],
        cwd=folder, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"grid mine: 1 cells, 1 shards, 4 examples ({world.model}: 1); executor local;" in finished.stdout
    assert (
        "skipped (no weights; the grid has skip_missing_weights): mnist/binarized, mnist/linf_certified, mnist/standard, "
        "mnist/wasserstein_adversarial"
    ) in finished.stdout
    assert sorted(path.name for path in folder.iterdir()) == [], "a dry run leaves nothing in the working folder"


def test_an_include_that_is_nowhere_on_the_search_path_is_refused_with_the_grids_there_are(world, tmp_path):
    grids = tmp_path / "my_conf" / "grid"
    grids.mkdir(parents=True)
    (grids / "broken.yaml").write_text("name: broken\ninclude: [smoke, not_a_grid]\n")
    finished = subprocess.run(
        [sys.executable, "-m", "harness", "--config-dir", str(tmp_path / "my_conf"), "grid=broken", "dry_run=true",
         f"data_root={world.data_root}", f"results_dir={tmp_path / 'out'}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 2, finished.stdout + finished.stderr
    assert "grid 'broken' includes 'not_a_grid', which does not exist; grids: broken, certify," in finished.stdout
