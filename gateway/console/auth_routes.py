"""Sign-in, sign-out, the overview page and the console's static files."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import func
from sqlmodel import Session, col, select

from gateway.batch_store import ACTIVE
from gateway.charts import PALETTE, Series, line_chart
from gateway.console import session
from gateway.console.common import db, state
from gateway.console.render import STATIC, page
from gateway.console.spend_routes import day_axis, month_start, parse_day
from gateway.db import Tenant
from gateway.db.batches import Batch
from gateway.reports import usage_report

router = APIRouter()

STATIC_TYPES = {"console.css": "text/css", "console.js": "text/javascript"}


def _safe_next(value: str) -> str:
    # Only paths of this console: never an absolute URL (an open redirect).
    return value if value.startswith("/admin") and not value.startswith("//") else "/admin"


@router.get("/login")
async def login_form(request: Request, error: str = "", next: str = "/admin") -> Response:
    session.admin_key(request)  # 403 when the admin API is disabled
    return page(request, "login.html", "", title="Sign in", error=error, next=_safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    target = _safe_next(str(form.get("next") or "/admin"))
    if not session.key_matches(request, str(form.get("key") or "")):
        return RedirectResponse("/admin/login?error=1", status_code=303)
    return session.sign_in(request, target)


@router.post("/logout")
async def logout(request: Request) -> Response:
    await session.checked_form(request)
    return session.sign_out(request, "/admin/login")


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC_TYPES:
        return Response("not found", status_code=404)
    return FileResponse(
        STATIC / name, media_type=STATIC_TYPES[name], headers={"cache-control": "max-age=300"}
    )


def _counts(engine: Any) -> tuple[int, int]:
    with Session(engine) as s:
        tenants = s.exec(select(func.count()).select_from(Tenant)).one()
        active = s.exec(
            select(func.count()).select_from(Batch).where(col(Batch.status).in_(ACTIVE))
        ).one()
    return int(tenants), int(active)


@router.get("")
async def home(request: Request) -> Response:
    session.require(request)
    start = month_start()
    since = parse_day(start)
    by_day = await db(request, usage_report, ["day"], None, since, None)
    tenants, active = await db(request, _counts)
    days = day_axis(by_day, since, None)
    values = {r.group["day"]: r for r in by_day.rows}
    chart = line_chart(
        "chart-home-cost",
        "Cost per day this month (USD)",
        days,
        [
            Series("cost", [values[d].cost_usd if d in values else 0.0 for d in days], PALETTE[0]),
            Series(
                "avoided by cache",
                [values[d].cost_avoided_usd if d in values else 0.0 for d in days],
                PALETTE[1],
            ),
        ],
        money=True,
    )
    replicas = state(request).pool.snapshot()
    return page(
        request,
        "home.html",
        "home",
        title="Overview",
        start=start,
        totals=by_day.totals,
        tenants=tenants,
        active_batches=active,
        chart=chart,
        replicas=len(replicas),
        ready=sum(1 for r in replicas if r["ready"]),
        now=datetime.now(UTC),
    )
