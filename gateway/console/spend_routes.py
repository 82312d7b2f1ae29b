"""Spend: totals and time series per tenant, model and day, from `usage_report`.

The page calls the same function as `bearpaw report` and the reports API, so
its figures cannot disagree with them for the same range.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway import tenants as svc
from gateway.charts import PALETTE, Series, bar_chart, line_chart, stacked_bars
from gateway.console import session
from gateway.console.common import db
from gateway.console.render import page
from gateway.reports import Report, usage_report

router = APIRouter()

MAX_DAYS = 400


def parse_day(value: str | None) -> datetime | None:
    """A YYYY-MM-DD date (or ISO datetime) as UTC; None when empty or invalid."""
    if not value:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def month_start(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y-%m}-01"


def day_axis(rows: Report, since: datetime | None, until: datetime | None) -> list[str]:
    """Every day of the range, so days without traffic show as zero, not as a
    gap the eye reads as a straight line between neighbours."""
    seen = [r.group["day"] for r in rows.rows]
    first = since.date() if since else (date.fromisoformat(seen[0]) if seen else None)
    last = (until - timedelta(microseconds=1)).date() if until else datetime.now(UTC).date()
    if seen:
        last = max(last, date.fromisoformat(seen[-1]))
    if first is None or (last - first).days > MAX_DAYS or last < first:
        return seen
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def _by_day(report: Report, days: list[str], metric: str) -> list[float]:
    values = {r.group["day"]: getattr(r, metric) for r in report.rows}
    return [float(values.get(d, 0)) for d in days]


@router.get("/console/spend")
async def spend(request: Request, tenant: str = "", start: str = "", end: str = "") -> Response:
    session.require(request)
    if not start and not end:
        start = month_start()  # the budget period by default
    since, until = parse_day(start), parse_day(end)
    who = tenant.strip() or None
    by_tenant = await db(request, usage_report, ["tenant"], who, since, until)
    by_model = await db(request, usage_report, ["model"], who, since, until)
    by_day = await db(request, usage_report, ["day"], who, since, until)
    days = day_axis(by_day, since, until)
    charts = [
        line_chart(
            "chart-money-by-day",
            "Per day: cost, cost avoided by the cache, batch savings (USD)",
            days,
            [
                Series("cost", _by_day(by_day, days, "cost_usd"), PALETTE[0]),
                Series("avoided by cache", _by_day(by_day, days, "cost_avoided_usd"), PALETTE[1]),
                Series("batch savings", _by_day(by_day, days, "batch_discount_usd"), PALETTE[2]),
            ],
            money=True,
        ),
        stacked_bars(
            "chart-tokens-by-day",
            "Tokens per day",
            days,
            [
                Series(
                    "prompt (backend)", _by_day(by_day, days, "backend_prompt_tokens"), PALETTE[0]
                ),
                Series(
                    "completion (backend)",
                    _by_day(by_day, days, "backend_completion_tokens"),
                    PALETTE[2],
                ),
                Series("answered from cache", _by_day(by_day, days, "cached_tokens"), PALETTE[1]),
            ],
        ),
        bar_chart(
            "chart-cost-by-tenant",
            "Cost per tenant (USD)",
            [r.group["tenant"] for r in by_tenant.rows],
            [Series("cost", [r.cost_usd for r in by_tenant.rows], PALETTE[0])],
            money=True,
        ),
        bar_chart(
            "chart-cost-by-model",
            "Cost per model (USD)",
            [r.group["model"] for r in by_model.rows],
            [Series("cost", [r.cost_usd for r in by_model.rows], PALETTE[0])],
            money=True,
        ),
    ]
    query = {k: v for k, v in (("tenant", tenant), ("start", start), ("end", end)) if v}
    names = [t.name for t in await db(request, svc.list_tenants)]
    return page(
        request,
        "spend.html",
        "spend",
        title="Spend",
        tenant=tenant,
        start=start,
        end=end,
        totals=by_tenant.totals,
        charts=charts,
        tables=(("tenant", by_tenant), ("model", by_model), ("day", by_day)),
        csv_href="/admin/console/spend.csv?" + urlencode(query),
        tenant_names=names,
    )


@router.get("/console/spend.csv")
async def spend_csv(request: Request, tenant: str = "", start: str = "", end: str = "") -> Response:
    session.require(request)
    if not start and not end:
        start = month_start()
    report = await db(
        request,
        usage_report,
        ["tenant", "model", "day"],
        tenant.strip() or None,
        parse_day(start),
        parse_day(end),
    )
    return Response(
        report.to_csv(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": 'attachment; filename="bearpaw-spend.csv"'},
    )
