"""Admin API (behind BEARPAW_ADMIN_KEY): tenants, keys, cache purge."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from gateway import tenants as svc
from gateway.auth import AdminDep
from gateway.db import ApiKey, Tenant
from gateway.db.ids import unix
from gateway.errors import APIError

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    tier: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    monthly_budget_usd: float | None = None
    budget_hard: bool | None = None
    cache_enabled: bool | None = None
    cache_allow_sampling: bool | None = None
    cache_operating_point: str | None = None
    cache_max_error: float | None = None


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tier: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    monthly_budget_usd: float | None = None
    budget_hard: bool | None = None
    cache_enabled: bool | None = None
    cache_allow_sampling: bool | None = None
    cache_operating_point: str | None = None
    cache_max_error: float | None = None


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    rpm_limit: int | None = None
    tpm_limit: int | None = None


def tenant_json(t: Tenant) -> dict[str, Any]:
    data = t.model_dump(exclude={"created_at"})
    return {"object": "tenant", **data, "created_at": unix(t.created_at)}


def key_json(k: ApiKey) -> dict[str, Any]:
    return {
        "object": "api_key",
        "id": k.id,
        "tenant_id": k.tenant_id,
        "name": k.name,
        "prefix": k.prefix,
        "rpm_limit": k.rpm_limit,
        "tpm_limit": k.tpm_limit,
        "created_at": unix(k.created_at),
        "revoked_at": unix(k.revoked_at),
    }


async def _svc(request: Request, fn: Any, *args: Any, **kwargs: Any) -> Any:
    state = request.app.state.bearpaw
    try:
        return await state.run_sync(lambda: fn(state.engine, *args, **kwargs))
    except svc.TenantError as exc:
        status = 404 if str(exc).startswith("no ") else 400
        raise APIError(status, str(exc)) from None


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantIn, request: Request) -> dict[str, Any]:
    fields = body.model_dump(exclude_none=True)
    name = fields.pop("name")
    return tenant_json(await _svc(request, svc.create_tenant, name, **fields))


@router.get("/tenants")
async def list_tenants(request: Request) -> dict[str, Any]:
    rows = await _svc(request, svc.list_tenants)
    return {"object": "list", "data": [tenant_json(t) for t in rows]}


@router.get("/tenants/{ref}")
async def get_tenant(ref: str, request: Request) -> dict[str, Any]:
    return tenant_json(await _svc(request, svc.get_tenant, ref))


@router.patch("/tenants/{ref}")
async def update_tenant(ref: str, body: TenantPatch, request: Request) -> dict[str, Any]:
    tenant = await _svc(request, svc.update_tenant, ref, **body.model_dump(exclude_unset=True))
    request.app.state.bearpaw.key_cache.clear()
    return tenant_json(tenant)


@router.post("/tenants/{ref}/keys", status_code=201)
async def create_key(ref: str, body: KeyIn, request: Request) -> dict[str, Any]:
    issued = await _svc(request, svc.create_key, ref, body.name, body.rpm_limit, body.tpm_limit)
    # The secret is in this answer only; it is never stored or shown again.
    return {**key_json(issued.key), "key": issued.secret}


@router.get("/keys")
async def list_keys(request: Request, tenant: str | None = None) -> dict[str, Any]:
    rows = await _svc(request, svc.list_keys, tenant)
    return {"object": "list", "data": [key_json(k) for k in rows]}


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
    key = await _svc(request, svc.revoke_key, key_id)
    request.app.state.bearpaw.key_cache.clear()
    return key_json(key)


@router.post("/tenants/{ref}/cache/purge")
async def purge_cache(ref: str, request: Request) -> dict[str, Any]:
    state = request.app.state.bearpaw
    tenant = await _svc(request, svc.get_tenant, ref)
    if state.cache is None:
        return {"object": "cache.purge", "tenant_id": tenant.id, "deleted": 0}
    deleted = await state.cache.purge(tenant.id)
    return {"object": "cache.purge", "tenant_id": tenant.id, "deleted": deleted}
