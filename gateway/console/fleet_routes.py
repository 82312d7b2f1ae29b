"""Fleet: every model's replicas, live. The page renders the table once (so it
reads without scripts) and console.js refreshes it from fleet.json every 2 s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from sqlalchemy.engine import Engine

from gateway.console import session
from gateway.console.common import db, state
from gateway.console.render import page, when
from gateway.db import Tenant, UsageRecord

router = APIRouter()

RECENT = 10


def recent(engine: Engine) -> list[dict[str, Any]]:
    """The latest requests: which replica (or the cache) answered them."""
    u, t = UsageRecord.__table__.c, Tenant.__table__.c
    stmt = (
        select(
            u.request_id,
            u.created_at,
            u.model,
            u.backend,
            u.status_code,
            u.latency_ms,
            t.name.label("tenant"),
        )
        .select_from(UsageRecord.__table__.outerjoin(Tenant.__table__, t.id == u.tenant_id))
        .order_by(u.created_at.desc(), u.request_id.desc())
        .limit(RECENT)
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    return [
        {
            "request_id": r["request_id"],
            "time": when(r["created_at"]),
            "tenant": r["tenant"] or "",
            "model": r["model"],
            "backend": r["backend"] or "",
            "status": r["status_code"],
            "latency_ms": round(r["latency_ms"] or 0.0),
        }
        for r in rows
    ]


async def snapshot(request: Request) -> dict[str, Any]:
    replicas = state(request).pool.snapshot()
    last = await db(request, recent)
    # The replica that answered each model's latest request.
    latest: dict[str, str] = {}
    for r in reversed(last):
        latest[r["model"]] = r["backend"]
    for rep in replicas:
        rep["took_last"] = latest.get(rep["model"]) == rep["url"]
        kv = rep.get("kv_usage")
        rep["kv_pct"] = None if kv is None else round(100 * kv, 1)
    return {"replicas": replicas, "recent": last}


@router.get("/console/fleet")
async def fleet(request: Request) -> Response:
    session.require(request)
    data = await snapshot(request)
    return page(request, "fleet.html", "fleet", title="Fleet", **data)


@router.get("/console/fleet.json")
async def fleet_json(request: Request) -> Response:
    if session.current(request) is None and not session.bearer_ok(request):
        return JSONResponse({"error": "sign in"}, status_code=401)
    return JSONResponse(await snapshot(request), headers={"cache-control": "no-store"})
