"""The report's numbers against hand-made stores whose distances the test chose."""

from __future__ import annotations

import base64
import html
import io
import math
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from results_factory import attack, norm_attack, suite_evaluation, write_cell

from harness.report.leaderboard import ThreatGroup, leaderboard, model_curves, solver_table, threat_groups
from harness.report import ReportError, build_report, main, write_report
from harness.run.store import Table, read_table
from harness.vocabulary import ModelCheck

INF = math.inf
BOX = attack("projected_sinkhorn_box")
FREE_LAM_100 = attack("projected_sinkhorn", lam=100.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Four MNIST models on the 5x5, p=1 ball, plus ablations and a CIFAR model.

    alpha, attacked twice: box [0, .05, .3, inf, inf (rejected OUTSIDE_BOX), 1.2]
    and free lambda 100 [0, .2, inf, .8, .9, inf]; worst case [0, .05, .3, .8, .9, 1.2].
    """
    root = tmp_path_factory.mktemp("store")
    digits = np.random.default_rng(0).random((6, 1, 28, 28)).astype(np.float32)
    write_cell(root, "mnist/alpha", BOX, [0, 0.05, 0.3, INF, INF, 1.2],
               statuses=["CLEAN_MISCLASSIFIED", "VERIFIED", "VERIFIED", "NOT_FOUND", "OUTSIDE_BOX", "VERIFIED"], images=digits)
    write_cell(root, "mnist/alpha", FREE_LAM_100, [0, 0.2, INF, 0.8, 0.9, INF], seconds_per_example=0.4, images=digits)
    write_cell(root, "mnist/beta", BOX, [0.6, INF, INF, INF, INF, INF], unconverged=2, trained_for="wasserstein_adversarial",
               clean_accuracy=0.97, images=digits)
    write_cell(root, "mnist/gamma", BOX, [0.4, 0.4, 0.7, 0.7, INF, 1.5], gradient_mode="bpda_straight_through", images=digits)
    write_cell(root, "mnist/delta", BOX, [0.4, 0.4, 0.7, 0.7, INF, 1.5], zero_gradients=5, images=digits)
    # Broken early, with two survivors: ahead of alpha at eps 1.0 (2/6 against 1/6), behind it by median radius.
    write_cell(root, "mnist/epsilon", BOX, [0.05, 0.05, 0.05, 0.05, INF, INF])
    # Figure 7: alpha on a 3x3 ball; Figure 8: beta over lambda x p.
    write_cell(root, "mnist/alpha", attack("projected_sinkhorn_box", kernel_size=3), [0.2, 0.5, 0.9, INF, INF, INF])
    for lam in (10.0, 1000.0):
        for p in (2.0, 3.0):
            write_cell(root, "mnist/beta", attack("projected_sinkhorn_box", lam=lam, p=p), [0.3 * p / lam ** 0.1] * 3 + [INF] * 3,
                       images=digits)
    write_cell(root, "mnist/gamma", norm_attack(), [0.05, 0.15, 0.25, INF, INF, INF])
    cifar = attack("projected_sinkhorn_box", eps_initial=0.001, eps_factor=1.17, eps_every=10, iterations=400)
    write_cell(root, "cifar10/omega", cifar, [0.004, 0.03, 0.2, INF], dataset="cifar10",
               images=np.random.default_rng(1).random((4, 3, 32, 32)).astype(np.float32))
    return root


@pytest.fixture(scope="module")
def examples(store):
    return read_table(store, Table.EXAMPLES)


@pytest.fixture(scope="module")
def main_table(store, examples):
    return leaderboard(examples, read_table(store, Table.CELLS), ThreatGroup("mnist", "wasserstein", 5, 1.0))


def test_groups_are_data_set_and_ball_the_main_ball_first(examples):
    groups = threat_groups(examples)
    assert groups[0] == ThreatGroup("cifar10", "wasserstein", 5, 1.0)
    assert groups[1] == ThreatGroup("mnist", "wasserstein", 5, 1.0)  # most examples of MNIST
    assert set(groups[2:]) == {ThreatGroup("mnist", "wasserstein", 3, 1.0), ThreatGroup("mnist", "wasserstein", 5, 2.0),
                               ThreatGroup("mnist", "wasserstein", 5, 3.0), ThreatGroup("mnist", "linf")}


def test_robust_accuracy_is_the_worst_case_over_attacks_and_unknown_beyond_the_search(main_table):
    rows = main_table.rows.set_index("model")
    assert main_table.radii == (0.1, 0.5, 1.0, 2.0) and main_table.largest_radius == pytest.approx(0.3 * 1.1 ** 19)
    assert [rows.loc["mnist/alpha", r] for r in main_table.radii] == pytest.approx([4 / 6, 3 / 6, 1 / 6, 0.0])
    assert [rows.loc["mnist/beta", r] for r in main_table.radii[:3]] == pytest.approx([1.0, 1.0, 5 / 6])
    assert [rows.loc["mnist/gamma", r] for r in main_table.radii[:3]] == pytest.approx([1.0, 4 / 6, 2 / 6])
    # Unbroken examples were never searched at 2.0 > 1.83: not known, not guessed.
    assert math.isnan(rows.loc["mnist/beta", 2.0]) and math.isnan(rows.loc["mnist/gamma", 2.0])
    assert rows.loc["mnist/alpha", "median_radius"] == pytest.approx((0.3 + 0.8) / 2)
    assert math.isinf(rows.loc["mnist/beta", "median_radius"])
    assert rows.loc["mnist/alpha", "examples"] == 6 and rows.loc["mnist/alpha", "attacks"] == 2
    assert rows.loc["mnist/beta", "clean_accuracy"] == pytest.approx(0.97)
    assert rows.loc["mnist/beta", "trained_for"] == "wasserstein_adversarial"


def test_rank_is_by_median_radius_then_the_reference_radius_and_ties_share_a_rank(main_table):
    assert main_table.reference_radius == 1.0
    assert main_table.attacks == {"projected_sinkhorn": [100.0], "projected_sinkhorn_box": [1000.0]}
    assert main_table.schedules == ["eps 0.3 x1.1 every 10 of 200 steps (largest 1.83)"]
    assert list(main_table.rows["model"]) == ["mnist/beta", "mnist/delta", "mnist/gamma", "mnist/alpha", "mnist/epsilon"]
    assert list(main_table.rows["rank"]) == [1, 2, 2, 4, 5]
    rows = main_table.rows.set_index("model")
    assert rows.loc["mnist/epsilon", 1.0] > rows.loc["mnist/alpha", 1.0]


def test_verification_counts_best_attack_and_flags(main_table):
    rows = main_table.rows.set_index("model")
    # alpha: box claims 4 (one OUTSIDE_BOX), free claims 3; clean misclassifications are not claims.
    assert (rows.loc["mnist/alpha", "claimed"], rows.loc["mnist/alpha", "verified"]) == (7, 6)
    assert rows.loc["mnist/alpha", "fraction_verified"] == pytest.approx(6 / 7)
    # Alone, box has median radius (0.3 + 1.2) / 2 = 0.75 and lambda 100 (0.8 + 0.9) / 2 = 0.85.
    assert rows.loc["mnist/alpha", "best_attack"] == "projected_sinkhorn_box λ=1000"
    flags = {model: dict(rows.loc[model, "flags"]) for model in rows.index}
    assert flags["mnist/alpha"] == {"1 rejected": "1 claimed successes failed exact verification (OUTSIDE_BOX 1)"}
    assert set(flags["mnist/beta"]) == {"unconverged"} and "12 attack steps" in flags["mnist/beta"]["unconverged"]
    assert set(flags["mnist/gamma"]) == {"BPDA"}
    assert set(flags["mnist/delta"]) == {"zero gradients"}
    assert rows.loc["mnist/alpha", "seconds"] == pytest.approx(6 * 0.1 + 6 * 0.4)
    assert rows.loc["mnist/alpha", "seconds_per_example"] == pytest.approx((6 * 0.1 + 6 * 0.4) / 12)


def test_the_headline_is_the_latest_standard_suite_when_present(tmp_path):
    inf = math.inf
    write_cell(tmp_path, "mnist/alpha", attack(), [0.05, 0.6, 0.6, inf])
    write_cell(tmp_path, "mnist/alpha", suite_evaluation(version=1), [0.04, 0.3, 0.3, 0.3])
    write_cell(tmp_path, "mnist/alpha", suite_evaluation(version=2), [0.02, 0.2, 0.2, 1.5])
    write_cell(tmp_path, "mnist/beta", attack(), [0.2, 0.2, 0.2, 0.2])
    examples, cells = read_table(tmp_path), read_table(tmp_path, Table.CELLS)
    (group,) = threat_groups(examples, cells)
    table = leaderboard(examples, cells, group)
    (row,) = table.rows.to_dict("records")  # beta has no suite row: it leaves the headline
    assert row["model"] == "mnist/alpha" and row["evaluation"] == "standard v2"
    assert [row[r] for r in (0.1, 0.5, 1.0)] == pytest.approx([3 / 4, 1 / 4, 1 / 4])  # version 2 alone, not the worst case
    assert row["best_attack"] == "plan_pgd_box (100% of minimal radii)"
    assert any("models without a standard v2 evaluation: mnist/beta" in note for note in table.notes)
    solvers = solver_table(examples, [table])
    assert sorted(solvers["attack"]) == ["projected_sinkhorn_box λ=1000", "projected_sinkhorn_box λ=1000", "standard v1", "standard v2"]
    page = write_report(tmp_path, tmp_path / "report").read_text(encoding="utf-8")
    headline, solver_rows = page.split('id="solvers-table"')
    assert headline.count('<td class="text" data-value="standard v2">standard v2</td>') == 1  # the evaluation column
    assert "models without a standard v2 evaluation: mnist/beta" in headline and "standard v1" in solver_rows


def test_cifar_table_uses_its_own_radii(store, examples):
    table = leaderboard(examples, read_table(store, Table.CELLS), ThreatGroup("cifar10", "wasserstein", 5, 1.0))
    row = table.rows.iloc[0]
    assert table.radii == (0.01, 0.05, 0.1)
    assert [row[r] for r in table.radii] == pytest.approx([3 / 4, 2 / 4, 2 / 4])


def test_norm_ball_table_uses_l_inf_radii_and_names_pgd(store, examples):
    table = leaderboard(examples, read_table(store, Table.CELLS), ThreatGroup("mnist", "linf"))
    assert table.radii == (0.1, 0.2, 0.3, 0.4) and table.largest_radius == pytest.approx(0.4)
    row = table.rows.iloc[0]
    assert [row[r] for r in table.radii] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 3 / 6])
    assert row["best_attack"] == "PGD (linf_sign)" and table.attacks == {"PGD (linf_sign)": []}


def test_solver_table_has_one_row_per_attack_on_a_model(store, examples, main_table):
    solvers = solver_table(examples, [main_table]).set_index(["model", "attack"])
    assert len(solvers) == 6
    box = solvers.loc[("mnist/alpha", "projected_sinkhorn_box λ=1000")]
    assert box["robust_accuracy"] == pytest.approx(3 / 6) and (box["claimed"], box["verified"]) == (4, 3)
    assert box["iterations_per_step"] == pytest.approx(30.0) and box["seconds_per_example"] == pytest.approx(0.1)


def test_curves_count_examples_beyond_each_radius_and_stop_at_the_search(examples):
    alpha = examples[(examples["model"] == "mnist/alpha") & (examples["kernel_size"] == 5)]
    curve = model_curves(alpha, ["model"], points=50)
    assert curve["eps"].max() == pytest.approx(0.3 * 1.1 ** 19)
    worst = np.array([0, 0.05, 0.3, 0.8, 0.9, 1.2])
    expected = [(worst > eps).mean() for eps in curve["eps"]]
    assert curve["robust_accuracy"].to_numpy() == pytest.approx(expected)


class _Tables(HTMLParser):
    """Collects every table's rows as lists of data-value strings, and every src/href."""

    def __init__(self):
        super().__init__()
        self.tables, self.links, self._table = {}, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag == "table":
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag == "td" and self._table is not None:
            self._table[-1].append(attrs["data-value"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None


def test_page_holds_the_tables_numbers_and_needs_no_network(store, tmp_path):
    page = write_report(store, tmp_path)
    parser = _Tables()
    parser.feed(page.read_text(encoding="utf-8"))
    assert set(parser.tables) == {
        "leaderboard-cifar10-wasserstein-k5-p1", "leaderboard-mnist-wasserstein-k5-p1", "leaderboard-mnist-wasserstein-k3-p1",
        "leaderboard-mnist-wasserstein-k5-p2", "leaderboard-mnist-wasserstein-k5-p3", "leaderboard-mnist-linf", "solvers-table",
    }
    rows = [row for row in parser.tables["leaderboard-mnist-wasserstein-k5-p1"] if row]
    assert [row[1] for row in rows] == ["mnist/beta", "mnist/delta", "mnist/gamma", "mnist/alpha", "mnist/epsilon"]
    assert [row[0] for row in rows] == ["1", "2", "2", "4", "5"]
    alpha = rows[3]
    assert all(row[5].startswith("worst case of ") for row in rows)  # no suite in this store
    assert [float(v) for v in alpha[6:10]] == pytest.approx([4 / 6, 3 / 6, 1 / 6, 0.0])
    assert rows[0][9] == "" and rows[0][10] == "Infinity"  # beta: unknown at 2.0, median unbounded
    text = page.read_text(encoding="utf-8")
    assert "<li><b>projected_sinkhorn</b>, λ ∈ {100}: summary of projected_sinkhorn. Box: box of projected_sinkhorn.</li>" in text
    assert "<li><b>projected_sinkhorn_box</b>, λ ∈ {10, 1000}: summary" in text.split('id="mnist-wasserstein-k5-p2"')[1]
    # Self-contained: every link is an in-page anchor or an inline PNG that decodes.
    external = [link for link in parser.links if not link.startswith(("#", "data:image/png;base64,"))]
    assert external == []
    pictures = [Image.open(io.BytesIO(base64.b64decode(link.split(",", 1)[1]))) for link in parser.links if link.startswith("data:")]
    assert len(pictures) == len(list((tmp_path / "figures").glob("*.png"))) >= 6
    assert all(picture.width > 200 and picture.height > 150 for picture in pictures)


def test_every_figure_is_drawn_from_the_store(store):
    names = {figure.name for figure in build_report(store).figures}
    assert names == {
        "robust_accuracy", "solvers", "kernel_sizes", "lambda_p", "lambda_p_gallery",
        "gallery_cifar10-wasserstein-k5-p1", "gallery_mnist-wasserstein-k5-p1",
    }


def test_an_empty_results_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ReportError, match="holds no results"):
        build_report(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "run the benchmark first" in capsys.readouterr().err


def test_command_line_writes_page_and_figures(store, tmp_path, capsys):
    assert main([str(store), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "leaderboard.html").is_file()
    assert (tmp_path / "out" / "figures" / "robust_accuracy.png").is_file()
    assert "leaderboard.html" in capsys.readouterr().out


def test_failed_model_checks_are_flags_with_their_consequence(tmp_path):
    write_cell(tmp_path, "mnist/alpha", BOX, [0.2, 0.4, INF], failed_model_checks=["randomized_outputs", "training_mode"])
    write_cell(tmp_path, "mnist/alpha", FREE_LAM_100, [0.3, INF, INF], failed_model_checks=["probability_outputs"])
    write_cell(tmp_path, "mnist/beta", BOX, [0.2, 0.4, INF], zero_gradients=3, failed_model_checks=["zero_gradient_steps"])
    write_cell(tmp_path, "mnist/gamma", BOX, [0.2, 0.4, INF], failed_model_checks=None)  # a store older than version 6
    examples, cells = read_table(tmp_path), read_table(tmp_path, Table.CELLS)
    (group,) = threat_groups(examples, cells)
    rows = leaderboard(examples, cells, group).rows.set_index("model")
    flags = {model: dict(rows.loc[model, "flags"]) for model in rows.index}
    # Every check that failed in any of the model's cells, in the order of ModelCheck.
    assert list(flags["mnist/alpha"]) == ["randomized outputs", "probability outputs", "training mode"]
    assert flags["mnist/alpha"]["training mode"] == f"model check training_mode failed: {ModelCheck.TRAINING_MODE.consequence}"
    # The attack's zero-gradient steps keep their one flag, with the count.
    assert list(flags["mnist/beta"]) == ["zero gradients"] and flags["mnist/beta"]["zero gradients"].startswith("9 attack steps")  # 3 per example
    assert flags["mnist/gamma"] == {}
    page = write_report(tmp_path, tmp_path / "report").read_text(encoding="utf-8")
    assert '">randomized outputs</span>' in page and html.escape(ModelCheck.RANDOMIZED_OUTPUTS.consequence, quote=True) in page
