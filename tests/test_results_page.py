"""benchmarks/results_page.py against a hand-made store whose distances the test chose."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from results_factory import attack, write_cell

INF = math.inf
COMMAND = "python run_benchmark.py grid=smoke n_examples=6"
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "results_page.py"


def _script():
    spec = importlib.util.spec_from_file_location("results_page", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results_page = _script()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two MNIST models on the 5x5, p = 1 ball, paper schedule (largest radius 1.83).

    alpha, box: [0, .05, .3, .8, inf, 1.2] -> robust 66.7% at 0.1, 50.0% at 0.5, 33.3% at 1.0, unknown at 2.0;
    median radius (0.3 + 0.8) / 2 = 0.55.
    beta, box: [.6, inf, inf, inf]; beta, free: one claim rejected (OUTSIDE_BOX), the others not found
    -> robust 100.0% at 0.1 and 0.5, 75.0% at 1.0; median radius infinite.
    """
    root = tmp_path_factory.mktemp("store")
    write_cell(root, "mnist/alpha", attack("projected_sinkhorn_box"), [0, 0.05, 0.3, 0.8, INF, 1.2])
    write_cell(root, "mnist/beta", attack("projected_sinkhorn_box"), [0.6, INF, INF, INF], clean_accuracy=0.97)
    write_cell(root, "mnist/beta", attack("projected_sinkhorn"), [INF, INF, INF, INF],
               statuses=["OUTSIDE_BOX", "NOT_FOUND", "NOT_FOUND", "NOT_FOUND"], clean_accuracy=0.97, seconds_per_example=0.4)
    return root


@pytest.fixture(scope="module")
def page(store, tmp_path_factory):
    output = tmp_path_factory.mktemp("docs") / "results" / "smoke.md"
    assert results_page.main([str(store), "--command", COMMAND, "--output", str(output)]) == 0
    return output.read_text(encoding="utf-8")


def _row(page: str, first_cells: str) -> list[str]:
    """The cells of the Markdown table row that starts with ``first_cells``."""
    (line,) = [line for line in page.splitlines() if line.startswith(f"| {first_cells} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_stamp_holds_the_command_commit_versions_schema_and_device(page):
    assert f"`{COMMAND}`" in page
    assert "`0123456789abcdef`" in page
    assert "torch 2.15.0" in page
    assert "Store schema: v" in page
    assert "Device: cpu" in page
    assert "Cells: 3, examples attacked: 14" in page


def test_leaderboard_rows_hold_the_chosen_robust_accuracies(page):
    (heading,) = [line for line in page.splitlines() if line.startswith("## ")]
    assert heading.startswith("## mnist: ")
    assert "| rank | model | clean | eps 0.1 | eps 0.5 | eps 1 | eps 2 | median radius |" in page
    beta = _row(page, "1 | mnist/beta")
    assert beta[2:7] == ["97.0%", "100.0%", "100.0%", "75.0%", "–"]
    assert beta[7] == "> 1.83"
    assert beta[8:10] == ["4", "1/2"]
    assert "rejected" in beta[-1]
    alpha = _row(page, "2 | mnist/alpha")
    assert alpha[2:7] == ["99.0%", "66.7%", "50.0%", "33.3%", "–"]
    assert alpha[7:10] == ["0.550", "6", "4/4"]
    assert alpha[10] == "projected_sinkhorn_box λ=1000"
    assert alpha[11] == "0.100"


def test_each_attack_has_its_own_row(page):
    assert "### Each attack alone" in page
    free = _row(page, "mnist/beta | projected_sinkhorn λ=1000")
    assert free[2:5] == ["100.0%", "none found", "0/1"]
    assert free[5] == "0.400"
    box = _row(page, "mnist/alpha | projected_sinkhorn_box λ=1000")
    assert box[2:5] == ["33.3%", "0.550", "4/4"]


def test_page_is_a_provenance_and_a_leaderboard_block(page):
    import generated_blocks as blocks  # benchmarks/ is on the path once results_page.py is loaded

    parsed = blocks.parse_blocks(page)
    assert [(block.name, block.generator) for block in parsed] == [
        ("provenance", "benchmarks/results_page.py"), ("leaderboard", "benchmarks/results_page.py")]
    assert f"`{COMMAND}`" in parsed[0].body
    assert all(block.stamp.generated for block in parsed)
    assert blocks.tables_outside_blocks(page) == []


def test_stdout_without_output_and_refusal_of_an_empty_folder(store, tmp_path, capsys):
    assert results_page.main([str(store), "--command", COMMAND]) == 0
    assert "mnist/alpha" in capsys.readouterr().out
    assert results_page.main([str(tmp_path), "--command", COMMAND]) == 2
    assert "holds no results" in capsys.readouterr().err
