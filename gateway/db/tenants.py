"""Tenants and their API keys."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from gateway.db.ids import new_id, utcnow


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"

    id: str = Field(default_factory=lambda: new_id("ten_"), primary_key=True)
    name: str = Field(index=True, unique=True)
    # Priority tier: interactive | standard | batch. Mapped to vLLM `priority`.
    tier: str = "standard"
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    monthly_budget_usd: float | None = None
    # hard: over-budget requests are refused; soft: answered with a warning header.
    budget_hard: bool = True
    cache_enabled: bool = True
    cache_allow_sampling: bool = False
    cache_operating_point: str = "balanced"
    # δ, the largest share of wrong semantic hits (cache/bound.py); None: the
    # fixed operating point decides, with no bound.
    cache_max_error: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(default_factory=lambda: new_id("key_"), primary_key=True)
    tenant_id: str = Field(foreign_key="tenants.id", index=True)
    name: str = ""
    # First characters of the secret, shown in listings so users can tell keys apart.
    prefix: str
    # sha256 of the full secret; the secret itself is never stored.
    key_hash: str = Field(index=True, unique=True)
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
