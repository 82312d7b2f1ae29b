"""The objects a request needs to run (pool, cache, metering, limits, prices,
pipeline), built the same way for the gateway and for the workers, so a batch
line meets exactly the cache and metering an interactive request does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from backends.pool import ReplicaPool
from cache.semantic_cache import SemanticCache
from gateway.budgets import BudgetGuard, build_budget_guard, close_budget_guard
from gateway.db import UsageRecord, get_engine, migrate
from gateway.dialects.responses.service import ResponsesService
from gateway.limits import Limiter, MemoryCounters, RedisCounters
from gateway.pipeline import Call, Outcome, Pipeline
from gateway.pricing import PriceBook
from gateway.resilience.dependencies import Dependencies
from gateway.resilience.usage_spool import UsageSpool
from gateway.settings import Settings
from gateway.stream_latency import StreamLatencies
from gateway.usage_writer import UsageWriter


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    pool: ReplicaPool
    cache: SemanticCache | None
    usage: UsageWriter
    counters: MemoryCounters | RedisCounters
    limiter: Limiter
    prices: PriceBook
    pipeline: Pipeline
    budgets: BudgetGuard
    responses: ResponsesService
    dependencies: Dependencies

    async def serve(self, call: Call) -> Outcome:
        """Runs a call a worker took (async job or batch line): dialects that
        translate onto the pipeline first, every other endpoint straight in."""
        if call.endpoint == "responses":
            return await self.responses.run(call)
        return await self.pipeline.run(call)

    async def close(self) -> None:
        await self.pipeline.drain()
        await close_budget_guard(self.budgets)
        await self.usage.close()
        if self.cache is not None:
            await self.cache.close()
        await self.pool.close()
        if isinstance(self.counters, RedisCounters):
            await self.counters.close()


async def build_runtime(
    settings: Settings, observe: Callable[[UsageRecord], None] | None = None
) -> Runtime:
    """Migrates the database and starts everything; call `close()` when done.

    `observe` sees every usage record after it is written (gateway metrics)."""
    settings.ensure_dirs()
    migrate(settings.db_url)
    engine = get_engine(settings.db_url)
    pool = ReplicaPool(settings.backends)
    await pool.start()
    cache = None
    if settings.cache.enabled:
        cache = SemanticCache(settings.cache, engine)
        await cache.start()
    resilience = settings.resilience
    dependencies = Dependencies()
    usage = UsageWriter(
        engine,
        spool=UsageSpool(settings.usage_spool_dir),
        dependencies=dependencies,
        replay_interval_s=resilience.probe_interval_s,
    )
    usage.start()
    counters: MemoryCounters | RedisCounters
    if settings.limits.redis_url:
        counters = RedisCounters(settings.limits.redis_url)
    else:
        counters = MemoryCounters()
    limiter = Limiter(
        counters,
        settings.limits.default_rpm,
        settings.limits.default_tpm,
        fail_open=resilience.limits_on_error == "allow",
        dependencies=dependencies if settings.limits.redis_url else None,
        retry_after_s=resilience.retry_after_s,
    )
    prices = PriceBook(settings.prices)
    budgets = build_budget_guard(
        settings.limits.redis_url,
        engine,
        settings.limits.budget_refresh_s,
        deny_on_error=resilience.budget_on_error == "deny",
        dependencies=dependencies,
        retry_after_s=resilience.retry_after_s,
    )

    def observed(record: UsageRecord) -> None:
        budgets.observe(record)  # keeps month-to-date spend current
        if observe is not None:
            observe(record)

    pipeline = Pipeline(
        pool,
        cache,
        usage,
        limiter,
        prices,
        budget_check=budgets,
        observe=observed,
        finish_abandoned=resilience.on_client_disconnect == "finish",
        stream_latencies=StreamLatencies(),
    )
    return Runtime(
        settings,
        engine,
        pool,
        cache,
        usage,
        counters,
        limiter,
        prices,
        pipeline,
        budgets,
        ResponsesService(pipeline, engine, dependencies),
        dependencies,
    )
