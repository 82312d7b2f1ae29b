"""Tenant and API-key management, shared by the CLI and the admin API."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway.db import ApiKey, Tenant
from gateway.db.ids import utcnow

KEY_PREFIX = "bp-"
TIERS = ("interactive", "standard", "batch")
OPERATING_POINTS = ("strict", "balanced", "aggressive")


class TenantError(ValueError):
    """A management request that cannot be honoured (duplicate, unknown, bad value)."""


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    secret: str  # shown once, never stored


TENANT_FIELDS = (
    "tier",
    "rpm_limit",
    "tpm_limit",
    "monthly_budget_usd",
    "budget_hard",
    "cache_enabled",
    "cache_allow_sampling",
    "cache_operating_point",
    "cache_max_error",
)


def _check_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - set(TENANT_FIELDS)
    if unknown:
        raise TenantError(f"unknown tenant field(s): {', '.join(sorted(unknown))}")
    if "tier" in fields and fields["tier"] not in TIERS:
        raise TenantError(f"tier must be one of {', '.join(TIERS)}")
    op = fields.get("cache_operating_point")
    if op is not None and op not in OPERATING_POINTS:
        raise TenantError(f"cache_operating_point must be one of {', '.join(OPERATING_POINTS)}")
    delta = fields.get("cache_max_error")
    if delta is not None and not 0.0 < delta < 1.0:
        raise TenantError("cache_max_error must be greater than 0 and less than 1")
    for name in ("rpm_limit", "tpm_limit", "monthly_budget_usd"):
        value = fields.get(name)
        if value is not None and value < 0:
            raise TenantError(f"{name} must not be negative")


def create_tenant(engine: Engine, name: str, **fields: Any) -> Tenant:
    if not name or not name.strip():
        raise TenantError("tenant name must not be empty")
    _check_fields(fields)
    with Session(engine, expire_on_commit=False) as s:
        if s.exec(select(Tenant).where(Tenant.name == name)).first():
            raise TenantError(f"tenant '{name}' already exists")
        tenant = Tenant(name=name, **{k: v for k, v in fields.items() if v is not None})
        s.add(tenant)
        s.commit()
        return tenant


def update_tenant(engine: Engine, ref: str, **fields: Any) -> Tenant:
    _check_fields(fields)
    with Session(engine, expire_on_commit=False) as s:
        tenant = _find_tenant(s, ref)
        for k, v in fields.items():
            setattr(tenant, k, v)
        s.add(tenant)
        s.commit()
        return tenant


def _find_tenant(s: Session, ref: str) -> Tenant:
    tenant = s.get(Tenant, ref) or s.exec(select(Tenant).where(Tenant.name == ref)).first()
    if tenant is None:
        raise TenantError(f"no tenant '{ref}'")
    return tenant


def get_tenant(engine: Engine, ref: str) -> Tenant:
    with Session(engine, expire_on_commit=False) as s:
        return _find_tenant(s, ref)


def list_tenants(engine: Engine) -> list[Tenant]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.exec(select(Tenant).order_by(Tenant.created_at)))


def create_key(
    engine: Engine,
    tenant_ref: str,
    name: str = "",
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
) -> IssuedKey:
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with Session(engine, expire_on_commit=False) as s:
        tenant = _find_tenant(s, tenant_ref)
        key = ApiKey(
            tenant_id=tenant.id,
            name=name,
            prefix=secret[:10],
            key_hash=hash_key(secret),
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
        )
        s.add(key)
        s.commit()
        return IssuedKey(key=key, secret=secret)


def list_keys(engine: Engine, tenant_ref: str | None = None) -> list[ApiKey]:
    with Session(engine, expire_on_commit=False) as s:
        q = select(ApiKey).order_by(ApiKey.created_at)
        if tenant_ref:
            q = q.where(ApiKey.tenant_id == _find_tenant(s, tenant_ref).id)
        return list(s.exec(q))


def revoke_key(engine: Engine, key_id: str) -> ApiKey:
    with Session(engine, expire_on_commit=False) as s:
        key = s.get(ApiKey, key_id)
        if key is None:
            raise TenantError(f"no key '{key_id}'")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            s.add(key)
            s.commit()
        return key


def authenticate(engine: Engine, secret: str) -> tuple[ApiKey, Tenant] | None:
    """The live key and its tenant for a presented secret, or None."""
    with Session(engine, expire_on_commit=False) as s:
        key = s.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(secret))).first()
        if key is None or key.revoked_at is not None:
            return None
        tenant = s.get(Tenant, key.tenant_id)
        return (key, tenant) if tenant else None
