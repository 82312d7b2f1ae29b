"""Cache: hit rate per tenant, semantic share, entries, purge (with confirmation)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine

from cache import store
from cache.calibration import measured_wrong_rates
from gateway import tenants as svc
from gateway.console import session
from gateway.console.common import db, state
from gateway.console.render import page
from gateway.db import Tenant, UsageRecord

router = APIRouter()


def per_tenant(engine: Engine) -> list[dict[str, Any]]:
    """Every tenant's cache outcomes (from usage records) and stored entries."""
    u, t = UsageRecord.__table__.c, Tenant.__table__.c
    outcomes = {
        r.tenant_id: r
        for r in _rows(
            engine,
            select(
                u.tenant_id,
                func.sum(case((u.cache == "hit", 1), else_=0)).label("hits"),
                func.sum(case((u.cache == "miss", 1), else_=0)).label("misses"),
                func.sum(case((u.cache == "bypass", 1), else_=0)).label("bypass"),
                func.sum(u.cost_avoided_usd).label("avoided"),
            ).group_by(u.tenant_id),
        )
    }
    store.create_table(engine)  # a gateway with the cache off never created it
    entries = dict(
        _rows(
            engine,
            select(store.CacheEntry.tenant, func.count()).group_by(store.CacheEntry.tenant),
        )
    )
    out = []
    for tenant in _rows(
        engine,
        select(t.id, t.name, t.cache_enabled, t.cache_operating_point, t.cache_max_error).order_by(
            t.name
        ),
    ):
        o = outcomes.get(tenant.id)
        hits, misses = (int(o.hits or 0), int(o.misses or 0)) if o else (0, 0)
        out.append(
            {
                "id": tenant.id,
                "name": tenant.name,
                "enabled": tenant.cache_enabled,
                "operating_point": tenant.cache_operating_point,
                "hits": hits,
                "misses": misses,
                "bypass": int(o.bypass or 0) if o else 0,
                # Of the requests the cache could answer (a hit or a miss).
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "avoided": float(o.avoided or 0) if o else 0.0,
                "entries": int(entries.get(tenant.id, 0)),
                "max_error": tenant.cache_max_error,
            }
        )
    return out


def _rows(engine: Engine, stmt: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(stmt))


@router.get("/console/cache")
async def cache_page(request: Request, purged: str = "", deleted: int = 0) -> Response:
    session.require(request)
    rows = await db(request, per_tenant)
    cache = state(request).cache
    stats = cache.stats() if cache is not None else None
    share = None
    if stats:
        hits = stats.get("hits_exact", 0) + stats.get("hits_semantic", 0)
        share = stats.get("hits_semantic", 0) / hits if hits else None
    if cache is not None:
        # The wrong rate measured on each tenant's own verdicts (issue 13's bound).
        deltas = {r["id"]: r["max_error"] for r in rows}
        measured = await db(request, measured_wrong_rates, cache.grid, deltas)
        for r in rows:
            r["wrong"] = measured.get(r["id"])
    flash = f"Purged {deleted} cache entries of {purged}." if purged else ""
    return page(
        request,
        "cache.html",
        "cache",
        title="Cache",
        rows=rows,
        stats=stats,
        semantic_share=share,
        enabled=cache is not None,
        flash=flash,
    )


@router.get("/console/cache/{ref}/purge")
async def confirm_purge(request: Request, ref: str) -> Response:
    session.require(request)
    try:
        tenant = await db(request, svc.get_tenant, ref)
    except svc.TenantError as exc:
        return page(
            request,
            "message.html",
            "cache",
            404,
            title="Not found",
            message=str(exc),
            back="/admin/console/cache",
        )
    return page(
        request,
        "confirm.html",
        "cache",
        title="Purge cache",
        question=f"Delete every cache entry of tenant {tenant.name}?",
        detail="Its next requests go to the backends and refill the cache.",
        action=f"/admin/console/cache/{tenant.id}/purge",
        button="Purge cache",
        back="/admin/console/cache",
    )


@router.post("/console/cache/{ref}/purge")
async def purge(request: Request, ref: str) -> Response:
    await session.checked_form(request)
    try:
        tenant = await db(request, svc.get_tenant, ref)
    except svc.TenantError as exc:
        return page(
            request,
            "message.html",
            "cache",
            404,
            title="Not found",
            message=str(exc),
            back="/admin/console/cache",
        )
    cache = state(request).cache
    if cache is not None:
        # Memory and table together, as the admin API does.
        deleted = await cache.purge(tenant.id)
    else:
        await db(request, store.create_table)
        deleted = await db(request, store.delete_tenant, tenant.id)
    query = urlencode({"purged": tenant.name, "deleted": deleted})
    return RedirectResponse(f"/admin/console/cache?{query}", status_code=303)
