"""Request log: the latest usage records, filtered and paged; one record in full.

Bearpaw records no prompt or answer text (there is no body logging), so the
log shows the metering record of each request and says so.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.engine import Engine

from gateway.console import session
from gateway.console.common import db
from gateway.console.render import page
from gateway.db import ApiKey, Tenant, UsageRecord

router = APIRouter()

PAGE_SIZE = 50
STATUS_CLASSES = ("2xx", "4xx", "5xx")


def _query() -> Any:
    u, t, k = UsageRecord.__table__.c, Tenant.__table__.c, ApiKey.__table__.c
    return select(
        u, t.name.label("tenant_name"), k.prefix.label("key_prefix"), k.name.label("key_name")
    ).select_from(
        UsageRecord.__table__.outerjoin(Tenant.__table__, t.id == u.tenant_id).outerjoin(
            ApiKey.__table__, k.id == u.key_id
        )
    )


def search(
    engine: Engine, filters: dict[str, str], page_no: int
) -> tuple[list[dict[str, Any]], bool]:
    """One page of records, newest first, and whether there is a next page."""
    u, t = UsageRecord.__table__.c, Tenant.__table__.c
    stmt = _query()
    if filters.get("tenant"):
        stmt = stmt.where((u.tenant_id == filters["tenant"]) | (t.name == filters["tenant"]))
    if filters.get("model"):
        stmt = stmt.where(u.model == filters["model"])
    if filters.get("endpoint"):
        stmt = stmt.where(u.endpoint == filters["endpoint"])
    status = filters.get("status")
    if status in STATUS_CLASSES:
        low = int(status[0]) * 100
        stmt = stmt.where(u.status_code >= low, u.status_code < low + 100)
    stmt = stmt.order_by(u.created_at.desc(), u.request_id.desc())
    stmt = stmt.limit(PAGE_SIZE + 1).offset(page_no * PAGE_SIZE)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(stmt).mappings()]
    return rows[:PAGE_SIZE], len(rows) > PAGE_SIZE


def choices(engine: Engine) -> dict[str, list[str]]:
    """Values for the filter menus: the models and endpoints seen so far."""
    u = UsageRecord.__table__.c
    with engine.connect() as conn:
        models = [r[0] for r in conn.execute(select(u.model).distinct().order_by(u.model))]
        endpoints = [r[0] for r in conn.execute(select(u.endpoint).distinct().order_by(u.endpoint))]
    return {"models": models, "endpoints": endpoints}


def one(engine: Engine, request_id: str) -> dict[str, Any] | None:
    stmt = _query().where(UsageRecord.__table__.c.request_id == request_id)
    with engine.connect() as conn:
        row = conn.execute(stmt).mappings().first()
    return dict(row) if row else None


@router.get("/console/requests")
async def request_log(
    request: Request,
    tenant: str = "",
    model: str = "",
    endpoint: str = "",
    status: str = "",
    page_no: int = 0,
) -> Response:
    session.require(request)
    filters = {"tenant": tenant.strip(), "model": model, "endpoint": endpoint, "status": status}
    page_no = max(0, page_no)
    rows, more = await db(request, search, filters, page_no)
    menus = await db(request, choices)
    kept = {k: v for k, v in filters.items() if v}
    return page(
        request,
        "requests.html",
        "requests",
        title="Request log",
        rows=rows,
        filters=filters,
        statuses=STATUS_CLASSES,
        page_no=page_no,
        prev_href=f"?{urlencode({**kept, 'page_no': page_no - 1})}" if page_no else "",
        next_href=f"?{urlencode({**kept, 'page_no': page_no + 1})}" if more else "",
        **menus,
    )


@router.get("/console/requests/{request_id}")
async def request_detail(request: Request, request_id: str) -> Response:
    session.require(request)
    row = await db(request, one, request_id)
    if row is None:
        return page(
            request,
            "message.html",
            "requests",
            404,
            title="Not found",
            message=f"No request '{request_id}' in the log.",
            back="/admin/console/requests",
        )
    return page(request, "request.html", "requests", title="Request", r=row)
