"""leaderboard.html as a reader sees it: rendered in headless Chromium, clicked, photographed.

Needs Debian's ``chromium`` and the ``playwright`` package (no browser
download). Without them the tests skip, unless
``WASSERSTEIN_BENCH_REQUIRE_BROWSER=1`` (set by CI), where they fail.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os

import numpy as np
import pytest
from PIL import Image
from results_factory import attack, write_cell

from harness.report.browser import find_chromium, open_page
from harness.report import write_report

TABLE = "#leaderboard-mnist-wasserstein-k5-p1"
MODELS = 50


@pytest.fixture(scope="module", autouse=True)
def browser_available():
    missing = []
    if find_chromium() is None:
        missing.append("Chromium (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright (pip install playwright)")
    if missing:
        message = f"browser tests need {' and '.join(missing)}"
        if os.environ.get("WASSERSTEIN_BENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def fifty_models(tmp_path_factory):
    """50 models with random verified distances; two attacks on every fifth one; images for a few."""
    root = tmp_path_factory.mktemp("fifty")
    rng = np.random.default_rng(7)
    digits = rng.random((4, 1, 28, 28)).astype(np.float32)
    for number in range(MODELS):
        model = f"mnist/model_{number:02d}"
        scale = rng.uniform(0.1, 3.0)
        distances = np.where(rng.random(20) < 0.1, math.inf, rng.exponential(scale, 20))
        distances[distances > 1.8] = math.inf  # nothing is found beyond the largest radius searched
        write_cell(root, model, attack(), distances, clean_accuracy=rng.uniform(0.9, 1.0), images=digits if number < 3 else None)
        if number % 5 == 0:
            weaker = distances * 1.1
            write_cell(root, model, attack("projected_sinkhorn", lam=100.0), np.where(weaker > 1.8, math.inf, weaker))
    return write_report(root)


def _column(page, index: int) -> list[str]:
    return page.locator(f"{TABLE} tbody tr").evaluate_all(
        f"rows => rows.map(row => row.cells[{index}].getAttribute('data-value'))"
    )


def test_fifty_model_page_renders_offline_with_every_row_and_figure(fifty_models):
    with open_page(fifty_models) as (page, refused):
        assert page.locator(f"{TABLE} tbody tr").count() == MODELS
        names = page.locator(f"{TABLE} tbody tr td:nth-child(2)").all_inner_texts()
        assert sorted(names) == [f"mnist/model_{n:02d}" for n in range(MODELS)]
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 100)")
        assert page.locator("img").count() >= 3
        shot = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
    assert refused == []
    pixels = np.asarray(shot)
    ink = (pixels < 200).any(axis=2).mean()
    assert shot.size == (1400, 1000) and ink > 0.03, f"screenshot looks blank: {ink:.1%} of pixels drawn"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_clicking_a_header_sorts_the_rows_and_a_second_click_reverses(fifty_models):
    with open_page(fifty_models) as (page, _):
        ranks = [int(v) for v in _column(page, 0)]
        assert ranks == sorted(ranks)
        header = page.locator(f"{TABLE} thead").get_by_role("button", name="model", exact=True)
        header.click()
        ascending = _column(page, 1)
        assert ascending == sorted(ascending) and ascending[0] == "mnist/model_00"
        assert page.locator(f"{TABLE} thead th[aria-sort='ascending']").inner_text().startswith("model")
        header.click()
        assert _column(page, 1) == sorted(ascending, reverse=True)
        # Numbers sort as numbers; unknown values go last.
        page.locator(f"{TABLE} thead").get_by_role("button", name="robust @ 1.0").click()
        values = _column(page, 8)
        known = [float(v) for v in values if v != ""]
        assert known == sorted(known) and values[: len(known)] == [v for v in values if v != ""]
        page.locator(f"{TABLE} thead").get_by_role("button", name="median radius").click()
        medians = [float(v) for v in _column(page, 10)]
        assert medians == sorted(medians) and math.isinf(medians[-1]) and medians[0] < 1.0
