"""The report page in a real headless Chromium, served by a real gateway process:
sign in through the form, then read the charts and tables from the DOM."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from gateway.db import get_engine, migrate
from tests.support.gateway_process import GatewayProcess
from tests.support.usage_data import seed_known_usage

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs /usr/bin/chromium")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    data_dir: Path = tmp_path_factory.mktemp("gw-report-page")
    url = f"sqlite:///{data_dir / 'bearpaw.db'}"
    migrate(url)
    seed_known_usage(get_engine(url))
    gw = GatewayProcess(data_dir, backends=[], env={"BEARPAW_CACHE__ENABLED": "false"}).start()
    yield gw
    gw.stop()


def test_page_shows_charts_and_rows(gateway: GatewayProcess) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{gateway.url}/admin/reports/page?start=2026-03-01&end=2026-04-01")
            # Not signed in: the login form.
            assert page.url.endswith("/admin/reports/login")
            page.fill("input[name=key]", gateway.admin_key)
            page.click("button[type=submit]")
            page.wait_for_selector("#chart-cost-by-day")
            assert page.title() == "Bearpaw usage and cost"

            # The filters of the first visit are lost at sign-in; set them in the form.
            page.fill("input[name=start]", "2026-03-01")
            page.fill("input[name=end]", "2026-04-01")
            page.click("form.filters button")
            page.wait_for_url("**end=2026-04-01**")

            cards = {
                c: page.inner_text(f"#card-{c} b")
                for c in ("requests", "tokens", "cached", "cost", "avoided", "batch")
            }
            assert cards == {
                "requests": "5",
                "tokens": "1,815",
                "cached": "150",
                "cost": "$1.8300",
                "avoided": "$0.3000",
                "batch": "$1.5000",
            }

            # Three charts, bars carrying their values.
            assert page.locator("svg.chart").count() == 3
            day_bars = page.eval_on_selector_all(
                "#chart-cost-by-day rect.bar[data-series=cost]",
                "els => els.map(e => [e.dataset.label, Number(e.dataset.value)])",
            )
            assert day_bars == [["2026-03-01", 0.3], ["2026-03-02", 1.53]]
            model_bars = page.eval_on_selector_all(
                "#chart-tokens-by-model rect.bar",
                "els => els.map(e => [e.dataset.label, e.dataset.series, Number(e.dataset.value)])",
            )
            assert sorted(model_bars) == [
                ["big", "backend tokens", 1500],
                ["big", "cached tokens", 0],
                ["small", "backend tokens", 165],
                ["small", "cached tokens", 150],
            ]
            widths = page.eval_on_selector_all(
                "#chart-cost-by-tenant rect.bar[data-series=cost]",
                "els => els.map(e => e.getBoundingClientRect().width)",
            )
            assert len(widths) == 2 and widths[0] > widths[1] > 0  # acme costs more

            tenant_rows = page.eval_on_selector_all(
                "#table-tenant tbody tr",
                "rows => rows.map(r => [...r.cells].map(c => c.innerText))",
            )
            assert [r[0] for r in tenant_rows] == ["acme", "globex"]
            assert tenant_rows[0][1:4] == ["4", "1", "1"]  # requests, errors, cache hits
            assert page.locator("#table-day tbody tr").count() == 2

            # The CSV link works with the session cookie.
            href = page.get_attribute("#export-csv", "href")
            assert href is not None
            csv_text = page.evaluate("h => fetch(h).then(r => r.text())", href)
            assert csv_text.splitlines()[0].startswith("tenant,model,day,requests")
            assert len(csv_text.strip().splitlines()) == 1 + 3
        finally:
            browser.close()
