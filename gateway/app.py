"""The FastAPI application and its startup/shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from backends.pool import ReplicaPool
from cache.semantic_cache import SemanticCache
from gateway.db import get_engine, migrate
from gateway.errors import install_handlers
from gateway.limits import Limiter, MemoryCounters, RedisCounters
from gateway.middleware import RequestIdMiddleware
from gateway.observability import GatewayMetrics, configure_logging
from gateway.pipeline import Pipeline
from gateway.pricing import PriceBook
from gateway.routes import admin, health, inference, models
from gateway.settings import Settings, get_settings
from gateway.state import GatewayState
from gateway.usage_writer import UsageWriter

log = logging.getLogger("bearpaw.app")

# Extension points: other packages' routers and startup hooks register here
# (files/batches/jobs), so this module does not import them.
EXTRA_ROUTERS: list = []
STARTUP_HOOKS: list = []


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        migrate(settings.db_url)
        engine = get_engine(settings.db_url)
        pool = ReplicaPool(settings.backends)
        await pool.start()
        cache = None
        if settings.cache.enabled:
            cache = SemanticCache(settings.cache, engine)
            await cache.start()
        usage = UsageWriter(engine)
        usage.start()
        if settings.limits.redis_url:
            counters = RedisCounters(settings.limits.redis_url)
        else:
            counters = MemoryCounters()
        limiter = Limiter(counters, settings.limits.default_rpm, settings.limits.default_tpm)
        prices = PriceBook(settings.prices)
        metrics = GatewayMetrics(pool)
        pipeline = Pipeline(pool, cache, usage, limiter, prices, observe=metrics.observe)
        state = GatewayState(
            settings=settings,
            engine=engine,
            pool=pool,
            cache=cache,
            usage=usage,
            limiter=limiter,
            prices=prices,
            pipeline=pipeline,
        )
        state.extras["registry"] = metrics.registry
        state.extras["metrics"] = metrics
        app.state.bearpaw = state
        middleware_metrics[0] = metrics
        for hook in STARTUP_HOOKS:
            await hook(app, state)
        log.info("bearpaw ready", extra={"path": settings.db_url})
        try:
            yield
        finally:
            state.extras["draining"] = True
            await pipeline.drain()
            await usage.close()
            if cache is not None:
                await cache.close()
            await pool.close()
            if isinstance(counters, RedisCounters):
                await counters.close()

    app = FastAPI(
        title="Bearpaw",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    middleware_metrics: list = [None]
    install_handlers(app)
    for router in (inference.router, models.router, admin.router, health.router, *EXTRA_ROUTERS):
        app.include_router(router)
    app.add_middleware(_LazyRequestId, holder=middleware_metrics)
    return app


class _LazyRequestId(RequestIdMiddleware):
    """The metrics object exists only after startup; look it up per request."""

    def __init__(self, app, holder: list) -> None:  # noqa: ANN001
        super().__init__(app)
        self._holder = holder

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        self.metrics = self._holder[0]
        await super().__call__(scope, receive, send)
