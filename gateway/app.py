"""The FastAPI application and its startup/shutdown."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.async_jobs import AsyncJobs
from gateway.auth import KeyCache
from gateway.console.router import install as install_console
from gateway.errors import install_handlers
from gateway.fastpath import GatewayApp
from gateway.middleware import AccessLog, RequestIdMiddleware
from gateway.observability import GatewayMetrics, QueueDepthPoller, configure_logging
from gateway.resilience.outbox import TaskOutbox
from gateway.resilience.probes import DependencyProbes, dependency_checks
from gateway.routes import (
    admin,
    batches,
    files,
    health,
    inference,
    jobs,
    latency,
    messages,
    models,
    passthrough,
    reports,
    responses,
)
from gateway.runtime import build_runtime
from gateway.settings import Settings, get_settings
from gateway.shutdown import install_drain
from gateway.state import GatewayState
from gateway.task_queue import TaskQueue

log = logging.getLogger("bearpaw.app")

# Extension points: other packages' routers and startup hooks register here
# (files/batches/jobs), so this module does not import them.
EXTRA_ROUTERS: list = []
STARTUP_HOOKS: list = []
SHUTDOWN_HOOKS: list = []


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Metrics need the pool, which the runtime builds: the observer looks
        # them up when a record arrives.
        holder: list[GatewayMetrics] = []
        runtime = await build_runtime(settings, observe=lambda r: holder[0].observe(r))
        metrics = GatewayMetrics(runtime.pool, cache=runtime.cache)
        holder.append(metrics)
        queue_depth = QueueDepthPoller(runtime.engine)
        queue_depth.start()
        metrics.set_queue_depth(queue_depth)
        state = GatewayState(
            settings=settings,
            engine=runtime.engine,
            pool=runtime.pool,
            cache=runtime.cache,
            usage=runtime.usage,
            limiter=runtime.limiter,
            prices=runtime.prices,
            pipeline=runtime.pipeline,
            key_cache=KeyCache(settings.resilience.key_ttl_s, settings.resilience.key_stale_s),
        )
        state.extras["registry"] = metrics.registry
        state.extras["metrics"] = metrics
        state.extras["budgets"] = runtime.budgets
        state.extras["responses"] = runtime.responses
        app.state.bearpaw = state
        middleware_metrics[0] = metrics
        resilience = settings.resilience
        dependencies = runtime.dependencies
        state.extras["dependencies"] = dependencies
        state.extras["usage_spool"] = runtime.usage.spool
        tasks = TaskQueue(settings.celery_broker_url, settings.workers.visibility_timeout_s)
        outbox = TaskOutbox(
            tasks,
            dependencies,
            reject_when_down=resilience.broker_on_error == "reject",
            retry_after_s=resilience.retry_after_s,
            interval_s=resilience.probe_interval_s,
        )
        outbox.start()
        state.extras["tasks"] = outbox
        state.extras["jobs"] = AsyncJobs(state.engine, outbox)
        probes = DependencyProbes(
            dependencies,
            dependency_checks(settings, runtime, outbox),
            interval_s=resilience.probe_interval_s,
        )
        probes.start()
        metrics.set_dependencies(dependencies, runtime.usage.spool, outbox)
        for hook in STARTUP_HOOKS:
            await hook(app, state)
        # SIGTERM flips /ready to 503 before uvicorn stops accepting (drain).
        restore_signals = install_drain(state.extras, settings.drain_seconds)
        if settings.gc_freeze:
            settle_heap()
        log.info("bearpaw ready", extra={"path": settings.db_url})
        try:
            yield
        finally:
            state.extras["draining"] = True
            restore_signals()
            await queue_depth.close()
            await probes.close()
            await outbox.close()
            for hook in SHUTDOWN_HOOKS:
                await hook(app, state)
            await runtime.close()
            tasks.close()

    app = GatewayApp(
        title="Bearpaw",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        telemetry=None
        if settings.opentelemetry
        else {"tracing": False, "metrics": False, "logs": False},
    )
    middleware_metrics: list = [None]
    install_handlers(app)
    for router in (
        inference.router,
        models.router,
        admin.router,
        reports.router,
        health.router,
        files.router,
        batches.router,
        jobs.router,
        latency.router,
        responses.router,
        messages.router,
        passthrough.router,
        *EXTRA_ROUTERS,
    ):
        app.include_router(router)
    install_console(app)
    access = AccessLog(middleware_metrics)
    app.add_middleware(_LazyRequestId, holder=middleware_metrics, access=access)
    if not settings.opentelemetry:
        # The hot inference routes skip the framework (gateway/fastpath.py);
        # with OpenTelemetry on, every request keeps FastAPI's native tracing.
        app.fast_access = access
    return app


# Young-generation collections per allocated container objects: a proxied
# request allocates a few hundred, so the default 700 collected every request
# or two; 20,000 keeps each young collection under a millisecond.
GC_GEN0_THRESHOLD = 20_000


def settle_heap() -> None:
    """Freezes what start-up built, so the collector stops re-scanning it.

    A started gateway holds a few hundred thousand long-lived objects
    (FastAPI, pydantic, SQLAlchemy, the cache's model and index); Python's
    full collection walks all of them, measured at 100-235 ms on the 2-core
    box, and under load it ran every few seconds: the p99 tail of a request
    that waited behind it. Frozen objects are never scanned again (they are
    still freed when their reference count drops; only cycles among them
    would stay). Runs once per process, after every start-up hook."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)


class _LazyRequestId(RequestIdMiddleware):
    """The metrics object exists only after startup: the access log looks it up
    through `holder` per request."""

    def __init__(self, app, holder: list, access: AccessLog) -> None:  # noqa: ANN001
        super().__init__(app, access=access)
        self._holder = holder
