"""Certificates as grid cells: validated with the grid, stored in the ``certificates`` table, shown beside the attacks.

The numbers of the report are checked against hand-made stores
(:mod:`results_factory`) whose verified distances and certified radii the
test chose; the round trip through the runner certifies real MNIST images of
``mnist/standard`` and skips without ``DATA_ROOT`` and ``WEIGHTS_DIR``.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.collections import PolyCollection
from results_factory import attack, write_cell, write_certificates

from harness.report import build_report
from harness.report import figures as plots
from harness.report.leaderboard import KNOWN_EXACTLY_TOLERANCE, ThreatGroup, certificate_violations
from harness.run.grid import GridError, expand_blocks
from harness.run.preflight import preflight, select_models
from harness.run.runner import RunContext
from harness.run.scheduler import run_cells
from harness.run.store import CELLS_SCHEMA, CERTIFICATES_SCHEMA, Table, read_table, shard_path
from harness.vocabulary import CertificateStatus

pytestmark = pytest.mark.usefixtures("single_thread")

INF = math.inf
PAPER_MODELS = ["mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial"]
CERTIFY = {"dataset": "mnist", "model": "mnist/standard", "certifier": "linear_bounds", "kernel_size": 5, "p": 1,
           "radii": [0.001, 0.01], "n_examples": 4}
MAIN_BALL = ThreatGroup("mnist", "wasserstein", 5, 1.0)


# --------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------


def test_certify_blocks_expand_to_cells_of_their_own_and_attack_ids_stay():
    cells = expand_blocks([{**CERTIFY, "box": [True, False], "certifier": ["linear_bounds", "milp"], "time_limit": 20}])
    assert sorted(cell.label for cell in cells) == [
        "certified (linear bounds, box)", "certified (linear bounds, no box)", "certified (milp, box)", "certified (milp, no box)",
    ]
    assert len({cell.cell_id for cell in cells}) == 4 and len({s.shard_id for c in cells for s in c.shards(2)}) == 8
    milp = next(cell for cell in cells if cell.label == "certified (milp, box)")
    assert (milp.settings.radii, milp.settings.time_limit, milp.final_eps) == ((0.001, 0.01), 20.0, 0.01)
    assert milp.config()["certify"] == {"certifier": "milp", "radii": [0.001, 0.01], "box": True, "radius_rounds": 4, "time_limit": 20.0}
    # time_limit belongs to the complete certifier only: the linear bounds' ids ignore it.
    (linear,) = expand_blocks([{**CERTIFY, "box": True}])
    assert "time_limit" not in linear.config()["certify"] and linear.cell_id in {cell.cell_id for cell in cells}
    # A protocol supplies the ball; the data set's ladder is the default.
    (preset,) = expand_blocks([{**{k: v for k, v in CERTIFY.items() if k not in ("kernel_size", "p", "radii")}, "protocol": "paper_mnist"}])
    assert preset.ball == linear.ball and preset.settings.radii == (0.001, 0.01, 0.05, 0.1)
    # An attack cell's id is what it was before certificates existed (conf/grid/certify.yaml's attack on mnist/standard).
    (attack_cell,) = expand_blocks([{"dataset": "mnist", "model": "mnist/standard", "solver": "plan_pgd_box", "protocol": "paper_mnist",
                                     "eps_initial": 0.0005, "eps_factor": 1.1, "eps_every": 3, "iterations": 200, "n_examples": 500}])
    assert attack_cell.cell_id == "f2ab4ffffb64af6d5aba"
    # The command line's models=[...] and n_examples= reach certify blocks too.
    blocks, problems = select_models([{**CERTIFY, "model": PAPER_MODELS}], ["mnist/binarized"])
    (chosen,) = expand_blocks(blocks, {"n_examples": 7, "seed": None})
    assert problems == [] and (chosen.model, chosen.n_examples) == ("mnist/binarized", 7)


def test_certify_blocks_refuse_attack_settings_lp_balls_and_bad_values_by_name():
    blocks = [
        {**CERTIFY, "solver": "plan_pgd_box", "step_size": 0.1, "restarts": 2},
        {**CERTIFY, "threat_model": "linf"},
        {**CERTIFY, "radii": [0.01, 0.001]},
        {**CERTIFY, "radii": [[0.001], [0.01]]},
        {**CERTIFY, "certifier": "crown"},
        {**CERTIFY, "time_limit": 5},
        {**CERTIFY, "box": "yes", "radius_rounds": -1, "certifier": "milp", "time_limit": 0},
        {"dataset": "mnist", "model": "mnist/standard", "solver": "plan_pgd_box", "protocol": "paper_mnist", "radii": [0.1], "n_examples": 1},
    ]
    with pytest.raises(GridError) as raised:
        expand_blocks(blocks)
    message = str(raised.value)
    for expected in (
        "block 1: 'solver', 'step_size', 'restarts' cannot be set beside certifier: they are attack settings; a certify block "
        "sets box, certifier, dataset, kernel_size, model, n_examples, p, protocol, radii, radius_rounds, seed, threat_model, time_limit",
        "block 2: certificates are for the Wasserstein ball, not threat_model='linf'",
        "block 3: radii=[0.01, 0.001] is invalid: give one list of positive, finite, distinct radii in increasing order",
        "block 4: radii=[[0.001], [0.01]] is invalid",
        "block 5: certifier='crown' is invalid: it must be linear_bounds or milp",
        "block 6: 'time_limit' is used by none of the block's cells; allowed: box, certifier",
        "block 7: box='yes' is invalid: it must be true or false",
        "block 7: radius_rounds=-1 is invalid: it must be an integer >= 0",
        "block 7: time_limit=0 is invalid: it must be a number > 0",
        "block 8: 'radii' are certify settings, in a block without certifier: set certifier ('linear_bounds', 'milp')",
    ):
        assert expected in message, expected
    assert message.startswith("the grid cannot run; 10 problem(s)")


def test_preflight_refuses_models_the_certifiers_cannot_read(tmp_path):
    block = {"dataset": "cifar10", "model": ["cifar10/resnet18"], "certifier": "linear_bounds", "kernel_size": 5, "p": 1, "n_examples": 1}
    checked = preflight({
        "grid": {"name": "certify_cifar", "blocks": [block]}, "executor": "local", "data_root": str(tmp_path / "data"),
        "results_dir": str(tmp_path / "results"), "device": "cpu",
    })
    assert "model 'cifar10/resnet18' cannot be certified: certificates have no rule for layer CifarResNet" in "\n".join(checked.problems)


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


def test_the_certificates_table_reads_empty_and_older_cells_read_without_a_certifier(tmp_path):
    empty = read_table(tmp_path, Table.CERTIFICATES)
    assert empty.empty and set(empty.columns) == set(CERTIFICATES_SCHEMA.names) | {"dataset", "model"}
    # A version-4 cells file: no certify columns.
    older = pa.schema([field for field in CELLS_SCHEMA if field.name not in ("certifier", "box", "time_limit", "radius_rounds")])
    row = {field.name: [None] for field in older}
    row.update(schema_version=[4], cell_id=["old"], threat_model=["wasserstein"], status=["complete"])
    path = shard_path(tmp_path, Table.CELLS, "mnist", "mnist/standard", "old")
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table(row, schema=older), path)
    cells = read_table(tmp_path, Table.CELLS)
    assert cells["certifier"].isna().all() and cells["box"].isna().all() and cells["cell_id"].tolist() == ["old"]


def test_a_certify_cell_runs_through_the_local_executor_and_a_rerun_skips_it(published_folders, tmp_path):
    data_root, weights_dir = published_folders
    cells = expand_blocks([{**CERTIFY, "box": False, "radii": [0.001, 0.002], "radius_rounds": 0, "n_examples": 2}])
    context = RunContext(data_root=data_root, results_dir=str(tmp_path), weights_dir=weights_dir)
    report = run_cells(cells, context, shard_size=2, progress=False)
    assert (report.shards_run, report.failures) == (1, {})
    certificates = read_table(tmp_path, Table.CERTIFICATES)
    assert len(certificates) == 2 * 2 and sorted(zip(certificates["example_index"], certificates["eps"])) == [
        (0, 0.001), (0, 0.002), (1, 0.001), (1, 0.002)]
    assert set(certificates["status"]) <= {status.value for status in CertificateStatus}
    assert (certificates["cell_id"] == cells[0].cell_id).all() and (certificates["certifier"] == "linear_bounds").all()
    assert not (tmp_path / "examples").exists() and not (tmp_path / "images").exists()
    (row,) = report.cells
    certified_at_largest = (certificates.loc[certificates["eps"] == 0.002, "status"] == "certified").mean()
    assert (row["status"], row["n_examples"], row["robust_accuracy"], row["certifier"]) == ("complete", 2, certified_at_largest, "linear_bounds")
    again = run_cells(cells, context, shard_size=2, progress=False)
    assert (again.shards_run, again.shards_skipped) == (0, 1)
    assert read_table(tmp_path, Table.CERTIFICATES).equals(certificates)


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------

# mnist/alpha, attacked: verified radii per example; certified by the linear bounds (with the box, and a looser cell
# without it that must not be the one chosen) and by the MILP on the first four examples; example 0 is misclassified.
ALPHA_ATTACKED = [0, 0.052, 0.3, INF, 1.2, 0.02]
ALPHA_LINEAR = [0, 0.05, 0.1, 0.1, 0.05, 0.001]
ALPHA_LINEAR_NO_BOX = [0, 0.05, 0.1, 0.1, 0.1, 0.001]
ALPHA_MILP = [0, 0.05, 0.1, 0.05]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("certified")
    write_cell(root, "mnist/alpha", attack("plan_pgd_box"), ALPHA_ATTACKED)
    write_cell(root, "mnist/beta", attack("plan_pgd_box"), [0.2, INF, INF, 0.7], seconds_per_example=0.3)
    write_certificates(root, "mnist/alpha", ALPHA_LINEAR, misclassified=[0])
    write_certificates(root, "mnist/alpha", ALPHA_LINEAR_NO_BOX, box=False, misclassified=[0])
    write_certificates(root, "mnist/alpha", ALPHA_MILP, certifier="milp", misclassified=[0], seconds_per_radius=2.0)
    return root


@pytest.fixture(scope="module")
def report(store):
    return build_report(store)


def test_leaderboard_rows_show_certified_and_attacked_and_what_is_known_exactly(report):
    (table,) = report.tables
    alpha, beta = (table.rows.set_index("model").loc[name] for name in ("mnist/alpha", "mnist/beta"))
    # Certified at 0.1 (with the box, linear bounds or MILP): examples 2 and 3 of 6; attacked: 2, 3 and 4.
    assert alpha["certified"][0.1] == pytest.approx(2 / 6) and alpha[0.1] == pytest.approx(3 / 6)
    assert alpha["certified"][0.5] == 0.0 and alpha["certified_examples"] == 6
    # Bracketed within 10%: the misclassified example and example 1 (certified 0.05, broken at 0.052).
    assert KNOWN_EXACTLY_TOLERANCE == 0.1 and alpha["known_exactly"] == pytest.approx(2 / 6)
    assert beta["certified"] is None and math.isnan(beta["known_exactly"])
    page = report.html()
    assert "[33.3, 50.0]" in page and 'id="certificates-table"' in page and "known exactly" in page
    assert "tolerance 10%" in page and 'role="alert"' not in page
    assert report.violations.empty


def test_certificate_table_compares_both_certifiers_with_the_attacks_on_shared_examples(report):
    rows = report.certificate_table.set_index("radius")
    assert list(rows.index) == [0.001, 0.01, 0.05, 0.1] and set(rows["model"]) == {"mnist/alpha"}
    at = rows.loc[0.1]
    # The MILP ran on examples 0-3 only: every number is over those four.
    assert at["examples"] == 4
    assert (at["certified_linear_bounds"], at["certified_milp"], at["certified"], at["attacked"]) == pytest.approx((0.5, 0.25, 0.5, 0.5))
    assert rows.loc[0.05, "gap"] == pytest.approx(0.75 - 0.75) and at["known_exactly"] == pytest.approx(2 / 4)
    assert (at["seconds_linear_bounds"], at["seconds_milp"]) == pytest.approx((0.5, 2.0))


def test_the_radius_figure_shades_between_certified_and_attacked(store, report):
    palette = plots.model_palette(["mnist/alpha", "mnist/beta"])
    examples = read_table(store, Table.EXAMPLES)
    certificates = read_table(store, Table.CERTIFICATES)

    def bands(figure) -> int:
        return sum(isinstance(collection, PolyCollection) for axis in figure.axes for collection in axis.collections)

    # seaborn draws (empty) error bands of its own: the certificates add one band, mnist/alpha's.
    without = bands(plots.accuracy_against_radius(examples, [MAIN_BALL], palette))
    assert bands(plots.accuracy_against_radius(examples, [MAIN_BALL], palette, certificates)) == without + 1
    assert "robust_accuracy" in {figure.name for figure in report.figures}


def test_certificate_violations_find_a_planted_contradiction_and_the_page_warns(tmp_path, store):
    assert certificate_violations(read_table(store, Table.EXAMPLES), read_table(store, Table.CERTIFICATES)).empty
    write_cell(tmp_path, "mnist/gamma", attack("plan_pgd_box"), [0.05, INF])
    write_certificates(tmp_path, "mnist/gamma", [0.1, 0.1])
    violations = certificate_violations(read_table(tmp_path, Table.EXAMPLES), read_table(tmp_path, Table.CERTIFICATES))
    assert violations[["model", "example_index"]].drop_duplicates().values.tolist() == [["mnist/gamma", 0]]
    assert sorted(violations["eps"]) == [0.05, 0.1] and (violations["verified_distance"] == 0.05).all()
    assert np.array_equal(violations["kernel_size"], [5.0, 5.0])
    page = build_report(tmp_path).html()
    assert 'role="alert"' in page and "Warning: 2 certificate(s) contradicted by verified attacks" in page
