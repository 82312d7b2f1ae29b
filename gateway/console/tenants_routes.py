"""Tenants and keys: list, search, create, edit; issue and revoke keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func
from sqlmodel import Session, select

from gateway import tenants as svc
from gateway.console import session
from gateway.console.common import db, state
from gateway.console.render import page
from gateway.db import ApiKey

router = APIRouter()

# The wrong-hit bound (issue 13) is edited here once the tenant service has it.
HAS_BOUND = "cache_max_error" in svc.TENANT_FIELDS
CHOICES = {"tiers": svc.TIERS, "operating_points": svc.OPERATING_POINTS, "has_bound": HAS_BOUND}


def _live_keys(engine: Any) -> dict[str, int]:
    with Session(engine) as s:
        rows = s.exec(
            select(ApiKey.tenant_id, func.count())
            .where(ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
            .group_by(ApiKey.tenant_id)
        ).all()
    return dict(rows)


def _int(value: str, name: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise svc.TenantError(f"{name} must be a whole number") from None


def _float(value: str, name: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise svc.TenantError(f"{name} must be a number") from None


def tenant_fields(form: dict[str, str]) -> dict[str, Any]:
    """The settings form as tenant fields. Empty numbers mean "no limit", and an
    unticked checkbox is absent from a form, so it means False."""
    fields = {
        "tier": form.get("tier", "standard"),
        "rpm_limit": _int(form.get("rpm_limit", ""), "Requests per minute"),
        "tpm_limit": _int(form.get("tpm_limit", ""), "Tokens per minute"),
        "monthly_budget_usd": _float(form.get("monthly_budget_usd", ""), "Monthly budget"),
        "budget_hard": form.get("budget_hard", "true") == "true",
        "cache_enabled": form.get("cache_enabled") == "true",
        "cache_allow_sampling": form.get("cache_allow_sampling") == "true",
        "cache_operating_point": form.get("cache_operating_point", "balanced"),
    }
    if HAS_BOUND:
        fields["cache_max_error"] = _float(form.get("cache_max_error", ""), "Wrong-hit bound")
    return fields


@router.get("/console/tenants")
async def tenants(request: Request, q: str = "") -> Response:
    session.require(request)
    rows = await db(request, svc.list_tenants)
    needle = q.strip().lower()
    if needle:
        rows = [t for t in rows if needle in t.name.lower() or needle in t.id.lower()]
    live = await db(request, _live_keys)
    return page(
        request,
        "tenants.html",
        "tenants",
        title="Tenants & keys",
        tenants=rows,
        q=q,
        live_keys=live,
        **CHOICES,
    )


async def _tenant_page(request: Request, ref: str, error: str = "", flash: str = "") -> Response:
    try:
        tenant = await db(request, svc.get_tenant, ref)
    except svc.TenantError as exc:
        return page(
            request,
            "message.html",
            "tenants",
            404,
            title="Not found",
            message=str(exc),
            back="/admin/console/tenants",
        )
    keys = await db(request, svc.list_keys, tenant.id)
    return page(
        request,
        "tenant.html",
        "tenants",
        400 if error else 200,
        title=f"Tenant {tenant.name}",
        t=tenant,
        keys=keys,
        error=error,
        flash=flash,
        **CHOICES,
    )


@router.post("/console/tenants")
async def create(request: Request) -> Response:
    form = await session.checked_form(request)
    try:
        tenant = await db(
            request, svc.create_tenant, form.get("name", "").strip(), **tenant_fields(form)
        )
    except svc.TenantError as exc:
        rows = await db(request, svc.list_tenants)
        live = await db(request, _live_keys)
        return page(
            request,
            "tenants.html",
            "tenants",
            400,
            title="Tenants & keys",
            tenants=rows,
            q="",
            live_keys=live,
            flash=f"Not created: {exc}",
            **CHOICES,
        )
    return RedirectResponse(f"/admin/console/tenants/{tenant.id}?created=1", status_code=303)


@router.get("/console/tenants/{ref}")
async def tenant(request: Request, ref: str, created: str = "", saved: str = "") -> Response:
    session.require(request)
    flash = "Tenant created." if created else "Saved." if saved else ""
    return await _tenant_page(request, ref, flash=flash)


@router.post("/console/tenants/{ref}")
async def update(request: Request, ref: str) -> Response:
    form = await session.checked_form(request)
    try:
        await db(request, svc.update_tenant, ref, **tenant_fields(form))
    except svc.TenantError as exc:
        return await _tenant_page(request, ref, error=str(exc))
    # Keys are cached with their tenant's settings for a few seconds.
    state(request).key_cache.clear()
    return RedirectResponse(f"/admin/console/tenants/{ref}?saved=1", status_code=303)


@router.post("/console/tenants/{ref}/keys")
async def issue_key(request: Request, ref: str) -> Response:
    form = await session.checked_form(request)
    try:
        issued = await db(request, svc.create_key, ref, form.get("name", "").strip())
        tenant = await db(request, svc.get_tenant, ref)
    except svc.TenantError as exc:
        return await _tenant_page(request, ref, error=str(exc))
    # The secret is in this page only; it is never stored or shown again.
    return page(
        request,
        "key_issued.html",
        "tenants",
        201,
        title="New API key",
        t=tenant,
        key=issued.key,
        secret=issued.secret,
    )


def _get_key(engine: Any, key_id: str) -> ApiKey | None:
    with Session(engine, expire_on_commit=False) as s:
        return s.get(ApiKey, key_id)


@router.get("/console/keys/{key_id}/revoke")
async def confirm_revoke(request: Request, key_id: str) -> Response:
    session.require(request)
    key = await db(request, _get_key, key_id)
    if key is None:
        return page(
            request,
            "message.html",
            "tenants",
            404,
            title="Not found",
            message=f"No key '{key_id}'.",
            back="/admin/console/tenants",
        )
    tenant = await db(request, svc.get_tenant, key.tenant_id)
    return page(
        request,
        "confirm.html",
        "tenants",
        title="Revoke key",
        question=f"Revoke key {key.prefix}… ({key.name or 'unnamed'}) of tenant {tenant.name}?",
        detail="Calls with it are refused within seconds. This cannot be undone.",
        action=f"/admin/console/keys/{key_id}/revoke",
        button="Revoke key",
        back=f"/admin/console/tenants/{tenant.id}",
    )


@router.post("/console/keys/{key_id}/revoke")
async def revoke(request: Request, key_id: str) -> Response:
    await session.checked_form(request)
    try:
        key = await db(request, svc.revoke_key, key_id)
    except svc.TenantError as exc:
        return page(
            request,
            "message.html",
            "tenants",
            404,
            title="Not found",
            message=str(exc),
            back="/admin/console/tenants",
        )
    state(request).key_cache.clear()
    return RedirectResponse(f"/admin/console/tenants/{key.tenant_id}", status_code=303)
