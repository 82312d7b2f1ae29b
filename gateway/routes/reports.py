"""Cost reports over HTTP: a JSON/CSV API and a page with charts.

Both are behind the admin key. The API takes it like the rest of the admin
API (`Authorization: Bearer <admin key>`). A browser cannot send that header
on its own, so the page also accepts the console's session cookie
(gateway/console/session.py: signed, HttpOnly, SameSite=Strict, scoped to
/admin): open `/admin/reports/login` (or `/admin/login`) and enter the admin
key. `?key=<admin key>` on the page URL does the same login in one step for
bookmarks and scripts and then redirects to the URL without it, so the key does
not stay in the address bar or history.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway.charts import PALETTE, Series, bar_chart
from gateway.console import session
from gateway.errors import APIError
from gateway.reports import Report, parse_group_by, usage_report

router = APIRouter(prefix="/admin/reports", tags=["reports"])


def _admin_key(request: Request) -> str:
    return session.admin_key(request)


def _authorized(request: Request) -> bool:
    return session.bearer_ok(request) or session.current(request) is not None


def _require(request: Request) -> None:
    if not _authorized(request):
        raise APIError(401, "Incorrect admin key provided.", code="invalid_api_key")


def _parse_time(value: str | None, name: str) -> datetime | None:
    """ISO date or datetime; without a zone it is UTC."""
    if not value:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise APIError(
            400, f"Invalid value for '{name}': expected an ISO date", param=name
        ) from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


async def _report(
    request: Request, group_by: str, tenant: str | None, start: str | None, end: str | None
) -> Report:
    try:
        groups = parse_group_by(group_by)
    except ValueError as exc:
        raise APIError(400, str(exc), param="group_by") from None
    state = request.app.state.bearpaw
    since, until = _parse_time(start, "start"), _parse_time(end, "end")
    return await state.run_sync(
        lambda: usage_report(state.engine, groups, tenant or None, since, until)
    )


@router.get("/usage")
async def usage(
    request: Request,
    group_by: str = "tenant",
    tenant: str | None = None,
    start: str | None = None,
    end: str | None = None,
    format: str = "json",
) -> Response:
    """Usage per tenant, model or day (comma-separate several: `tenant,day`)."""
    _require(request)
    if format not in ("json", "csv"):
        raise APIError(400, "Invalid value for 'format': json or csv", param="format")
    report = await _report(request, group_by, tenant, start, end)
    if format == "csv":
        return Response(
            report.to_csv(),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="bearpaw-usage.csv"'},
        )
    return Response(_json(report.as_dict()), media_type="application/json")


def _json(data: dict[str, Any]) -> bytes:
    return orjson.dumps(data)


# ------------------------------------------------------------------ the page

_STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:18px}
table{border-collapse:collapse;margin:8px 0} td,th{border-bottom:1px solid #eee;padding:4px 10px}
td.n{text-align:right;font-variant-numeric:tabular-nums}
form.filters{display:flex;gap:8px;align-items:end;flex-wrap:wrap}
form.filters label{display:flex;flex-direction:column;font-size:12px}
.chart{display:block;margin:8px 0}
"""


def _html(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>",
        headers={"cache-control": "no-store"},
    )


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, error: str = "") -> HTMLResponse:
    _admin_key(request)
    note = '<p id="login-error">Incorrect admin key.</p>' if error else ""
    return _html(
        "Bearpaw reports: sign in",
        f"<h1>Bearpaw reports</h1>{note}"
        '<form method="post" action="/admin/reports/login">'
        '<label>Admin key <input type="password" name="key" autofocus></label> '
        '<button type="submit">Sign in</button></form>',
    )


def _signed_in(request: Request, target: str) -> RedirectResponse:
    return session.sign_in(request, target)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    key = str(form.get("key") or "")
    if not hmac.compare_digest(key.encode(), _admin_key(request).encode()):
        return RedirectResponse("/admin/reports/login?error=1", status_code=303)
    return _signed_in(request, "/admin/reports/page")


@router.get("/page", response_class=HTMLResponse)
async def page(
    request: Request,
    tenant: str | None = None,
    start: str | None = None,
    end: str | None = None,
    key: str | None = None,
) -> Response:
    admin = _admin_key(request)
    query = {k: v for k, v in (("tenant", tenant), ("start", start), ("end", end)) if v}
    clean = "/admin/reports/page" + (f"?{urlencode(query)}" if query else "")
    if key is not None:
        if not hmac.compare_digest(key.encode(), admin.encode()):
            return RedirectResponse("/admin/reports/login?error=1", status_code=303)
        return _signed_in(request, clean)
    if not _authorized(request):
        return RedirectResponse("/admin/reports/login", status_code=303)
    if not start and not end:
        # The current month so far, by default: what budgets are measured on.
        now = datetime.now(UTC)
        start = f"{now:%Y-%m}-01"
    by_tenant = await _report(request, "tenant", tenant, start, end)
    by_model = await _report(request, "model", tenant, start, end)
    by_day = await _report(request, "day", tenant, start, end)
    return _html("Bearpaw usage and cost", _page_body(by_tenant, by_model, by_day, query, start))


def _page_body(
    by_tenant: Report, by_model: Report, by_day: Report, query: dict[str, str], start: str | None
) -> str:
    t = by_tenant.totals
    cards = "".join(
        f'<div class="card" id="card-{cid}">{escape(label)}<b>{value}</b></div>'
        for cid, label, value in (
            ("requests", "Requests", f"{t.requests:,}"),
            ("tokens", "Tokens", f"{t.total_tokens:,}"),
            ("cached", "Cached tokens", f"{t.cached_tokens:,}"),
            ("cost", "Cost", f"${t.cost_usd:,.4f}"),
            ("avoided", "Avoided by cache", f"${t.cost_avoided_usd:,.4f}"),
            ("batch", "Batch savings", f"${t.batch_discount_usd:,.4f}"),
        )
    )
    days = [r.group["day"] for r in by_day.rows]
    models = [r.group["model"] for r in by_model.rows]
    tenants = [r.group["tenant"] for r in by_tenant.rows]
    charts = [
        bar_chart(
            "chart-cost-by-day",
            "Cost per day (USD)",
            days,
            [
                Series("cost", [r.cost_usd for r in by_day.rows], PALETTE[0]),
                Series("avoided by cache", [r.cost_avoided_usd for r in by_day.rows], PALETTE[1]),
                Series("batch savings", [r.batch_discount_usd for r in by_day.rows], PALETTE[2]),
            ],
            money=True,
        ),
        bar_chart(
            "chart-tokens-by-model",
            "Tokens per model",
            models,
            [
                Series(
                    "backend tokens",
                    [r.backend_prompt_tokens + r.backend_completion_tokens for r in by_model.rows],
                    PALETTE[0],
                ),
                Series("cached tokens", [r.cached_tokens for r in by_model.rows], PALETTE[1]),
            ],
        ),
        bar_chart(
            "chart-cost-by-tenant",
            "Cost per tenant (USD)",
            tenants,
            [
                Series("cost", [r.cost_usd for r in by_tenant.rows], PALETTE[0]),
                Series(
                    "avoided by cache", [r.cost_avoided_usd for r in by_tenant.rows], PALETTE[1]
                ),
            ],
            money=True,
        ),
    ]
    tables = "".join(
        f"<h2>Per {name}</h2>{_table(f'table-{name}', report)}"
        for name, report in (("tenant", by_tenant), ("model", by_model), ("day", by_day))
    )
    filters = (
        '<form class="filters" method="get" action="/admin/reports/page">'
        f'<label>Tenant<input name="tenant" value="{escape(query.get("tenant", ""))}"></label>'
        f'<label>From<input name="start" type="date" value="{escape(start or "")}"></label>'
        f'<label>To (exclusive)<input name="end" type="date" '
        f'value="{escape(query.get("end", ""))}"></label>'
        '<button type="submit">Show</button></form>'
    )
    export = urlencode({"group_by": "tenant,model,day", "format": "csv", **query})
    return (
        "<h1>Bearpaw usage and cost</h1>"
        f"{filters}<div class=cards>{cards}</div>"
        f"<h2>Charts</h2>{''.join(charts)}{tables}"
        f'<p><a id="export-csv" href="/admin/reports/usage?{escape(export)}">'
        "Download CSV (tenant, model, day)</a></p>"
    )


def _table(table_id: str, report: Report) -> str:
    head = "".join(
        f"<th>{escape(c)}</th>"
        for c in (
            *report.group_by,
            "requests",
            "errors",
            "cache hits",
            "prompt tokens",
            "completion tokens",
            "cached tokens",
            "cost $",
            "avoided $",
            "batch saved $",
        )
    )
    body = []
    for row in report.rows:
        cells = [f"<td>{escape(row.group[g])}</td>" for g in report.group_by]
        cells += [
            f'<td class="n">{v}</td>'
            for v in (
                f"{row.requests:,}",
                f"{row.errors:,}",
                f"{row.cache_hits:,}",
                f"{row.prompt_tokens:,}",
                f"{row.completion_tokens:,}",
                f"{row.cached_tokens:,}",
                f"{row.cost_usd:.6f}",
                f"{row.cost_avoided_usd:.6f}",
                f"{row.batch_discount_usd:.6f}",
            )
        ]
        body.append(f"<tr>{''.join(cells)}</tr>")
    rows = "".join(body)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
