"""The results pages' convention: every table in a generated block, every page with its command; and the generators
writing a page from a hand-made store whose figures the test chose."""

from __future__ import annotations

import datetime
import importlib
import math
import re
import sys
from pathlib import Path

import pytest
from results_factory import attack, suite_evaluation, write_cell, write_certificates

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = ROOT / "docs" / "results"
MANIFEST = RESULTS / "pages.toml"
INF = math.inf

sys.path.insert(0, str(BENCHMARKS))
blocks = importlib.import_module("generated_blocks")
regenerate = importlib.import_module("regenerate_results")

PAGES = sorted(path.name for path in RESULTS.glob("*.md"))


@pytest.fixture(scope="module")
def manifest():
    return regenerate.load_manifest(MANIFEST)


# ---------------------------------------------------------------------------------------------------------------
# The pages in docs/results
# ---------------------------------------------------------------------------------------------------------------


def test_every_page_is_in_the_manifest_and_every_manifest_page_exists(manifest):
    assert sorted(page.file for page in manifest.pages) == PAGES


@pytest.mark.parametrize("name", PAGES)
def test_no_table_outside_a_generated_block(name):
    outside = blocks.tables_outside_blocks((RESULTS / name).read_text(encoding="utf-8"))
    assert outside == [], f"{name}: tables outside the generated blocks, lines {[number for number, _ in outside]}"


@pytest.mark.parametrize("name", PAGES)
def test_page_starts_with_its_command_and_folders(name, manifest):
    text = (RESULTS / name).read_text(encoding="utf-8")
    assert text.startswith("# "), f"{name}: no title on the first line"
    parsed = blocks.parse_blocks(text)
    assert parsed and parsed[0].name == "provenance", f"{name}: the first block is not the provenance block"
    page = next(page for page in manifest.pages if page.file == name)
    body = parsed[0].body
    assert f"`{regenerate.page_command(manifest, page)}`" in body, f"{name}: the provenance block lacks the page's command"
    for key in page.folder_keys():
        spec = manifest.folders[key]
        assert f"- `{spec.path}`: `{spec.command}`" in body, f"{name}: folder {key} or its command is not in the provenance block"
    # Nothing but the title and blank lines before it.
    assert all(not line.strip() for line in text.splitlines()[1:parsed[0].start])


@pytest.mark.parametrize("name", PAGES)
def test_page_holds_the_manifests_blocks_with_their_generator(name, manifest):
    page = next(page for page in manifest.pages if page.file == name)
    on_page = {block.name: block for block in blocks.parse_blocks((RESULTS / name).read_text(encoding="utf-8"))}
    assert set(on_page) == {"provenance", *(spec.name for spec in page.blocks)}
    for spec in page.blocks:
        block = on_page[spec.name]
        assert (block.generator, block.kind) == (spec.generator, spec.kind), f"{name}: block {spec.name}"
        assert block.sources == tuple(manifest.folders[key].path for key in spec.folders), f"{name}: block {spec.name}"
        assert not re.search(r"/(tmp|home|work)/", " ".join(block.sources)), "a page names folders by placeholder"


def test_manifest_state_matches_the_stamps(manifest):
    for page in manifest.pages:
        on_page = blocks.parse_blocks((RESULTS / page.file).read_text(encoding="utf-8"))
        written = all(block.stamp.generated for block in on_page)
        assert written == (page.state == regenerate.REGENERATED), f"{page.file}: state {page.state!r}"


def test_every_generator_writes_the_kinds_the_manifest_asks_for(manifest):
    for page in manifest.pages:
        for spec in page.blocks:
            if spec.generator == regenerate.SELF:
                assert spec.kind == "index"
                continue
            module = regenerate.generator_module(spec.generator)
            assert spec.kind in module.BLOCK_KINDS, f"{page.file}: {spec.generator} has no kind {spec.kind!r}"


# ---------------------------------------------------------------------------------------------------------------
# The markers
# ---------------------------------------------------------------------------------------------------------------


def test_markers_round_trip_and_replace_keeps_the_prose():
    stamp = blocks.Stamp("0123abcd", "2026-12-07")
    first = blocks.Block("one", "benchmarks/x.py", "| a |\n| --- |\n| 1 |", kind="k", sources=("$RESULTS_ROOT/a b", "$R/c"), stamp=stamp)
    text = "# T\n\nProse before.\n\n" + blocks.render_block(first) + "\n\nProse after.\n"
    (parsed,) = blocks.parse_blocks(text)
    assert (parsed.name, parsed.generator, parsed.kind, parsed.sources, parsed.stamp) == (
        "one", "benchmarks/x.py", "k", ("$RESULTS_ROOT/a b", "$R/c"), stamp)
    assert parsed.body == first.body
    assert blocks.tables_outside_blocks(text) == []
    second = blocks.Block("two", "benchmarks/y.py", "new", stamp=stamp)
    replaced, others = blocks.replace_blocks(text, [blocks.Block("one", "benchmarks/x.py", "| b |", stamp=stamp), second])
    assert others == []
    assert "Prose before." in replaced and "Prose after." in replaced and "| a |" not in replaced
    assert [block.name for block in blocks.parse_blocks(replaced)] == ["one", "two"]


def test_tables_outside_blocks_and_fenced_examples():
    text = "# T\n\n| x |\n| --- |\n\n```markdown\n<!-- BEGIN GENERATED by a.py block=b -->\n| in a fence |\n```\n"
    assert [number for number, _ in blocks.tables_outside_blocks(text)] == [3, 4]
    assert blocks.parse_blocks(text) == []


@pytest.mark.parametrize("text, message", [
    ("<!-- BEGIN GENERATED by a.py block=x -->\n", "never closed"),
    ("<!-- END GENERATED -->\n", "outside any block"),
    ("<!-- BEGIN GENERATED by a.py block=x -->\n<!-- BEGIN GENERATED by a.py block=y -->\n", "inside the block"),
    ("<!-- BEGIN GENERATED by a.py kind=x -->\n<!-- END GENERATED -->\n", "no name"),
    ("<!-- BEGIN GENERATED by a.py block=x -->\n<!-- END GENERATED -->\n<!-- BEGIN GENERATED by a.py block=x -->\n"
     "<!-- END GENERATED -->\n", "second block"),
    ("<!-- BEGIN GENERATED -->\n", "must read"),
])
def test_broken_markers_are_refused(text, message):
    with pytest.raises(blocks.BlockError, match=message):
        blocks.parse_blocks(text)


def test_prose_figures_outside_blocks():
    stamp = blocks.Stamp("c", "d")
    text = "# T\n\nIt keeps 45.0% and takes 3.2x, `5 s` in code, 9 s.\n\n" + blocks.render_block(
        blocks.Block("b", "g.py", "| 45.0% | 3.2x |", stamp=stamp)) + "\n"
    assert [figure for _, figure in blocks.prose_figures_outside_blocks(text)] == ["9 s"]


# ---------------------------------------------------------------------------------------------------------------
# The generators on a hand-made store
# ---------------------------------------------------------------------------------------------------------------

SUITE = [0, 0.05, 0.3, 0.8, INF, 1.2]
"""The suite's verified distances on mnist/alpha: robust 66.7% at 0.1, 50.0% at 0.5, 33.3% at 1, 16.7% at 2;
median radius (0.3 + 0.8) / 2 = 0.55; schedule radius 1.2 x each, so every shrink is 1.2."""
GROWING = [0, 0.2, 0.4, 0.9, INF, INF]
"""plan_pgd_box, paper schedule (largest 1.83): 83.3% at 0.1, 50.0% at 0.5, 33.3% at 1, unknown at 2."""
FIXED = [0, 0.3, 0.45, INF, INF, INF]
"""plan_pgd_box at the fixed radius 0.5, 200 steps, in a second store: 50.0% at 0.5."""
ORACLE = [0, 0.3, 0.45, 0.95, INF, INF]
"""frank_wolfe_box at 0.3 s per example, beside plan_pgd_box (GROWING) at 0.1 s: larger radii on 3 images, the
same claimed radius (1.5 x the distance) on 3, median 0.70 against 0.65."""
CERTIFIED = [0, 0.001, 0.01, 0.05, 0.001, 0.001]
"""Certified radii (example 0 misclassified): median 0.001, largest 0.05; 0.5 s per radius evaluated, 6.5 s in all."""

PAGE = """# A page

Prose that stays.

<!-- BEGIN GENERATED by benchmarks/suite_benchmark.py block=suite kind=suite from=$RESULTS_ROOT/store commit=none date=none -->
| hand | typed |
| --- | --- |
<!-- END GENERATED -->

More prose that stays.
"""

MANIFEST_TEXT = """
[placeholders]
RESULTS_ROOT = "unused"

[folders.store]
path = "$RESULTS_ROOT/store"
command = "python run_benchmark.py grid=evaluate results_dir=$RESULTS_ROOT/store"

[folders.fixed]
path = "$RESULTS_ROOT/fixed"
command = "python run_benchmark.py grid=fixed_radius_check results_dir=$RESULTS_ROOT/fixed"

[folders.absent]
path = "$RESULTS_ROOT/absent"
command = "python run_benchmark.py grid=smoke results_dir=$RESULTS_ROOT/absent"

[[pages]]
file = "page.md"
title = "A page"
summary = "the test's page"
state = "not yet regenerated"

[[pages.blocks]]
name = "suite"
generator = "benchmarks/suite_benchmark.py"
kind = "suite"
folders = ["store"]

[[pages.blocks]]
name = "shrink"
generator = "benchmarks/suite_benchmark.py"
kind = "shrink"
folders = ["store"]

[[pages.blocks]]
name = "single"
generator = "benchmarks/suite_benchmark.py"
kind = "single-attacks"
folders = ["store", "store", "fixed"]

[[pages.blocks]]
name = "large"
generator = "benchmarks/suite_benchmark.py"
kind = "large-radii"
folders = ["store", "fixed"]

[[pages.blocks]]
name = "protocols"
generator = "benchmarks/suite_benchmark.py"
kind = "protocols"
folders = ["store", "fixed"]
options = { radii = [0.1, 0.5] }

[[pages.blocks]]
name = "pairs"
generator = "benchmarks/attack_table.py"
kind = "pairs"
folders = ["store"]
options = { left = "plan_pgd_box", right = "frank_wolfe_box", labels = ["pgd", "fw"], radii = [0.5, 1.0] }

[[pages.blocks]]
name = "cells"
generator = "benchmarks/attack_table.py"
kind = "cells"
folders = ["store"]
options = { radii = [0.1, 0.5], claimed = true, schedule = true }

[[pages.blocks]]
name = "leaderboard"
generator = "benchmarks/results_page.py"
kind = "leaderboard"
folders = ["store"]

[[pages.blocks]]
name = "certify-cells"
generator = "benchmarks/certify_table.py"
kind = "cells"
folders = ["store"]

[[pages.blocks]]
name = "certify-time"
generator = "benchmarks/certify_table.py"
kind = "time"
folders = ["store"]

[[pages.blocks]]
name = "certify-radius"
generator = "benchmarks/certify_table.py"
kind = "median-radius"
folders = ["store"]

[[pages]]
file = "missing.md"
title = "Missing"
state = "not yet regenerated"

[[pages.blocks]]
name = "leaderboard"
generator = "benchmarks/results_page.py"
kind = "leaderboard"
folders = ["absent"]

[[pages]]
file = "index.md"
title = "Index"
state = "regenerated"

[[pages.blocks]]
name = "pages"
generator = "benchmarks/regenerate_results.py"
kind = "index"
"""


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    store = root / "store"
    write_cell(store, "mnist/alpha", suite_evaluation(), SUITE)
    write_cell(store, "mnist/alpha", attack("plan_pgd_box", lam=None), GROWING)
    write_cell(store, "mnist/alpha", attack("frank_wolfe_box", lam=None), ORACLE, seconds_per_example=0.3)
    fixed = attack("plan_pgd_box", lam=None, eps_initial=0.5, eps_factor=1.0, eps_every=1, iterations=200)
    write_cell(root / "fixed", "mnist/alpha", fixed, FIXED)
    write_certificates(store, "mnist/alpha", CERTIFIED, misclassified=(0,))
    docs = tmp_path_factory.mktemp("docs")
    (docs / "pages.toml").write_text(MANIFEST_TEXT, encoding="utf-8")
    (docs / "page.md").write_text(PAGE, encoding="utf-8")
    return root, docs


def _run(docs, root, *options):
    return regenerate.main(["--manifest", str(docs / "pages.toml"), "--results-root", str(root), *options])


def _row(body: str, first_cells: str) -> list[str]:
    (line,) = [line for line in body.splitlines() if line.startswith(f"| {first_cells} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def page(written):
    root, docs = written
    assert _run(docs, root, "--page", "page", "index") == 0
    return (docs / "page.md").read_text(encoding="utf-8"), docs


def test_generated_page_parses_and_keeps_its_prose(page):
    text, docs = page
    parsed = {block.name: block for block in blocks.parse_blocks(text)}
    assert list(parsed) == ["provenance", "suite", "shrink", "single", "large", "protocols", "pairs", "cells",
                            "leaderboard", "certify-cells", "certify-time", "certify-radius"]
    assert "Prose that stays." in text and "More prose that stays." in text and "| hand |" not in text
    assert blocks.tables_outside_blocks(text) == []
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    commit = blocks.code_stamp().commit
    assert all(block.stamp == blocks.Stamp(commit, today) for block in parsed.values())
    assert parsed["suite"].sources == ("$RESULTS_ROOT/store",)
    assert "--page page`" in parsed["provenance"].body
    assert 'state = "regenerated"' in (docs / "pages.toml").read_text(encoding="utf-8").split('file = "page.md"')[1].split("[[pages]]")[0]
    index = (docs / "index.md").read_text(encoding="utf-8")
    assert f"| [page.md](page.md) | the test's page | `$RESULTS_ROOT/store`, `$RESULTS_ROOT/fixed` | regenerated {today} |" in index
    assert "| [missing.md](missing.md) |" in index and "| not written yet |" in index


def test_suite_blocks_hold_the_stores_figures(page):
    parsed = {block.name: block for block in blocks.parse_blocks(page[0])}
    suite = _row(parsed["suite"].body, "mnist/alpha")
    assert suite[1:6] == ["66.7%", "50.0%", "33.3%", "16.7%", "0.55"]
    assert suite[6:9] == ["1.200", "4/4", "0"]
    assert suite[9] == "segment 4" and suite[10].startswith("plan_pgd_box 4")
    assert suite[11:] == ["0", "0.10"]
    assert _row(parsed["shrink"].body, "mnist/alpha") == ["mnist/alpha", "4", "1.200", "1.200", "1.200", "1.200"]
    single = parsed["single"].body
    assert _row(single, "mnist/alpha | **suite standard v1**")[3:7] == ["**66.7%**", "**50.0%**", "**33.3%**", "**16.7%**"]
    growing = _row(single, "mnist/alpha | plan_pgd_box | eps 0.3 x1.1 every 10 of 200 steps")
    assert growing[3:] == ["83.3%", "50.0%", "33.3%", "–", "yes"]
    assert _row(parsed["large"].body, "mnist/alpha | 0.5") == ["mnist/alpha", "0.5", "plan_pgd_box, 200 steps", "50.0%", "50.0%", "6"]
    protocols = parsed["protocols"].body
    assert _row(protocols, "mnist/alpha | plan_pgd_box | fixed eps 0.5, 200 steps")[3:] == ["83.3%", "50.0%", "0.10"]
    assert _row(protocols, "mnist/alpha | suite standard v1")[3:] == ["66.7%", "50.0%", "0.10"]


def test_attack_blocks_hold_the_stores_figures(page):
    parsed = {block.name: block for block in blocks.parse_blocks(page[0])}
    pairs = _row(parsed["pairs"].body, "mnist/alpha")
    assert pairs[2:] == ["50.0% / 50.0%", "33.3% / 33.3%", "0 / 3", "3", "0.650 / 0.700", "0.100 / 0.300", "3.0x", "0 / 0", "6"]
    growing = _row(parsed["cells"].body, "mnist/alpha | plan_pgd_box | eps 0.3 x1.1 every 10 of 200 steps")
    assert growing[3:] == ["83.3% (83.3%)", "50.0% (66.7%)", "3/3", "0", "0.100"]
    assert "| 1 | mnist/alpha |" in parsed["leaderboard"].body
    assert "## mnist: " in parsed["leaderboard"].body


def test_certify_blocks_hold_the_stores_figures(page):
    parsed = {block.name: block for block in blocks.parse_blocks(page[0])}
    cells = parsed["certify-cells"].body
    assert cells.startswith("### linear_bounds, with the box")
    assert "No certificate is contradicted by any verified attack in the store." in cells
    time = _row(parsed["certify-time"].body, "mnist/alpha")
    assert time[1] == "1.1 s"
    radius = _row(parsed["certify-radius"].body, "mnist/alpha")
    assert radius[1:3] == ["0.001", "0.05"]


def test_missing_folder_prints_its_command_and_fails(written, capsys):
    root, docs = written
    assert _run(docs, root, "--page", "missing") == 1
    out = capsys.readouterr().out
    assert f"python run_benchmark.py grid=smoke results_dir={root}/absent" in out
    assert not (docs / "missing.md").exists()
    assert _run(docs, root, "--page", "missing", "--allow-missing") == 0


def test_check_reports_stale_and_broken_pages(written, capsys):
    root, docs = written
    (docs / "missing.md").write_text("# Missing\n\n| a table |\n", encoding="utf-8")
    assert _run(docs, root, "--check", "--page", "missing") == 1
    out = capsys.readouterr().out
    assert "no provenance block" in out and "a table outside the generated blocks" in out and "folder absent missing" in out
    (docs / "missing.md").unlink()
