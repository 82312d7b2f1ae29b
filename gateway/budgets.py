"""Monthly budgets per tenant: hard ones refuse, soft ones warn.

The month-to-date spend of a tenant comes from its usage records. Summing them
per request would put a query on the hot path, so the sum is kept in a store
for `refresh_s` seconds and each record's cost is added to it as the record
is written; when the entry expires it is read again from the database, which
also picks up spend written by processes this one does not hear from (Celery
workers, other gateways without Redis). With Redis configured every gateway
process reads and adds to the same entry, so they agree on a tenant's spend.

A budget is checked before the request runs and a request is billed after, so
a tenant's concurrent requests can overshoot a hard budget by what they cost
together; the next request after that is refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from gateway.caller import Caller
from gateway.db import UsageRecord
from gateway.errors import APIError
from gateway.resilience.dependencies import (
    Dependencies,
    is_database_error,
    is_redis_error,
    unavailable,
)

log = logging.getLogger("bearpaw.budgets")

WARNING_HEADER = "x-bearpaw-budget-warning"
REMAINING_HEADER = "x-bearpaw-budget-remaining-usd"


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(now: datetime) -> datetime:
    start = month_start(now)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def month_to_date_spend(engine: Engine, tenant_id: str, now: datetime) -> float:
    stmt = select(func.coalesce(func.sum(UsageRecord.cost_usd), 0.0)).where(
        UsageRecord.tenant_id == tenant_id,
        UsageRecord.created_at >= month_start(now),
        UsageRecord.created_at < next_month_start(now),
    )
    with engine.connect() as conn:
        return float(conn.execute(stmt).scalar_one())


class SpendStore(Protocol):
    async def get(self, key: str) -> float | None: ...

    async def put(self, key: str, value: float, ttl: float) -> None: ...

    async def add(self, key: str, amount: float) -> None:
        """Adds to an entry that exists; a missing one is left to be loaded."""
        ...


class MemorySpend:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[str, tuple[float, float]] = {}

    async def get(self, key: str) -> float | None:
        item = self._entries.get(key)
        if item is None or item[0] < self.clock():
            return None
        return item[1]

    async def put(self, key: str, value: float, ttl: float) -> None:
        self._entries[key] = (self.clock() + ttl, value)

    async def add(self, key: str, amount: float) -> None:
        item = self._entries.get(key)
        if item is not None:
            self._entries[key] = (item[0], item[1] + amount)


# Adding to a missing entry would create one that lacks the month's earlier
# spend; leave it missing so the next check loads the full sum.
_ADD_IF_PRESENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
end
return false
"""


class RedisSpend:
    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self.client = redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        self._add = self.client.register_script(_ADD_IF_PRESENT)

    async def get(self, key: str) -> float | None:
        value = await self.client.get(key)
        return None if value is None else float(value)

    async def put(self, key: str, value: float, ttl: float) -> None:
        # NX: another process that loaded first may already be adding to it.
        await self.client.set(key, repr(value), px=int(ttl * 1000), nx=True)

    async def add(self, key: str, amount: float) -> None:
        await self._add(keys=[key], args=[repr(amount)])

    async def close(self) -> None:
        await self.client.aclose()


class BudgetGuard:
    """The pipeline's `budget_check` hook and the observer that keeps spend current."""

    def __init__(
        self,
        engine: Engine,
        store: SpendStore,
        refresh_s: float = 30.0,
        warn_ratio: float = 0.8,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        deny_on_error: bool = False,
        dependencies: Dependencies | None = None,
        retry_after_s: int = 5,
    ) -> None:
        self.engine = engine
        # A hard budget whose spend cannot be read: refuse (503) instead of
        # serving unmetered against it (`resilience.budget_on_error: deny`).
        self.deny_on_error = deny_on_error
        self.dependencies = dependencies
        self.retry_after_s = retry_after_s
        self.store = store
        self.refresh_s = refresh_s
        self.warn_ratio = warn_ratio
        self.now = now
        self._tasks: set[asyncio.Task[Any]] = set()

    def _key(self, tenant_id: str, when: datetime) -> str:
        return f"bearpaw:spend:{tenant_id}:{when.astimezone(UTC):%Y-%m}"

    async def spend(self, tenant_id: str) -> float:
        """Month-to-date spend of a tenant, USD."""
        now = self.now()
        key = self._key(tenant_id, now)
        value = await self.store.get(key)
        if value is None:
            value = await asyncio.to_thread(month_to_date_spend, self.engine, tenant_id, now)
            await self.store.put(key, value, self.refresh_s)
        return value

    async def __call__(self, caller: Caller) -> dict[str, str]:
        budget = caller.monthly_budget_usd
        if budget is None:
            return {}
        try:
            if self._shared_store_down():
                raise ConnectionError("the spend store (Redis) is down")
            spent = await self.spend(caller.tenant_id)
        except Exception as exc:
            return self._unreadable(caller, exc)
        headers = {REMAINING_HEADER: f"{max(0.0, budget - spent):.6f}"}
        if spent >= budget:
            if caller.budget_hard:
                now = self.now()
                retry = max(1, int((next_month_start(now) - now).total_seconds()))
                raise APIError(
                    429,
                    f"You exceeded your current quota: tenant {caller.tenant_name} has spent "
                    f"${spent:.4f} of its ${budget:.2f} monthly budget.",
                    code="insufficient_quota",
                    type="insufficient_quota",
                    headers={"retry-after": str(retry), **headers},
                )
            headers[WARNING_HEADER] = (
                f"monthly budget exceeded: spent ${spent:.4f} of ${budget:.2f} (soft limit)"
            )
        elif spent >= budget * self.warn_ratio:
            headers[WARNING_HEADER] = (
                f"{spent / budget:.0%} of monthly budget used: ${spent:.4f} of ${budget:.2f}"
            )
        return headers

    def _shared_store_down(self) -> bool:
        deps = self.dependencies
        return isinstance(self.store, RedisSpend) and deps is not None and deps.is_down("redis")

    def _unreadable(self, caller: Caller, exc: Exception) -> dict[str, str]:
        name = "database" if is_database_error(exc) else "redis"
        if self.dependencies is not None and (is_database_error(exc) or is_redis_error(exc)):
            self.dependencies.failed(name, exc)
        if self.deny_on_error and caller.budget_hard:
            raise unavailable(name, self.retry_after_s, "a hard budget's spend cannot be read")
        # An unreadable spend must not take the gateway down with it.
        log.warning("could not read spend of %s; admitting", caller.tenant_id, exc_info=exc)
        return {}

    def observe(self, record: UsageRecord) -> None:
        """Adds a written record's cost to its tenant's spend (sync: the
        pipeline's observer hook)."""
        if not record.cost_usd or self._shared_store_down():
            return
        key = self._key(record.tenant_id, record.created_at or self.now())
        task = asyncio.get_running_loop().create_task(self.store.add(key, record.cost_usd))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not add spend", exc_info=task.exception())

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def build_budget_guard(
    redis_url: str | None,
    engine: Engine,
    refresh_s: float,
    deny_on_error: bool = False,
    dependencies: Dependencies | None = None,
    retry_after_s: int = 5,
) -> BudgetGuard:
    """The guard a gateway process uses: spend shared through Redis when configured."""
    store: SpendStore = RedisSpend(redis_url) if redis_url else MemorySpend()
    return BudgetGuard(
        engine,
        store,
        refresh_s=refresh_s,
        deny_on_error=deny_on_error,
        dependencies=dependencies,
        retry_after_s=retry_after_s,
    )


async def close_budget_guard(guard: BudgetGuard) -> None:
    await guard.drain()
    if isinstance(guard.store, RedisSpend):
        await guard.store.close()
