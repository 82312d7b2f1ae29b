"""Who is calling: a plain snapshot of the key and tenant, safe to cache and pass to workers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cache.policy import CachePolicy
from gateway.db import ApiKey, Tenant

# Tenant tier -> vLLM request priority (lower runs first under
# --scheduling-policy priority).
TIER_PRIORITY = {"interactive": 0, "standard": 5, "batch": 10}


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    tenant_name: str
    key_id: str | None
    tier: str = "standard"
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    key_rpm_limit: int | None = None
    key_tpm_limit: int | None = None
    monthly_budget_usd: float | None = None
    budget_hard: bool = True
    cache_enabled: bool = True
    cache_allow_sampling: bool = False
    cache_operating_point: str = "balanced"
    cache_max_error: float | None = None

    @classmethod
    def of(cls, key: ApiKey | None, tenant: Tenant) -> Caller:
        return cls(
            tenant_id=tenant.id,
            tenant_name=tenant.name,
            key_id=key.id if key else None,
            tier=tenant.tier,
            rpm_limit=tenant.rpm_limit,
            tpm_limit=tenant.tpm_limit,
            key_rpm_limit=key.rpm_limit if key else None,
            key_tpm_limit=key.tpm_limit if key else None,
            monthly_budget_usd=tenant.monthly_budget_usd,
            budget_hard=tenant.budget_hard,
            cache_enabled=tenant.cache_enabled,
            cache_allow_sampling=tenant.cache_allow_sampling,
            cache_operating_point=tenant.cache_operating_point,
            cache_max_error=tenant.cache_max_error,
        )

    @property
    def priority(self) -> int:
        return TIER_PRIORITY.get(self.tier, TIER_PRIORITY["standard"])

    @property
    def cache_policy(self) -> CachePolicy:
        return CachePolicy(
            enabled=self.cache_enabled,
            allow_sampling=self.cache_allow_sampling,
            operating_point=self.cache_operating_point,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Caller:
        # Jobs and batches store this snapshot; ignore fields a newer or older
        # release wrote so that queued work survives an upgrade.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
